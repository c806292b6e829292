"""Exporting a MoR / MoE-LoRA adapter under fixed routing as a standard peft LoRA: exact against
the adapter with the same fixed routing and against the merged model, through
PeftModel.from_pretrained; MoE-LoRA at rank N*r; the `mor export-lora` command end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from mor import MoRConfig, get_mor_model
from mor.cli import main
from mor.export import export_lora, lora_factors, mixture_layers, resolve_routing
from mor.data.builtin import write_builtin_suite

from conftest import make_tiny_llama

R, N, ALPHA = 4, 4, 8.0
INPUTS = torch.randint(3, 128, (3, 14), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomized(model, seed: int = 0):
    """Give every adapter tensor random, clearly non-zero values (B = 0 at init would make the
    export trivially exact)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = 1.0 if "expert_scales" in name else 0.3
            offset = 1.0 if "expert_scales" in name else 0.0
            param.copy_(offset + scale * torch.randn(param.shape, generator=gen))
    return model.eval()


def adapted(method: str, base=None):
    base = make_tiny_llama() if base is None else base
    config = MoRConfig(method=method, r=R, num_experts=N, alpha=ALPHA, dropout=0.0, target_modules="attention+ffn")
    return randomized(get_mor_model(base, config))


def profile_of(model):
    """A per-layer routing profile measured on INPUTS (differs from layer to layer)."""
    return model.measure_routing([{"input_ids": INPUTS}])


def logits(model, routing=None) -> torch.Tensor:
    with torch.no_grad():
        if routing is None:
            return model(input_ids=INPUTS).logits
        with model.fixed_routing(routing):
            return model(input_ids=INPUTS).logits


@pytest.mark.parametrize("method,rank", [("mor", R), ("moelora", N * R)])
def test_lora_factors_give_the_fixed_routing_update(method, rank):
    model = adapted(method)
    routing = resolve_routing(mixture_layers(model), profile_of(model))
    for name, layer in mixture_layers(model).items():
        lora_A, lora_B, scale = lora_factors(layer, routing[name])
        assert lora_A.shape == (rank, layer.in_features) and lora_B.shape == (layer.out_features, rank)
        assert scale == pytest.approx(layer.scaling)
        expected = layer.merged_delta(routing[name])  # sum_i g_i D_i
        assert torch.allclose(scale * lora_B @ lora_A, expected, atol=1e-6), name


@pytest.mark.parametrize("method,rank", [("mor", R), ("moelora", N * R)])
def test_exported_lora_equals_fixed_routing_and_merged_model_through_peft(tmp_path, method, rank):
    base = make_tiny_llama()
    model = adapted(method, copy.deepcopy(base))
    routing = profile_of(model)
    folder = export_lora(model, routing, tmp_path / "lora", base_model_name_or_path="tiny-llama")

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["lora_alpha"] == ALPHA / R * rank
    assert config["base_model_name_or_path"] == "tiny-llama" and config["lora_dropout"] == 0.0
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(mixture_layers(model))

    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    got = logits(lora)
    expected = logits(model, routing)
    merged = logits(copy.deepcopy(model).merge_and_unload(routing))
    assert (got - expected).abs().max() <= 1e-5
    assert (got - merged).abs().max() <= 1e-5
    assert (got - logits(base)).abs().max() > 1e-2  # the adapter does change the model


def test_target_modules_are_leaf_names_when_they_select_exactly_the_adapted_layers(tmp_path):
    model = adapted("mor")
    config = json.loads((export_lora(model, "uniform", tmp_path / "all") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    base = make_tiny_llama()
    only_first_block = MoRConfig(r=R, num_experts=N, alpha=ALPHA, target_modules=r"model\.layers\.0\.mlp\.up_proj")
    model = randomized(get_mor_model(copy.deepcopy(base), only_first_block))
    folder = export_lora(model, "uniform", tmp_path / "one")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["model.layers.0.mlp.up_proj"]
    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert (logits(lora) - logits(model, "uniform")).abs().max() <= 1e-5


def test_one_lora_per_routing_profile(tmp_path):
    base = make_tiny_llama()
    model = adapted("mor", copy.deepcopy(base))
    names = list(mixture_layers(model))
    first = torch.tensor([0.7, 0.1, 0.1, 0.1])
    second = torch.tensor([0.0, 0.0, 0.2, 0.8])
    for label, g in (("first", first), ("second", second)):
        export_lora(model, g, tmp_path / label)
    a, b = (PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / label)).eval()
            for label in ("first", "second"))
    assert (logits(a) - logits(model, first)).abs().max() <= 1e-5
    assert (logits(b) - logits(model, second)).abs().max() <= 1e-5
    assert (logits(a) - logits(b)).abs().max() > 1e-2
    saved = json.loads((tmp_path / "second" / "routing_profile.json").read_text())
    assert set(saved) == set(names) and saved[names[0]] == pytest.approx(second.tolist())


