"""MoR on whole Hugging Face models: injection, training, save/load, merge, baselines."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import mor
from mor import MoRConfig, get_mor_model, parameter_count
from mor.config import WEIGHTS_NAME

from conftest import make_tiny_llama

BATCH = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def train_steps(model, steps=5, lr=1e-2, batch=BATCH):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def trained(method="mor", **kw):
    model = get_mor_model(make_tiny_llama(), MoRConfig(method=method, r=4, num_experts=4, dropout=0.0, init_seed=0, **kw))
    train_steps(model)
    return model


@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_adapted_model_equals_base_model_at_initialisation(method):
    base = make_tiny_llama()
    expected = base(BATCH).logits
    model = get_mor_model(base, MoRConfig(method=method, r=4, num_experts=3))
    assert torch.equal(model(input_ids=BATCH).logits, expected)


def test_only_adapter_parameters_train_and_default_targets_are_the_ffn():
    model = get_mor_model(make_tiny_llama(), MoRConfig())
    names = sorted(model.mor_adapters())
    assert names == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".base_layer." not in n and "embed" not in n for n in trainable)


def test_training_makes_experts_differ_and_routing_input_dependent():
    model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=4, dropout=0.0, init="ones", init_seed=0))
    losses = train_steps(model, steps=8)
    assert losses[-1] < losses[0]
    layer = model.mor_adapters()["model.layers.0.mlp.up_proj"]
    for scales in (layer.expert_scales_in, layer.expert_scales_out):
        assert (scales - scales[0]).abs().max() > 1e-4, "the rows of Omega stayed equal"
    x = torch.randn(10, layer.in_features)
    assert layer.router(x).std(dim=0).max() > 1e-3


def test_parameter_counts_match_closed_form_for_all_four_methods():
    cases = {
        "mor": lambda m: get_mor_model(m, MoRConfig(r=8, num_experts=4)),
        "moelora": lambda m: get_mor_model(m, MoRConfig(method="moelora", r=2, num_experts=4)),
        "lora": lambda m: get_peft_model(m, LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"])),
        "dora": lambda m: get_peft_model(m, LoraConfig(r=8, use_dora=True, target_modules=["gate_proj", "up_proj", "down_proj"])),
    }
    ranks = {"mor": 8, "moelora": 2, "lora": 8, "dora": 8}
    for method, wrap in cases.items():
        model = wrap(make_tiny_llama())
        expected = parameter_count(make_tiny_llama(), method, ranks[method], num_experts=4)
        assert mor.count_trainable_parameters(model) == expected, method
    # the explicit formula of docs/method.md, section 3 "Parameters per adapted layer",
    # for the tiny model's FFN (d=32, ffn=64)
    shapes = [(32, 64), (32, 64), (64, 32)] * 2
    assert parameter_count(make_tiny_llama(), "mor", 8, 4) == sum(8 * (i + o) + 4 * (8 + o) + i * 4 for i, o in shapes)


@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_save_and_load_give_bit_identical_outputs(tmp_path, method):
    model = trained(method)
    expected = model(input_ids=BATCH).logits
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", WEIGHTS_NAME} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOR"
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert all(".base_layer." not in k for k in saved) and len(saved) > 0
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert torch.equal(loaded(input_ids=BATCH).logits, expected)
    assert torch.equal(mor.load_adapter(make_tiny_llama(), tmp_path)(input_ids=BATCH).logits, expected)


def test_corrupted_or_mismatched_adapter_files_give_clear_errors(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted or not a safetensors"):
        mor.load_adapter(make_tiny_llama(), tmp_path)

    tensors = load_file_from_bytes(good, tmp_path)
    dropped = dict(list(tensors.items())[1:])
    save_file(dropped, str(weights))
    with pytest.raises(ValueError, match="1 missing tensors"):
        mor.load_adapter(make_tiny_llama(), tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    save_file(tensors, str(weights))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(ValueError, match="shape mismatches"):
        mor.load_adapter(make_tiny_llama(), tmp_path)

    weights.unlink()
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="adapter weights not found"):
        mor.load_adapter(make_tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        mor.load_adapter(make_tiny_llama(), tmp_path / "nowhere")


def load_file_from_bytes(data: bytes, tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(data)
    tensors = load_file(str(path))
    path.unlink()
    return tensors


def test_disable_adapter_gives_the_exact_base_model():
    model = trained()
    expected = make_tiny_llama()(BATCH).logits
    with model.disable_adapter():
        assert torch.equal(model(input_ids=BATCH).logits, expected)
    assert not torch.allclose(model(input_ids=BATCH).logits, expected)


@pytest.mark.parametrize("method", ["mor", "moelora"])
def test_merge_with_measured_profile_equals_unmerged_fixed_routing(tmp_path, method):
    model = trained(method)
    batches = [{"input_ids": BATCH, "attention_mask": torch.ones_like(BATCH)}]
    profile = model.measure_routing(batches)
    assert set(profile.weights) == set(model.mor_adapters())
    for g in profile.weights.values():
        assert g.shape == (4,) and abs(g.sum().item() - 1) < 1e-5
    with model.fixed_routing(profile):
        expected = model(input_ids=BATCH).logits
    merged = model.merge_and_unload(routing=profile)
    assert type(merged).__module__.startswith("transformers.")
    assert not any("mor" in type(m).__module__ for m in merged.modules())
    got = merged(input_ids=BATCH).logits
    assert (got - expected).abs().max().item() <= 1e-5
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(BATCH).logits, got)


def test_routing_profile_ignores_padding_and_round_trips(tmp_path):
    model = trained()
    mask = torch.ones_like(BATCH)
    mask[1, 6:] = 0
    full = model.measure_routing([{"input_ids": BATCH[:1], "attention_mask": mask[:1]},
                                  {"input_ids": BATCH[1:, :6], "attention_mask": mask[1:, :6]}])
    padded = model.measure_routing([{"input_ids": BATCH, "attention_mask": mask}])
    for name in full.weights:
        torch.testing.assert_close(full.weights[name], padded.weights[name], atol=1e-5, rtol=1e-4)
    path = padded.save(tmp_path / "profile.json")
    again = mor.RoutingProfile.load(path)
    for name in padded.weights:
        torch.testing.assert_close(again.weights[name], padded.weights[name])


def test_merge_needs_a_routing_for_learned_routers_but_not_for_mean():
    with pytest.raises(ValueError, match="needs a fixed routing"):
        trained().merge_and_unload()
    model = trained(router="mean")
    with model.fixed_routing("uniform"):
        expected = model(input_ids=BATCH).logits
    torch.testing.assert_close(model.merge_and_unload()(BATCH).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_experts=4"):
        trained().merge_and_unload(routing=torch.ones(3) / 3)


def test_balanced_router_adds_and_reports_its_auxiliary_loss():
    model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=4, router="balanced", balance_coef=0.5,
                                                       dropout=0.0))
    model.train()
    out = model(input_ids=BATCH, labels=BATCH)
    with model.disable_adapter():
        plain = model.base_model(input_ids=BATCH, labels=BATCH).loss
    aux = out["router_aux_loss"]
    assert aux.item() >= 1.0 - 1e-4 and model.last_router_aux_loss == pytest.approx(aux.item())
    torch.testing.assert_close(out.loss, plain + 0.5 * aux, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    router = model.mor_adapters()["model.layers.0.mlp.gate_proj"].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.eval()
    assert "router_aux_loss" not in model(input_ids=BATCH, labels=BATCH)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=4, dropout=0.0, init_seed=0,
                                                           router="balanced"))
        with torch.no_grad():
            for layer in model.mor_adapters().values():
                layer.lora_B.fill_(0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_works_inside_accelerate_prepare():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=2, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    model.train()
    first = model(input_ids=BATCH, labels=BATCH).loss
    accelerator.backward(first)
    opt.step()
    assert model(input_ids=BATCH, labels=BATCH).loss < first


def test_torch_compile_matches_eager():
    model = trained()
    expected = model(input_ids=BATCH).logits
    compiled = torch.compile(model.base_model, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=BATCH).logits, expected, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_model_can_be_adapted_and_merged():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    model = get_mor_model(base, MoRConfig(r=4, num_experts=3, target_modules=["c_fc", "c_proj"], dropout=0.0))
    assert len(model.mor_adapters()) == 6  # mlp.c_fc, mlp.c_proj and attn.c_proj in each block
    train_steps(model, steps=3)
    profile = model.measure_routing([{"input_ids": BATCH}])
    with model.fixed_routing(profile):
        expected = model(input_ids=BATCH).logits
    assert (model.merge_and_unload(profile)(BATCH).logits - expected).abs().max() <= 1e-5


def test_target_module_choices():
    linear_count = lambda cfg: len(get_mor_model(make_tiny_llama(), cfg).mor_layers())  # noqa: E731
    assert linear_count(MoRConfig(target_modules="attention")) == 8
    assert linear_count(MoRConfig(target_modules="all-linear")) == 14  # 7 per block, lm_head excluded
    assert linear_count(MoRConfig(target_modules=r".*\.0\.mlp\.(up|down)_proj")) == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": -3}, "r"), ({"num_experts": 0}, "num_experts"),
    ({"router": "topk", "top_k": 9, "num_experts": 8}, "top_k"), ({"router": "gumbel"}, "router"),
    ({"method": "lora"}, "method"), ({"dropout": 1.5}, "dropout"), ({"alpha": 0}, "alpha"),
    ({"init": "zeros"}, "init"), ({"target_modules": []}, "target_modules"),
])
def test_bad_configurations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MoRConfig\.{field}="):
        MoRConfig(**kwargs)


def test_bad_targets_say_what_exists():
    with pytest.raises(ValueError, match=r"matches no module.*gate_proj"):
        get_mor_model(make_tiny_llama(), MoRConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="cannot adapt a LlamaRMSNorm"):
        get_mor_model(make_tiny_llama(), MoRConfig(target_modules=["input_layernorm"]))


@pytest.mark.slow
def test_one_training_step_lowers_loss_on_smollm2(smollm2_path):
    from mor.runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model = get_mor_model(base, MoRConfig(r=8, num_experts=8, dropout=0.0, init_seed=0))
    batch = tokenizer(["The capital of France is Paris.", "Two plus two equals four."], return_tensors="pt",
                      padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    loss0 = model(**batch, labels=labels).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(**batch, labels=labels).loss
    assert loss1 < loss0


# -- U, kept for one generation or evaluation, never longer ------------------------------------------------

def _tiny_mor():
    return get_mor_model(make_tiny_llama(), MoRConfig(r=4, num_experts=4, init_seed=0)).eval()


def _write_through_data(model, seed=1):
    """What weight averaging, EMA, distributed wrappers and some loaders do: write through ``.data``,
    which bumps no ``_version``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".mor." in name:
            p.data.add_(torch.randn(p.shape, generator=g) * 0.5)


