"""``mor compare PLAN``: run (or resume) a comparison plan and write its report."""

from __future__ import annotations

import os
import shlex
import sys
import time

from . import at_least_one, command


def add_compare_flags(p) -> None:
    p.add_argument("plan", help="the plan: a YAML or JSON file (see docs/compare.md)")
    p.add_argument("--workers", type=at_least_one, default=1,
                   help="processes sharing the plan, each taking the next unclaimed run (default 1)")
    p.add_argument("--threads", type=at_least_one, default=None,
                   help="torch threads per worker (default: CPU cores / workers)")
    p.add_argument("--limit", type=at_least_one, default=None,
                   help="stop this worker after finishing this many runs (the rest resume later)")
    p.add_argument("--report", action="store_true", help="no training: write the report of what has finished")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the runs")
    p.add_argument("--cost", type=at_least_one, default=None, metavar="ROUNDS",
                   help="measure each arm's training step time against LoRA's, interleaved, for ROUNDS rounds "
                        "(writes cost.json beside the results; the report adds it)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each comparison (0: none)")


@command("compare", "compare adapters (MoR, LoRA, DoRA, MoE-LoRA) on your model and data: paired, seeded, "
                    "learning rates chosen on validation", arguments=add_compare_flags)
def cmd_compare(args) -> int:
    from ..compare import Worker, read_plan, write_report
    from ..compare.report import selection_status

    plan = read_plan(args.plan)
    command_line = shlex.join(["mor", "compare", *sys.argv[2:]]) if sys.argv[1:2] == ["compare"] else ""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cost:
        from ..compare.cost import write_cost

        print(f"wrote {write_cost(plan, rounds=args.cost)}")
    elif not args.report:
        if args.workers > 1:
            from ..compare.runner import run_workers

            extra = ["--limit", str(args.limit)] if args.limit else []
            status = run_workers(args.plan, args.workers, args.threads, extra)
            if status != 0:
                print(f"error: a worker failed with status {status} (its output is above); run the same command "
                      "again to resume", file=sys.stderr)
                return status
        else:
            from ..runtime.loading import load_model
            from ..compare.plan import match_budget

            counts = match_budget(plan, load_model(plan.model))
            log = lambda msg: print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", flush=True)  # noqa: E731
            log("trainable parameters: " + ", ".join(f"{plan.arms[a].label} {n:,}" for a, n in counts.items()))
            Worker(plan, log=log, limit=args.limit).run()
    if args.no_report:
        return 0
    from ..compare.plan import match_budget

    match_budget(plan)  # loads the model only when an arm's r is matched to the budget
    for line in selection_status(plan):
        print(line)
    text, md = write_report(plan, command_line, bootstrap=args.bootstrap)
    print(text)
    if md is not None:
        print(f"\nwrote {md}")
    return 0
