"""Does ``mor eval --scoring text`` give exactly lm-evaluation-harness's numbers, and how fast?

    python -m benchmarks.lm_eval_agreement --limit 100          # 100 test records per task
    python -m benchmarks.lm_eval_agreement                      # the full test splits
    python -m benchmarks.lm_eval_agreement --adapter runs/mor-r8 --lm-eval-model mor

For every task (default: ARC-Easy, piqa and social_i_qa) the same items are scored by
``mor.eval.scoring`` and by ``lm_eval.simple_evaluate`` on a local task written for them; acc and
acc_norm must be identical, and per record the requests, choices and log-likelihoods are compared.
How it is built: docs/benchmarks.md, section "lm-eval agreement".

Output: a header (machine, versions, date, exact command), a Markdown table, ``--out`` JSON.
The exit status is 1 when any metric differs, 0 otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, markdown_table, write_json

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
DEFAULT_TASKS = ("ARC-Easy", "piqa", "social_i_qa")
DOC_TO_TEXT = "Question: {{question}}\\nAnswer:"  # as written into the YAML (a YAML "\n" escape)


# -- arguments --------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder with one sub-folder per task")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"default: {' '.join(DEFAULT_TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="first N records per task (default: all)")
    p.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder (MoR / MoE-LoRA / LoRA / DoRA)")
    p.add_argument("--batch-size", type=int, default=16, help="for both sides (mor eval's default)")
    p.add_argument("--lm-eval-model", choices=["mor", "hf"], default="mor",
                   help="lm-eval model type: mor (ours, HFLM subclass) or hf (lm-eval's own; adapter via peft=)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--keep-tasks", default=None, help="write the lm-eval task files here instead of a temp folder")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.adapter is not None and args.lm_eval_model == "hf":
        cfg = Path(args.adapter) / "adapter_config.json"
        if cfg.is_file() and "peft_type" not in json.loads(cfg.read_text(encoding="utf-8")):
            p.error("--lm-eval-model hf loads adapters through peft; a MoR / MoE-LoRA adapter needs --lm-eval-model mor")
    return args


# -- header -----------------------------------------------------------------------------------------

def header(info: dict, command: str, args) -> str:
    load = info["load_average"]
    load_text = f" | load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""
    return "\n".join([
        "# mor eval --scoring text vs lm-evaluation-harness",
        "",
        f"machine: {info['host']} | {info['cpu']} | {info['cpu_count']} CPUs, torch threads {info['threads']}"
        f"{load_text} | device {args.device}",
        f"versions: python {info['python']} | torch {info['torch']} | transformers {info['transformers']} | "
        f"lm-eval {info['lm_eval']} | peft {info['peft']}",
        f"date: {info['date']}",
        f"command: {command}",
    ])


# -- data -------------------------------------------------------------------------------------------

def lm_eval_name(task: str) -> str:
    return "mor_agree_" + re.sub(r"[^a-z0-9_]+", "_", task.lower()).strip("_")


def convert(task) -> list[dict]:
    """``{question, choices, label}`` for every record of a :class:`mor.data.Task`, through the
    same parser as ``mor eval``; fill-in-the-blank records are refused."""
    from mor.data import DataError, parse_multiple_choice

    docs = []
    for record in task.records:
        try:
            parsed = parse_multiple_choice(record.data)
        except DataError as err:
            raise DataError(f"{record.source}: {err}") from None
        if parsed.blank:
            raise SystemExit(
                f"{record.source}: task {task.name!r} has fill-in-the-blank records (winogrande's partial "
                "scoring: one context per option). A plain doc_to_text/doc_to_choice lm-eval task cannot "
                "express them, so this benchmark does not compare them; leave the task out of --tasks."
            )
        docs.append({"question": parsed.question, "choices": list(parsed.options), "label": parsed.gold})
    return docs


def check_items_match_docs(items, docs) -> None:
    """The items ``mor eval`` scores are the (context, continuation) pairs the YAML makes."""
    from mor.data import DEFAULT_TEMPLATE, text_prompt

    assert len(items) == len(docs), (len(items), len(docs))
    for item, doc in zip(items, docs):
        context = text_prompt(doc["question"], DEFAULT_TEMPLATE)
        expected = ([context] * len(doc["choices"]), [" " + c for c in doc["choices"]], doc["label"])
        if (item.contexts, item.continuations, item.gold) != expected:
            raise AssertionError(f"{item.source}: the lm-eval doc does not reproduce mor's item")


def write_task(folder: Path, name: str, docs: list[dict]) -> Path:
    """``<name>.jsonl`` + ``<name>.yaml`` (as in tests/test_lm_eval.py)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        f'doc_to_text: "{DOC_TO_TEXT}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return data


