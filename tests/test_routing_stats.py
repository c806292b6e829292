"""Routing statistics (entropy, load, divergence between tasks), their training callback, and the
training options that act on the router or the base precision."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mor.analysis.analyze import routing_over_steps_table
from mor.cli import main
from mor.train.adapters import AdapterSpec, apply_adapter
from mor.analysis.routing_stats import (RoutingRecorder, entropy_bits, expert_load, find_routers, js_divergence,
                               measure_routing_stats, token_entropy_bits)
from mor.data.builtin import write_builtin_suite
from mor.train import TrainConfig, run_training
from mor.train.setup import cast_frozen_base, resolve_base_dtype, scale_router_init
from mor.train.trainer import AdapterTrainer, training_arguments


def test_statistics_match_hand_computed_values():
    gates = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert entropy_bits(gates).tolist() == pytest.approx([1.0, 0.0, 2.0])
    assert token_entropy_bits(gates) == pytest.approx(1.0)
    load = expert_load(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]))
    assert load["top"] == pytest.approx([0.25, 0.75])
    assert load["mean"] == pytest.approx([0.4, 0.6])
    assert expert_load(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))["top"] == pytest.approx([0.75, 0.25])
    assert js_divergence(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert js_divergence(torch.tensor([[0.3, 0.7], [0.3, 0.7]])) == pytest.approx(0.0)
    # JSD([1,0], [.5,.5]) = H(.75, .25) - (0 + 1) / 2
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert js_divergence(torch.tensor([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(h - 0.5)


def _mor(tiny_llama, **kw):
    return apply_adapter(tiny_llama, AdapterSpec(r=4, num_experts=3, dropout=0.0, init_seed=0, **kw))


def test_recorder_skips_padding_and_separates_tasks(tiny_llama):
    model = _mor(tiny_llama, router="softmax").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    plain = measure_routing_stats(model, {"a": [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]})
    masked = measure_routing_stats(model, {"a": [padded]})
    assert plain["entropy_bits"] == pytest.approx(masked["entropy_bits"], rel=1e-5)
    assert plain["tasks"]["a"]["tokens"] == masked["tasks"]["a"]["tokens"] == 4
    layer = next(iter(plain["layers"]))
    assert masked["layers"][layer]["load_mean"] == pytest.approx(plain["layers"][layer]["load_mean"], rel=1e-5)
    assert sum(masked["layers"][layer]["load_top"]) == pytest.approx(1.0)
    assert len(plain["layers"]) == len(find_routers(model)) == 6  # 2 blocks x gate/up/down
    assert plain["jsd_bits"] == 0.0  # one task

    two = measure_routing_stats(model, {"a": [{"input_ids": ids}], "b": [{"input_ids": torch.tensor([[9, 3, 2]])}]})
    assert two["jsd_bits"] > 0 and set(two["tasks"]) == {"a", "b"}
    assert model.training is False
    model.train()
    measure_routing_stats(model, {"a": [{"input_ids": ids}]})
    assert model.training is True  # mode restored


def test_mean_router_has_uniform_entropy(tiny_llama):
    model = _mor(tiny_llama, router="mean")
    stats = measure_routing_stats(model, {"a": [{"input_ids": torch.tensor([[5, 6, 7]])}]})
    assert stats["entropy_normalized"] == pytest.approx(1.0)
    assert stats["load_top_max"] == pytest.approx(1 / 3)  # ties split evenly: no expert is "top"


def test_the_recorder_measures_the_routing_profile_measure_routing_returns(tiny_llama):
    model = _mor(tiny_llama).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = model.measure_routing([{"input_ids": ids, "attention_mask": mask}])
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.mask = mask
        model(input_ids=ids, attention_mask=mask)
    got = recorder.profile()
    assert set(got.weights) == set(expected.weights) and len(got.weights) > 1
    for layer, weights in expected.weights.items():
        assert torch.equal(got.weights[layer], weights), layer  # one measurement (mor.routing.GateRecorder)
    assert not torch.allclose(got.weights[layer], torch.full_like(weights, 1 / 3))  # a learned, non-uniform router


def test_recorder_rejects_a_mask_of_the_wrong_size(tiny_llama):
    model = _mor(tiny_llama).eval()
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.mask = torch.ones(1, 3)
        with pytest.raises(ValueError, match="mask covers 3 tokens"):
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=16, eval_size=4, tasks=["parity", "colour"])
    return [str(folder / "parity"), str(folder / "colour")]


def test_training_writes_routing_records_per_interval(tmp_path, tiny_model_dir, two_tasks):
    cfg = TrainConfig(model=str(tiny_model_dir), adapter=AdapterSpec(r=4, num_experts=3), data=two_tasks,
                      output=str(tmp_path / "run"), max_steps=5, batch_size=4, logging_steps=2, evaluate=False,
                      routing_stats_steps=2, routing_probe_size=3)
    result = run_training(cfg)
    records = json.loads((tmp_path / "run" / "routing_stats.json").read_text())
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert set(records[-1]["tasks"]) == {"parity", "colour"}
    layer = records[-1]["layers"][next(iter(records[-1]["layers"]))]
    assert set(layer) == {"entropy_bits", "jsd_bits", "load_top", "load_mean"} and len(layer["load_top"]) == 3
    logged = [h for h in result.log_history if "routing/jsd_bits" in h]
    assert logged and "routing/entropy_bits" in logged[0]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["routing_stats"]["last"]["step"] == 5 and saved["routing_stats"]["records"] == 4

    # `mor analyze` draws them over steps from the file beside the adapter
    assert main(["analyze", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--data", *two_tasks, "--limit", "4", "--output", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "routing_over_steps.png").stat().st_size > 10_000
    assert routing_over_steps_table(records).count("\n") == len(records) + 1  # header, rule, one line a step


def test_router_parameters_get_their_own_learning_rate(tmp_path, tiny_llama):
    model = _mor(tiny_llama)
    cfg = TrainConfig(output=str(tmp_path), lr=2e-3, max_steps=1)
    trainer = AdapterTrainer(model=model, args=training_arguments(cfg), train_dataset=[{"input_ids": [1]}])
    trainer.router_lr_multiplier = 10.0
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    routers = [g for g in optimizer.param_groups if g.get("router")]
    others = [g for g in optimizer.param_groups if not g.get("router")]
    assert routers and all(g["lr"] == pytest.approx(2e-2) for g in routers)
    assert all(g["lr"] == pytest.approx(2e-3) for g in others)
    assert all("router" in names[id(p)] for g in routers for p in g["params"])
    assert not any("router" in names[id(p)] for g in others for p in g["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


def test_router_init_scale_multiplies_router_weights(tiny_llama):
    model = _mor(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    assert scale_router_init(model, 4.0) == len(before) > 0
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.detach(), 4.0 * before[n])


def test_bf16_base_stays_close_to_fp32_and_adapter_stays_fp32(tiny_llama):
    model = _mor(tiny_llama)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    half = copy.deepcopy(model)
    assert cast_frozen_base(half, torch.bfloat16) > 0
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters() if not p.requires_grad)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, half(input_ids=ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    loss = half(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in half.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_base_dtype_names():
    assert resolve_base_dtype("fp32") is torch.float32
    assert resolve_base_dtype("bf16") is torch.bfloat16
    assert resolve_base_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        resolve_base_dtype("fp16")


def test_train_flags_reach_the_config(monkeypatch):
    import mor.train as train_module  # where `mor train` finds run_training
    from mor.cli import main as cli_main

    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "run_training", fake_run)
    with pytest.raises(SystemExit):
        cli_main(["train", "--base-dtype", "bf16", "--group-by-length", "--router-lr-multiplier", "30",
                  "--router-init-scale", "5", "--routing-stats-steps", "7", "--no-eval"])
    cfg = seen["cfg"]
    assert (cfg.base_dtype, cfg.group_by_length, cfg.router_lr_multiplier, cfg.router_init_scale,
            cfg.routing_stats_steps) == ("bf16", True, 30.0, 5.0, 7)
    assert training_arguments(cfg).train_sampling_strategy == "group_by_length"


def test_routers_are_found_one_way_and_two_active_adapters_are_an_error(tiny_llama):
    # routing statistics used to switch themselves off silently when find_routers swallowed this error
    from peft import get_peft_model

    from mor import MoRConfig
    from mor.errors import SettingsError
    from mor.layer import find_routers, mixture_layers

    assert find_routers(tiny_llama) == {}  # no mixture layers (a LoRA / DoRA run): nothing to record
    model = get_peft_model(tiny_llama, MoRConfig(r=2, num_experts=2, init_seed=0))
    routers = find_routers(model)
    assert set(routers) == set(mixture_layers(model)) == set(model.mor_layers()) and len(routers) == 6
    model.add_adapter("second", MoRConfig(r=2, num_experts=2, init_seed=1))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(SettingsError, match="one adapter at a time"):
        find_routers(model)
