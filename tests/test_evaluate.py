"""Multiple-choice log-likelihood scoring (mor.eval.scoring): exact values on a hand-built model,
prefix reuse and batching against naive one-by-one scoring, tables and JSON."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import make_bpe_tokenizer as build_bpe_tokenizer
from conftest import make_tiny_llama
from mor.data import MultipleChoiceItem
from mor.eval.scoring import (
    accuracy_table,
    choice_length,
    encode_pair,
    evaluate_tasks,
    format_table,
    resolve_max_length,
    score_items,
    write_results_json,
)

# ---------------------------------------------------------------------------------------------
# Tiny offline models

def build_llama(vocab_size: int, seed: int = 0, max_position_embeddings: int = 2048):
    return make_tiny_llama(seed, vocab_size, hidden=64, max_position_embeddings=max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# Hand-built model: a bigram table whose log-probabilities we set


WORDS = ["<unk>", "</s>", "Q:", "sky?", "Answer:", "a", "bb", "cccccc", "zz"]
NEG = -60.0  # exp(-60) ~ 1e-26: "impossible" next words


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def bigram_table() -> torch.Tensor:
    ids = {w: i for i, w in enumerate(WORDS)}
    table = torch.zeros(len(WORDS), len(WORDS))  # uniform rows by default

    def row(prev, probs):
        table[ids[prev]] = NEG
        for word, p in probs.items():
            table[ids[prev], ids[word]] = math.log(p)

    row("Answer:", {"a": 0.4, "bb": 0.3, "cccccc": 0.2, "zz": 0.1})
    row("bb", {"a": 0.5, "cccccc": 0.2, "zz": 0.3})
    row("a", {"cccccc": 0.6, "zz": 0.4})
    row("Q:", {"a": 0.5, "bb": 0.5})
    return table


class BigramLM(torch.nn.Module):
    """logits[t] = table[input_ids[t]]. With ``with_cache`` it returns a (dummy) legacy
    tuple cache, so the prefix-reuse path runs; without, the scorer must fall back."""

    def __init__(self, with_cache: bool):
        super().__init__()
        self.table = torch.nn.Parameter(bigram_table(), requires_grad=False)
        self.with_cache = with_cache
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        out = SimpleNamespace(logits=self.table[input_ids])
        if self.with_cache and kwargs.get("use_cache"):
            past = kwargs.get("past_key_values")
            kv = input_ids[:, None, :, None].float()
            if past is not None:
                kv = torch.cat([past[0][0], kv], dim=2)
            out.past_key_values = ((kv, kv),)
        return out


def hand_items():
    ctx = "Q: sky?\nAnswer:"
    return [
        # log-probs ln .4, ln .3, ln .2; per character: -.92, -.60, -.27 -> acc picks 0, acc_norm 2
        MultipleChoiceItem("alpha", [ctx] * 3, [" a", " bb", " cccccc"], gold=2, source="h:1"),
        # ln(.3 * .5) = -1.90 (-0.47 per char) vs ln .1 = -2.30 (-1.15 per char): both pick 0
        MultipleChoiceItem("alpha", [ctx] * 2, [" bb a", " zz"], gold=0, source="h:2"),
        # fill-in-the-blank: per-choice contexts, shared continuation: ln .6 vs ln .2
        MultipleChoiceItem("beta", ["Q: a", "Q: bb"], [" cccccc", " cccccc"], gold=1, source="h:3"),
    ]


@pytest.mark.parametrize("with_cache", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_hand_built_scores_ranking_and_accuracy(with_cache, batch_size, caplog):
    model = BigramLM(with_cache)
    with caplog.at_level(logging.WARNING, logger="mor.eval.loglik"):
        scores = score_items(model, word_tokenizer(), hand_items(), batch_size=batch_size, progress=False)
    assert ("prefix reuse unavailable" in caplog.text) is (not with_cache)

    expected = [
        [math.log(0.4), math.log(0.3), math.log(0.2)],
        [math.log(0.3) + math.log(0.5), math.log(0.1)],
        [math.log(0.6), math.log(0.2)],
    ]
    for s, exp in zip(scores, expected):
        assert s.logprobs == pytest.approx(exp, abs=1e-5)
    assert [s.lengths for s in scores] == [[1, 2, 6], [4, 2], [6, 6]]
    assert [s.num_tokens for s in scores] == [[1, 1, 1], [2, 1], [1, 1]]
    assert [(s.pred, s.pred_norm) for s in scores] == [(0, 2), (0, 0), (0, 0)]
    assert [(s.correct, s.correct_norm) for s in scores] == [(False, True), (True, True), (False, False)]
    assert scores[1].is_greedy == [False, False]

    results = accuracy_table(scores)
    assert results["tasks"]["alpha"]["n"] == 2
    assert results["tasks"]["alpha"]["acc"] == 0.5
    assert results["tasks"]["alpha"]["acc_norm"] == 1.0
    assert results["tasks"]["alpha"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert results["tasks"]["beta"] == {
        "n": 1, "acc": 0.0, "acc_stderr": None, "acc_norm": 0.0, "acc_norm_stderr": None, "chance": 0.5
    }
    avg = results["average"]
    assert (avg["n"], avg["tasks"]) == (3, 2)
    assert avg["acc"] == pytest.approx(0.25)
    assert avg["acc_norm"] == pytest.approx(0.5)
    assert avg["chance"] == pytest.approx(((1 / 3 + 1 / 2) / 2 + 0.5) / 2)


def test_prefix_is_encoded_once_per_context():
    model = BigramLM(with_cache=True)
    score_items(model, word_tokenizer(), hand_items()[:2], batch_size=8, progress=False)
    # one prefix pass for the one distinct context (both items share it), one candidate pass
    # for the single two-token continuation
    assert model.calls == [(1, 3), (1, 1)]


def test_auto_reuse_skips_contexts_whose_continuations_dominate():
    # one shared 3-token context, two 6-token continuations: a prefix pass would save
    # 3 of 16 tokens, so "auto" scores both as full sequences in one forward
    long_item = MultipleChoiceItem("g", ["Q: sky?\nAnswer:"] * 2, [" a a a a a a", " bb bb bb bb bb bb"], 0)
    reference = None
    for reuse, calls in (("auto", [(2, 8)]), (True, [(1, 3), (2, 5)]), (False, [(2, 8)])):
        model = BigramLM(with_cache=True)
        scores = score_items(model, word_tokenizer(), [long_item], batch_size=8, progress=False, reuse_prefix=reuse)
        assert model.calls == calls, reuse
        reference = reference or scores[0].logprobs
        assert scores[0].logprobs == pytest.approx(reference, abs=1e-5)
    with pytest.raises(ValueError, match="reuse_prefix must be True, False or 'auto'"):
        score_items(BigramLM(True), word_tokenizer(), [long_item], progress=False, reuse_prefix="yes")


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    items = [MultipleChoiceItem("t", ["Q:"] * 2, [" bb", " a"], gold=1)]  # ln .5 each
    (s,) = score_items(BigramLM(True), word_tokenizer(), items, progress=False)
    assert s.logprobs[0] == s.logprobs[1]
    assert s.pred == 0 and not s.correct


def test_choice_length_drops_one_target_delimiter():
    assert choice_length(" blue") == 4
    assert choice_length("blue") == 4
    assert choice_length("  x") == 2


# ---------------------------------------------------------------------------------------------
# Tokenisation and lengths like HFLM


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer(bos=False)


@pytest.fixture(scope="module")
def bpe_bos():
    return build_bpe_tokenizer(bos=True)


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(bpe):
    ctx, cont = encode_pair(bpe, "Answer: ", "blue")
    assert ctx == bpe.encode("Answer:")
    assert ctx + cont == bpe.encode("Answer: blue")
    ctx2, cont2 = encode_pair(bpe, "Answer:", " blue")
    assert (ctx2, cont2) == (ctx, cont)


def test_encode_pair_bos_and_empty_context(bpe, bpe_bos):
    ctx, cont = encode_pair(bpe_bos, "Answer:", " blue")
    assert ctx[0] == bpe_bos.bos_token_id and bpe_bos.bos_token_id not in cont
    ctx, _ = encode_pair(bpe_bos, "Answer:", " blue", add_bos_token=False)
    assert ctx[0] != bpe_bos.bos_token_id
    ctx, _ = encode_pair(bpe, "Answer:", " blue", add_bos_token=True)
    assert ctx == bpe.encode("Answer:")  # a post-processor without BOS adds none
    # empty context: the prefix token (BOS) conditions the continuation
    ctx, cont = encode_pair(bpe, "", " blue")
    assert ctx == [bpe.bos_token_id] and cont == bpe.encode(" blue", add_special_tokens=False)


def test_encode_pair_matches_lm_eval_hflm(bpe, bpe_bos):
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    pairs = [
        ("Question: what colour is the sky?\nAnswer:", " blue"),
        ("Answer: ", "the lazy dog"),
        ("Answer:\n\n", " 7"),
        ("", " yes"),
        ("<s>Answer:", " no"),
        ("a quick brown fox", "jumps"),
    ]
    for tok in (bpe, bpe_bos):
        for add_bos in (None, False):
            lm = lm_eval_hf.HFLM(pretrained=build_llama(len(tok)), tokenizer=tok, add_bos_token=add_bos)
            seen = []
            lm._loglikelihood_tokens = lambda reqs, **kw: seen.extend(reqs) or [(0.0, False)] * len(reqs)
            lm.loglikelihood(
                [Instance("loglikelihood", {}, args, idx) for idx, args in enumerate(pairs)], disable_tqdm=True
            )
            ours = [encode_pair(tok, c, x, add_bos_token=add_bos) for c, x in pairs]
            assert [(list(c), list(x)) for _, c, x in seen] == [(list(c), list(x)) for c, x in ours]


def test_resolve_max_length_like_hflm(bpe):
    assert resolve_max_length(build_llama(len(bpe), max_position_embeddings=77), bpe) == 77
    assert resolve_max_length(SimpleNamespace(config=None), bpe) == 2048
    bpe_short = build_bpe_tokenizer()
    bpe_short.model_max_length = 99
    assert resolve_max_length(SimpleNamespace(), bpe_short) == 99


# ---------------------------------------------------------------------------------------------
# Batching and prefix reuse against naive scoring


def naive_scores(model, tokenizer, items, max_length):
    """One pair at a time, the whole (truncated) sequence, no cache, no padding."""
    out = []
    with torch.no_grad():
        for item in items:
            row = []
            for context, continuation in zip(item.contexts, item.continuations):
                ctx, cont = encode_pair(tokenizer, context, continuation)
                inp = (ctx + cont)[-(max_length + 1) :][:-1]
                logits = model(torch.tensor([inp])).logits[0].float()
                logprobs = torch.log_softmax(logits, dim=-1)[len(inp) - len(cont) :]
                row.append(float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()))
            out.append(row)
    return out


def mixed_items():
    q = "Question: what colour is the sky?\nAnswer:"
    long_q = "Question: " + "which is larger, 3 or 7? " * 6 + "\nAnswer:"
    return [
        MultipleChoiceItem("a", [q] * 4, [" blue", " green", " the lazy dog jumps over", " 7"], 0),
        MultipleChoiceItem("a", [q] * 2, [" yes", " no"], 1),  # same context as the first item
        MultipleChoiceItem("b", ["The cat sat on ", "A dog sat on "], ["the mat", "the mat"], 1),
        MultipleChoiceItem("b", [long_q] * 3, [" 3", " 7", " plants need sunlight"], 1),  # truncated
        MultipleChoiceItem("c", ["", "x"], [" true", " false"], 0),  # empty context
        MultipleChoiceItem("c", ["Answer: "] * 2, ["maybe", "a quick brown fox"], 0),  # trailing space
    ]


@pytest.mark.parametrize("bos", [False, True])
def test_batching_and_prefix_reuse_match_naive_scoring(bos):
    tok = build_bpe_tokenizer(bos=bos)
    model = build_llama(len(tok), seed=1, max_position_embeddings=40)
    items = mixed_items()
    assert len(encode_pair(tok, items[3].contexts[0], items[3].continuations[0])[0]) > 40  # truncates
    reference = naive_scores(model, tok, items, max_length=40)
    for kwargs in (
        {"batch_size": 1},
        {"batch_size": 3},
        {"batch_size": 7},
        {"batch_size": 64},
        {"batch_size": 7, "reuse_prefix": False},
        {"batch_size": 3, "reuse_prefix": True},
        {"batch_size": 64, "reuse_prefix": True},
    ):
        scores = score_items(model, tok, items, progress=False, **kwargs)
        for s, ref in zip(scores, reference):
            assert s.logprobs == pytest.approx(ref, abs=1e-4), kwargs


def test_works_through_peft_and_restores_training_mode(bpe):
    peft = pytest.importorskip("peft")
    base = build_llama(len(bpe), seed=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.train()
    items = mixed_items()
    reference = naive_scores(model, bpe, items, max_length=2048)
    scores = score_items(model, bpe, items, batch_size=5, progress=False)
    assert model.training
    for s, ref in zip(scores, reference):
        assert s.logprobs == pytest.approx(ref, abs=1e-4)
    # the adapter matters: the base alone scores differently
    with model.disable_adapter():
        plain = score_items(model, bpe, items[:1], progress=False)
    assert plain[0].logprobs != pytest.approx(scores[0].logprobs, abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(bpe):
    model = build_llama(len(bpe), seed=3)
    cpu = score_items(model, bpe, mixed_items(), progress=False)
    gpu = score_items(model.to("cuda"), bpe, mixed_items(), progress=False)
    for a, b in zip(cpu, gpu):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Tables, JSON, evaluate_tasks


def test_evaluate_tasks_table_and_json(tmp_path):
    items = hand_items()
    tasks = {"beta": [items[2]], "alpha": items[:2]}
    results = evaluate_tasks(BigramLM(True), word_tokenizer(), tasks, batch_size=4, progress=False)
    assert list(results["tasks"]) == ["beta", "alpha"]
    limited = evaluate_tasks(BigramLM(True), word_tokenizer(), tasks, batch_size=4, limit=1, progress=False)
    assert limited["tasks"]["alpha"]["n"] == 1 and limited["average"]["n"] == 2

    text = format_table(results)
    lines = text.splitlines()
    assert "log-likelihood" in lines[0]
    assert lines[2].split("|")[1:-1] == [" task    ", " n ", " acc             ", " acc_norm        ", " chance "]
    assert any(line.startswith("| average") for line in lines)
    assert "| alpha   | 2 | 0.5000 ± 0.5000 | 1.0000 ± 0.0000 | 0.4167 |" in lines

    path = write_results_json(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == results


def test_progress_bar_and_validation(bpe, capsys):
    model = build_llama(len(bpe))
    score_items(model, bpe, mixed_items()[:2], progress=True)
    assert "Scoring choices" in capsys.readouterr().err
    with pytest.raises(ValueError, match="contexts"):
        score_items(model, bpe, [MultipleChoiceItem("t", ["a"], [" b", " c"], 0)], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        score_items(model, bpe, mixed_items(), batch_size=0, progress=False)