def _fresh_logits(model, no_grad=torch.no_grad):
    """The logits of a newly built model holding ``model``'s weights: what any forward must give."""
    fresh = _tiny_mor()
    fresh.load_state_dict(model.state_dict())
    with no_grad():
        return fresh(input_ids=BATCH).logits


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_writes_through_data_in_eval_mode_are_seen_by_the_next_forward(no_grad):
    model = _tiny_mor()
    with no_grad():
        model(input_ids=BATCH)  # an inference forward before the change
    _write_through_data(model)
    with no_grad():
        torch.testing.assert_close(model(input_ids=BATCH).logits, _fresh_logits(model, no_grad), atol=0, rtol=0)


@pytest.mark.parametrize("change", ["load_state_dict", "train_then_eval", "end_of_the_block"])
def test_factors_kept_inside_reusing_factors_follow_loads_and_mode_changes(change):
    """Inside ``reusing_factors`` (generation, evaluation) U is built once; loading weights or
    toggling train()/eval() rebuilds it, and leaving the block drops it, even after ``.data`` writes."""
    from mor.layer import reusing_factors

    model = _tiny_mor()
    other = _tiny_mor()
    _write_through_data(other, seed=2)
    with reusing_factors(model):
        with torch.no_grad():
            model(input_ids=BATCH)  # U kept from here
        if change == "load_state_dict":
            model.load_state_dict(other.state_dict())
        else:
            _write_through_data(model)
        if change == "train_then_eval":
            model.train()
            model.eval()
        if change != "end_of_the_block":
            with torch.no_grad():
                got = model(input_ids=BATCH).logits
    if change == "end_of_the_block":
        with torch.no_grad():
            got = model(input_ids=BATCH).logits
    torch.testing.assert_close(got, _fresh_logits(model), atol=0, rtol=0)


