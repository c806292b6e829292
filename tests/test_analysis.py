"""Analysis: routing by task (profiles, entropy, JSD), parameter scaling, rank spectra, figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama
from matplotlib.image import imread

import mor
from mor.analysis import analyze as A
from mor.analysis import plots as P
from mor.params import layer_parameter_count, parameter_count

R, N = 4, 4


def _batches(low: int, high: int, count: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(low, high, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # some padding: must not count
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _randomise(model, distinct_out: bool = True) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.mor_adapters().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))  # B = 0 at init: dW would be 0
            if distinct_out and isinstance(layer, mor.MoRAdapter):
                # Omega_B rows clearly distinct, so the experts' output spaces differ
                layer.expert_scales_out.copy_(1 + torch.randn(layer.expert_scales_out.shape, generator=g))


@pytest.fixture
def mor_model():
    model = mor.get_mor_model(make_tiny_llama(), mor.MoRConfig(r=R, num_experts=N, dropout=0.0, init_seed=0))
    _randomise(model)
    return model


@pytest.fixture
def tasks():
    return {"low": _batches(3, 40, seed=0), "high": _batches(80, 128, seed=1)}


# -- routing -------------------------------------------------------------------------------------

def test_profiles_cover_every_layer_and_sum_to_one(mor_model, tasks):
    profiles = A.task_routing_profiles(mor_model, tasks)
    assert list(profiles) == ["low", "high"]
    for profile in profiles.values():
        assert set(profile.weights) == set(mor_model.mor_adapters())
        for g in profile.weights.values():
            assert g.shape == (N,) and (g >= 0).all()
            assert float(g.sum()) == pytest.approx(1.0, abs=1e-5)


def test_jsd_is_zero_for_identical_task_data_and_positive_otherwise(mor_model, tasks):
    same = A.routing_stats(A.task_routing_profiles(mor_model, {"a": tasks["low"], "b": tasks["low"]}))
    assert same["jsd_mean"] == pytest.approx(0.0, abs=1e-9)
    assert same["jsd_pairwise"][0][1] == pytest.approx(0.0, abs=1e-9)
    diff = A.routing_stats(A.task_routing_profiles(mor_model, tasks))
    assert diff["jsd_mean"] > 1e-6
    assert diff["jsd_pairwise"][0][1] == pytest.approx(diff["jsd_pairwise"][1][0])
    assert diff["jsd_pairwise"][0][1] > 1e-6
    assert len(diff["jsd_per_layer"]) == len(mor_model.mor_adapters())
    for task in diff["tasks"]:
        assert 0 < diff["per_task"][task]["entropy_bits"] <= math.log2(N) + 1e-9
    table = A.routing_table(diff)
    assert "low" in table and "high" in table and "JSD" in table


def test_entropy_and_jsd_reference_values():
    assert float(A.entropy_bits(torch.full((8,), 1 / 8))) == pytest.approx(3.0)
    assert float(A.entropy_bits(torch.tensor([1.0, 0.0]))) == 0.0
    assert A.js_divergence(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert A.js_divergence(torch.tensor([[0.3, 0.7], [0.3, 0.7]])) == pytest.approx(0.0, abs=1e-12)


def test_text_tasks_need_a_tokenizer(mor_model):
    with pytest.raises(ValueError, match="tokenizer"):
        A.task_routing_profiles(mor_model, {"t": ["some text"]})


# -- parameter scaling -----------------------------------------------------------------------------

def test_parameter_scaling_matches_the_closed_form():
    base = make_tiny_llama()
    data = A.parameter_scaling(base, r=R, experts=(1, 2, 4, 8))
    shapes = [(32, 64), (32, 64), (64, 32)] * 2  # gate, up, down in two blocks
    assert data["num_layers"] == 6
    for i, n in enumerate(data["experts"]):
        assert data["mor"][i] == parameter_count(base, "mor", R, n) == sum(
            R * (a + b) + n * (R + b) + a * n for a, b in shapes)
        assert data["moelora"][i] == sum(n * R * (a + b) + a * n for a, b in shapes)
        assert data["lora"][i] == sum(R * (a + b) for a, b in shapes)
        assert data["lora_rank_Nr"][i] == sum(layer_parameter_count("lora", a, b, n * R) for a, b in shapes)
    mor_steps = [b - a for a, b in zip(data["mor"], data["mor"][1:])]
    moe_steps = [b - a for a, b in zip(data["moelora"], data["moelora"][1:])]
    assert all(m < e for m, e in zip(mor_steps, moe_steps))  # MoE-LoRA grows faster with N
    assert data["mor_vs_moelora"][-1] < data["mor_vs_moelora"][0]
    assert "MoE-LoRA" in A.parameter_table(data)


def test_parameter_scaling_on_a_wrapped_model_counts_the_same_layers(mor_model):
    plain = A.parameter_scaling(make_tiny_llama(), r=R, experts=(N,))
    wrapped = A.parameter_scaling(mor_model, r=R, experts=(N,))
    own = A.parameter_scaling(mor_model, r=R, experts=(N,), target_modules=None)
    assert wrapped["mor"] == plain["mor"] == own["mor"]
    assert wrapped["this_adapter"]["parameters"] == plain["mor"][0]  # the closed form is the real count
    assert A.parameter_scaling(mor_model, r=R, experts=(N,), target_modules=["down_proj"])["num_layers"] == 2


# -- rank spectrum --------------------------------------------------------------------------------

def test_mixed_mor_update_has_rank_r_while_the_experts_span_n_times_r(mor_model):
    data = A.rank_spectrum(mor_model, layers="all")
    assert len(data["layers"]) == 6
    for name, d in data["layers"].items():
        # every D_i = diag(Omega_B[i]) B diag(Omega_A[i]) A reads through A: any fixed mix is rank <= r
        assert d["mixed"]["numeric_rank"] == R
        assert d["shared"]["numeric_rank"] == R
        assert d["input_span"]["numeric_rank"] == R
        assert all(e["numeric_rank"] == R for e in d["experts"])
        # ... but the experts write to N*r output directions (distinct Omega_B rows)
        assert d["output_span"]["numeric_rank"] == min(N * R, d["d_out"]) > R
        assert R - 1 < d["mixed"]["effective_rank"] <= R + 1e-6
        assert d["mixed"]["energy_top_r"] == pytest.approx(1.0)
        layer = mor_model.mor_adapters()[name]
        dense = torch.linalg.svdvals(layer.double().merged_delta(torch.full((N,), 1 / N, dtype=torch.float64)))
        torch.testing.assert_close(torch.tensor(d["mixed"]["singular_values"][:R], dtype=torch.float64),
                                   dense[:R].detach(), rtol=1e-9, atol=1e-12)


def test_moelora_mixed_update_reaches_rank_n_times_r():
    model = mor.get_mor_model(make_tiny_llama(), mor.MoELoRAConfig(r=R, num_experts=N, init_seed=0))
    _randomise(model)
    data = A.rank_spectrum(model, layers=[0])
    (d,) = data["layers"].values()
    assert d["shared"] is None
    assert d["mixed"]["numeric_rank"] == N * R > R
    assert d["mixed"]["energy_top_r"] < 1.0


def test_rank_spectrum_profile_layers_and_a_lora_model(mor_model, tasks):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=R, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    profile = A.task_routing_profiles(mor_model, {"low": tasks["low"]})["low"]
    names = list(mor_model.mor_adapters())
    data = A.rank_spectrum(mor_model, profile, lora_model=lora)
    chosen = list(data["layers"])  # by default: first, middle, last
    assert len(chosen) == 3 and chosen[0] == names[0] and chosen[-1] == names[-1]
    d = data["layers"][names[0]]
    assert d["routing"] == pytest.approx(profile.weights[names[0]].tolist())
    assert d["lora"]["numeric_rank"] == R and d["lora"]["r"] == R
    assert "LoRA model" in A.spectrum_table(data)
    with pytest.raises(KeyError):
        A.rank_spectrum(mor_model, layers=["nope"])


def test_effective_rank_of_a_flat_spectrum():
    st = A.spectrum_stats(torch.tensor([2.0, 2.0, 2.0, 0.0]), r=2)
    assert st["numeric_rank"] == 3
    assert st["effective_rank"] == pytest.approx(3.0)
    assert st["energy_top_r"] == pytest.approx(2 / 3)
    assert A.spectrum_stats(torch.zeros(3))["numeric_rank"] == 0


# -- figures and the report -------------------------------------------------------------------

def test_analyze_writes_readable_figures_and_the_numbers(mor_model, tasks, tmp_path):
    paths = A.analyze(mor_model, {**tasks, "mixed": _batches(3, 128, seed=2)}, tmp_path, experts=(1, 2, 4))
    assert set(paths) == {*P.FIGURES, "analysis"}
    for key, name in P.FIGURES.items():
        assert paths[key] == tmp_path / name
        assert paths[key].stat().st_size > 1000
        image = imread(paths[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    numbers = json.loads(paths["analysis"].read_text())
    assert set(numbers) >= {"routing", "parameters", "rank_spectrum"}
    assert numbers["routing"]["tasks"] == ["low", "high", "mixed"]
    report = A.format_report(paths["analysis"])
    assert report == A.format_report(tmp_path) == A.format_report(numbers)
    for heading in ("Router specialisation", "Parameter scaling", "Rank spectrum"):
        assert heading in report


def test_routing_figures_draw_the_computed_numbers(mor_model, tasks, tmp_path):
    stats = A.routing_stats(A.task_routing_profiles(mor_model, tasks))
    for per_layer in (False, True):
        path = P.plot_task_routing(stats, tmp_path / f"r{per_layer}.png", per_layer=per_layer)
        assert imread(path).shape[0] > 100
    assert P.short_layer_name("model.layers.12.mlp.gate_proj") == "12.gate_proj"
    assert P.short_layer_name("transformer.h.3.mlp.c_fc") == "3.c_fc"