def test_task_loras_served_side_by_side_by_peft(tmp_path):
    """The README's recipe: several task LoRAs over one base, switched with set_adapter or mixed
    in one batch with adapter_names."""
    base = make_tiny_llama()
    model = adapted("mor", copy.deepcopy(base))
    profiles = {"first": torch.tensor([0.7, 0.1, 0.1, 0.1]), "second": torch.tensor([0.0, 0.0, 0.2, 0.8])}
    for name, g in profiles.items():
        export_lora(model, g, tmp_path / name)
    served = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "first"), adapter_name="first")
    served.load_adapter(str(tmp_path / "second"), adapter_name="second")
    served.eval()
    for name, g in profiles.items():
        served.set_adapter(name)
        assert (logits(served) - logits(model, g)).abs().max() <= 1e-5
    names = ["second", "__base__", "first"]  # one adapter per row of the batch
    with torch.no_grad():
        mixed = served(input_ids=INPUTS, adapter_names=names).logits
    assert (mixed[0] - logits(model, profiles["second"])[0]).abs().max() <= 1e-5
    assert (mixed[1] - logits(base)[1]).abs().max() <= 1e-5
    assert (mixed[2] - logits(model, profiles["first"])[2]).abs().max() <= 1e-5


def test_layer_names_are_relative_to_the_transformers_model_inside_any_wrapper():
    model = adapted("mor")
    names = set(mixture_layers(model))
    assert "model.layers.0.mlp.down_proj" in names
    assert set(mixture_layers(model.base_model)) == names  # the bare transformers model
    wrapper = torch.nn.Module()
    wrapper.base_model = torch.nn.Module()
    wrapper.base_model.model = model.base_model  # e.g. a PeftModel's base_model.model
    assert set(mixture_layers(wrapper)) == names
    with pytest.raises(ValueError, match="no MoR / MoE-LoRA layers"):
        mixture_layers(make_tiny_llama())


def test_routing_resolver_accepts_profiles_vectors_prefixed_keys_and_uniform(tmp_path):
    model = adapted("mor")
    layers = mixture_layers(model)
    profile = profile_of(model)
    prefixed = {f"base_model.model.{k}": v for k, v in profile.weights.items()}
    for routing in (profile, profile.weights, prefixed, profile.save(tmp_path / "p.json"), str(tmp_path / "p.json")):
        resolved = resolve_routing(layers, routing)
        assert all(torch.allclose(resolved[k], profile.weights[k]) for k in layers)
    assert all(torch.equal(g, torch.full((N,), 0.25)) for g in resolve_routing(layers, "uniform").values())
    assert all(torch.equal(g, torch.arange(4.0)) for g in resolve_routing(layers, torch.arange(4.0)).values())
    with pytest.raises(ValueError, match="has 3 weights"):
        resolve_routing(layers, torch.ones(3) / 3)
    with pytest.raises(ValueError, match="no weights for 1 layers"):
        resolve_routing(layers, {k: v for k, v in list(profile.weights.items())[1:]})
    with pytest.raises(FileNotFoundError):
        resolve_routing(layers, str(tmp_path / "missing.json"))


def test_gpt2_conv1d_exports_with_fan_in_fan_out(tmp_path):
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    config = MoRConfig(r=R, num_experts=N, alpha=ALPHA, dropout=0.0, target_modules=["c_attn", "c_fc"])
    model = randomized(get_mor_model(copy.deepcopy(base), config))
    routing = profile_of(model)
    folder = export_lora(model, routing, tmp_path / "gpt2")
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    lora = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert (logits(lora) - logits(model, routing)).abs().max() <= 1e-5


# -- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=16, eval_size=4, tasks=["parity", "colour"])
    return [str(folder / "parity"), str(folder / "colour")]