# -- the two sides ----------------------------------------------------------------------------------

def run_mor(args, model_path: str, task_path: Path):
    """``mor eval --data <task> --scoring text --limit N``: load, build items, score.

    ``mor.eval.scoring.score_items`` is wrapped for the call so that the per-record scores that
    ``evaluate_tasks`` computes are kept for the comparison (no second scoring pass)."""
    import mor.eval.scoring as mev
    from mor.data import multiple_choice_items
    from mor.runtime.loading import load_model, load_tokenizer
    from mor.data import load_eval_tasks

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    if args.adapter:
        from mor.model import load_adapter

        model = load_adapter(model, args.adapter)
    model = model.to(args.device).eval()
    t1 = time.perf_counter()
    (task,) = load_eval_tasks([str(task_path)])
    items = multiple_choice_items(task, scoring="text", tokenizer=tokenizer)
    kept: list = []
    original = mev.score_items

    def recording(*a, **k):
        scores = original(*a, **k)
        kept.extend(scores)
        return scores

    mev.score_items = recording
    try:
        results = mev.evaluate_tasks(model, tokenizer, {task.name: items}, batch_size=args.batch_size,
                                     limit=args.limit, progress=False, scoring="text")
    finally:
        mev.score_items = original
    t2 = time.perf_counter()
    chosen = items[: args.limit] if args.limit is not None else items
    return chosen, kept, results["tasks"][task.name], {"load_s": t1 - t0, "score_s": t2 - t1, "wall_s": t2 - t0}


def model_args(args, model_path: str) -> str:
    parts = [f"pretrained={model_path}", "dtype=float32"]
    if args.adapter:
        parts.append(f"{'adapter' if args.lm_eval_model == 'mor' else 'peft'}={args.adapter}")
    return ",".join(parts)


def run_lm_eval(args, model_path: str, name: str, task_manager):
    import lm_eval

    if args.lm_eval_model == "mor":
        import mor.lm_eval_model  # noqa: F401 - registers "mor"

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=args.lm_eval_model, model_args=model_args(args, model_path), tasks=[name],
        task_manager=task_manager, device=args.device, batch_size=args.batch_size, log_samples=True,
    )
    wall = time.perf_counter() - t0
    res = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return res, samples, {"wall_s": wall}


def compare_samples(items, scores, samples) -> dict:
    """Per record: same requests? same right/wrong? largest log-likelihood difference."""
    same_requests = len(samples) == len(items) and all(
        [tuple(a) for a in s["arguments"]] == list(zip(it.contexts, it.continuations))
        for s, it in zip(samples, items)
    )
    acc_diff = acc_norm_diff = 0
    max_ll = 0.0
    for score, sample in zip(scores, samples):
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        max_ll = max([max_ll] + [abs(a - b) for a, b in zip(score.logprobs, theirs)])
        acc_diff += float(score.correct) != sample["acc"]
        acc_norm_diff += float(score.correct_norm) != sample["acc_norm"]
    return {"same_requests": same_requests, "records_acc_differ": acc_diff,
            "records_acc_norm_differ": acc_norm_diff, "max_abs_loglik_diff": max_ll}


# -- output -----------------------------------------------------------------------------------------

def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def table(rows: list[dict]) -> str:
    head = ["task", "n", "acc (mor)", "acc (lm-eval)", "acc_norm (mor)", "acc_norm (lm-eval)", "identical?",
            "wall time mor", "wall time lm-eval"]
    lines = []
    for r in rows:
        lines.append([r["task"], str(r["n"]), _f(r["mor"]["acc"]), _f(r["lm_eval"]["acc"]),
                      _f(r["mor"]["acc_norm"]), _f(r["lm_eval"]["acc_norm"]),
                      "yes" if r["identical"] else "NO",
                      f"{r['mor']['wall_s']:.1f} s", f"{r['lm_eval']['wall_s']:.1f} s"])
    if len(rows) > 1:
        lines.append(["total", str(sum(r["n"] for r in rows)), "", "", "", "",
                      "yes" if all(r["identical"] for r in rows) else "NO",
                      f"{sum(r['mor']['wall_s'] for r in rows):.1f} s",
                      f"{sum(r['lm_eval']['wall_s'] for r in rows):.1f} s"])
    return markdown_table(head, lines)


