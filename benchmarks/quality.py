"""Quality of MoR against LoRA, DoRA and MoE-LoRA on a multi-task commonsense mix.

    python benchmarks/quality.py                    # the full comparison (~1 h on a 2-core CPU)
    python benchmarks/quality.py --quick            # a few minutes: 2 tasks, 16 steps, 3 methods, 1 seed
    python benchmarks/quality.py --device cuda --steps 400 --train-per-task 2000 --test-per-task 1000 \\
        --seeds 0 1 2                               # the same comparison, scaled up on a GPU (bf16)

Trains every method on the same multi-task mix (answer-text targets), picks each method's
learning rate on validation, scores answer-text log-likelihood (acc, acc_norm) and, for MoR, the
merged model too. A rerun with the same settings reuses finished runs. Prints a Markdown table;
``--out`` gets every number as JSON and a PNG bar chart next to it. How it is built (splits,
learning-rate choice, seeds, ties, resume) and why: docs/benchmarks.md, section "Quality".
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python benchmarks/quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, read_json, settings_hash, write_json  # noqa: E402

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
ALL_TASKS = ("boolq", "ARC-Easy", "openbookqa", "piqa", "social_i_qa")
QUICK_TASKS = ("ARC-Easy", "piqa")

# name -> (label, AdapterSpec kwargs); None = the base model, zero-shot
METHODS: dict[str, tuple[str, dict | None]] = {
    "base": ("base model, zero-shot", None),
    "lora": ("LoRA r=16", dict(method="lora", r=16)),
    "dora": ("DoRA r=16", dict(method="dora", r=16)),
    "moelora": ("MoE-LoRA N=8 r=2", dict(method="moelora", r=2, num_experts=8)),
    "mor": ("MoR r=8 N=8", dict(method="mor", r=8, num_experts=8)),
    "moelora-r8": ("MoE-LoRA N=8 r=8 (larger ref.)", dict(method="moelora", r=8, num_experts=8)),
    "mor-mean": ("MoR r=8 N=8, router=mean", dict(method="mor", r=8, num_experts=8, router="mean")),
    "mor-balanced": ("MoR r=8 N=8, router=balanced", dict(method="mor", r=8, num_experts=8, router="balanced")),
}
MATCHED = ("lora", "dora", "moelora", "mor")  # the matched trainable-parameter budget
QUICK_METHODS = ("base", "lora", "moelora", "mor")


# -- arguments --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder with one sub-folder per task")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: {' '.join(ALL_TASKS)}")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: all")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (matched methods; others use the first)")
    p.add_argument("--lr-grid", nargs="+", type=float, default=None, help="default: 3e-4 1e-3 (chosen on validation)")
    p.add_argument("--train-per-task", type=int, default=None, help="training records per task (default 240)")
    p.add_argument("--val-per-task", type=int, default=None, help="validation records per task (default 24)")
    p.add_argument("--test-per-task", type=int, default=None, help="held-back test records per task (default 60)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8")
    p.add_argument("--max-length", type=int, default=None, help="training tokens per example (default 128)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=1234, help="seed of the fixed train/val/test carve")
    p.add_argument("--routing-prompts", type=int, default=64, help="train prompts per task for the MoR routing profile")
    p.add_argument("--label-scoring", action="store_true", help="also score labels (secondary column)")
    p.add_argument("--no-merged", action="store_true", help="skip the merged-with-fixed-routing MoR evaluation")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (bf16 autocast on cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 when the machine's load average already fills its cores -- "
                        "oversubscribed OpenMP threads spin and run 3-30x slower -- else torch's default)")
    p.add_argument("--out", default="results/quality.json", help="JSON with all numbers; the PNG goes next to it")
    p.add_argument("--runs-dir", default=None, help="one folder per run (default: <out without .json>_runs)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 tasks, 16 steps, 30 test, 1 seed, 3 methods")
    p.add_argument("--verbose", action="store_true", help="show the evaluation progress bars")
    args = p.parse_args(argv)
    quick = dict(tasks=list(QUICK_TASKS), methods=list(QUICK_METHODS), seeds=[0], lr_grid=[1e-3],
                 train_per_task=64, val_per_task=8, test_per_task=30, steps=16, batch_size=8, max_length=128)
    full = dict(tasks=list(ALL_TASKS), methods=list(METHODS), seeds=[0, 1], lr_grid=[3e-4, 1e-3],
                train_per_task=240, val_per_task=24, test_per_task=60, steps=40, batch_size=8, max_length=128)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# -- helpers ----------------------------------------------------------------------------------------

def _std(values):
    return statistics.stdev(values) if len(values) >= 2 else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _f(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


# -- data -------------------------------------------------------------------------------------------

def prepare_data(args, folder: Path) -> dict:
    """Carve the fixed splits and write ``folder/<task>/train.json`` (what run_training reads);
    return ``{"train"|"val"|"test": {task: Task}, "provenance": {task: text}}``."""
    from mor.data import Task, load_task_records, split_records

    root = Path(args.data_root)
    out = {"train": {}, "val": {}, "test": {}, "provenance": {}}
    for name in args.tasks:
        tdir = root / name
        if not tdir.is_dir():
            raise SystemExit(f"--data-root {root}: no task folder {name!r} (have: {sorted(p.name for p in root.iterdir() if p.is_dir())})")
        has_train = (tdir / "train.json").is_file() or (tdir / "train.jsonl").is_file()
        test_all = load_task_records(tdir, split="test")
        if args.test_per_task < len(test_all):
            rest_of_test, test = split_records(test_all, eval_size=args.test_per_task, seed=args.split_seed)
        else:
            rest_of_test, test = Task(test_all.name, []), test_all
        if has_train:
            pool = load_task_records(tdir, split="train")
            where = f"train.json ({len(pool)}) -> train + validation; test.json ({len(test_all)}) -> test"
        else:
            pool = rest_of_test
            where = f"no train split: test.json ({len(test_all)}) carved into test / validation / train (seed {args.split_seed})"
        if len(pool) < args.val_per_task + 1:
            raise SystemExit(f"task {name}: {len(pool)} records left for train+validation; lower --val-per-task/--test-per-task")
        pool, val = split_records(pool, eval_size=args.val_per_task, seed=args.split_seed + 1)
        if args.train_per_task < len(pool):
            _, train = split_records(pool, eval_size=args.train_per_task, seed=args.split_seed + 2)
        else:
            train = pool
        out["train"][name], out["val"][name], out["test"][name] = train, val, test
        out["provenance"][name] = f"{where}; used: {len(train)} train, {len(val)} val, {len(test)} test"
        dest = folder / name / "train.json"
        if not dest.is_file():
            write_json(dest, [r.data for r in train.records])
    return out


# -- evaluation -------------------------------------------------------------------------------------

class Evaluator:
    def __init__(self, args, data: dict, device: str):
        self.args, self.data, self.device = args, data, device
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from mor.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.args.model)
        return self._tokenizer

    def _autocast(self):
        import contextlib

        import torch

        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def score(self, model, split: str, scoring: str = "text", tasks=None) -> dict:
        from mor.data import multiple_choice_items
        from mor.evaluate import evaluate_tasks

        tasks = tasks or list(self.data[split])
        items = {t: multiple_choice_items(self.data[split][t], scoring=scoring, tokenizer=self.tokenizer) for t in tasks}
        with self._autocast():
            return evaluate_tasks(model, self.tokenizer, items, batch_size=self.args.eval_batch_size,
                                  progress=self.args.verbose)

    def load(self, adapter_dir: Path | None):
        from mor.loading import load_model
        from mor.model import load_adapter

        model = load_model(self.args.model)
        if adapter_dir is not None:
            model = load_adapter(model, adapter_dir)
        return model.to(self.device).eval()

    def merged_scores(self, model) -> dict:
        """Per task: routing profile on that task's train prompts, merge, score its test examples."""
        from mor.data import training_examples

        tasks, profiles = {}, {}
        for name, train in self.data["train"].items():
            prompts = [ex.prompt for ex in training_examples(train, target="text")][: self.args.routing_prompts]
            profile = model.measure_routing(prompts, tokenizer=self.tokenizer, batch_size=self.args.eval_batch_size,
                                            max_length=self.args.max_length)
            try:
                twin = copy.deepcopy(model)
            except Exception:  # noqa: BLE001 -- fall back to a fresh load
                twin = None
            merged = (twin if twin is not None else model).merge_and_unload(profile)
            res = self.score(merged, "test", tasks=[name])
            tasks[name] = res["tasks"][name]
            profiles[name] = [round(float(x), 4) for x in profile.mean()]
            if twin is None:
                raise RuntimeError("deepcopy of the MoR model failed; cannot merge without destroying it")
            del merged, twin
        avg = {k: _mean([t[k] for t in tasks.values()]) for k in ("acc", "acc_norm")}
        return {"tasks": tasks, "average": avg, "routing_mean_per_task": profiles}


