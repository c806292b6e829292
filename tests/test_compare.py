"""``mor compare``: the plan, the carve, the paired statistics against their naive formulas, the
runner (learning rate chosen on validation, resume, refusal, workers) on a tiny model, and the
report reproducing the quality study's committed numbers."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mor.compare import read_plan
from mor.compare.plan import PlanError, plan_from_dict
from mor.compare.stats import Z_95, Z_POWER_80, mcnemar_p, paired, records_needed, seeds_needed

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "benchmarks" / "plans"


def rec(seed, tasks: dict[str, str]) -> dict:
    return {"seed": seed, "records": {t: {"acc_norm": bits, "acc": bits} for t, bits in tasks.items()}}


# -- statistics ------------------------------------------------------------------------------------

def test_paired_difference_equals_the_naive_formula():
    """diff, the records' and the seeds' parts of the standard error, and the discordance, from
    the formula written out record by record on random scores."""
    rng = random.Random(3)
    tasks = {"t1": 40, "t2": 25}
    runs = {arm: [rec(s, {t: "".join(str(int(rng.random() < p)) for _ in range(n)) for t, n in tasks.items()})
                  for s in (0, 1, 2)] for arm, p in (("a", 0.6), ("b", 0.5))}
    out = paired(runs["a"], runs["b"], list(tasks), bootstrap=0)
    d = {t: [statistics.fmean(int(r["records"][t]["acc_norm"][j]) for r in runs["a"])
             - statistics.fmean(int(r["records"][t]["acc_norm"][j]) for r in runs["b"]) for j in range(n)]
         for t, n in tasks.items()}
    diff = statistics.fmean(statistics.fmean(v) for v in d.values())
    se_rec = math.sqrt(sum(statistics.pvariance(v) / len(v) for v in d.values())) / len(tasks)
    per_seed = [statistics.fmean(r["records"][t]["acc_norm"].count("1") / n for t, n in tasks.items())
                - statistics.fmean(q["records"][t]["acc_norm"].count("1") / n for t, n in tasks.items())
                for r, q in zip(runs["a"], runs["b"])]
    se = math.sqrt(se_rec ** 2 + statistics.variance(per_seed) / 3)
    assert out["diff"] == pytest.approx(diff, abs=1e-12)
    assert out["se_records"] == pytest.approx(se_rec, abs=1e-12)
    assert out["se"] == pytest.approx(se, abs=1e-12)
    assert out["discordant"] == pytest.approx(sum(x != 0 for v in d.values() for x in v) / 65)
    a_only = sum(ra["records"][t]["acc_norm"][j] > rb["records"][t]["acc_norm"][j]
                 for ra, rb in zip(runs["a"], runs["b"]) for t, n in tasks.items() for j in range(n))
    assert out["a_only"] == a_only
    assert out["verdict"] == ("tie" if abs(diff) <= 2 * se else "better" if diff > 0 else "worse")


def test_verdicts_bootstrap_and_mcnemar():
    better = paired([rec(0, {"t": "1" * 300 + "0" * 100})], [rec(0, {"t": "0" * 400})], ["t"], bootstrap=500)
    assert better["verdict"] == "better" and better["a_only"] == 300 and better["b_only"] == 0
    lo, hi = better["bootstrap_95"]
    assert lo <= better["diff"] <= hi and lo > 0.6
    assert paired([rec(0, {"t": "0" * 400})], [rec(0, {"t": "1" * 300 + "0" * 100})], ["t"])["verdict"] == "worse"
    same = paired([rec(0, {"t": "10" * 50})], [rec(0, {"t": "10" * 50})], ["t"])
    assert same["verdict"] == "tie" and same["diff"] == 0 and same["mcnemar_p"] == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # exact: both tails of Binomial(5, 1/2)
    assert mcnemar_p(3, 3) == 1.0
    # runs that scored different test splits are not paired
    with pytest.raises(ValueError, match="different numbers of records"):
        paired([rec(0, {"t": "1" * 10})], [rec(0, {"t": "1" * 11})], ["t"])


def test_records_needed_inverts_the_standard_error():
    v, sd, tasks, seeds = 0.08, 0.004, 4, 3
    n = records_needed(v, sd, tasks, seeds, difference=0.02)
    z = Z_95 + Z_POWER_80
    assert z * math.sqrt(v / (n * tasks) + sd ** 2 / seeds) <= 0.02 < z * math.sqrt(v / ((n - 1) * tasks) + sd ** 2 / seeds)
    assert records_needed(v, 0.03, tasks, 1) is None  # the seeds' spread alone exceeds the budget


def test_seeds_needed_inverts_the_standard_error():
    v, sd, tasks, n = 0.034, 0.016, 9, 200
    s = seeds_needed(v, sd, tasks, n, difference=0.02)
    z = Z_95 + Z_POWER_80
    assert z * math.sqrt(v / (n * tasks) + sd ** 2 / s) <= 0.02 < z * math.sqrt(v / (n * tasks) + sd ** 2 / (s - 1))
    assert seeds_needed(v, sd, tasks, 20) is None  # too few records: no number of seeds is enough
    assert seeds_needed(v, None, tasks, n) == 1


# -- the plan --------------------------------------------------------------------------------------

BASE_PLAN = dict(name="t", data=dict(train=["builtin:parity"]), train=dict(max_steps=2), arms=dict(lora=dict(method="lora", r=4)))


@pytest.mark.parametrize("change, message", [
    (dict(colour="red"), "unknown key"),
    (dict(arms=dict(lora=dict(method="lora", lr=1e-3, lrs=[1e-3]))), "not both"),
    (dict(arms=dict(lora=dict(method="lorax"))), "method"),
    (dict(train=dict(max_steps=2, output="x")), "set per run by compare"),
    (dict(train=dict()), "max_steps"),
    (dict(compare=[["lora", "mor"]]), "no arm 'mor'"),
    (dict(select=dict(lrs=[2.0])), "in \\(0, 1\\)"),
    (dict(select=dict(widen=-1)), "select.widen"),
    (dict(data=dict(train=["builtin:parity"], test_per_task=0)), "test_per_task"),
])
def test_plan_errors_name_the_key(change, message):
    with pytest.raises(PlanError, match=message):
        plan_from_dict({**BASE_PLAN, **change})


def test_a_bad_plan_is_one_error_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({**BASE_PLAN, "arms": {"lora": {"method": "lora", "rank": 4}}}))
    proc = subprocess.run([sys.executable, "-m", "mor.cli", "compare", str(plan)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: plan") and "rank" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validation_is_carved_from_training_data_never_test(tmp_path):
    from mor.compare.data import carve

    plan = plan_from_dict({**BASE_PLAN, "data": dict(train=["builtin:parity", "builtin:colour"], train_per_task=30,
                                                      validation_per_task=10, test_per_task=20)})
    splits = carve(plan, tmp_path)
    for task in ("parity", "colour"):
        train = {json.dumps(r.data, sort_keys=True) for r in splits.train[task].records}
        val = {json.dumps(r.data, sort_keys=True) for r in splits.validation[task].records}
        test = {json.dumps(r.data, sort_keys=True) for r in splits.test[task].records}
        assert (len(train), len(val), len(test)) == (30, 10, 20)
        assert not train & val and not val & test and not train & test
    again = carve(plan, tmp_path / "other")  # the same plan carves the same records anywhere
    assert [r.data for r in again.validation["parity"].records] == [r.data for r in splits.validation["parity"].records]


# -- choosing the learning rate ---------------------------------------------------------------------

def test_rate_beyond_an_edge_follows_the_grids_step():
    from mor.compare.plan import rate_beyond

    assert rate_beyond([1e-3, 3e-3, 1e-2], 1e-2) == 3e-2  # the 1-3-10 ladder
    assert rate_beyond([1e-3, 3e-3], 3e-3) == 1e-2 and rate_beyond([1e-3, 3e-3], 1e-3) == 3e-4
    assert rate_beyond([1e-4, 2e-4, 4e-4], 4e-4) == 8e-4 and rate_beyond([1e-4, 2e-4, 4e-4], 1e-4) == 5e-5
    assert rate_beyond([1e-3, 3e-3, 1e-2], 3e-3) is None  # not an edge
    assert rate_beyond([0.1, 0.3], 0.3) is None and rate_beyond([1e-3], 1e-3) is None  # past (0, 1); one rate


@pytest.mark.parametrize("peak, widen, tried, chosen", [
    (1e-3, 2, [3e-4, 1e-3, 3e-3], 1e-3),                    # inside: the grid as written
    (3e-2, 2, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 3e-2),        # up twice; still the edge: widen exhausted
    (1e-2, 2, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 1e-2),        # up twice: 1e-2 was the edge, 3e-2 falls
    (1e-5, 1, [3e-4, 1e-3, 3e-3, 1e-4], 1e-4),              # down once
    (3e-2, 0, [3e-4, 1e-3, 3e-3], 3e-3),                    # widen: 0
])
def test_selection_widens_the_grid_while_the_best_is_at_its_edge(tmp_path, peak, widen, tried, chosen):
    """The real worker loop, its training and scoring replaced by a validation score peaked at ``peak``
    (a second arm's at 1e-3, inside its grid): the trials it runs, in which order, and the rate every
    final run gets."""
    from mor.compare.plan import key_hash
    from mor.compare.runner import Worker, chosen_lr

    plan = plan_from_dict({**BASE_PLAN, "seeds": [0, 1], "select": dict(lrs=[3e-4, 1e-3, 3e-3], widen=widen),
                           "arms": dict(lora=dict(method="lora", r=4), other=dict(method="lora", r=2)),
                           "results": str(tmp_path / "results"), "work": str(tmp_path / "work")})
    ran = []

    class Scored(Worker):
        def execute(self, job, lr, key, path):
            ran.append((job.kind, job.arm, job.lr or lr))
            best = peak if job.arm == "lora" else 1e-3
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(key_hash=key_hash(key), validation_average=-abs(math.log(job.lr / best))
                                            if job.kind == "select" else None)))

    assert Scored(plan, log=lambda _: None).run(poll_seconds=0) == len(tried) + 3 + 2 * 2
    assert [lr for kind, arm, lr in ran if kind == "select" and arm == "lora"] == pytest.approx(tried)
    assert [lr for kind, arm, lr in ran if kind == "final" and arm == "lora"] == pytest.approx([chosen, chosen])
    assert chosen_lr(plan, plan.arms["lora"])[0] == pytest.approx(chosen)
    kinds = [kind for kind, _, _ in ran]
    assert kinds == sorted(kinds, key=lambda k: k != "select")  # every trial (widened too) before any final run


# -- the runner on a tiny model ---------------------------------------------------------------------

def tiny_plan(folder: Path, model: Path, **changes) -> Path:
    plan = dict(name="tiny", model=str(model),
                data=dict(train=["builtin:parity", "builtin:colour"], heldout=["builtin:sentiment"],
                          train_per_task=24, validation_per_task=8, test_per_task=12, heldout_per_task=10),
                train=dict(max_steps=3, batch_size=4, max_length=64, target="text"),
                seeds=[0, 1], select=dict(lrs=[1e-3, 3e-2], widen=0), baseline=True,
                arms=dict(lora=dict(method="lora", r=4), mor=dict(method="mor", num_experts=4)),
                results="results", work="work")
    plan.update(changes)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def compare(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mor.cli", "compare", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"), cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_compare_end_to_end_resume_and_refusal(tmp_path, tiny_model_dir):
    plan_file = tiny_plan(tmp_path, tiny_model_dir)
    first = compare(plan_file, "--limit", "3", "--no-report")  # killed after 3 runs, say
    results = tmp_path / "results"
    done = sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json"))
    assert len(done) == 3, first.stdout
    stamps = {p: (results / p).stat().st_mtime_ns for p in done}

    compare(plan_file)
    assert all((results / p).stat().st_mtime_ns == t for p, t in stamps.items())  # nothing redone
    names = sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json"))
    assert names == sorted(["base.json", "lora_seed0.json", "lora_seed1.json", "mor_seed0.json", "mor_seed1.json",
                            "report.json", *(f"select/{a}_lr{lr}_seed0.json" for a in ("lora", "mor")
                                             for lr in ("0.001", "0.03"))])
    # each arm's rate is the best validation score of its grid, recorded in its final runs
    for arm in ("lora", "mor"):
        val = {lr: json.loads((results / f"select/{arm}_lr{lr}_seed0.json").read_text())["validation_average"]
               for lr in ("0.001", "0.03")}
        final = json.loads((results / f"{arm}_seed1.json").read_text())
        assert final["lr"] == float(max(val, key=val.get))
        assert final["lr_selection"]["validation_average"] == pytest.approx(val)
        assert set(final["records"]) == {"parity", "colour", "sentiment"}
        assert all(len(final["records"][t]["acc_norm"]) == n for t, n in (("parity", 12), ("sentiment", 10)))
    # the selection's seed-0 training at the chosen rate is the final seed-0 run's: trained once
    trainings = sorted(p.name for p in (tmp_path / "work" / "train").iterdir() if p.is_dir())
    assert len(trainings) == 4 + 2, trainings  # 2 arms x 2 rates (seed 0), + seed 1 of each arm
    report = (results / "report.md").read_text()
    assert "paired comparisons" in report and "mor r=" in report and "power:" in report
    assert (results / "report_accuracy.png").is_file() and (results / "report_differences.png").is_file()

    # the same results folder under other settings: refused, nothing changed
    changed = tiny_plan(tmp_path, tiny_model_dir, train=dict(max_steps=4, batch_size=4, max_length=64, target="text"))
    before = {p: p.read_bytes() for p in results.rglob("*_seed*.json")}
    proc = compare(changed, check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in results.rglob("*_seed*.json")} == before


def test_the_common_case_from_flags_without_a_plan_file(tmp_path, tiny_model_dir):
    """`mor compare --data ...` writes the plan it describes under results/compare/NAME, runs it,
    and the same command resumes it; other flags under the same name, or a plan file and flags
    together, are one error line that changes nothing."""
    flags = ["--data", "builtin:parity", "builtin:colour", "--heldout", "builtin:sentiment", "--model", tiny_model_dir,
             "--steps", "2", "--seeds", "0", "--lrs", "1e-3", "3e-2", "--target", "text", "--name", "mine"]
    first = compare(*flags, "--workers", "2", cwd=tmp_path)
    results = tmp_path / "results" / "compare" / "mine"
    plan = read_plan(results / "plan.yaml")
    assert str(results / "plan.yaml") in first.stdout
    assert list(plan.arms) == ["lora", "mor"] and plan.steps() == 2 and plan.seeds == [0]
    assert plan.data.heldout == ["builtin:sentiment"] and plan.work_dir() == tmp_path / "runs" / "compare" / "mine"
    done = {p: p.stat().st_mtime_ns for p in results.rglob("*_seed*.json")}
    # each arm's seed 0 and its rate trials: the two given, and any past an edge (select.widen)
    trials = sorted(p.name for p in results.glob("select/*.json"))
    assert len(trials) >= 4 and len(done) == 2 + len(trials)
    assert {f"{a}_lr{lr}_seed0.json" for a in ("lora", "mor") for lr in ("0.001", "0.03")} <= set(trials)
    again = compare(*flags, cwd=tmp_path)
    assert "] train " not in again.stdout and {p: p.stat().st_mtime_ns for p in done} == done  # resumed: nothing redone
    before = (results / "plan.yaml").read_text()
    for args in (flags[:-1] + ["mine", "--steps", "3"], ["plan.yaml", "--arms", "lora"], [],
                 ["--data", "no-such.jsonl", "--name", "typo"]):
        proc = compare(*args, check=False, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, args
    assert (results / "plan.yaml").read_text() == before and {p: p.stat().st_mtime_ns for p in done} == done
    assert not (tmp_path / "results" / "compare" / "typo").exists()  # a missing file is refused before any plan


def test_two_hosts_share_a_plan(tmp_path, tiny_model_dir):
    """Two workers on two "hosts" (separate processes recording different host names in their
    claims) racing through one plan: every training once, every result written."""
    plan_file = tiny_plan(tmp_path, tiny_model_dir, seeds=[0, 1, 2], baseline=False)
    command = [sys.executable, "-m", "mor.cli", "compare", str(plan_file), "--no-report", "--threads", "1"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false", MOR_HOST=host))
             for host in ("host-a", "host-b")]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [line for out in outs for line in out.splitlines() if "] train " in line]
    assert len({line.split("] ", 1)[1] for line in lines}) == len(lines) == 4 + 4  # every training once
    assert {line.split(" pid")[0].split()[-1] for line in lines} <= {"host-a", "host-b"}
    assert len(list((tmp_path / "results").glob("*_seed*.json"))) == 6


@pytest.mark.slow
def test_each_training_on_two_processes(tmp_path, tiny_model_dir):
    """``processes: 2``: every training runs through accelerate on two gloo ranks."""
    plan_file = tiny_plan(tmp_path, tiny_model_dir, seeds=[0], baseline=False, processes=2,
                          arms=dict(lora=dict(method="lora", r=4, lr=1e-3)))
    compare(plan_file, "--no-report")
    result = json.loads(next((tmp_path / "work" / "train").glob("lora_*/result.json")).read_text())
    assert result["world_size"] == 2
    assert json.loads((tmp_path / "results" / "lora_seed0.json").read_text())["world_size"] == 2


# -- the quality study as a plan ----------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_plan_reads_and_finds_its_data(path):
    plan = read_plan(path)
    for task in plan.data.train + plan.data.heldout:
        if not task.startswith("builtin:"):
            assert Path(plan.data.source(task, plan.folder)).is_dir(), task
    assert plan.results_dir().is_relative_to(REPO / "results") and plan.work_dir().is_relative_to(REPO / "runs")


def test_report_reproduces_the_quality_study(tmp_path):
    """The 31 committed runs of the quality study, read through its plan, give the numbers the
    retired benchmarks/quality.py committed in results/quality.json."""
    from mor.compare.report import finished_runs, summarise

    plan = read_plan(PLANS / "commonsense4.yaml")
    finished = finished_runs(plan)
    assert sum(map(len, finished.values())) == 31
    summary = summarise(plan, finished, plan.data.train, plan.data.heldout, bootstrap=0)
    old = json.loads((REPO / "results" / "quality.json").read_text())
    rows = {r["arm"]: r for r in summary["rows"]}
    for row in old["rows"]:
        new = rows[row["method"]]
        for key in ("avg_acc_norm", "seed_sd", "forgetting", "trainable_parameters"):
            assert new[key] == pytest.approx(row[key], abs=1e-12), (row["method"], key)
        assert new["per_task_acc_norm"] == pytest.approx(row["per_task_acc_norm"], abs=1e-12)
    comps = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    assert len(comps) == len(old["comparisons"]) == 22
    for c in old["comparisons"]:
        new = comps[(c["a"], c["b"])]
        for part in ("trained", "heldout"):
            for key in ("diff", "se", "discordant"):
                assert new[part][key] == pytest.approx(c[part][key], abs=1e-12), (c["a"], c["b"], part, key)
            assert new[part]["verdict"] == c[part]["verdict"]


def test_report_reproduces_the_ablations():
    from mor.compare.report import finished_runs, summarise

    plan = read_plan(PLANS / "commonsense4_ablations.yaml")
    summary = summarise(plan, finished_runs(plan), plan.data.train, plan.data.heldout, bootstrap=0)
    old = {r["label"]: r for r in json.loads((REPO / "results" / "quality_ablations.json").read_text())["rows"]}
    rows = {r["label"]: r for r in summary["rows"]}
    assert set(rows) == set(old)
    for label, row in old.items():
        assert rows[label]["avg_acc_norm"] == pytest.approx(row["avg"], abs=1e-12)
    for c in summary["comparisons"]:
        want = old[plan.arms[c["a"]].label]["vs_reference"]
        assert c["trained"]["diff"] == pytest.approx(want["diff"], abs=1e-12)
        assert c["trained"]["two_se"] == pytest.approx(want["two_se"], abs=1e-12)
        assert c["trained"]["verdict"] == want["verdict"]


def test_a_folder_task_without_a_train_split_trains_on_the_rest_of_its_test_split(tmp_path):
    """Like social_i_qa: test records first, then train and validation from what is left."""
    from mor.compare.data import carve

    folder = tmp_path / "qa"
    folder.mkdir()
    records = [{"question": f"q{i}?", "choices": ["yes", "no"], "label": i % 2} for i in range(60)]
    (folder / "test.json").write_text(json.dumps(records))
    plan = plan_from_dict({**BASE_PLAN, "data": dict(train=[str(folder)], train_per_task=30, validation_per_task=10,
                                                      test_per_task=15)})
    splits = carve(plan, tmp_path / "work")
    seen = [r.data["question"] for s in (splits.train, splits.validation, splits.test) for r in s["qa"].records]
    assert len(seen) == len(set(seen)) == 55
    assert "rest of its test split" in splits.provenance["qa"]


def test_a_plan_reads_what_data_reads_a_saved_datasetdict_with_columns(tmp_path):
    """A ``save_to_disk`` DatasetDict (train and test splits) whose columns are mapped onto record
    fields: the test records come from its test split, train and validation from its train split."""
    datasets = pytest.importorskip("datasets")
    from mor.compare.data import carve

    def rows(prefix, n):
        return {"q": [f"{prefix} {i}?" for i in range(n)], "opts": [["yes", "no"]] * n, "gold": [i % 2 for i in range(n)]}

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows("train", 40)),
                          "test": datasets.Dataset.from_dict(rows("test", 20))}).save_to_disk(str(tmp_path / "qa"))
    plan = plan_from_dict({**BASE_PLAN, "data": dict(train=[str(tmp_path / "qa")], train_per_task=25,
                                                      validation_per_task=10, test_per_task=12,
                                                      columns={"question": "q", "choices": "opts", "label": "gold"})})
    splits = carve(plan, tmp_path / "work")
    assert all(r.data["question"].startswith("test") for r in splits.test["qa"].records)
    assert all(r.data["question"].startswith("train") for s in (splits.train, splits.validation) for r in s["qa"].records)
    assert (len(splits.train["qa"]), len(splits.validation["qa"]), len(splits.test["qa"])) == (25, 10, 12)


# -- cost ---------------------------------------------------------------------------------------------

def test_cost_interleaves_arms_and_times_the_runs_optimizer(tmp_path, tiny_model_dir):
    """Every arm, built as its training builds it, takes turns with the reference (who goes first
    rotates); the optimizer timed is the one the run's Trainer builds (its default ``optim``, the
    router's own group); each AdamW implementation is timed on every arm; the report shows it."""
    from transformers import TrainingArguments

    from mor.compare.cost import ADAMW, _interleaved, measure_cost, ratio_row, write_cost
    from mor.compare.report import write_report

    calls = []
    _interleaved({"a": "a", "b": "b", "c": "c"}, lambda c, b: calls.append(c + b), rounds=2, warmup=1,
                 log=lambda *_: None, what="x", batches=["0", "1"])
    assert calls == ["a0", "b0", "c0", "b1", "c1", "a1", "c0", "a0", "b0"]  # every arm on the round's batch
    row = ratio_row([2.0, 3.0, 9.0], [1.0, 1.0, 3.0])
    assert row["ratio"] == 3.0 and row["seconds"] == 3.0 and row["iqr"][0] <= 3.0 <= row["iqr"][1]

    plan = read_plan(tiny_plan(tmp_path, tiny_model_dir, arms=dict(
        lora=dict(method="lora", r=4), mor=dict(method="mor", num_experts=4, router_lr_multiplier=10))))
    cost = measure_cost(plan, rounds=2, warmup=1, log=lambda *_: None)
    assert cost["optim"] == TrainingArguments("x").optim
    arms = {a["arm"]: a for a in cost["arms"]}
    assert set(arms) == {"lora", "mor"} and arms["lora"]["ratio"] == 1.0 and cost["noise_floor"] > 0
    assert arms["mor"]["tensors"] > arms["lora"]["tensors"]  # MoR's per-expert vectors and router
    lr = plan.arm_grid(plan.arms["mor"])[0]
    assert arms["lora"]["lrs"] == [lr] and arms["mor"]["lrs"] == pytest.approx([lr, 10 * lr])  # the router's group
    assert arms["lora"]["implementation"] == ("fused" if "fused" in cost["optim"] else "for-loop")
    assert {(r["arm"], r["implementation"]) for r in cost["adamw"]} == {(a, i) for a in arms for i in ADAMW}
    write_cost(plan, rounds=1)
    report, _ = write_report(plan)  # nothing trained yet: the cost alone
    assert "forward+backward" in report and "fused" in report and "foreach" in report


@pytest.mark.parametrize("count", [1, 3])
def test_each_bootstrap_interval_is_drawn_on_its_comparisons_row(count):
    """Issue 34: one comparison's bootstrap band used to sit at the bottom of the axis, below its point."""
    from matplotlib.colors import to_rgba

    from mor.compare.report import BOOTSTRAP_GREY, _plt, draw_differences

    comps = [{"a": f"x{k}", "b": "base", "trained": {"diff": 0.01 * k, "two_se": 0.02, "verdict": "tie",
                                                     "bootstrap_95": [0.01 * k - 0.015, 0.01 * k + 0.025]}}
             for k in range(count)]
    fig, ax = _plt().subplots()
    draw_differences(ax, comps, {**{f"x{k}": f"arm {k}" for k in range(count)}, "base": "base"})
    grey = [line for line in ax.lines if to_rgba(line.get_color()) == to_rgba(BOOTSTRAP_GREY)]
    points = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(grey) == len(points) == count
    low, high = ax.get_ylim()
    for band, point, comp in zip(grey, points, reversed(comps)):
        (y,) = set(band.get_ydata())
        assert y == point.get_ydata()[0] and low + 0.4 < y < high - 0.4  # on the point's row, inside the axis
        assert list(band.get_xdata()) == pytest.approx([100 * x for x in comp["trained"]["bootstrap_95"]])
    _plt().close(fig)


def test_settings_added_since_results_were_keyed_change_the_key_only_when_set():
    """use_rslora / modules_to_save came after results/quality was keyed: left at their defaults the key
    is the one those results carry (test_report_reproduces_* reads them); set, the key differs."""
    from mor.train.adapters import AdapterSpec

    plain, rslora = AdapterSpec(method="mor"), AdapterSpec(method="mor", use_rslora=True)
    assert "use_rslora" not in plain.key() and "modules_to_save" not in plain.key()
    assert rslora.key()["use_rslora"] is True
    assert AdapterSpec(method="lora", modules_to_save=["lm_head"]).key()["modules_to_save"] == ["lm_head"]