# -- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.lm_eval_agreement " + shlex.join(sys.argv[1:] if argv is None else list(argv))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager

    from mor.runtime.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    info = machine_info(args.device, packages=("transformers", "lm_eval", "peft"))
    print(header(info, command, args), flush=True)
    print(f"model: {model_path}" + (f" + adapter {args.adapter}" if args.adapter else "")
          + f" | lm-eval model type: {args.lm_eval_model} | batch size {args.batch_size}"
          + f" | limit {args.limit if args.limit is not None else 'none (full test splits)'}\n", flush=True)

    data_root = Path(args.data_root)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mor_lm_eval_agree_") as tmp:
        task_dir = Path(args.keep_tasks) if args.keep_tasks else Path(tmp)
        task_dir.mkdir(parents=True, exist_ok=True)
        for task_arg in args.tasks:
            task_path = data_root / task_arg
            if not task_path.exists():
                raise SystemExit(f"{task_path}: no such task folder or file under --data-root {data_root}")
            from mor.data import load_eval_tasks

            (task,) = load_eval_tasks([str(task_path)])
            docs = convert(task)[: args.limit] if args.limit is not None else convert(task)
            name = lm_eval_name(task.name)
            write_task(task_dir, name, docs)
            print(f"[{task.name}] {len(docs)} records ({task.files[0]}) -> lm-eval task {name}", flush=True)

            items, scores, mor_row, mor_time = run_mor(args, model_path, task_path)
            check_items_match_docs(items, docs)
            print(f"[{task.name}] mor: acc {mor_row['acc']:.4f} acc_norm {mor_row['acc_norm']:.4f} "
                  f"({mor_time['wall_s']:.1f} s)", flush=True)

            tm = TaskManager(include_path=str(task_dir), include_defaults=False)
            res, samples, lm_time = run_lm_eval(args, model_path, name, tm)
            lm_row = {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
                      "acc_stderr": res.get("acc_stderr,none"), "acc_norm_stderr": res.get("acc_norm_stderr,none")}
            print(f"[{task.name}] lm-eval: acc {lm_row['acc']:.4f} acc_norm {lm_row['acc_norm']:.4f} "
                  f"({lm_time['wall_s']:.1f} s)", flush=True)

            detail = compare_samples(items, scores, samples)
            identical = (mor_row["acc"] == lm_row["acc"] and mor_row["acc_norm"] == lm_row["acc_norm"]
                         and mor_row["n"] == len(samples))
            rows.append({
                "task": task.name, "lm_eval_task": name, "n": mor_row["n"], "file": task.files[0],
                "identical": identical,
                "mor": {"acc": mor_row["acc"], "acc_norm": mor_row["acc_norm"],
                        "acc_stderr": mor_row.get("acc_stderr"), "acc_norm_stderr": mor_row.get("acc_norm_stderr"),
                        **mor_time},
                "lm_eval": {**lm_row, "n": len(samples), **lm_time},
                "per_record": detail,
            })

    ok = all(r["identical"] for r in rows)
    print()
    print(table(rows))
    print()
    for r in rows:
        d = r["per_record"]
        print(f"{r['task']}: same (context, continuation) requests: {'yes' if d['same_requests'] else 'NO'}; "
              f"records whose acc / acc_norm differ: {d['records_acc_differ']} / {d['records_acc_norm_differ']}; "
              f"max |log-likelihood difference|: {d['max_abs_loglik_diff']:.2e}; "
              f"mor = load {r['mor']['load_s']:.1f} s + data and scoring {r['mor']['score_s']:.1f} s")
    print("wall times are end to end per task (model load + data + scoring) on a shared machine; "
          "compare them as rough figures.")
    print("RESULT: " + ("all metrics identical" if ok else "METRICS DIFFER"))
    if args.out:
        out = Path(args.out)
        report = {"machine": info, "command": command, "args": vars(args), "model_path": model_path,
                  "scoring": "text", "rows": rows, "identical": ok}
        write_json(out, report)
        print(f"JSON written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