# -- runs -------------------------------------------------------------------------------------------

def run_one(args, ev: Evaluator, data_dir: Path, runs: Path, method: str, lr: float, seed: int, need: set,
            log) -> dict:
    """Train (unless result.json exists) and evaluate what ``need`` asks for (unless in bench.json)."""
    from mor.methods import AdapterSpec
    from mor.train import TrainConfig, last_complete_checkpoint, run_training

    label, kwargs = METHODS[method]
    spec = AdapterSpec(**kwargs)
    train_key = dict(model=args.model, spec=spec.to_dict(), tasks=args.tasks, train=args.train_per_task,
                     val=args.val_per_task, test=args.test_per_task, split_seed=args.split_seed, steps=args.steps,
                     batch=args.batch_size, max_length=args.max_length, warmup=args.warmup_ratio, lr=lr, seed=seed)
    folder = runs / method / f"lr{lr:g}_seed{seed}_{settings_hash(train_key)}"
    result_path, bench_path = folder / "result.json", folder / "bench.json"
    bench = read_json(bench_path) or {}
    result = read_json(result_path)
    if result is None:
        log(f"train {method} lr={lr:g} seed={seed} -> {folder}")
        cfg = TrainConfig(model=args.model, adapter=copy.deepcopy(spec), data=[str(data_dir / t) for t in args.tasks],
                          target="text", output=str(folder), max_steps=args.steps, batch_size=args.batch_size,
                          lr=lr, warmup_ratio=args.warmup_ratio, scheduler="cosine", max_length=args.max_length,
                          seed=seed, save_steps=max(10, args.steps // 2), logging_steps=max(1, args.steps // 4),
                          evaluate=False)
        cfg.resume = last_complete_checkpoint(folder / "checkpoints") is not None
        cfg.overwrite = not cfg.resume  # no result.json: what an earlier attempt left there is ours to replace
        result = run_training(cfg).to_dict()
        bench = {}
    else:
        log(f"reuse {method} lr={lr:g} seed={seed} (result.json exists)")
    bench.update(method=method, label=label, lr=lr, seed=seed, folder=str(folder), train_key=train_key,
                 trainable_parameters=result["trainable_parameters"], train_seconds=result["train_seconds"],
                 final_loss=result["final_loss"], global_step=result["global_step"])
    todo = [k for k in sorted(need) if k not in bench]
    if todo:
        start = time.perf_counter()
        model = ev.load(Path(result["adapter_dir"]))
        if "val" in todo:
            bench["val"] = ev.score(model, "val")
        if "test" in todo:
            bench["test"] = ev.score(model, "test")
        if "test_label" in todo:
            bench["test_label"] = ev.score(model, "test", scoring="label")
        if "merged" in todo:
            bench["merged"] = ev.merged_scores(model)
        bench["eval_seconds"] = bench.get("eval_seconds", 0.0) + time.perf_counter() - start
        del model
    write_json(bench_path, bench)
    return bench


def run_base(args, ev: Evaluator, runs: Path, label_scoring: bool, log) -> dict:
    key = dict(model=args.model, tasks=args.tasks, test=args.test_per_task, split_seed=args.split_seed)
    path = runs / "base" / f"zero-shot_{settings_hash(key)}" / "bench.json"
    bench = read_json(path) or {}
    need = ["test"] + (["test_label"] if label_scoring else [])
    if all(k in bench for k in need):
        log("reuse base zero-shot")
    else:
        log("score base model zero-shot")
        start = time.perf_counter()
        model = ev.load(None)
        if "test" not in bench:
            bench["test"] = ev.score(model, "test")
        if label_scoring and "test_label" not in bench:
            bench["test_label"] = ev.score(model, "test", scoring="label")
        bench["eval_seconds"] = bench.get("eval_seconds", 0.0) + time.perf_counter() - start
    bench.update(method="base", label=METHODS["base"][0], trainable_parameters=0, train_seconds=0.0, lr=None, seed=None)
    write_json(path, bench)
    return bench


# -- summary ----------------------------------------------------------------------------------------

def summarise(method: str, runs: list[dict], val_by_lr: dict, param_formula: int | None) -> dict:
    tests = [r["test"] for r in runs]
    tasks = list(tests[0]["tasks"])
    row = {
        "method": method, "label": METHODS[method][0], "matched_budget": method in MATCHED,
        "trainable_parameters": runs[0]["trainable_parameters"], "parameters_closed_form": param_formula,
        "lr": runs[0]["lr"], "val_avg_acc_norm_by_lr": val_by_lr, "seeds": [r["seed"] for r in runs],
        "per_task_acc_norm": {t: _mean([x["tasks"][t]["acc_norm"] for x in tests]) for t in tasks},
        "per_task_acc": {t: _mean([x["tasks"][t]["acc"] for x in tests]) for t in tasks},
        "avg_acc": _mean([x["average"]["acc"] for x in tests]),
        "avg_acc_norm": _mean([x["average"]["acc_norm"] for x in tests]),
        "avg_acc_norm_per_seed": [x["average"]["acc_norm"] for x in tests],
        "avg_acc_norm_seed_std": _std([x["average"]["acc_norm"] for x in tests]),
        "avg_acc_seed_std": _std([x["average"]["acc"] for x in tests]),
        "avg_acc_norm_stderr": _mean([x["average"].get("acc_norm_stderr") for x in tests]),
        "chance": tests[0]["average"].get("chance"),
        "train_seconds_per_run": _mean([r.get("train_seconds") for r in runs]),
        "eval_seconds_per_run": _mean([r.get("eval_seconds") for r in runs]),
        "final_loss": _mean([r.get("final_loss") for r in runs]),
        "runs": [{k: r.get(k) for k in ("seed", "lr", "folder", "final_loss", "train_seconds", "eval_seconds", "test",
                                         "test_label", "merged", "val")} for r in runs],
    }
    if all("test_label" in r for r in runs):
        row["label_avg_acc"] = _mean([r["test_label"]["average"]["acc"] for r in runs])
    if all("merged" in r for r in runs):
        row["merged_avg_acc"] = _mean([r["merged"]["average"]["acc"] for r in runs])
        row["merged_avg_acc_norm"] = _mean([r["merged"]["average"]["acc_norm"] for r in runs])
        row["merged_avg_acc_norm_seed_std"] = _std([r["merged"]["average"]["acc_norm"] for r in runs])
    return row


def verdicts(rows: list[dict]) -> tuple[dict, list[str]]:
    """Gap to the best method: a tie when smaller than the seed spread or 2 standard errors."""
    best = max(rows, key=lambda r: r["avg_acc_norm"])

    def threshold(a, b):
        spread = max([x for x in (a["avg_acc_norm_seed_std"], b["avg_acc_norm_seed_std"]) if x is not None], default=0.0)
        se = math.sqrt((a["avg_acc_norm_stderr"] or 0) ** 2 + (b["avg_acc_norm_stderr"] or 0) ** 2)
        return max(spread, 2 * se), spread, se

    out = {}
    for r in rows:
        if r is best:
            out[r["method"]] = "best"
            continue
        gap = best["avg_acc_norm"] - r["avg_acc_norm"]
        thr, _, _ = threshold(best, r)
        out[r["method"]] = f"tie ({-gap:+.3f})" if gap < thr else f"below ({-gap:+.3f})"
    lines = []
    by = {r["method"]: r for r in rows}
    if "mor" in by:
        for other in ("lora", "dora", "moelora", "moelora-r8", "mor-mean", "mor-balanced", "base"):
            if other not in by:
                continue
            a, b = by["mor"], by[other]
            diff = a["avg_acc_norm"] - b["avg_acc_norm"]
            thr, spread, se = threshold(a, b)
            word = "TIE" if abs(diff) < thr else ("MoR better" if diff > 0 else "MoR worse")
            spread_text = f"{spread:.3f}" if len(a["seeds"]) > 1 or len(b["seeds"]) > 1 else "n/a (1 seed)"
            lines.append(f"MoR vs {b['label']}: {diff:+.3f} avg acc_norm; seed spread {spread_text}, "
                         f"2 x s.e. of the difference {2 * se:.3f} -> {word}")
    return out, lines


def markdown_table(rows: list[dict], tasks: list[str], verdict: dict, label_scoring: bool) -> str:
    head = ["method", "trainable params", "lr"] + [f"{t} acc_norm" for t in tasks] + \
           ["avg acc", "avg acc_norm ± seed sd (s.e.)", "seeds", "merged avg acc_norm (MoR)"]
    if label_scoring:
        head.append("label-scoring avg acc")
    head += ["train s/run", "eval s/run", "vs best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sd = r["avg_acc_norm_seed_std"]
        cell = f"{r['avg_acc_norm']:.3f} ± {_f(sd)} ({_f(r['avg_acc_norm_stderr'])})"
        cells = [r["label"], f"{r['trainable_parameters']:,}", "-" if r["lr"] is None else f"{r['lr']:g}"]
        cells += [_f(r["per_task_acc_norm"].get(t)) for t in tasks]
        cells += [_f(r["avg_acc"]), cell, str(len(r["seeds"])) if r["seeds"] != [None] else "-",
                  _f(r.get("merged_avg_acc_norm"))]
        if label_scoring:
            cells.append(_f(r.get("label_avg_acc")))
        cells += [f"{r['train_seconds_per_run']:.0f}", _f(r["eval_seconds_per_run"], 0), verdict[r["method"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    values = [r["avg_acc_norm"] for r in rows]
    errs = [r["avg_acc_norm_seed_std"] if r["avg_acc_norm_seed_std"] is not None else (r["avg_acc_norm_stderr"] or 0)
            for r in rows]
    colors = ["#888888" if r["method"] == "base" else ("#1f77b4" if r["matched_budget"] else "#ff7f0e") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    ax.bar(range(len(rows)), values, yerr=errs, capsize=4, color=colors)
    for i, r in enumerate(rows):
        if r.get("merged_avg_acc_norm") is not None:
            ax.plot([i - 0.35, i + 0.35], [r["merged_avg_acc_norm"]] * 2, "k--", lw=1)
    chance = rows[0].get("chance")
    if chance:
        ax.axhline(chance, color="red", lw=0.8, ls=":", label=f"chance {chance:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("average acc_norm (answer-text scoring)")
    lo = min(values + ([chance] if chance else [])) - 0.05
    ax.set_ylim(max(0.0, lo), min(1.0, max(v + e for v, e in zip(values, errs)) + 0.05))
    ax.set_title(title, fontsize=9)
    fig.text(0.01, 0.01, "error bars: seed s.d. (2+ seeds) else test s.e.; dashed: MoR merged with per-task fixed routing; "
             "blue = matched budget", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else \
        shlex.join(["python", "benchmarks/quality.py", *argv])
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # run_training's Trainer picks CUDA whenever it sees one
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads
    if threads is None and device == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in args.methods]  # canonical order

    out = Path(args.out)
    runs = Path(args.runs_dir) if args.runs_dir else out.with_name(out.stem + "_runs")
    started = _dt.datetime.now().astimezone()
    header = [f"# MoR quality benchmark -- {started:%Y-%m-%d %H:%M %Z}", f"machine: {machine_line(device)}",
              f"command: {command}"]
    print("\n".join(header), flush=True)

    data_key = dict(root=str(Path(args.data_root).resolve()), tasks=args.tasks, train=args.train_per_task,
                    val=args.val_per_task, test=args.test_per_task, split_seed=args.split_seed)
    data_dir = runs / f"data_{settings_hash(data_key)}"
    data = prepare_data(args, data_dir)
    ev = Evaluator(args, data, device)

    adapter_methods = [m for m in methods if m != "base"]
    seeds_of = {m: (args.seeds if m in MATCHED else args.seeds[:1]) for m in adapter_methods}
    n_runs = sum(len(args.lr_grid) + len([s for s in seeds_of[m] if s != seeds_of[m][0]]) for m in adapter_methods)
    n_runs += "base" in methods
    print(f"{len(adapter_methods)} adapter methods, lr grid {args.lr_grid}, seeds {args.seeds} -> {n_runs} runs "
          f"({args.steps} steps x batch {args.batch_size} x {args.max_length} tokens each)", flush=True)

    bar = tqdm(total=n_runs, desc="quality benchmark", unit="run", position=0, leave=True, dynamic_ncols=True)
    log = lambda msg: bar.write(f"[{time.strftime('%H:%M:%S')}] {msg}")  # noqa: E731
    wall0 = time.perf_counter()

    results: dict[str, list[dict]] = {}
    val_scores: dict[str, dict] = {}
    if "base" in methods:
        results["base"] = [run_base(args, ev, runs, args.label_scoring, log)]
        bar.update(1)

    param_formula = {}
    if adapter_methods:
        from mor.loading import load_model
        from mor.methods import AdapterSpec

        probe = load_model(args.model)
        param_formula = {m: AdapterSpec(**METHODS[m][1]).parameter_count(probe) for m in adapter_methods}
        del probe

    for method in adapter_methods:
        seeds = seeds_of[method]
        final_need = {"test"} | ({"test_label"} if args.label_scoring else set())
        if METHODS[method][1]["method"] == "mor" and not args.no_merged:
            final_need.add("merged")
        by_lr = {}
        if len(args.lr_grid) > 1:
            for lr in args.lr_grid:
                bar.set_postfix_str(f"{method} lr={lr:g} seed={seeds[0]}")
                by_lr[lr] = run_one(args, ev, data_dir, runs, method, lr, seeds[0], {"val"}, log)
                bar.update(1)
            best_lr = max(args.lr_grid, key=lambda lr: (by_lr[lr]["val"]["average"]["acc_norm"], -lr))
            val_scores[method] = {f"{lr:g}": by_lr[lr]["val"]["average"]["acc_norm"] for lr in args.lr_grid}
            log(f"{method}: validation avg acc_norm by lr {val_scores[method]} -> lr {best_lr:g}")
        else:
            best_lr = args.lr_grid[0]
            val_scores[method] = {f"{best_lr:g}": None}
        results[method] = []
        for seed in seeds:
            bar.set_postfix_str(f"{method} lr={best_lr:g} seed={seed}")
            results[method].append(run_one(args, ev, data_dir, runs, method, best_lr, seed, final_need, log))
            if not (len(args.lr_grid) > 1 and seed == seeds[0]):
                bar.update(1)
    bar.close()
    wall = time.perf_counter() - wall0

    rows = []
    for method in methods:
        if method == "base":
            rows.append(summarise("base", results["base"], {}, 0))
        else:
            rows.append(summarise(method, results[method], val_scores[method], param_formula[method]))
    verdict, vs_lines = verdicts(rows)
    table = markdown_table(rows, args.tasks, verdict, args.label_scoring)
    budget = ", ".join(f"{r['label']} {r['trainable_parameters']:,}" for r in rows if r["matched_budget"])
    notes = [
        "Training: answer-text targets; scoring: answer-text log-likelihood (acc, acc_norm = per-character), "
        "lm-eval style" + ("; label scoring as a secondary column" if args.label_scoring else "") + ".",
        f"Steps {args.steps} x batch {args.batch_size}, max {args.max_length} tokens, cosine, warm-up "
        f"{args.warmup_ratio:g}; AdamW; " + (f"lr chosen per method from {args.lr_grid} on validation "
        f"({args.val_per_task}/task) with seed {args.seeds[0]}." if len(args.lr_grid) > 1 else
        f"one fixed lr {args.lr_grid[0]:g} (no grid search)."),
        f"Matched budget: {budget}.",
        "Ties: a gap to the best smaller than the seed s.d. or 2 s.e. of the test mean is a tie.",
        "Data: " + "; ".join(f"{t}: {p}" for t, p in data["provenance"].items()),
    ]
    print()
    print(table)
    print()
    for line in notes + vs_lines:
        print("- " + line)
    print(f"\nwall time: {wall / 60:.1f} min", flush=True)

    png = out.with_suffix(".png")
    record = {
        "header": {"date": started.isoformat(), "machine": machine_line(device), "command": command,
                   "wall_seconds": wall},
        "settings": {k: v for k, v in vars(args).items()},
        "data": data["provenance"],
        "rows": rows, "verdict": verdict, "comparisons": vs_lines, "notes": notes, "table_markdown": table,
        "png": str(png),
    }
    write_json(out, record)
    bar_chart(rows, png, f"SmolLM2 FFN adapters, {len(args.tasks)} tasks, {args.steps} steps "
              f"({started:%Y-%m-%d})" if args.model is None else f"{args.model}, {args.steps} steps")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    if str(repo / "src") not in sys.path and (repo / "src" / "mor").is_dir():
        sys.path.insert(0, str(repo / "src"))
    sys.exit(main())
