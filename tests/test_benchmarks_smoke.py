"""Smoke tests of the benchmarks: they run in seconds on tiny sizes and print / write what they promise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` lives at the repo root, next to ``src``
    sys.path.insert(0, str(ROOT))


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


def test_quality_benchmark_quick_smoke(tmp_path, capsys, tiny_model_dir):
    """``benchmarks/quality.py`` end to end on a tiny config-built LLaMA and a few tiny records:
    every method trains, is scored (text, label, merged MoR), the table prints, the JSON and the
    PNG are written, and a rerun reuses every finished run."""
    quality = pytest.importorskip("benchmarks.quality")
    data = _tiny_commonsense(tmp_path / "commonsense")
    out_json = tmp_path / "quality.json"
    argv = ["--model", str(tiny_model_dir), "--data-root", str(data), "--tasks", "ARC-Easy", "piqa",
            "--steps", "2", "--batch-size", "2", "--max-length", "64", "--train-per-task", "6",
            "--val-per-task", "2", "--test-per-task", "4", "--seeds", "0", "1", "--lr-grid", "1e-3",
            "--routing-prompts", "4", "--eval-batch-size", "4", "--label-scoring", "--device", "cpu",
            "--out", str(out_json)]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out

    assert "MoR quality benchmark" in printed and "machine:" in printed and "command:" in printed
    assert "| method | trainable params |" in printed
    for label, _ in quality.METHODS.values():
        assert f"| {label} |" in printed
    report = json.loads(out_json.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == set(quality.METHODS)
    assert out_json.with_suffix(".png").stat().st_size > 0
    for method, row in rows.items():
        assert set(row["per_task_acc_norm"]) == {"ARC-Easy", "piqa"}
        assert 0.0 <= row["avg_acc_norm"] <= 1.0 and "label_avg_acc" in row
        if method == "base":
            assert row["trainable_parameters"] == 0
            continue
        # the closed-form count is what was actually trained
        assert row["trainable_parameters"] == row["parameters_closed_form"] > 0
        assert row["lr"] == 1e-3
        assert len(row["seeds"]) == (2 if method in quality.MATCHED else 1)
        if method.startswith("mor"):
            assert 0.0 <= row["merged_avg_acc_norm"] <= 1.0
    assert rows["mor"]["avg_acc_norm_seed_std"] is not None
    assert any(line.startswith("MoR vs LoRA") for line in report["comparisons"])
    assert "piqa" in report["data"] and "no train split" in report["data"]["piqa"]

    # resume: a second call trains nothing and gives the same numbers
    assert quality.main(argv) == 0
    again = capsys.readouterr()
    assert "] train " not in again.out + again.err and "reuse mor lr=0.001 seed=1" in again.out + again.err
    rerun = json.loads(out_json.read_text())
    assert [r["avg_acc_norm"] for r in rerun["rows"]] == [r["avg_acc_norm"] for r in report["rows"]]

    # a learning-rate grid: the 1e-3 run is reused, only 3e-4 trains; the lr is picked on validation
    grid = argv[:argv.index("--seeds")] + ["--seeds", "0", "--lr-grid", "1e-3", "3e-4", "--methods", "lora",
                                          "--routing-prompts", "4", "--eval-batch-size", "4", "--device", "cpu",
                                          "--out", str(out_json)]
    assert quality.main(grid) == 0
    logs = "".join(capsys.readouterr())
    assert "reuse lora lr=0.001 seed=0" in logs and "] train lora lr=0.0003 seed=0" in logs
    (row,) = json.loads(out_json.read_text())["rows"]
    assert set(row["val_avg_acc_norm_by_lr"]) == {"0.001", "0.0003"} and row["lr"] in (1e-3, 3e-4)
