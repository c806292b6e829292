"""peft's options that LoRA users set, on MoR: modules_to_save, trainable_token_indices, use_rslora.
Run on every supported peft minor (scripts/test_peft_versions.sh)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import mor
from mor import MoRConfig
from mor.config import WEIGHTS_NAME

from conftest import make_tiny_llama
from test_peft_integration import BATCH, logits, train_steps


def test_modules_to_save_trains_the_head_beside_the_adapter_and_saves_loads_and_merges_it(tmp_path):
    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0,
                                                        router="mean", modules_to_save=["lm_head"]))
    head_before = make_tiny_llama().lm_head.weight.detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in trainable) and any(".mor." in n for n in trainable)
    expected = logits(train_steps(model))
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    head_keys = [k for k in saved if "lm_head" in k]
    assert head_keys and not torch.equal(saved[head_keys[0]], head_before)  # the trained head is in the file
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]

    for loaded in (PeftModel.from_pretrained(make_tiny_llama(), tmp_path), mor.load_adapter(make_tiny_llama(), tmp_path)):
        assert torch.equal(logits(loaded), expected)
    merged = mor.load_adapter(make_tiny_llama(), tmp_path).merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear and not torch.equal(merged.lm_head.weight, head_before)
    assert (logits(merged) - expected).abs().max() < 1e-5


def test_trainable_token_indices_train_only_those_rows_and_reload(tmp_path):
    indices = [5, 7]
    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0,
                                                        trainable_token_indices=indices))
    expected = logits(train_steps(model))
    model.save_pretrained(tmp_path)
    loaded = mor.load_adapter(make_tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path)), expected)
    profile = loaded.measure_routing([{"input_ids": BATCH}])
    with loaded.fixed_routing(profile):
        fixed = logits(loaded)
    merged = loaded.merge_and_unload(profile)
    assert (logits(merged) - fixed).abs().max() < 1e-5
    rows = merged.get_input_embeddings().weight
    base = make_tiny_llama().get_input_embeddings().weight
    changed = sorted(int(i) for i in torch.nonzero((rows != base).any(dim=1)).flatten())
    assert changed == indices  # only the listed tokens' rows moved, and the merge kept them



@pytest.mark.parametrize("beside", [{"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [5, 7]}])
def test_a_lora_export_carries_what_the_adapter_trains_beside_it(tmp_path, beside):
    from peft import LoraConfig

    from mor.export import export_lora

    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0, **beside))
    train_steps(model)
    model.eval()
    profile = model.measure_routing([{"input_ids": BATCH}])
    with model.fixed_routing(profile):
        expected = logits(model)
    export_lora(model, profile, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    key, value = next(iter(beside.items()))
    assert config[key] == value
    lora = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    assert (logits(lora) - expected).abs().max() < 1e-5
    # the layers' LoRA alone (what the export wrote before): other logits, so carrying them matters
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert any(".lora_" not in k for k in tensors)
    (tmp_path / "alone").mkdir()
    layers_only = {k: v for k, v in tensors.items() if ".lora_" in k}
    save_file(layers_only, str(tmp_path / "alone" / "adapter_model.safetensors"))
    (tmp_path / "alone" / "adapter_config.json").write_text(json.dumps({**config, key: None}))
    alone = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "alone").eval()
    assert (logits(alone) - expected).abs().max() > 1e-3


def test_use_rslora_scales_by_alpha_over_sqrt_r_in_the_forward_the_merge_and_the_export(tmp_path):
    config = MoRConfig(r=4, num_experts=3, alpha=8, dropout=0.0, init_seed=0, router="mean", use_rslora=True)
    assert config.scaling == 8 / math.sqrt(4) and MoRConfig(r=4, alpha=8).scaling == 8 / 4
    model = get_peft_model(make_tiny_llama(), config)
    adapter = next(iter(model.mor_adapters().values()))
    assert adapter.scaling == 4.0
    expected = logits(train_steps(model))
    # the same trained weights without rsLoRA: a different update (scale 2 instead of 4)
    plain = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, alpha=8, dropout=0.0, init_seed=0,
                                                         router="mean"))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(logits(plain), expected)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), expected)
    from peft import LoraConfig
    from mor.export import export_lora

    export_lora(loaded, "uniform", tmp_path / "lora")
    lora = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], LoraConfig)
    assert (logits(lora) - expected).abs().max() < 1e-5
    assert (logits(loaded.merge_and_unload()) - expected).abs().max() < 1e-5



@pytest.mark.parametrize("method", ["mor", "lora"])
def test_mor_train_flags_set_rslora_and_modules_to_save_for_every_method(method):
    from peft import LoraConfig

    from mor.cli import build_parser
    from mor.cli.flags import settings_from_args
    from mor.train.adapters import AdapterSpec, apply_adapter

    args = build_parser().parse_args(["train", "--method", method, "--r", "4", "--alpha", "8", "--use-rslora",
                                      "--modules-to-save", "lm_head"])
    spec = settings_from_args(AdapterSpec, args)
    config = spec.to_peft_config(make_tiny_llama())
    assert isinstance(config, LoraConfig if method == "lora" else MoRConfig)
    assert config.use_rslora is True and list(config.modules_to_save) == ["lm_head"]
    model = apply_adapter(make_tiny_llama(), spec)
    assert any("lm_head" in n and p.requires_grad for n, p in model.named_parameters())
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    scale = layer.scaling["default"] if method == "lora" else next(iter(model.mor_adapters().values())).scaling
    assert scale == 8 / math.sqrt(4)
    plain = settings_from_args(AdapterSpec, build_parser().parse_args(["train", "--method", method]))
    assert plain.use_rslora is False and plain.modules_to_save is None


def test_the_balanced_routers_loss_is_added_through_the_peft_model():
    # on every peft minor: peft <0.21 runs the tuner's model without its forward hooks unless MoR's tuner calls it
    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, router="balanced", balance_coef=0.5))
    model.train()
    out = model(input_ids=BATCH, labels=BATCH)
    assert model.last_router_aux_loss is not None and "router_aux_loss" in out
    with model.disable_adapter():
        plain = model(input_ids=BATCH, labels=BATCH).loss
    assert torch.allclose(out.loss, plain + 0.5 * out["router_aux_loss"], atol=1e-6)
