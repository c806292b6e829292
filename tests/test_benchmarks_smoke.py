"""Smoke tests of the benchmarks: they run in seconds on tiny sizes and print / write what they promise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def _tiny_commonsense(root: Path) -> Path:
    """A few records in the commonsense format: one task with train/test splits (4 options),
    one with only test.json (2 solutions), like ARC-Easy and piqa."""
    words = ["red", "blue", "green", "yellow", "animal", "plant", "tool", "even", "odd"]

    def arc(i: int) -> dict:
        opts = [words[(i + k) % len(words)] for k in range(4)]
        gold = i % 4
        body = " ".join(f"Answer{k + 1}: {o}" for k, o in enumerate(opts))
        return {"instruction": f"Please choose the correct answer to the question: which is {opts[gold]} {i}?\n\n"
                               f"{body}\n\nAnswer format: answer1/answer2/answer3/answer4",
                "input": "", "output": f"the correct answer is answer{gold + 1}", "answer": f"answer{gold + 1}"}

    def piqa(i: int) -> dict:
        gold = i % 2
        return {"instruction": f"Please choose the correct solution to the question: is {i} even or odd?\n\n"
                               f"Solution1: {words[i % 9]} even\n\nSolution2: {words[(i + 3) % 9]} odd\n\n"
                               "Answer format: solution1/solution2",
                "input": "", "output": f"the correct answer is solution{gold + 1}", "answer": f"solution{gold + 1}"}

    (root / "ARC-Easy").mkdir(parents=True)
    (root / "piqa").mkdir()
    (root / "ARC-Easy" / "train.json").write_text(json.dumps([arc(i) for i in range(12)]))
    (root / "ARC-Easy" / "test.json").write_text(json.dumps([arc(100 + i) for i in range(8)]))
    (root / "piqa" / "test.json").write_text(json.dumps([piqa(i) for i in range(20)]))
    return root


def test_quality_study_quick_smoke(tmp_path, capsys, tiny_model_dir):
    """``benchmarks/quality.py --quick`` end to end on a tiny LLaMA and a few records: every run
    trains, scores every test record of the trained and the held-out task, writes its own result
    file at once; the report compares runs record by record; a rerun trains nothing; a result
    made under other settings is refused."""
    quality = pytest.importorskip("benchmarks.quality")
    data = _tiny_commonsense(tmp_path / "commonsense")
    results = tmp_path / "results"
    argv = ["--quick", "--model", str(tiny_model_dir), "--data-root", str(data), "--methods", "base", "mor",
            "lora", "lora-lr1e-3", "--seeds", "0", "1", "--results", str(results), "--work", str(tmp_path / "work"),
            "--eval-batch-size", "4", "--lr", "5e-4"]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "finished: 7 of 7 runs" in printed and "paired comparisons" in printed
    assert sorted(p.name for p in results.iterdir()) == [
        "base.json", "lora-lr1e-3_seed0.json", "lora-lr1e-3_seed1.json", "lora_seed0.json", "lora_seed1.json",
        "mor_seed0.json", "mor_seed1.json"]
    trained_lr = {run: json.loads((tmp_path / "work" / run / "adapter" / "training.json").read_text())
                  ["train_config"]["lr"] for run in ("lora_seed0", "lora-lr1e-3_seed0")}
    assert trained_lr == {"lora_seed0": 5e-4, "lora-lr1e-3_seed0": 1e-3}  # the control's own rate, not the common one
    runs = {p.stem: json.loads(p.read_text()) for p in results.iterdir()}
    for name, rec in runs.items():
        # every test record of the trained task (8) and of the held-out one (quick: 8 of 20)
        assert {t: len(v["acc_norm"]) for t, v in rec["records"].items()} == {"ARC-Easy": 8, "piqa": 8}
        assert rec["tasks"]["ARC-Easy"]["acc_norm"] == pytest.approx(rec["records"]["ARC-Easy"]["acc_norm"].count("1") / 8)
        assert (rec["trainable_parameters"] > 0) == (name != "base")
    assert runs["mor_seed0"]["trainable_parameters"] == runs["mor_seed0"]["parameters_closed_form"]
    assert runs["mor_seed0"]["losses"] and "gate_mean" in runs["mor_seed0"]["routing"]["tasks"]["piqa"]
    assert "routing" not in runs["lora_seed0"]

    summary = json.loads(results.with_suffix(".json").read_text())
    (comp,) = [c for c in summary["comparisons"] if (c["a"], c["b"]) == ("mor", "lora")]
    by_seed = [sum(map(int, runs[f"mor_seed{s}"]["records"]["ARC-Easy"]["acc_norm"])) / 8 -
               sum(map(int, runs[f"lora_seed{s}"]["records"]["ARC-Easy"]["acc_norm"])) / 8 for s in (0, 1)]
    assert comp["trained"]["diff"] == pytest.approx(sum(by_seed) / 2)
    assert comp["trained"]["per_seed"] == pytest.approx(by_seed)
    assert results.with_suffix(".png").stat().st_size > 0 and Path(summary["routing_png"]).stat().st_size > 0

    assert quality.main(argv) == 0  # resume: nothing trains again
    assert "] train " not in capsys.readouterr().out

    with pytest.raises(SystemExit, match="other settings"):
        quality.main(argv + ["--steps", "3"])


def test_quality_ablations_quick_smoke(tmp_path, capsys, tiny_model_dir):
    """``--ablations --quick``: the N and r sweep trains seven adapters whose parameter counts
    follow N and r, and the figure and the summary are written."""
    quality = pytest.importorskip("benchmarks.quality")
    data = _tiny_commonsense(tmp_path / "commonsense")
    results = tmp_path / "ablations"
    argv = ["--ablations", "--quick", "--model", str(tiny_model_dir), "--data-root", str(data),
            "--results", str(results), "--work", str(tmp_path / "work"), "--eval-batch-size", "4"]
    assert quality.main(argv) == 0
    assert "finished: 7 of 7 runs" in capsys.readouterr().out
    rows = {r["run"]: r for r in json.loads(results.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {f"ablation_N{n}" for n in (2, 4, 8, 16)} | {f"ablation_r{r}" for r in (4, 16, 32)}
    params = [rows[f"ablation_N{n}"]["trainable_parameters"] for n in (2, 4, 8, 16)]
    assert params == sorted(params) and len(set(params)) == 4
    assert rows["ablation_r4"]["trainable_parameters"] < rows["ablation_N8"]["trainable_parameters"] < \
        rows["ablation_r16"]["trainable_parameters"]
    assert all(0 < r["avg_se"] < 0.5 for r in rows.values())
    # each run against r=8 N=8 record by record: on the same records the paired difference of the
    # averages is the difference of the averages
    ref = rows.pop("ablation_N8")
    assert ref["vs_reference"] is None
    for r in rows.values():
        assert r["vs_reference"]["diff"] == pytest.approx(r["avg"] - ref["avg"], abs=1e-12)
        assert r["vs_reference"]["verdict"] in ("tie", "better", "worse")
    assert results.with_suffix(".png").stat().st_size > 0


def test_quality_paired_difference_arithmetic():
    """The paired difference and its standard error, by hand: one task, two runs a side."""
    quality = pytest.importorskip("benchmarks.quality")

    def rec(seed, bits):
        return {"seed": seed, "records": {"t": {"acc_norm": bits}}}

    a = [rec(0, "1100"), rec(1, "1110")]
    b = [rec(0, "1000"), rec(1, "1000")]
    out = quality.paired(a, b, ["t"])
    d = [0.0, 1.0, 0.5, 0.0]  # per record: mean over a's seeds minus b's
    assert out["diff"] == pytest.approx(sum(d) / 4)
    var = sum((x - sum(d) / 4) ** 2 for x in d) / 4
    assert out["se_records"] == pytest.approx((var / 4) ** 0.5)
    assert out["per_seed"] == pytest.approx([0.25, 0.5]) and out["sd_seeds"] == pytest.approx(0.125 * 2 ** 0.5)
    assert out["se"] == pytest.approx((out["se_records"] ** 2 + out["sd_seeds"] ** 2 / 2) ** 0.5)
    assert out["verdict"] == "tie"  # 0.375 < 2 s.e. with 4 records
    many = quality.paired([rec(0, "1" * 400)], [rec(0, "0" * 200 + "1" * 200)], ["t"])
    assert many["diff"] == pytest.approx(0.5) and many["verdict"] == "better"
    assert quality.paired([rec(0, "0" * 200 + "1" * 200)], [rec(0, "1" * 400)], ["t"])["verdict"] == "worse"


def test_quality_bf16_check_compares_the_same_steps():
    """The bf16-base check pairs the runs of one seed and compares losses step by step."""
    quality = pytest.importorskip("benchmarks.quality")
    bf16 = {"seed": 0, "losses": [[1, 2.0], [2, 1.5], [60, 1.0]], "train_seconds": 70.0}
    fp32 = {"seed": 0, "losses": [[1, 2.1], [2, 1.5], [60, 0.8]], "train_seconds": 100.0}
    other = {"seed": 1, "losses": [[1, 9.0]], "train_seconds": 1.0}
    out = quality.bf16_check({"mor": [other, bf16], "mor-fp32": [fp32]})
    assert out["mean_abs_gap_first"] == pytest.approx(0.05) and out["max_abs_gap_first"] == pytest.approx(0.1)
    assert out["mean_abs_gap_all"] == pytest.approx(0.3 / 3) and out["train_seconds_ratio"] == pytest.approx(0.7)
    assert quality.bf16_check({"mor": [bf16]}) is None


def test_quality_workers_claim_runs_with_lock_files(tmp_path):
    """Two workers never take the same run; a lock left by a dead process is taken over."""
    import subprocess

    quality = pytest.importorskip("benchmarks.quality")
    lock = tmp_path / "locks" / "mor_seed0.lock"
    assert quality._claim(lock) and lock.read_text() == str(__import__("os").getpid())
    assert not quality._claim(lock)  # held by a live process (this one)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert quality._claim(lock)


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
