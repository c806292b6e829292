"""The report of a plan: what finished, each arm's accuracy per seed with intervals, the learning
rates chosen on validation, paired comparisons (difference, interval, discordance, verdict, the
smallest difference the plan detects), and the cost per step when it was measured. Markdown to
paste, JSON with every number, two figures."""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import textwrap
from pathlib import Path

from ..errors import require
from ..runtime.report import markdown_table
from ..safety import atomic_write_text
from .plan import Plan, lr_name
from .runner import Job, chosen_lr, job_key, jobs, read_result, result_path, selection
from .stats import average_accuracy, paired, records_needed, run_stderr, seeds_needed, task_accuracy


def finished_runs(plan: Plan) -> dict[str, list[dict]]:
    """{arm (or "base"): its finished final runs, in seed order}; refuses results made otherwise."""
    finished: dict[str, list[dict]] = {}
    for job in jobs(plan):
        if job.kind == "select":
            continue
        lr = chosen_lr(plan, plan.arms[job.arm])[0] if job.kind == "final" else None
        if job.kind == "final" and lr is None:
            continue
        record = read_result(result_path(plan, job), job_key(plan, job, lr))
        if record is not None:
            finished.setdefault(job.arm or "base", []).append(record)
    return finished


def summarise(plan: Plan, finished: dict[str, list[dict]], tasks: list[str], heldout: list[str],
              bootstrap: int = 2000) -> dict:
    rows = []
    for arm, recs in finished.items():
        avgs = [average_accuracy(r, tasks) for r in recs]
        rows.append(dict(
            arm=arm, label=recs[0]["label"], seeds=[r["seed"] for r in recs], lr=recs[0].get("lr"),
            trainable_parameters=recs[0]["trainable_parameters"],
            per_task_acc_norm={t: statistics.fmean(task_accuracy(r, t) for r in recs) for t in tasks + heldout},
            avg_acc_norm=statistics.fmean(avgs), avg_acc_norm_per_seed=avgs,
            avg_se_per_seed=[run_stderr(r, tasks) for r in recs],
            seed_sd=statistics.stdev(avgs) if len(avgs) > 1 else None,
            heldout_per_seed=[average_accuracy(r, heldout) for r in recs] if heldout else [],
            forgetting=statistics.fmean(average_accuracy(r, heldout) for r in recs) if heldout else None,
            final_loss=_fmean(r.get("final_loss") for r in recs),
            routing_jsd_bits=_fmean((r.get("routing") or {}).get("jsd_bits") for r in recs),
            routing_entropy_normalized=_fmean((r.get("routing") or {}).get("entropy_normalized") for r in recs),
            lr_selection=recs[0].get("lr_selection")))
    comps = []
    for a, b in plan.comparisons():
        if a in finished and b in finished:
            comps.append(dict(a=a, b=b, trained=paired(finished[a], finished[b], tasks, bootstrap=bootstrap),
                              heldout=paired(finished[a], finished[b], heldout, bootstrap=bootstrap) if heldout
                              else None))
    return dict(rows=rows, comparisons=comps, power=power(finished, comps, tasks))


def _fmean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def power(finished: dict, comps: list[dict], tasks: list[str], difference: float = 0.02) -> dict | None:
    """How many test records per task a ``difference`` (2 points) needs at 1, 3, 5 and 10 seeds, and
    how many seeds at the plan's records, from the variance components the finished comparisons
    measured (their medians)."""
    measured = [c["trained"] for c in comps if c["trained"]["n"]]
    if not measured:
        return None
    n_per_task = measured[0]["n"] / len(tasks)
    # se_rec^2 = v / (n T): the per-record variance v back from each comparison's se_records
    variances = sorted(c["se_records"] ** 2 * n_per_task * len(tasks) for c in measured)
    sds = sorted(c["sd_seeds"] for c in measured if c["sd_seeds"] is not None)
    v, sd = statistics.median(variances), (statistics.median(sds) if sds else None)
    return dict(difference=difference, record_variance=v, seed_sd=sd, records_per_task=round(n_per_task),
                detectable_median=statistics.median(c["detectable"] for c in measured),
                needed={s: records_needed(v, sd, len(tasks), s, difference) for s in (1, 3, 5, 10)},
                seeds_needed=seeds_needed(v, sd, len(tasks), round(n_per_task), difference))


