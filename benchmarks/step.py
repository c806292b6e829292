"""The training step of a compare plan's arms against its LoRA arm, on this machine: the same models,
optimizers and batches as ``mor compare PLAN --cost ROUNDS`` (mor.compare.cost builds them), the arms
taking turns step by step, the median of per-round ratios to the reference with its IQR, and a
second copy of the reference as the noise floor. Faster than ``--cost``: only the arms named, and
no AdamW implementation sweep. With ``--profile STEPS`` each arm's steps also run under
torch.profiler and the table of where the time goes (self CPU time per op, forward and backward
together) is printed and kept in the JSON.

    PYTHONPATH=src nice -n 10 python -m benchmarks.step --rounds 20 --profile 5 --json results/step.json

``--losses STEPS`` trains each arm alone instead and keeps its losses; run it on two versions of the
code (``--against`` the first one's JSON) to check that a change to the step left the losses alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import machine_info, text_table
from mor.compare.cost import _interleaved, build_contenders, ratio_row, reference_arm, training_step
from mor.compare.plan import read_plan

ROOT = Path(__file__).resolve().parents[1]


def profile_arm(pair, batches: list[dict], top: int) -> dict:
    """``len(batches)`` training steps of one arm under torch.profiler: the ``top`` ops by self CPU
    time (ms per step), the step's total, and how many ops it ran per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            training_step(pair, batch)
    events = prof.key_averages()
    steps = len(batches)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return dict(total_ms=total, ops_per_step=sum(e.count for e in events) / steps,
                top=[dict(op=e.key, ms=e.self_cpu_time_total / 1e3 / steps, calls=e.count / steps) for e in rows])


def training_losses(plan, steps: int) -> dict[str, list[float]]:
    """Each arm of ``plan`` built alone (as ``--cost`` builds it, the Trainer's seed set last) and trained
    ``steps`` steps on the plan's batches: its losses, to compare two versions of the code."""
    losses = {}
    for name, arm in dict(plan.arms).items():
        plan.arms = {name: arm}
        built, batches, _ = build_contenders(plan, steps, log=lambda _: None)
        model, optimizer = built[name]
        losses[name] = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default=str(ROOT / "benchmarks/plans/mix9.yaml"))
    p.add_argument("--arms", nargs="+", default=["lora", "mor", "mor-mean"], help="the plan's arms to time")
    p.add_argument("--data-root", default=None, help="the plan's data root, if not where the plan says")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="profile each arm for STEPS steps")
    p.add_argument("--top", type=int, default=12, help="ops per arm in the profile table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--losses", type=int, default=0, metavar="STEPS",
                   help="instead of timing: train each arm alone for STEPS steps and keep its losses")
    p.add_argument("--against", default=None, metavar="JSON",
                   help="with --losses: a JSON an earlier --losses run wrote; print the largest difference")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    plan = read_plan(args.plan)
    unknown = [a for a in args.arms if a not in plan.arms]
    if unknown:
        raise SystemExit(f"error: {plan.name} has no arm {unknown[0]!r}; its arms are {list(plan.arms)}")
    plan.arms = {name: plan.arms[name] for name in args.arms}
    if args.data_root:
        plan.data.root = str(Path(args.data_root).resolve())
    if args.losses:
        report = dict(plan=plan.name, steps=args.losses, losses=training_losses(plan, args.losses), machine=machine_info())
        if args.against:
            earlier = json.loads(Path(args.against).read_text())["losses"]
            report["max_difference"] = {name: max(abs(a - b) for a, b in zip(losses, earlier[name]))
                                        for name, losses in report["losses"].items() if name in earlier}
            print(text_table(["arm", "steps", "largest loss difference"],
                             [[name, args.losses, f"{d:.3g}"] for name, d in report["max_difference"].items()]))
        return _write(report, args.json)
    reference = reference_arm(plan)
    built, batches, optim = build_contenders(plan, args.warmup + args.rounds, log=lambda _: None)
    times = _interleaved(built, training_step, args.rounds, args.warmup, lambda _: None, "step", batches)
    total = {name: [f + o for f, o in t] for name, t in times.items()}
    rows = []
    for name in [*plan.arms, "noise floor"]:
        arm = plan.arms.get(name, plan.arms[reference])
        label = arm.label or name if name in plan.arms else f"noise floor ({arm.label or reference} twice)"
        rows.append(dict(arm=name, label=label, **ratio_row(total[name], total[reference]),
                         forward_backward=ratio_row([f for f, _ in times[name]], [f for f, _ in times[reference]]),
                         optimizer_ms=1e3 * ratio_row([o for _, o in times[name]], [o for _, o in times[reference]])["seconds"],
                         tensors=sum(len(g["params"]) for g in built[name][1].param_groups)))
    print(text_table(["arm", "step / LoRA", "IQR", "fwd+bwd / LoRA", "step ms", "optimizer ms", "tensors"],
                     [[r["label"], f"{r['ratio']:.3f}", f"{r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}",
                       f"{r['forward_backward']['ratio']:.3f}", f"{1e3 * r['seconds']:.0f}", f"{r['optimizer_ms']:.1f}",
                       r["tensors"]] for r in rows]))
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    report = dict(plan=plan.name, reference=plan.arms[reference].label or reference, rounds=args.rounds, optim=optim,
                  batches=dict(size=shapes[0][0], lengths=sorted({s[1] for s in shapes})), arms=rows,
                  machine=machine_info())
    if args.profile:
        report["profile"] = {}
        for name in plan.arms:
            prof = profile_arm(built[name], batches[: args.profile], args.top)
            report["profile"][name] = prof
            print(f"\n{name}: {prof['total_ms']:.0f} ms self CPU per step, {prof['ops_per_step']:.0f} ops per step")
            print(text_table(["op", "ms / step", "calls / step"],
                             [[t["op"], f"{t['ms']:.1f}", f"{t['calls']:.0f}"] for t in prof["top"]]))
    return _write(report, args.json)


def _write(report: dict, path: str | None) -> dict:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