def test_cli_export_lora_per_task_and_from_a_profile(tmp_path, tiny_model_dir, tasks, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--r", "4", "--num-experts", "3",
                 "--target-modules", "attention+ffn", "--data", *tasks, "--output", str(run), "--max-steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--no-eval", "--no-figures"]) == 0
    adapter = run / "adapter"
    capsys.readouterr()
    assert main(["export-lora", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", *tasks,
                 "--output", str(tmp_path / "loras")]) == 0
    printed = capsys.readouterr().out
    diffs = [float(line.split(": ")[-1]) for line in printed.splitlines() if "max |logit difference|" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-5
    for task in ("parity", "colour"):
        folder = tmp_path / "loras" / task
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    # from a saved profile, checked here against the merged model through peft
    profile = tmp_path / "loras" / "parity" / "routing_profile.json"
    assert main(["export-lora", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--routing", str(profile),
                 "--output", str(tmp_path / "one"), "--no-check"]) == 0
    from mor.runtime.loading import load_model, load_tokenizer
    from mor.model import load_adapter

    tok = load_tokenizer(str(tiny_model_dir))
    batch = tok(["Is 1234 even or odd?"], return_tensors="pt")
    merged = load_adapter(load_model(str(tiny_model_dir)), adapter).merge_and_unload(str(profile))
    lora = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "one")).eval()
    with torch.no_grad():
        assert (lora(**batch).logits - merged(**batch).logits).abs().max() <= 1e-5


def test_cli_export_lora_moelora_says_rank_n_times_r(tmp_path, tiny_model_dir, tasks, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--method", "moelora", "--r", "2", "--num-experts", "3",
                 "--data", tasks[0], "--output", str(run), "--max-steps", "1", "--batch-size", "4",
                 "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["export-lora", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"),
                 "--routing", "uniform", "--output", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "rank N*r = 3*2 = 6" in printed
    assert float(printed.split("routing: ")[-1].split()[0]) <= 1e-5
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 6


def test_cli_export_lora_refuses_a_peft_lora(tmp_path, tiny_model_dir, capsys):
    from mor.runtime.loading import load_model

    lora = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert main(["export-lora", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "lora"),
                 "--routing", "uniform", "--output", str(tmp_path / "out")]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "already a LoRA" in err


