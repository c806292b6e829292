"""The GPU check (``python -m benchmarks.gpu``) runs its own code at tiny shapes on the CPU, and the
code paths it exercises on CUDA hold where a CPU can check them: a fixed routing follows the model's
device, and torch.compile traces a MoR layer in one graph."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mor
from benchmarks import gpu
from benchmarks.speed_layer import layer_flops


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    docs = tmp_path / "results.md"
    docs.write_text(f"# Results\n\n{gpu.DOCS_BEGIN}\nold\n{gpu.DOCS_END}\n\nafter\n")
    assert gpu.main(["--cpu", "--tiny", "--strict", "--out", str(out), "--docs", str(docs)]) == 0
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu.SECTIONS) and report["machine"]["device"] == "cpu"

    layer = sections["layer"]["rows"]
    assert {r["method"] for r in layer} == {"base", gpu.LORA, gpu.MOR, gpu.MOELORA}
    assert len(layer) == 4 * len(gpu.TINY.layer_shapes) * len(gpu.TINY.layer_tokens)
    assert all(r["seconds"] > 0 and r["bound_seconds"] > 0 and math.isfinite(r["tflops"]) for r in layer)

    step = {r["adapter"]: r for r in sections["step"]["rows"]}
    assert set(step) == set(gpu.STEP_ARMS) and step[gpu.LORA]["vs_lora"] == 1.0
    assert all(r["finite"] and r["step_seconds"] > 0 and r["peak_rise_bytes"] is None for r in step.values())
    assert gpu.SKIP_NO_CUDA in sections["step"]["table"]  # peak GPU memory: no number without CUDA

    decode = sections["decode"]["rows"]
    eager = [r for r in decode if r["mode"] == "eager"]
    assert len(eager) == 3 * len(gpu.TINY.decode_batches) and all(r["tokens_per_s"] > 0 for r in eager)
    assert all(r["skipped"] == gpu.SKIP_NO_CUDA for r in decode if r["mode"] == "compiled")

    served = sections["served"]["rows"]
    assert len(served) == len(gpu.TINY.served_layers) * len(gpu.TINY.served_tokens)
    assert all(r["max_abs_diff_vs_reference"] < 0.05 for r in served)  # bf16: the fused layer is MoRAdapter's sum
    assert sections["qlora"]["skipped"] == gpu.SKIP_NO_CUDA

    printed = capsys.readouterr().out
    for title in gpu.TITLES.values():
        assert title in printed
    text = docs.read_text()  # the block between the markers replaced, the rest kept
    assert "old" not in text and text.startswith("# Results\n\n") and text.endswith(f"{gpu.DOCS_END}\n\nafter\n")
    assert "python -m benchmarks.gpu --cpu --tiny" in text and gpu.SKIP_NO_CUDA in text


def test_gpu_check_refuses_what_it_must_not_do(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="never writes results/gpu.json"):
        gpu.main(["--cpu", "--tiny", "--out", "results/gpu.json"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu.main(["--tiny", "--out", str(tmp_path / "x.json")])


@pytest.mark.parametrize("method", ["base", "lora", "mor", "moelora"])
def test_the_layers_gemms_are_its_flops(method):
    """The GEMM shapes the bound is timed at add up to the layer's analytic FLOPs (speed_layer's)."""
    r, n = (16, 1) if method == "lora" else (8, 8)
    flops = gpu.gemm_flops(gpu.layer_gemms(method, 4096, 4096, 11008, r, n))
    assert flops == layer_flops(method, 4096, 4096, 11008, r, n, "full")


def tiny_mor_model():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**gpu.MODEL_TINY)
    return get_peft_model(AutoModelForCausalLM.from_config(config), mor.MoRConfig(r=4, num_experts=4)).eval()


def test_fixed_routing_and_merge_follow_the_models_device():
    """A routing profile lives on the CPU; pinned onto a model on another device (the meta device
    stands in for CUDA: it refuses mixed devices alike) it must move to the adapters' device."""
    model = tiny_mor_model().to("meta")
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    with torch.no_grad(), model.fixed_routing("uniform"):
        assert model(input_ids=ids).logits.device.type == "meta"
    adapter = next(iter(model.mor_adapters().values()))
    assert adapter.merged_delta(torch.full((4,), 0.25)).device.type == "meta"
    from mor.export import lora_factors  # mor export-lora

    assert {t.device.type for t in lora_factors(adapter, torch.full((4,), 0.25))[:2]} == {"meta"}


def test_a_mor_layer_compiles_in_one_graph():
    """torch.compile (transformers' static-cache generation on CUDA) traces the MoR layer whole: its
    no-grad factor cache, keyed on storage pointers, stays out of the graph."""
    layer = next(iter(tiny_mor_model().base_model.mor_layers().values()))
    with torch.no_grad():
        for adapter in layer.mor.values():
            adapter.lora_B.normal_(0, 0.1)
        x = torch.randn(3, layer.in_features)
        want = layer(x)  # eager first: the cache is filled, as after any evaluation
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), want)


@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_under_autocast_the_layer_keeps_its_output_in_the_autocast_dtype(method):
    """bf16 autocast over a bf16 base with fp32 adapter weights (a Trainer run with bf16 on a GPU, or
    --bf16 on a CPU): the layer never holds its (tokens, d_out) output or its gradient in fp32, and
    computes what the cast path computes (the adapter's products in bf16 either way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter

    tokens, d_in, d_out = 5, 16, 24
    torch.manual_seed(0)
    cls = MoRAdapter if method == "mor" else MoELoRAAdapter
    adapter = cls(d_in, d_out, r=4, num_experts=3, alpha=8)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.1)
    layer = MixtureLayer(nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16), "default", adapter)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), t.dtype, tuple(t.shape)))
            return out

    with Outputs() as outputs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.sum().backward()
    fp32_outputs = [op for op, dtype, shape in outputs.seen if dtype == torch.float32 and shape == (tokens, d_out)]
    assert out.dtype == torch.bfloat16 and not fp32_outputs
    assert adapter.lora_B.grad is not None and adapter.lora_B.grad.dtype == torch.float32

    # the same as casting to the adapter's dtype (the path outside autocast), within bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = layer.base_layer(x) + adapter(x.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, cast, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["mor", "moelora"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_under_autocast_the_router_computes_its_logits_in_fp32(method, grad):
    """bf16 autocast runs every linear in bf16; the router's W_g x stays fp32 (as outside autocast), in
    training and in the inference path that takes the logits from one product with A x: the gates equal
    the fp32 formula's exactly, where bf16 logits would move them."""
    import torch.nn.functional as F

    from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter
    from mor.routing import gates_from_logits

    torch.manual_seed(0)
    cls = MoRAdapter if method == "mor" else MoELoRAAdapter
    adapter = cls(64, 48, r=4, num_experts=4, alpha=8)
    with torch.no_grad():
        adapter.router.weight.mul_(20)  # logits of several units: bf16 rounds them visibly
    layer = MixtureLayer(nn.Linear(64, 48, bias=False).to(torch.bfloat16), "default", adapter.train(grad))
    x = torch.randn(6, 64).to(torch.bfloat16)
    seen = []
    adapter.router.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    router = adapter.router
    want = gates_from_logits(F.linear(x.float(), router.weight.float()), router.strategy, router.top_k)
    bf16 = gates_from_logits(F.linear(x, router.weight.to(torch.bfloat16)).float(), router.strategy, router.top_k)
    assert not torch.equal(want.to(seen[0].dtype), bf16.to(seen[0].dtype))  # the test can tell the two apart
    torch.testing.assert_close(seen[0], want.to(seen[0].dtype), atol=0, rtol=0)