# -- text ----------------------------------------------------------------------------------------------

def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _pts(x):
    return "-" if x is None else f"{100 * x:+.1f}"


def tables(summary: dict, tasks: list[str], heldout: list[str]) -> str:
    rows, comps = summary["rows"], summary["comparisons"]
    head = ["arm", "trainable params", "lr", "seeds", *tasks, f"avg ({len(tasks)} trained)", "seed sd",
            *(f"{t} (held out)" for t in heldout), "routing JSD (bits)"]
    body = [[r["label"], f"{r['trainable_parameters']:,}", "-" if r["lr"] is None else f"{r['lr']:g}",
             str(len(r["seeds"])) if r["seeds"] != [None] else "-",
             *(_pct(r["per_task_acc_norm"][t]) for t in tasks), _pct(r["avg_acc_norm"]),
             "-" if r["seed_sd"] is None else f"{100 * r['seed_sd']:.1f}",
             *(_pct(r["per_task_acc_norm"][t]) for t in heldout),
             "-" if r["routing_jsd_bits"] is None else f"{r['routing_jsd_bits']:.4f}"] for r in rows]
    text = "accuracy (acc_norm, %)\n\n" + markdown_table(head, body)

    per_seed = [[r["label"], *(f"{_pct(v)} ± {100 * 2 * se:.1f}" for v, se in zip(r["avg_acc_norm_per_seed"],
                                                                                  r["avg_se_per_seed"]))]
                for r in rows]
    width = max(len(r) for r in per_seed) - 1
    text += ("\n\nper seed: task average ± 2 s.e. (test sampling)\n\n"
             + markdown_table(["arm", *(f"run {i + 1}" for i in range(width))],
                              [r + ["-"] * (width + 1 - len(r)) for r in per_seed]))

    selected = [r for r in rows if r.get("lr_selection")]
    if selected:
        grid = sorted({lr for r in selected for lr in r["lr_selection"]["validation_average"]}, key=float)
        text += ("\n\nlearning rate chosen on the validation split (validation task average, %)\n\n"
                 + markdown_table(["arm", *grid, "chosen"],
                                  [[r["label"], *(_pct(r["lr_selection"]["validation_average"].get(lr)) for lr in grid),
                                    r["lr_selection"]["chosen"] + (" (grid edge)" if _at_edge(r["lr_selection"]) else "")]
                                   for r in selected]))

    label = {r["arm"]: r["label"] for r in rows}
    chead = ["comparison", "seeds", "diff, trained avg (pts)", "2 s.e.", "bootstrap 95%", "discordant",
             "a only / b only (McNemar p)", "verdict", "detectable (80% power)", "diff, held out", "2 s.e.",
             "verdict (held out)"]
    cbody = []
    for c in comps:
        t, h = c["trained"], c["heldout"]
        boot = t.get("bootstrap_95")
        cbody.append([f"{label[c['a']]} vs {label[c['b']]}", f"{t['seeds_a']} / {t['seeds_b']}", _pts(t["diff"]),
                      f"{100 * t['two_se']:.1f}", f"[{_pts(boot[0])}, {_pts(boot[1])}]" if boot else "-",
                      f"{100 * t['discordant']:.0f}% of {t['n']}",
                      f"{t['a_only']} / {t['b_only']} ({t['mcnemar_p']:.2g})", t["verdict"],
                      f"{100 * t['detectable']:.1f}"]
                     + ([_pts(h["diff"]), f"{100 * h['two_se']:.1f}", h["verdict"]] if h else ["-"] * 3))
    if cbody:
        text += "\n\npaired comparisons (a minus b, points)\n\n" + markdown_table(chead, cbody)
    p = summary.get("power")
    if p:
        need = ", ".join(f"{s} seed{'s' if s > 1 else ''}: " + (f"{n:,}" if n else "not reachable (seed spread)")
                         for s, n in p["needed"].items())
        text += (f"\n\npower: this plan ({p['records_per_task']} test records per task) detects differences of "
                 f"{100 * p['detectable_median']:.1f} points (median over comparisons; 80% power, 5% two-sided). "
                 f"A {100 * p['difference']:.0f}-point difference needs, per task: {need} test records; "
                 f"with this plan's {p['records_per_task']} a task, "
                 + (f"{p['seeds_needed']} seed{'s' if p['seeds_needed'] > 1 else ''}." if p["seeds_needed"]
                    else "no number of seeds."))
    return text


