"""``mor compare PLAN``: run (or resume) a comparison plan and write its report."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from . import at_least_one, command
from ..errors import SettingsError


PLAN_FLAGS = ("data", "heldout", "arms", "model", "steps", "seeds", "lrs", "target", "name")


def add_compare_flags(p) -> None:
    p.add_argument("plan", nargs="?", help="the plan: a YAML or JSON file (see docs/compare.md); or describe the "
                                           "common case with --data and the flags below instead")
    g = p.add_argument_group("a plan from flags, without a plan file (written to results/compare/NAME/plan.yaml; "
                             "the same command resumes it)")
    g.add_argument("--data", nargs="+", metavar="TASK",
                   help="tasks to train on: anything `mor train --data` reads, or builtin:<task>")
    g.add_argument("--heldout", nargs="+", metavar="TASK", help="tasks scored but never trained on (forgetting)")
    g.add_argument("--arms", nargs="+", metavar="METHOD", help="methods to compare at a matched parameter budget "
                   "(default: lora mor; also dora, moelora)")
    g.add_argument("--model", help="base model: hub id, folder or .gguf (default: the embedded SmolLM2-135M)")
    g.add_argument("--steps", type=at_least_one, help="optimizer steps of every run (default 300)")
    g.add_argument("--seeds", type=int, nargs="+", help="seeds of every arm (default 0 1 2)")
    g.add_argument("--lrs", type=float, nargs="+", help="learning rates each arm chooses from on validation "
                   "(default 3e-4 1e-3 3e-3; up to 2 more past an edge while the best sits there)")
    g.add_argument("--target", choices=["output", "text"], help="what runs train on and how records are scored "
                   "(`mor train --target`)")
    g.add_argument("--name", help="the comparison's name: its results/compare/NAME folder (default: compare)")
    p.add_argument("--workers", type=at_least_one, default=1,
                   help="processes sharing the plan, each taking the next unclaimed run, each given its own GPUs "
                        "(the plan's resources.gpus a run) where the machine has them (default 1)")
    e = p.add_argument_group("engines: where the trainings run (docs/cluster.md)")
    e.add_argument("--engine", choices=["local", "slurm", "ray"], default=None,
                   help="local: --workers processes on this machine; slurm: job arrays through submitit; ray: Ray "
                        "tasks (default: the plan's engine:, else local)")
    e.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster: auto, ray://HOST:PORT or HOST:PORT (default: start Ray on this machine)")
    e.add_argument("--slurm-partition", default=None, help="the partition of every job (default: the plan's "
                                                         "slurm.partition, else the cluster's default)")
    e.add_argument("--slurm-time", type=at_least_one, default=None, metavar="MINUTES",
                   help="time limit of each job (default: the plan's slurm.timeout_min, else 240); a job near it is "
                        "requeued and resumes from its last complete checkpoint")
    e.add_argument("--slurm-array-parallelism", type=at_least_one, default=None, metavar="N",
                   help="jobs of an array running at once (default: the plan's slurm.array_parallelism, else 256)")
    e.add_argument("--slurm-local", action="store_true",
                   help="--engine slurm's jobs through submitit's LocalExecutor on this machine (no SLURM): try a "
                        "plan's jobs as the cluster will run them")
    e.add_argument("--claim-grace", type=float, default=None, metavar="SECONDS",
                   help="a claimed run whose holder's heartbeat is older than this is taken over (default 60, or "
                        "$MOR_CLAIM_GRACE); every worker of a plan must use the same")
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
    from ..compare import read_plan, write_report
    from ..compare.report import selection_status

    flags = [f"--{f}" for f in PLAN_FLAGS if getattr(args, f) is not None]
    if args.plan and flags:
        raise SettingsError(f"give a plan file or the plan flags ({', '.join(flags)}), not both: a plan's settings "
                               "live in its file")
    if not args.plan:
        from ..compare.plan import plan_from_flags, write_plan_file

        if not args.data:
            raise SettingsError("give a plan file (mor compare plan.yaml) or the tasks to compare on: "
                                   "mor compare --data TASK [TASK ...] [--arms lora mor]")
        raw = plan_from_flags(args.data, args.heldout, args.arms, args.model, args.steps, args.seeds, args.lrs,
                              args.target, args.name)
        args.plan = str(write_plan_file(raw, Path(raw["results"]) / "plan.yaml"))
        print(f"plan: {args.plan} (`mor compare {args.plan}` resumes or reports it)")
    plan = read_plan(args.plan)
    command_line = shlex.join(["mor", "compare", *sys.argv[2:]]) if sys.argv[1:2] == ["compare"] else ""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.cost:
        from ..compare.cost import write_cost

        print(f"wrote {write_cost(plan, rounds=args.cost)}")
    elif not args.report:
        if args.claim_grace is not None:
            os.environ["MOR_CLAIM_GRACE"] = str(args.claim_grace)  # the workers and jobs this starts inherit it
        engine = args.engine or plan.engine
        if engine != "local":
            _run_engine(plan, engine, args)
        else:
            from ..compare.engines import Resources, gpu_sets, visible_gpus

            gpus = visible_gpus()
            sets = gpu_sets(args.workers, Resources.of(plan).gpus_per_run(plan, len(gpus)), gpus)
            if args.workers == 1 and sets[0] in (None, ",".join(gpus)):  # its GPUs are all it sees: run here
                _run_here(plan, args)
            else:  # worker processes, each started with its own CUDA_VISIBLE_DEVICES
                from ..compare.runner import run_workers

                extra = ["--limit", str(args.limit)] if args.limit else []
                status = run_workers(args.plan, args.workers, args.threads, extra, sets)
                if status != 0:
                    print(f"error: a worker failed with status {status} (its output is above); run the same command "
                          "again to resume", file=sys.stderr)
                    return status
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


def _log(msg: str) -> None:
    from ..compare.claims import host_name

    host = f" {host_name()}" if os.environ.get("MOR_HOST") else ""
    print(f"[{time.strftime('%H:%M:%S')}{host} pid {os.getpid()}] {msg}", flush=True)


def _run_here(plan, args) -> None:
    """The plan's jobs in this process, taking the next unclaimed one until none is left."""
    from ..compare import Worker
    from ..compare.plan import match_budget
    from ..runtime.loading import load_model

    counts = match_budget(plan, load_model(plan.model))
    _log("trainable parameters: " + ", ".join(f"{plan.arms[a].label} {n:,}" for a, n in counts.items()))
    Worker(plan, log=_log, limit=args.limit).run()


def _run_engine(plan, engine: str, args) -> None:
    """The plan through SLURM or Ray: this process decides what runs, the engine runs it."""
    from ..compare.engines import Driver, make_engine
    from ..compare.plan import match_budget
    from ..runtime.loading import load_model

    if args.limit or args.workers > 1:
        raise SettingsError(f"--engine {engine} runs every job the plan has; --workers and --limit are the local "
                            "engine's")
    runner = make_engine(plan, engine, args.ray_address, args.slurm_partition, args.slurm_time,
                         args.slurm_array_parallelism, args.slurm_local)  # refuses before anything is loaded
    try:
        counts = match_budget(plan, load_model(plan.model))
        _log("trainable parameters: " + ", ".join(f"{plan.arms[a].label} {n:,}" for a, n in counts.items()))
        Driver(plan, runner, log=_log, threads=args.threads).run()
    finally:
        runner.close()