def test_generate_builds_u_once_per_call_and_sees_data_writes_between_calls(monkeypatch):
    from mor.layer import MoRAdapter

    model = _tiny_mor()
    builds = []
    build = MoRAdapter._build_factors
    monkeypatch.setattr(MoRAdapter, "_build_factors", lambda self: builds.append(self) or build(self))
    prompt = BATCH[:1, :4]
    model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    adapters = [m for m in model.modules() if isinstance(m, MoRAdapter)]
    assert len(builds) == len(adapters)  # once per adapter for 6 tokens, not once per token
    _write_through_data(model)
    fresh = _tiny_mor()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False),
                       fresh.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))


def naive_mor_forward(adapter, x, base_out=None):
    """sum_i G_i(x) D_i x one expert at a time, the router run as a module (its hooks see the gates)."""
    gates, x = adapter.router(x), adapter.dropout(x)
    deltas = adapter.expert_deltas()  # (N, d_out, d_in)
    out = base_out if base_out is not None else 0
    for i in range(adapter.num_experts):
        out = out + gates[..., i:i + 1] * (x @ deltas[i].T)
    return out


def naive_mean_balancing_loss(gates):
    """The Switch-Transformer loss N sum_i f_i P_i of each layer (in fp32), one layer at a time, averaged."""
    losses = []
    for probs in (g.float() for g in gates):
        n = probs.shape[-1]
        share = torch.bincount(probs.argmax(dim=-1), minlength=n).to(probs.dtype) / probs.shape[0]
        losses.append(n * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("router", ["balanced", "mean"])
def test_twenty_training_steps_give_the_naive_formulas_losses(router, monkeypatch):
    """The vectorised training path (U built in its stacked layout, the balance loss of all layers at
    once) against the equation written out expert by expert and the loss layer by layer: the same
    losses to 1e-6 over 20 AdamW steps (float64, so that only a wrong formula can differ)."""
    def run():
        model = get_mor_model(make_tiny_llama().double(), MoRConfig(r=4, num_experts=4, router=router, dropout=0.0,
                                                                    init_seed=0, balance_coef=0.5))
        return train_steps(model, steps=20, lr=1e-2)

    fast = run()
    monkeypatch.setattr(mor.layer.MoRAdapter, "forward", naive_mor_forward)
    monkeypatch.setattr(mor.model, "mean_balancing_loss", naive_mean_balancing_loss)
    naive = run()
    assert fast[-1] < fast[0] - 0.1  # the steps train
    assert max(abs(a - b) for a, b in zip(fast, naive)) < 1e-6, (fast, naive)