@pytest.mark.slow
def test_real_smollm2_exports_within_float32_rounding(smollm2_path, tmp_path):
    """SmolLM2-135M, attention + FFN of all 30 blocks, r=8, N=8, a visibly non-zero adapter."""
    from mor.runtime.loading import load_model, load_tokenizer

    tok = load_tokenizer(smollm2_path)
    base = load_model(smollm2_path).eval()
    model = get_mor_model(copy.deepcopy(base), MoRConfig(r=8, num_experts=8, dropout=0.0, init_seed=0,
                                                         target_modules="attention+ffn"))
    with torch.no_grad():
        for layer in mixture_layers(model).values():
            layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    texts = ["Question: Is 1234 even or odd?\nAnswer:", "Which colour is the sky on a clear day? Answer:"]
    routing = model.measure_routing(texts, tokenizer=tok)
    folder = export_lora(model, routing, tmp_path / "lora")
    batch = tok(texts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        with model.fixed_routing(routing):
            expected = model(**batch).logits
        moved = (base(**batch).logits - expected)[mask].abs().max()
        got = PeftModel.from_pretrained(base, str(folder)).eval()(**batch).logits
        merged = copy.deepcopy(model).merge_and_unload(routing)(**batch).logits
    assert moved > 0.5
    assert (got - expected)[mask].abs().max() <= 1e-4  # logits of size ~20 after 30 fp32 blocks
    assert (got - merged)[mask].abs().max() <= 2e-4  # the merge has its own rounding (9e-5 vs fixed here)
    print(f"SmolLM2: peft LoRA vs fixed routing {(got - expected)[mask].abs().max():.3g}, vs merged "
          f"{(got - merged)[mask].abs().max():.3g}, merged vs fixed {(merged - expected)[mask].abs().max():.3g}, "
          f"adapter moves the logits by {moved:.3g}")


# -- exports that stand alone: plain peft, no `import mor`, the hub offline (issue 34) --------------------------

WITHOUT_MOR = """
import sys, torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import save_file
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor({ids})).logits
assert not any(name == "mor" or name.startswith("mor.") for name in sys.modules), "mor was imported"
save_file({{"logits": logits.contiguous()}}, sys.argv[2])
"""


def load_without_mor(folder, ids, out, cwd):
    """AutoPeftModelForCausalLM on ``folder`` in a fresh process that never imports mor, the hub offline,
    run from ``cwd`` (not the export's folder): the finished process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", WITHOUT_MOR.format(ids=ids), str(folder), str(out)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_an_export_of_the_embedded_default_loads_with_plain_peft_offline(tmp_path, smollm2_path, capsys):
    """`mor export-lora` on the embedded SmolLM2 records the folder it resolves to: AutoPeftModelForCausalLM
    gives mor's logits in a process without mor, from another working directory, with the hub offline."""
    import mor
    from mor.runtime.loading import load_model

    model = get_mor_model(load_model(None), MoRConfig(r=8, num_experts=4, dropout=0.0, init_seed=0))
    with torch.no_grad():
        for layer in mixture_layers(model).values():
            layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    assert main(["export-lora", "--adapter", str(tmp_path / "adapter"), "--routing", "uniform",
                 "--output", str(tmp_path / "lora"), "--no-check"]) == 0
    printed = capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == smollm2_path  # absolute: no hub look-up, any working directory
    assert f"from_pretrained('{tmp_path / 'lora'}')" in printed and f"--lora-modules lora={tmp_path / 'lora'}" in printed

    ids = INPUTS.tolist()
    (tmp_path / "elsewhere").mkdir()
    proc = load_without_mor(tmp_path / "lora", ids, tmp_path / "logits.safetensors", tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = mor.load_adapter(load_model(None), tmp_path / "adapter").eval()
    with torch.no_grad():
        with ours.fixed_routing("uniform"):
            expected = ours(input_ids=INPUTS).logits
        with ours.disable_adapter():
            moved = (ours(input_ids=INPUTS).logits - expected).abs().max()
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert moved > 0.1  # the adapter changes the logits: the equality below can fail
    assert (got - expected).abs().max() <= 1e-4  # fp32 rounding over 30 blocks (5e-5 measured)


def test_an_export_whose_base_moved_fails_in_peft_naming_the_recorded_path(tmp_path, tiny_model_dir, capsys):
    """The base folder moved after the export: peft's own error names the recorded path; re-pointing the
    config (docs/export-lora.md) loads it again. Exporting onto the base folder is refused."""
    import shutil

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    from mor.runtime.loading import load_model

    get_mor_model(load_model(str(base)), MoRConfig(r=2, num_experts=2, init_seed=0)).save_pretrained(tmp_path / "adapter")
    flags = ["export-lora", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--routing", "uniform",
             "--no-check", "--output"]
    assert main([*flags, str(base), "--overwrite"]) == 2  # onto the base: refused, the base untouched
    assert "error: " in capsys.readouterr().err and (base / "config.json").is_file()
    assert main([*flags, str(tmp_path / "lora")]) == 0
    moved = base.rename(tmp_path / "base-moved")
    proc = load_without_mor(tmp_path / "lora", [[5, 6, 7]], tmp_path / "logits.safetensors", tmp_path)
    assert proc.returncode != 0 and str(base) in proc.stderr
    config_file = tmp_path / "lora" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(moved)}))
    proc = load_without_mor(tmp_path / "lora", [[5, 6, 7]], tmp_path / "logits.safetensors", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_merged_model_records_its_base_and_its_card_loads_it_without_mor(tmp_path, tiny_model_dir, tasks,
                                                                           monkeypatch):
    """`mor merge` records the base as transformers opens it from any folder (absolute, not as given), and
    its README says where it came from and how to load it without mor."""
    from mor.runtime.loading import load_model

    get_mor_model(load_model(str(tiny_model_dir)), MoRConfig(r=2, num_experts=2, init_seed=0)).save_pretrained(
        tmp_path / "adapter")
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["merge", "--model", tiny_model_dir.name, "--adapter", str(tmp_path / "adapter"),
                 "--data", tasks[0], "--limit", "4", "--output", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # given relative, recorded absolute
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(tiny_model_dir) in card and f"measured on {tasks[0]}" in card
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "merged"}")' in card