def cost_table(cost: dict) -> str:
    def cell(r: dict) -> str:
        return f"{r['ratio']:.3f} ({r['iqr'][0]:.3f}-{r['iqr'][1]:.3f})"

    ref = cost["reference"]
    rows = [[a["label"], cell(a), cell(a["forward_backward"]), cell(a["optimizer"]), f"{a['seconds']:.3f}",
             f"{a['tensors']:,}"] for a in cost["arms"]]
    text = (f"training cost per step, interleaved in one process ({cost['rounds']} rounds; batches of "
            f"{cost['batch'][0]} from the training mix, median length {cost['batch'][1]:g} tokens, longest "
            f"{cost['batch'][2]}; optimizer {cost['optim']}; {cost['machine']}); ratio to {ref} "
            f"measured alone, median of per-round ratios (IQR); noise floor (the reference against itself): "
            f"{cost['noise_floor']:.3f}\n\n"
            + markdown_table(["arm", f"step / {ref}", "forward+backward", "optimizer", "median s/step",
                              "trainable tensors"], rows))
    impls = list(dict.fromkeys(r["implementation"] for r in cost["adamw"]))
    by = {(r["label"], r["implementation"]): r for r in cost["adamw"]}
    labels = list(dict.fromkeys(r["label"] for r in cost["adamw"]))
    rows = [[label, *(f"{1000 * by[label, i]['seconds']:.1f} ms ({by[label, i]['ratio']:.2f}x)" for i in impls)]
            for label in labels]
    return (text + f"\n\nthe optimizer step alone under each AdamW implementation, on the same gradients "
            f"(median ms; ratio to {ref} under the same implementation)\n\n" + markdown_table(["arm", *impls], rows))


# -- figures -----------------------------------------------------------------------------------------

