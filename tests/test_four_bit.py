"""A 4-bit (bitsandbytes nf4) base end to end: the merge is one plain dtype and equals the 4-bit
model's training forward, also after bitsandbytes repacked the weights for its CPU kernel; training
keeps gradients through the base; the commands load the base the way the adapter was trained."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import mor
from mor.cli import main
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes")
BATCH = torch.tensor([[5, 9, 17, 33, 60, 61, 62, 7], [3, 4, 8, 16, 32, 64, 99, 100]])
BF16_CPU_KERNEL = bnb.functional.has_avx512bf16()  # where bitsandbytes repacks 4-bit weights on a no-grad forward


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA + tokenizer folder, 64 wide (bitsandbytes' CPU kernel packs 4-bit weights in blocks of 64)."""
    folder = tmp_path_factory.mktemp("base4bit")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_4bit(folder, compute_dtype, **kwargs):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, **kwargs).eval()


def adapted(base):
    model = get_peft_model(base, mor.MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0))
    with torch.no_grad():
        for adapter in model.mor_adapters().values():
            adapter.lora_B.normal_(0, 0.05)  # a trained-looking update, not B = 0
    return model


def training_forward(model, routing="uniform"):
    """The 4-bit model's training forward (dequantise, then matmul), under fixed routing."""
    model.train()
    with torch.no_grad(), model.fixed_routing(routing):
        logits = model(input_ids=BATCH).logits
    model.eval()
    return logits


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("load_dtype", [None, torch.bfloat16])
def test_merged_4bit_model_is_one_dtype_and_runs(base_dir, compute_dtype, load_dtype):
    # the README's snippet gives no dtype: the non-quantised weights stay fp32, the merge must follow them
    model = adapted(load_4bit(base_dir, compute_dtype, **({"dtype": load_dtype} if load_dtype else {})))
    merged = model.merge_and_unload(routing="uniform")
    assert {p.dtype for p in merged.parameters()} == {load_dtype or torch.float32}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert torch.isfinite(merged(input_ids=BATCH).logits).all()


@pytest.mark.parametrize("evaluated_first", [False, True])
def test_4bit_merge_equals_the_training_forward(base_dir, evaluated_first):
    model = adapted(load_4bit(base_dir, torch.float32, dtype=torch.float32))
    expected = training_forward(model)
    if evaluated_first:  # bitsandbytes repacks the weights for its bf16 CPU kernel, rounding absmax to bf16
        with torch.no_grad():
            model(input_ids=BATCH)
    merged = model.merge_and_unload(routing="uniform")
    with torch.no_grad():
        got = merged(input_ids=BATCH).logits
    # W + delta in fp32 vs W x + delta x: rounding only (reading W off the layer's output was 2e-3 off)
    assert (got - expected).abs().max() < 1e-4


def test_4bit_merge_with_a_zero_update_is_the_4bit_weights_bit_for_bit(base_dir):
    base = load_4bit(base_dir, torch.float32, dtype=torch.float32)
    model = get_peft_model(base, mor.MoRConfig(r=4, num_experts=3, dropout=0.0))  # B = 0: no update
    expected = training_forward(model)
    merged = model.merge_and_unload(routing="uniform")
    with torch.no_grad():
        assert torch.equal(merged(input_ids=BATCH).logits, expected)


def test_training_on_a_4bit_base_keeps_gradients_after_an_evaluation(base_dir):
    """On a CPU with AVX512-BF16 a no-grad eval forward made bitsandbytes switch to a kernel that passes
    no gradient to its input; `mor train` evaluates before training and measures routing while it trains."""
    from mor.train import TrainConfig
    from mor.train.recipe import setup_model

    model, _ = setup_model(TrainConfig(model=str(base_dir), load_in_4bit=True))

    def grads():
        torch.manual_seed(0)  # the same adapter dropout masks
        model.train()
        model.zero_grad()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=BATCH)
    after = grads()
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.fixture(scope="module")
def run_4bit(base_dir, tmp_path_factory):
    """An adapter trained with `mor train --load-in-4bit` (training.json records it)."""
    folder = tmp_path_factory.mktemp("run4bit")
    data = folder / "task.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even or odd?", "input": "", "output": "even" if i % 2 == 0
                                 else "odd", "answer": "even" if i % 2 == 0 else "odd"} for i in range(16)]))
    assert main(["train", "--model", str(base_dir), "--data", str(data), "--output", str(folder / "run"),
                 "--max-steps", "2", "--batch-size", "4", "--r", "4", "--num-experts", "2", "--no-eval",
                 "--load-in-4bit"]) == 0
    return folder / "run" / "adapter"


def test_merge_loads_the_base_the_way_the_adapter_was_trained(base_dir, run_4bit, tmp_path, capsys):
    assert json.loads((run_4bit / "training.json").read_text())["train_config"]["load_in_4bit"] is True
    out = tmp_path / "merged"
    data = str(run_4bit.parents[1] / "task.json")
    assert main(["merge", "--model", str(base_dir), "--adapter", str(run_4bit), "--data", data,
                 "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "Base model loaded in 4-bit (bitsandbytes nf4) (as the adapter was trained" in printed.err
    assert "top-1 token agreement" in printed.out and "warning" not in printed.err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["base_model_name_or_path"] == str(base_dir)
    assert (out / "tokenizer.json").is_file()

    # the user forces a full-precision base: it works, with a warning that it is not the model as trained
    assert main(["merge", "--model", str(base_dir), "--adapter", str(run_4bit), "--data", data,
                 "--output", str(tmp_path / "merged-fp"), "--no-load-in-4bit"]) == 0
    printed = capsys.readouterr()
    assert "Base model loaded in full precision (--no-load-in-4bit)" in printed.err
    assert "warning: the adapter was trained on a 4-bit base" in printed.err


def test_export_lora_and_generate_load_the_recorded_4bit_base(base_dir, run_4bit, tmp_path, capsys):
    assert main(["export-lora", "--model", str(base_dir), "--adapter", str(run_4bit), "--routing", "uniform",
                 "--output", str(tmp_path / "lora")]) == 0
    assert "Base model loaded in 4-bit" in capsys.readouterr().err
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert main(["generate", "--model", str(base_dir), "--adapter", str(run_4bit), "--prompt", "Is 4 even?",
                 "--max-new-tokens", "2", "--load-in-4bit"]) == 0
    printed = capsys.readouterr()
    assert "Base model loaded in 4-bit (bitsandbytes nf4) (--load-in-4bit)" in printed.err
    assert "warning" not in printed.err
