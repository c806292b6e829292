"""The quality study: MoR against LoRA, DoRA and MoE-LoRA on a multi-task commonsense mix.

    python -m benchmarks.quality --workers 2        # run or resume the study (many hours on 2 cores)
    python -m benchmarks.quality --report           # table, verdicts and figures from the finished runs
    python -m benchmarks.quality --ablations --workers 2   # N and r sweeps, 1 seed, small budget
    python -m benchmarks.quality --quick            # a smoke: minutes

Every run (method x seed) trains on the same mix of four tasks, is scored on their test records
and on a fifth task nobody trains on (forgetting), and writes one JSON under results/quality/
with its per-record scores the moment it finishes -- so the study resumes across sessions and
any two runs can be compared record by record. ``--report`` (also printed after the runs)
computes paired differences with their standard errors and says better / worse / tie per
comparison. How it is built and why: docs/benchmarks.md, section "Quality".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.common import machine_line, markdown_table, read_json, settings_hash, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "commonsense"

# name -> (label, AdapterSpec kwargs or None for the base model, TrainConfig extras)
CHOSEN_ROUTER = dict(router_lr_multiplier=100.0)  # the remedy measured in results/routing_remedies/
METHODS: dict[str, tuple[str, dict | None, dict]] = {
    "base": ("base model, zero-shot", None, {}),
    "lora": ("LoRA r=16", dict(method="lora", r=16), {}),
    "dora": ("DoRA r=16", dict(method="dora", r=16), {}),
    "moelora": ("MoE-LoRA N=8 r=2", dict(method="moelora", r=2, num_experts=8), {}),
    "mor": ("MoR r=8 N=8, balanced, router lr x100",
            dict(method="mor", r=8, num_experts=8, router="balanced"), CHOSEN_ROUTER),
    "mor-softmax": ("MoR r=8 N=8, plain softmax (paper)", dict(method="mor", r=8, num_experts=8), {}),
    "mor-mean": ("MoR r=8 N=8, mean router (no routing)", dict(method="mor", r=8, num_experts=8, router="mean"), {}),
    "mor-fp32": ("MoR (as 'mor') on an fp32 base", dict(method="mor", r=8, num_experts=8, router="balanced"),
                 dict(CHOSEN_ROUTER, base_dtype="fp32")),
    # the common rate 3e-4 is not every method's best: would 1e-3 (the CLI's default) change a verdict?
    "lora-lr1e-3": ("LoRA r=16, lr 1e-3", dict(method="lora", r=16), dict(lr=1e-3)),
    "mor-lr1e-3": ("MoR (as 'mor'), lr 1e-3", dict(method="mor", r=8, num_experts=8, router="balanced"),
                   dict(CHOSEN_ROUTER, lr=1e-3)),
    "moelora-lr1e-3": ("MoE-LoRA N=8 r=2, lr 1e-3", dict(method="moelora", r=2, num_experts=8), dict(lr=1e-3)),
    "mor-softmax-lr1e-3": ("MoR r=8 N=8, plain softmax, lr 1e-3 (the CLI's defaults)",
                           dict(method="mor", r=8, num_experts=8), dict(lr=1e-3)),
    "dora-lr1e-3": ("DoRA r=16, lr 1e-3", dict(method="dora", r=16), dict(lr=1e-3)),
}
# the lr 1e-3 arms came last (seed 0 showed every method better at 1e-3 than at the common 3e-4)
STUDY_METHODS = ("base", "mor", "lora", "mor-softmax", "dora", "moelora", "mor-mean",
                 "moelora-lr1e-3", "mor-lr1e-3", "lora-lr1e-3")
# seed 0 only: is the bf16 base a fair stand-in for fp32? do DoRA and the CLI's default MoR gain at 1e-3 too?
CONTROL_SEED0 = ("mor-fp32", "mor-softmax-lr1e-3", "dora-lr1e-3")
# (a, b): is a better than b?
COMPARISONS = (("mor", "lora"), ("mor", "dora"), ("mor", "moelora"), ("mor", "mor-softmax"), ("mor", "mor-mean"),
               ("mor-softmax", "lora"), ("mor-mean", "lora"), ("dora", "lora"), ("moelora", "lora"), ("lora", "base"),
               ("mor", "base"), ("mor-fp32", "mor"), ("moelora-lr1e-3", "moelora"), ("mor-lr1e-3", "mor"),
               ("lora-lr1e-3", "lora"), ("mor-lr1e-3", "lora-lr1e-3"), ("mor-lr1e-3", "moelora-lr1e-3"),
               ("moelora-lr1e-3", "lora-lr1e-3"), ("mor-softmax-lr1e-3", "mor-lr1e-3"),
               ("mor-softmax-lr1e-3", "lora-lr1e-3"), ("dora-lr1e-3", "lora-lr1e-3"), ("dora-lr1e-3", "dora"))


@dataclass
class Settings:
    """What every run of one study shares (its hash names the study's result files)."""

    tasks: list = field(default_factory=lambda: ["boolq", "ARC-Easy", "openbookqa", "social_i_qa"])
    heldout: list = field(default_factory=lambda: ["piqa"])  # scored, never trained on: forgetting
    train_per_task: int = 1000
    test_per_task: int = 800  # capped by the task's test split (openbookqa: 500)
    heldout_size: int = 600
    steps: int = 300
    batch_size: int = 8
    max_length: int = 128
    lr: float = 3e-4  # one common rate for every method (stated, not tuned per method)
    warmup_ratio: float = 0.06
    base_dtype: str = "bf16"  # frozen base in bf16 while training, adapters fp32; scoring is fp32
    group_by_length: bool = True
    split_seed: int = 1234
    routing_prompts: int = 64  # test prompts per task for the routing profile after training
    model: str | None = None


QUICK = dict(tasks=["ARC-Easy"], heldout=["piqa"], train_per_task=16, test_per_task=12, heldout_size=8, steps=4,
             batch_size=2, max_length=64, lr=1e-3, routing_prompts=4)
ABLATION = dict(steps=100, test_per_task=300, heldout_size=300)
ABLATION_GRID = [("N", n, dict(method="mor", r=8, num_experts=n, router="balanced")) for n in (2, 4, 8, 16)] + \
                [("r", r, dict(method="mor", r=r, num_experts=8, router="balanced")) for r in (4, 16, 32)]
ABLATION_REFERENCE = "ablation_N8"  # r=8 N=8, the study's MoR: the others are compared with it


@dataclass(frozen=True)
class Run:
    name: str  # file stem under the results folder
    method: str
    seed: int | None
    label: str
    adapter: dict | None
    extras: tuple = ()  # TrainConfig fields beyond the shared ones, as sorted (key, value) pairs


def study_plan(methods, seeds) -> list[Run]:
    """Seed-major: every method's first seed before anyone's second, so an unfinished study
    already compares every method."""
    runs = [Run("base", "base", None, METHODS["base"][0], None)] if "base" in methods else []
    for seed in seeds:
        for m in methods:
            if m == "base" or (m in CONTROL_SEED0 and seed != seeds[0]):
                continue
            label, adapter, extras = METHODS[m]
            runs.append(Run(f"{m}_seed{seed}", m, seed, label, adapter, tuple(sorted(extras.items()))))
    return runs


def ablation_plan(seed: int) -> list[Run]:
    extras = tuple(sorted(CHOSEN_ROUTER.items()))
    return [Run(f"ablation_{axis}{value}", f"mor-{axis}{value}", seed,
                f"MoR r={a['r']} N={a['num_experts']}", a, extras) for axis, value, a in ABLATION_GRID]


# -- data -------------------------------------------------------------------------------------------

def prepare_data(s: Settings, data_root: Path, folder: Path) -> dict:
    """The fixed carve: ``{"train"|"test": {task: Task}, "provenance": {task: text}}``; train records are
    written to ``folder/<task>/train.json`` (what run_training reads)."""
    from mor.data import Task, load_task_records, split_records

    out = {"train": {}, "test": {}, "provenance": {}}
    for name in list(s.tasks) + list(s.heldout):
        tdir = data_root / name
        if not tdir.is_dir():
            have = sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
            raise SystemExit(f"error: --data-root {data_root}: no task folder {name!r} (have: {have})")
        size = s.heldout_size if name in s.heldout else s.test_per_task
        test_all = load_task_records(tdir, split="test")
        if size < len(test_all):
            rest, test = split_records(test_all, eval_size=size, seed=s.split_seed)
        else:
            rest, test = Task(test_all.name, []), test_all
        out["test"][name] = test
        if name in s.heldout:
            out["provenance"][name] = f"held out (never trained): {len(test)} of test.json ({len(test_all)})"
            continue
        has_train = (tdir / "train.json").is_file() or (tdir / "train.jsonl").is_file()
        pool = load_task_records(tdir, split="train") if has_train else rest
        train = split_records(pool, eval_size=s.train_per_task, seed=s.split_seed + 2)[1] \
            if s.train_per_task < len(pool) else pool
        out["train"][name] = train
        where = "train.json" if has_train else f"the rest of test.json (no train split; seed {s.split_seed})"
        out["provenance"][name] = f"{len(train)} train from {where}; {len(test)} test of test.json ({len(test_all)})"
        dest = folder / name / "train.json"
        if not dest.is_file():
            write_json(dest, [r.data for r in train.records])
    return out


# -- one run ----------------------------------------------------------------------------------------

def run_key(s: Settings, run: Run) -> dict:
    return dict(settings=asdict(s), method=run.method, adapter=run.adapter, extras=dict(run.extras), seed=run.seed)


def execute(run: Run, s: Settings, data: dict, data_dir: Path, work: Path, result_path: Path,
            eval_batch_size: int, log) -> dict:
    """Train (resuming a killed attempt), score every test record in fp32, measure routing; write
    ``result_path`` last, atomically."""
    import torch

    from mor.data import multiple_choice_items
    from mor.eval.scoring import evaluate_tasks
    from mor.runtime.loading import load_model, load_tokenizer
    from mor.train.adapters import AdapterSpec
    from mor.model import load_adapter
    from mor.train import TrainConfig, run_training
    from mor.train.trainer import last_complete_checkpoint

    record = dict(run=run.name, method=run.method, label=run.label, seed=run.seed, key=run_key(s, run),
                  key_hash=settings_hash(run_key(s, run)), machine=machine_line("cpu"), threads=torch.get_num_threads(),
                  started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    adapter_dir = None
    if run.adapter is not None:
        out = work / run.name
        extras = dict(run.extras)
        cfg = TrainConfig(model=s.model, adapter=AdapterSpec(**run.adapter), target="text", output=str(out),
                          data=[str(data_dir / t) for t in s.tasks], max_steps=s.steps, batch_size=s.batch_size,
                          lr=extras.pop("lr", s.lr),  # a learning-rate arm's own rate, else the common one
                          warmup_ratio=s.warmup_ratio, lr_scheduler="cosine", max_length=s.max_length,
                          seed=run.seed, save_steps=max(10, s.steps // 6), logging_steps=1,  # every loss: bf16 vs fp32 step by step
                          routing_stats_steps=max(1, s.steps // 30),
                          evaluate=False, base_dtype=extras.pop("base_dtype", s.base_dtype),
                          group_by_length=s.group_by_length, **extras)
        cfg.resume = last_complete_checkpoint(out / "checkpoints") is not None
        cfg.overwrite = not cfg.resume  # no result file yet: what an earlier attempt left there is ours
        log(f"train {run.name}" + (" (resuming)" if cfg.resume else ""))
        result = run_training(cfg)
        adapter_dir = result.adapter_dir
        record.update(trainable_parameters=result.trainable_parameters,
                      train_seconds=result.train_seconds, global_step=result.global_step,
                      final_loss=result.final_loss, base_dtype=result.base_dtype, train_settings=dict(
                          router_lr_multiplier=cfg.router_lr_multiplier, group_by_length=cfg.group_by_length),
                      losses=[(h["step"], round(h["loss"], 5)) for h in result.log_history or [] if "loss" in h],
                      routing_during_training=result.routing_stats)
    else:
        record.update(trainable_parameters=0, train_seconds=0.0)

    log(f"score {run.name}")
    start = time.perf_counter()
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model)
    if adapter_dir is not None:
        record["parameters_closed_form"] = AdapterSpec(**run.adapter).parameter_count(model)
        model = load_adapter(model, adapter_dir)
    model.eval()
    tasks = list(s.tasks) + list(s.heldout)
    items = {t: multiple_choice_items(data["test"][t], scoring="text", tokenizer=tokenizer) for t in tasks}
    with torch.no_grad():
        res = evaluate_tasks(model, tokenizer, items, batch_size=eval_batch_size, progress=False, log_samples=True)
    record["tasks"] = {t: res["tasks"][t] for t in tasks}
    # per record, 1/0 as a string (a few KB): acc_norm and acc, in the test split's order
    record["records"] = {t: {"acc_norm": "".join(str(int(x["acc_norm"])) for x in res["samples"][t]),
                             "acc": "".join(str(int(x["acc"])) for x in res["samples"][t])} for t in tasks}
    record["eval_seconds"] = time.perf_counter() - start
    if run.adapter is not None and run.adapter["method"] in ("mor", "moelora"):
        record["routing"] = routing_by_task(model, tokenizer, items, s)
    record["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    write_json(result_path, record)
    return record


def routing_by_task(model, tokenizer, items: dict, s: Settings) -> dict:
    """Routing statistics on each task's test prompts: entropy, between-task divergence, and the
    mean gate per task and layer (what the routing-by-task figure draws)."""
    from mor.analysis.routing_stats import measure_routing_stats, probe_batches

    texts = {t: [it.contexts[0] for it in task_items[: s.routing_prompts]] for t, task_items in items.items()}
    stats = measure_routing_stats(model, probe_batches(texts, tokenizer, max_length=s.max_length), gate_means=True)
    layers = stats.pop("layers")
    stats["jsd_bits_per_layer"] = {k: round(v["jsd_bits"], 6) for k, v in layers.items()}
    stats["entropy_bits_per_layer"] = {k: round(v["entropy_bits"], 5) for k, v in layers.items()}
    return stats


# -- workers: claim a run with a lock file, so several processes share one plan ------------------------

def _claim(lock: Path) -> bool:
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return False  # a live process holds it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # a dead holder: take it over
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def result_of(path: Path, run: Run, s: Settings) -> dict | None:
    """The finished run's record, or None; a record made under other settings is an error."""
    record = read_json(path)
    if record is None:
        return None
    if record.get("key_hash") != settings_hash(run_key(s, run)):
        raise SystemExit(f"error: {path} was made with other settings than this study's; pass another --results "
                         "folder (or delete that file to redo the run)")
    return record


def work_loop(plan: list[Run], s: Settings, args, log) -> int:
    data_root, results, work = Path(args.data_root), Path(args.results), Path(args.work)
    data_dir = work / f"data_{settings_hash(dict(root=str(data_root.resolve()), **asdict(s)))}"
    data = None
    done = 0
    for run in plan:
        path = results / f"{run.name}.json"
        if result_of(path, run, s) is not None:
            continue
        lock = work / "locks" / f"{run.name}.lock"
        if not _claim(lock):
            log(f"skip {run.name} (another worker has it)")
            continue
        try:
            if result_of(path, run, s) is None:  # finished while we were claiming?
                data = data or prepare_data(s, data_root, data_dir)
                execute(run, s, data, data_dir, work, path, args.eval_batch_size, log)
                log(f"finished {run.name} -> {path}")
                done += 1
        finally:
            lock.unlink(missing_ok=True)
    return done


# -- the report ---------------------------------------------------------------------------------------

def _bits(record: dict, task: str, metric: str = "acc_norm") -> list[int]:
    return [int(c) for c in record["records"][task][metric]]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def paired(a: list[dict], b: list[dict], tasks: list[str]) -> dict:
    """a minus b on the tasks' average acc_norm, paired record by record.

    Per task t and record j, d_tj = (a's score averaged over its seeds) - (b's, likewise); the
    difference of the averages is mean_t mean_j d_tj and its test-sampling standard error
    sqrt(sum_t var_j(d_tj) / n_t) / T. When both have several seeds (paired by seed), the
    seed-to-seed spread of the per-seed difference adds var/S: se = sqrt(se_records^2 + sd_seeds^2 / S)."""
    common = {r["seed"] for r in a} & {r["seed"] for r in b} - {None}
    if common:  # both trained: compare the seeds both have, seed with seed
        a, b = [r for r in a if r["seed"] in common], [r for r in b if r["seed"] in common]
    T = len(tasks)
    diff, var_sum, disc, n_total = 0.0, 0.0, 0, 0
    for t in tasks:
        sa = [_bits(r, t) for r in a]
        sb = [_bits(r, t) for r in b]
        n = len(sa[0])
        d = [sum(x[j] for x in sa) / len(sa) - sum(x[j] for x in sb) / len(sb) for j in range(n)]
        mean_d = sum(d) / n
        diff += mean_d / T
        var_sum += statistics.pvariance(d) / n if n > 1 else 0.0
        disc += sum(1 for x in d if x != 0)
        n_total += n
    se_records = math.sqrt(var_sum) / T
    per_seed = []
    if len(common) >= 2:
        for seed in sorted(common):
            ra = next(r for r in a if r["seed"] == seed)
            rb = next(r for r in b if r["seed"] == seed)
            per_seed.append(sum(_task_acc(ra, t) - _task_acc(rb, t) for t in tasks) / T)
    sd_seeds = statistics.stdev(per_seed) if len(per_seed) >= 2 else None
    se = math.sqrt(se_records ** 2 + (sd_seeds ** 2 / len(per_seed) if sd_seeds is not None else 0.0))
    verdict = "tie" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
    return dict(diff=diff, se_records=se_records, sd_seeds=sd_seeds, per_seed=per_seed, se=se, two_se=2 * se,
                discordant=disc / max(n_total, 1), n=n_total, seeds_a=len(a), seeds_b=len(b), verdict=verdict)


def _avg_stderr(record: dict, tasks: list[str]) -> float:
    """Standard error of one run's task-average accuracy: sqrt(sum_t p_t (1 - p_t) / n_t) / T."""
    var = sum(_task_acc(record, t) * (1 - _task_acc(record, t)) / len(_bits(record, t)) for t in tasks)
    return math.sqrt(var) / len(tasks)


def _task_acc(record: dict, task: str) -> float:
    bits = _bits(record, task)
    return sum(bits) / len(bits)


def summarise(runs: dict[str, list[dict]], s: Settings) -> tuple[list[dict], list[dict]]:
    rows = []
    for method, recs in runs.items():
        per_task = {t: _mean([_task_acc(r, t) for r in recs]) for t in list(s.tasks) + list(s.heldout)}
        avgs = [sum(_task_acc(r, t) for t in s.tasks) / len(s.tasks) for r in recs]
        rows.append(dict(method=method, label=recs[0]["label"], seeds=[r["seed"] for r in recs],
                         trainable_parameters=recs[0]["trainable_parameters"], per_task_acc_norm=per_task,
                         avg_acc_norm=_mean(avgs), avg_acc_norm_per_seed=avgs,
                         seed_sd=statistics.stdev(avgs) if len(avgs) > 1 else None,
                         forgetting=_mean([per_task[t] for t in s.heldout]) if s.heldout else None,
                         heldout_per_seed=[sum(_task_acc(r, t) for t in s.heldout) / len(s.heldout) for r in recs],
                         train_seconds=_mean([r.get("train_seconds") for r in recs]),
                         eval_seconds=_mean([r.get("eval_seconds") for r in recs]),
                         final_loss=_mean([r.get("final_loss") for r in recs]),
                         routing_jsd_bits=_mean([r.get("routing", {}).get("jsd_bits") for r in recs]),
                         routing_entropy_normalized=_mean([r.get("routing", {}).get("entropy_normalized")
                                                           for r in recs])))
    comps = []
    for a, b in COMPARISONS:
        if a in runs and b in runs:
            trained = paired(runs[a], runs[b], list(s.tasks))
            forget = paired(runs[a], runs[b], list(s.heldout)) if s.heldout else None
            comps.append(dict(a=a, b=b, trained=trained, heldout=forget))
    return rows, comps


def _pts(x):
    return "-" if x is None else f"{100 * x:+.1f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def tables(rows: list[dict], comps: list[dict], s: Settings) -> str:
    head = ["method", "trainable params", "seeds"] + [f"{t}" for t in s.tasks] + \
        [f"avg ({len(s.tasks)} trained)", "seed sd"] + [f"{t} (held out)" for t in s.heldout] + \
        ["routing JSD (bits)", "train s/run"]
    body = []
    for r in rows:
        body.append([r["label"], f"{r['trainable_parameters']:,}", str(len(r["seeds"])) if r["seeds"] != [None] else "-"]
                    + [_pct(r["per_task_acc_norm"][t]) for t in s.tasks]
                    + [_pct(r["avg_acc_norm"]), "-" if r["seed_sd"] is None else f"{100 * r['seed_sd']:.1f}"]
                    + [_pct(r["per_task_acc_norm"][t]) for t in s.heldout]
                    + ["-" if r["routing_jsd_bits"] is None else f"{r['routing_jsd_bits']:.4f}",
                       f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"])
    label = {r["method"]: r["label"] for r in rows}
    chead = ["comparison", "seeds", "diff, trained avg (pts)", "2 s.e. (pts)", "discordant records", "verdict",
             "diff, held out (pts)", "2 s.e.", "verdict (held out)"]
    cbody = []
    for c in comps:
        t, h = c["trained"], c["heldout"]
        cbody.append([f"{label[c['a']]} vs {label[c['b']]}", f"{t['seeds_a']} / {t['seeds_b']}", _pts(t["diff"]),
                      f"{100 * t['two_se']:.1f}", f"{100 * t['discordant']:.0f}% of {t['n']}", t["verdict"]]
                     + ([_pts(h["diff"]), f"{100 * h['two_se']:.1f}", h["verdict"]] if h else ["-"] * 3))
    return "accuracy (acc_norm, %)\n\n" + markdown_table(head, body) + "\n\npaired comparisons\n\n" + \
        markdown_table(chead, cbody)


# -- figures -------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(rows: list[dict], s: Settings, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))
    for ax, key, title in ((axes[0], "avg_acc_norm_per_seed", f"average of the {len(s.tasks)} trained tasks"),
                           (axes[1], "heldout_per_seed", f"{', '.join(s.heldout)} (never trained: forgetting)")):
        for i, r in enumerate(rows):
            vals = r[key]
            ax.bar(i, 100 * sum(vals) / len(vals), color="#888888" if r["method"] == "base" else "#1f77b4", alpha=0.7)
            ax.plot([i] * len(vals), [100 * v for v in vals], "k.", ms=5)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("acc_norm (%)")
        ax.set_title(title, fontsize=9)
        lo = min(100 * v for r in rows for v in r[key])
        ax.set_ylim(max(0, lo - 5), None)
    fig.text(0.01, 0.01, "bars: mean over seeds; dots: one per seed", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def routing_figure(runs: dict[str, list[dict]], path: Path) -> Path | None:
    """Per MoR variant: each task's mean gate per expert in the layer whose routing differs most
    between tasks, and the between-task divergence of every layer."""
    variants = [m for m in ("mor", "mor-softmax") if m in runs and "routing" in runs[m][0]]
    if not variants:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(4.5 * (len(variants) + 1), 3.8))
    for ax, m in zip(axes, variants):
        rt = runs[m][0]["routing"]
        tasks = list(rt["tasks"])
        # expert numbers mean nothing across layers: show the layer whose routing differs most by task
        layer = max(rt["jsd_bits_per_layer"], key=rt["jsd_bits_per_layer"].get)
        gates = [rt["tasks"][t]["gate_mean"][layer] for t in tasks]
        im = ax.imshow(gates, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("expert")
        short = layer.replace("base_model.model.model.", "").replace(".mor.default", "")
        ax.set_title(f"{runs[m][0]['label']} (seed {runs[m][0]['seed']})\nmean gate per task, {short} "
                     f"(JSD {rt['jsd_bits_per_layer'][layer]:.3f} bits)", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[-1]
    for m in variants:
        per_layer = list(runs[m][0]["routing"]["jsd_bits_per_layer"].values())
        ax.plot(range(len(per_layer)), per_layer, marker=".", label=runs[m][0]["label"])
    ax.set_yscale("log")
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("between-task JS divergence (bits)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablation_figure(records: list[dict], path: Path) -> Path:
    """Per axis, each run's accuracy minus the reference's (paired, ± 2 s.e.), trainable parameters
    as labels: the unpaired s.e. of one run (about 1.4 points) would hide what pairing resolves."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, axis, xlabel in ((axes[0], "N", "experts N (r=8)"), (axes[1], "r", "rank r (N=8)")):
        pts = sorted((_axis_value(r, axis), r) for r in records if _axis_value(r, axis) is not None)
        xs = [x for x, _ in pts]
        ys = [100 * r["vs_reference"]["diff"] if r["vs_reference"] else 0.0 for _, r in pts]
        errs = [100 * r["vs_reference"]["two_se"] if r["vs_reference"] else 0.0 for _, r in pts]
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3)
        for x, y, (_, r) in zip(xs, ys, pts):
            ax.annotate(f"{r['trainable_parameters'] / 1e6:.2f}M, {100 * r['avg']:.1f}%", (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, 6), ha="left")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.margins(x=0.25)
        ax.set_xlabel(xlabel)
        ax.set_title("avg acc_norm minus r=8 N=8's, paired ± 2 s.e.\n(labels: trainable parameters, avg acc_norm)",
                     fontsize=8)
    axes[0].set_ylabel("difference (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _axis_value(record: dict, axis: str):
    a = record["key"]["adapter"]
    if axis == "N" and a["r"] == 8:
        return a["num_experts"]
    if axis == "r" and a["num_experts"] == 8:
        return a["r"]
    return None


# -- main -----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder with one sub-folder per task")
    p.add_argument("--results", default=None, help="one JSON per finished run (default: results/quality, "
                   "results/quality_ablations with --ablations)")
    p.add_argument("--work", default=None, help="checkpoints and adapters (default: runs/quality)")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS) + list(CONTROL_SEED0), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    p.add_argument("--lr", type=float, default=None, help="the common learning rate (default 3e-4)")
    p.add_argument("--ablations", action="store_true", help="the N and r sweeps instead of the study")
    p.add_argument("--report", action="store_true", help="no training: report what has finished")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the plan (each with --threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / workers)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a smoke in minutes: 1 task, 4 steps, 2 methods")
    p.add_argument("--out", default=None, help="summary JSON (default: <results>.json); figures go beside it")
    return p.parse_args(argv)


def settings_of(args) -> Settings:
    s = Settings(model=args.model)
    if args.ablations:
        s = replace(s, **ABLATION)
    if args.quick:
        s = replace(s, **QUICK)
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.lr is not None:
        s = replace(s, lr=args.lr)
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    default_name = "quality_ablations" if args.ablations else ("quality_quick" if args.quick else "quality")
    args.results = args.results or str(REPO / "results" / default_name)
    args.work = args.work or str(REPO / "runs" / default_name)
    s = settings_of(args)
    plan = ablation_plan(args.seeds[0]) if args.ablations else study_plan(args.methods, args.seeds)

    if not args.report:
        if args.workers > 1 and not os.environ.get("MOR_QUALITY_WORKER"):
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
            child = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv),
                     "--workers", "1", "--threads", str(threads)]
            env = dict(os.environ, MOR_QUALITY_WORKER="1")
            procs = [subprocess.Popen(child, env=env) for _ in range(args.workers)]
            if any(p.wait() != 0 for p in procs):
                print("error: a worker failed (its output is above)", file=sys.stderr)
                return 1
        else:
            import torch
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            if args.threads:
                torch.set_num_threads(args.threads)
            log = lambda msg: print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", flush=True)  # noqa: E731
            log(f"{len(plan)} runs planned; {machine_line('cpu')}")
            work_loop(plan, s, args, log)
            if os.environ.get("MOR_QUALITY_WORKER"):
                return 0
    return report(plan, s, args, command)


def report(plan: list[Run], s: Settings, args, command: str) -> int:
    finished = {}
    for run in plan:
        rec = result_of(Path(args.results) / f"{run.name}.json", run, s)
        if rec is not None:
            finished.setdefault(run.method, []).append(rec)
    print(f"# MoR quality {'ablations' if args.ablations else 'study'} -- "
          f"{_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\ncommand: {command}\n"
          f"finished: {sum(map(len, finished.values()))} of {len(plan)} runs ({args.results})")
    if not finished:
        print("nothing finished yet")
        return 0
    out = Path(args.out) if args.out else Path(args.results).with_suffix(".json")
    if args.ablations:
        recs = [dict(r, avg=sum(_task_acc(r, t) for t in s.tasks) / len(s.tasks), avg_se=_avg_stderr(r, s.tasks))
                for v in finished.values() for r in v]
        # every run scores the same records: each is compared with the reference record by record
        ref = next((r for r in recs if r["run"] == ABLATION_REFERENCE), None)
        for r in recs:
            r["vs_reference"] = paired([r], [ref], s.tasks) if ref is not None and r is not ref else None
        def vs_reference(r):
            c = r["vs_reference"]
            if c is None:
                return ["-", "-", "reference" if r is ref else "-"]
            return [_pts(c["diff"]), _pts(c["two_se"]).lstrip("+"), c["verdict"]]

        body = [[r["label"], f"{r['trainable_parameters']:,}"] + [_pct(_task_acc(r, t)) for t in s.tasks] +
                [_pct(r["avg"]), _pct(r["avg_se"])] + vs_reference(r) + [_pct(_task_acc(r, t)) for t in s.heldout]
                for r in recs]
        ref_label = ref["label"] if ref is not None else "the reference (not finished)"
        text = markdown_table(["adapter", "trainable params", *s.tasks, "avg", "s.e.", f"vs {ref_label} (pts, paired)",
                               "2 s.e.", "verdict", *(f"{t} (held out)" for t in s.heldout)], body)
        png = ablation_figure(recs, out.with_suffix(".png"))
        summary = dict(reference=ABLATION_REFERENCE, rows=[
            {k: r[k] for k in ("run", "label", "trainable_parameters", "avg", "avg_se", "vs_reference")} for r in recs])
    else:
        rows, comps = summarise(finished, s)
        text = tables(rows, comps, s)
        png = accuracy_figure(rows, s, out.with_suffix(".png"))
        routing_png = routing_figure(finished, out.with_name(out.stem + "_routing.png"))
        summary = dict(rows=rows, comparisons=comps, routing_png=str(routing_png) if routing_png else None)
        check = bf16_check(finished)
        if check:
            text += "\n\n" + check["text"]
            summary["bf16_check"] = check
    print(text)
    print(f"\nsettings: {json_line(asdict(s))}")
    write_json(out, dict(command=command, settings=asdict(s), table_markdown=text, png=str(png), **summary))
    print(f"wrote {out} and {png}")
    return 0


def bf16_check(finished: dict[str, list[dict]], first: int = 50) -> dict | None:
    """The bf16-base run against its fp32-base twin (same seed, same batches in the same order):
    step-by-step loss gaps and the training-time ratio."""
    pairs = [(a, b) for a in finished.get("mor", []) for b in finished.get("mor-fp32", []) if a["seed"] == b["seed"]]
    if not pairs:
        return None
    bf16, fp32 = pairs[0]
    la, lb = dict(map(tuple, bf16["losses"])), dict(map(tuple, fp32["losses"]))
    steps = sorted(set(la) & set(lb))
    gaps = [abs(la[k] - lb[k]) for k in steps]
    head = [k for k in steps if k <= first]
    out = dict(seed=bf16["seed"], steps=len(steps), first=first,
               mean_abs_gap_first=_mean([abs(la[k] - lb[k]) for k in head]),
               max_abs_gap_first=max((abs(la[k] - lb[k]) for k in head), default=None),
               mean_abs_gap_all=_mean(gaps), mean_loss_first_fp32=_mean([lb[k] for k in head]),
               train_seconds_ratio=bf16["train_seconds"] / fp32["train_seconds"])
    out["text"] = (f"bf16 base vs fp32 base (MoR, seed {out['seed']}, same batches): losses of steps 1-{first} differ by "
                   f"{out['mean_abs_gap_first']:.4f} on average (max {out['max_abs_gap_first']:.4f}; mean fp32 loss "
                   f"{out['mean_loss_first_fp32']:.3f}), over all {out['steps']} steps by {out['mean_abs_gap_all']:.4f}; "
                   f"training time bf16 / fp32 = {out['train_seconds_ratio']:.2f}")
    return out


def json_line(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


if __name__ == "__main__":
    sys.exit(main())