def _plt():
    require("matplotlib", "drawing the report's figures")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(rows: list[dict], heldout: list[str], path: Path) -> Path:
    plt = _plt()
    panels = [("avg_acc_norm_per_seed", "task average, trained tasks")] + \
        ([("heldout_per_seed", f"{', '.join(heldout)} (never trained)")] if heldout else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, r in enumerate(rows):
            vals = r[key]
            ax.bar(i, 100 * sum(vals) / len(vals), color="#888888" if r["arm"] == "base" else "#1f77b4", alpha=0.6)
            errs = [100 * 2 * se for se in r["avg_se_per_seed"]] if key == "avg_acc_norm_per_seed" else None
            xs = [i + 0.12 * (k - (len(vals) - 1) / 2) for k in range(len(vals))]
            ax.errorbar(xs, [100 * v for v in vals], yerr=errs, fmt="k.", ms=5, capsize=2, lw=0.8)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("acc_norm (%)")
        ax.set_title(title, fontsize=9)
        lo = min(100 * v for r in rows for v in r[key])
        ax.set_ylim(max(0, lo - 5), None)
    fig.text(0.01, 0.01, "bars: mean over seeds; dots: one per seed, ± 2 s.e. of test sampling", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


BOOTSTRAP_GREY = "0.75"  # the bootstrap 95 % band behind each comparison's point


def draw_differences(ax, comps: list[dict], labels: dict) -> None:
    """One row per comparison (the first on top): its mean difference with ± 2 s.e. and, behind
    them on the same row, a grey band over its bootstrap 95 % interval."""
    for i, c in enumerate(reversed(comps)):
        t = c["trained"]
        ax.errorbar(100 * t["diff"], i, xerr=100 * t["two_se"], fmt="o", capsize=3, zorder=3,
                    color={"better": "#2ca02c", "worse": "#d62728"}.get(t["verdict"], "#1f77b4"))
        if t.get("bootstrap_95"):
            ax.plot([100 * x for x in t["bootstrap_95"]], [i, i], color=BOOTSTRAP_GREY, lw=7,
                    solid_capstyle="butt", zorder=1)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_ylim(-0.5, len(comps) - 0.5)  # every row its own band, one comparison included
    ax.set_yticks(range(len(comps)), [textwrap.fill(f"{labels[c['a']]} vs {labels[c['b']]}", 48)
                                      for c in reversed(comps)], fontsize=7)
    ax.set_xlabel("difference in task-average acc_norm (points)\n± 2 s.e.; grey band: bootstrap 95 %", fontsize=8)


def differences_figure(comps: list[dict], labels: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(comps) + 1.4))
    draw_differences(ax, comps, labels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the report ----------------------------------------------------------------------------------------

def write_report(plan: Plan, command: str = "", bootstrap: int = 2000) -> tuple[str, Path | None]:
    """(the report text, the Markdown file written -- None when nothing has finished)."""
    all_jobs = jobs(plan)
    finished = finished_runs(plan)
    n_final = sum(map(len, finished.values()))
    n_select = sum(1 for j in all_jobs if j.kind == "select"
                   and read_result(result_path(plan, j), job_key(plan, j)) is not None)
    heldout_names = [Path(t.removeprefix("builtin:")).name for t in plan.data.heldout]
    task_names = [Path(t.removeprefix("builtin:")).name for t in plan.data.train]
    head = (f"# `mor compare` report: {plan.name}\n\n{_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
            + (f"; command: `{command}`" if command else "") + f"; plan: `{plan.path}`\n\n"
            f"finished: {n_final} of {sum(1 for j in all_jobs if j.kind != 'select')} runs, "
            f"{n_select} of {sum(1 for j in all_jobs if j.kind == 'select')} learning-rate trials "
            f"({plan.results_dir()})\n")
    out = plan.results_dir()
    cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").is_file() else None
    cost_text = "\n\n" + cost_table(cost) if cost else ""
    if not finished:
        return head + "\nnothing finished yet" + cost_text + "\n", None
    summary = summarise(plan, finished, task_names, heldout_names, bootstrap)
    text = head + "\n" + tables(summary, task_names, heldout_names) + cost_text
    if cost:
        summary["cost"] = cost
    acc_png = accuracy_figure(summary["rows"], heldout_names, out / "report_accuracy.png")
    text += f"\n\n![accuracy per arm and seed]({acc_png.name})\n"
    if summary["comparisons"]:
        labels = {r["arm"]: r["label"] for r in summary["rows"]}
        diff_png = differences_figure(summary["comparisons"], labels, out / "report_differences.png")
        text += f"\n![paired differences]({diff_png.name})\n"
    md = atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.json", json.dumps(dict(command=command, plan=str(plan.path), tasks=task_names,
                                                           heldout=heldout_names, **summary), indent=1,
                                                      default=str) + "\n")
    return text, md


def _at_edge(lr_selection: dict) -> bool:
    """Whether the chosen rate is the lowest or highest its selection tried."""
    tried = sorted(map(float, lr_selection["validation_average"]))
    return len(tried) > 1 and float(lr_selection["chosen"]) in (tried[0], tried[-1])


def selection_status(plan: Plan) -> list[str]:
    """One line per arm: its chosen rate, or how many trials are left."""
    lines = []
    for arm in plan.arms.values():
        grid, lr, scores = selection(plan, arm)
        if len(grid) == 1:
            lines.append(f"{arm.name}: fixed lr {lr_name(grid[0])}")
        elif lr is None:
            done = sum(1 for s in plan.select_seeds() for g in grid
                       if read_result(result_path(plan, Job("select", arm.name, s, g)),
                                      job_key(plan, Job("select", arm.name, s, g))) is not None)
            lines.append(f"{arm.name}: {done} of {len(grid) * len(plan.select_seeds())} learning-rate trials done")
        else:
            added = grid[len(plan.arm_grid(arm)):]
            widened = f" (grid widened past its edge: {', '.join(map(lr_name, added))})" if added else ""
            edge = ("; still at the edge of the grid: widen it (lrs:, select.widen:) to know the best rate is inside"
                    if _at_edge(dict(validation_average=scores, chosen=lr_name(lr))) else "")
            lines.append(f"{arm.name}: lr {lr_name(lr)} chosen on validation "
                         + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in scores.items()) + widened + edge)
    return lines
