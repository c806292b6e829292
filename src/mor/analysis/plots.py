"""Figures of a MoR adapter's analysis, drawn from the numbers ``mor.analysis.analyze.analyze`` computes.

Every function takes a computed, JSON-able dict (``routing_stats``, ``parameter_scaling``,
``rank_spectrum``, the records of ``routing_stats.json``) and a PNG path, and returns the path.
matplotlib's object API on the Agg canvas: no pyplot, no global backend switch; matplotlib is
imported only when something is drawn.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence, Union

from ..errors import DataError, require

#: File names of the figures ``analysis.analyze`` writes, by key.
FIGURES = {
    "routing_by_task": "routing_by_task.png",
    "routing_by_task_layers": "routing_by_task_layers.png",
    "parameters_vs_experts": "parameters_vs_experts.png",
    "rank_spectrum": "rank_spectrum.png",
}
#: Drawn from a training run's routing_stats.json (not by ``analyze``, which needs no run).
ROUTING_OVER_STEPS = "routing_over_steps.png"
DPI = 120

PathLike = Union[str, Path]


def draw_figures(numbers: Mapping, out_dir: PathLike) -> dict[str, Path]:
    """The four figures of ``analysis.analyze``'s numbers (keys "routing", "parameters",
    "rank_spectrum") in ``out_dir``; returns {figure key (FIGURES): path}."""
    out_dir = Path(out_dir)
    return {
        "routing_by_task": plot_task_routing(numbers["routing"], out_dir / FIGURES["routing_by_task"]),
        "routing_by_task_layers": plot_task_routing(numbers["routing"], out_dir / FIGURES["routing_by_task_layers"],
                                                    per_layer=True),
        "parameters_vs_experts": plot_parameter_scaling(numbers["parameters"], out_dir / FIGURES["parameters_vs_experts"]),
        "rank_spectrum": plot_rank_spectrum(numbers["rank_spectrum"], out_dir / FIGURES["rank_spectrum"]),
    }


def short_layer_name(name: str) -> str:
    """'model.layers.12.mlp.gate_proj' -> '12.gate_proj'; names without a block index keep their
    last two parts."""
    parts = name.split(".")
    idx = next((p for p in parts if p.isdigit()), None)
    if idx is None:
        return ".".join(parts[-2:])
    return f"{idx}.{parts[-1]}"


def _figure(width: float, height: float):
    require("matplotlib", "drawing routing figures")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_task_routing(stats: Mapping, path: PathLike, per_layer: bool = False) -> Path:
    """Draw ``analysis.routing_stats``' dict.

    per_layer=False: grouped bars, mean router weight per expert (averaged over layers) for each
    task, dashed line at uniform 1/N; right, the pairwise JSD between tasks.
    per_layer=True: one heatmap per task, layers x experts, coloured by deviation from 1/N
    (shared scale), and a last column with the per-layer JSD across tasks.
    """
    return (_plot_routing_layers if per_layer else _plot_routing_mean)(stats, path)


def _plot_routing_mean(s: dict, path: PathLike) -> Path:
    import numpy as np

    tasks, n = s["tasks"], s["num_experts"]
    t_count = len(tasks)
    fig = _figure(min(13.0, max(8.0, 0.3 * n * max(t_count, 2) + 4.0)), 4.6)
    ax, ax_jsd = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.6, 1]})
    width = 0.8 / t_count
    x = np.arange(n)
    colors = [f"C{i % 10}" for i in range(t_count)]
    for i, task in enumerate(tasks):
        ax.bar(x - 0.4 + width * (i + 0.5), s["mean_weights"][task], width, label=task, color=colors[i])
    ax.axhline(1.0 / n, color="k", ls="--", lw=1, label=f"uniform 1/N = {1 / n:.3g}")
    ax.set_xticks(x, [f"E{i}" for i in range(n)])
    ax.set_xlabel("expert")
    ax.set_ylabel(f"mean router weight (avg over {len(s['layers'])} layers)")
    top = max(max(v) for v in s["mean_weights"].values())
    ax.set_ylim(0, top * 1.25)
    ax.legend(ncols=min(t_count + 1, 3), fontsize=8, loc="upper left")
    ax.set_title(f"Router weight per expert by task\nspecialisation: JSD = {s['jsd_mean']:.3g} bits "
                 f"(mean over layers, 0 = same routing)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    pair = np.array(s["jsd_pairwise"])
    im = ax_jsd.imshow(pair, cmap="viridis", vmin=0, vmax=max(pair.max(), 1e-12))
    ax_jsd.set_xticks(range(t_count), tasks, rotation=45, ha="right", fontsize=8)
    ax_jsd.set_yticks(range(t_count), tasks, fontsize=8)
    for a in range(t_count):
        for b in range(t_count):
            ax_jsd.text(b, a, f"{pair[a, b]:.2g}", ha="center", va="center", fontsize=7,
                        color="w" if pair[a, b] < 0.6 * pair.max() else "k")
    ax_jsd.set_title("pairwise JSD (bits)\nmean over layers", fontsize=10)
    fig.colorbar(im, ax=ax_jsd, shrink=0.8)
    return _save(fig, path)


def _plot_routing_layers(s: dict, path: PathLike) -> Path:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    tasks, n, layers = s["tasks"], s["num_experts"], s["layers"]
    t_count, l_count = len(tasks), len(layers)
    weights = np.array([s["weights"][t] for t in tasks])  # (T, L, N)
    dev = weights - 1.0 / n
    # a robust colour range (98th percentile of |deviation|): one extreme layer must not wash out the rest
    full = float(np.abs(dev).max())
    span = max(float(np.quantile(np.abs(dev), 0.98)), 1e-9)
    clipped = full > span * 1.05
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    height = max(4.0, 0.13 * l_count + 2.0)
    fig = _figure(1.9 * t_count + 3.4, height)
    axes = fig.subplots(1, t_count + 1, sharey=True, gridspec_kw={"width_ratios": [1] * t_count + [0.8]})
    labels = [short_layer_name(name) for name in layers]
    blocks = [lab.split(".", 1)[0] for lab in labels]
    by_block = l_count > 40 and all(b.isdigit() for b in blocks) and len(set(blocks)) < l_count
    if by_block:  # many layers: one tick per transformer block, at its first module
        ticks = [i for i in range(l_count) if i == 0 or blocks[i] != blocks[i - 1]]
        modules = [lab.split(".", 1)[1] for lab in labels[:ticks[1] if len(ticks) > 1 else l_count]]
        tick_labels, ylabel = [blocks[i] for i in ticks], f"transformer block (rows within a block: {', '.join(modules)})"
    else:
        ticks, tick_labels, ylabel = list(range(l_count)), labels, "layer (block.module)"
    fontsize = 7
    im = None
    for i, task in enumerate(tasks):
        ax = axes[i]
        im = ax.imshow(dev[i], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_xticks(range(n), [str(e) for e in range(n)], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"{task}\nH = {s['per_task'][task]['entropy_bits']:.3f} bits", fontsize=9)
    axes[0].set_yticks(ticks, tick_labels, fontsize=fontsize)
    axes[0].set_ylabel(ylabel)
    if by_block:
        for ax in axes:
            for t in ticks[1:]:
                ax.axhline(t - 0.5, color="0.5", lw=0.3, alpha=0.5)
    jsd = np.array(s["jsd_per_layer"])
    ax = axes[-1]
    ax.barh(range(l_count), jsd, color="C3", height=0.8)
    ax.set_xlabel("JSD (bits)")
    ax.set_title(f"JSD across tasks\nmean {s['jsd_mean']:.3g}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.set_ylim(l_count - 0.5, -0.5)
    cbar = fig.colorbar(im, ax=list(axes[:-1]), location="bottom", shrink=0.6, aspect=40, pad=0.01,
                        extend="both" if clipped else "neither")
    cbar.set_label(f"router weight - 1/N  (1/N = {1 / n:.3g}; red: expert used more, blue: less"
                   + (f"; colours saturate at +-{span:.2g}, max |dev| {full:.2g})" if clipped else ")"))
    fig.suptitle(f"Mean router weight per layer and expert, by task ({l_count} layers x {n} experts)", fontsize=11)
    return _save(fig, path)


def plot_routing_over_steps(records: Sequence[Mapping], path: PathLike) -> Path:
    """Routing during training, from ``routing_stats.json`` (mor.analysis.routing_stats): per-token
    entropy (bits), Jensen-Shannon divergence between tasks (bits) and the busiest expert's share
    of tokens, against the optimiser step; one thin line per layer (colour = depth), the mean over
    layers thick."""
    if not records:
        raise DataError("no routing records to draw (routing_stats.json is empty)")
    from matplotlib import colormaps

    steps = [r["step"] for r in records]
    layers = list(records[0]["layers"])
    cmap = colormaps["viridis"]
    fig = _figure(15.0, 4.2)
    axes = fig.subplots(1, 3)
    panels = [("entropy_bits", "entropy_bits", "mean per-token routing entropy (bits)"),
              ("jsd_bits", "jsd_bits", "JSD between tasks' mean routing (bits)"),
              ("load_top_max", None, "share of tokens of the busiest expert")]
    for ax, (key, layer_key, title) in zip(axes, panels):
        for i, layer in enumerate(layers):
            values = [(r["layers"][layer][layer_key] if layer_key else max(r["layers"][layer]["load_top"]))
                      for r in records]
            ax.plot(steps, values, color=cmap(i / max(len(layers) - 1, 1)), lw=0.6, alpha=0.6)
        ax.plot(steps, [r[key] for r in records], color="k", lw=2.2, label="mean over layers")
        ax.set_xlabel("optimiser step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    n = records[0]["num_experts"]
    axes[0].axhline(records[0]["uniform_entropy_bits"], color="C3", ls="--", lw=1, label=f"uniform (log2 {n})")
    axes[2].axhline(1 / n, color="C3", ls="--", lw=1, label=f"even load (1/{n})")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (axes[0], axes[2]):
        ax.legend(fontsize=8)
    tasks = ", ".join(records[-1].get("tasks", {}))
    fig.suptitle(f"Routing over training ({len(layers)} layers, thin lines coloured shallow->deep; probe tasks: {tasks})",
                 fontsize=11)
    return _save(fig, path)


def plot_parameter_scaling(data: dict, path: PathLike) -> Path:
    """Left: trainable parameters (millions) vs N for MoR, MoE-LoRA, LoRA rank r and rank N*r.
    Right: MoR's parameters as a share of MoE-LoRA's at the same N and r."""
    experts = data["experts"]
    fig = _figure(11.0, 4.4)
    ax, ax_ratio = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    top = max(data["moelora"] + data["lora_rank_Nr"] + data["mor"])
    m, unit = (1e6, "M") if top >= 1e6 else (1e3, "K")
    ax.plot(experts, [v / m for v in data["moelora"]], "s-", color="C3", label=f"MoE-LoRA (N experts of rank {data['r']})")
    ax.plot(experts, [v / m for v in data["lora_rank_Nr"]], ":", color="C3", alpha=0.7, label="LoRA of rank N*r")
    ax.plot(experts, [v / m for v in data["mor"]], "o-", color="C0", label=f"MoR (shared rank {data['r']})")
    ax.plot(experts, [v / m for v in data["lora"]], "--", color="C2", label=f"LoRA rank {data['r']}")
    for n, v in zip(experts, data["mor"]):
        ax.annotate(f"{v / m:.3g}{unit}", (n, v / m), textcoords="offset points", xytext=(2, -12), ha="left",
                    fontsize=7, color="C0")
    for n, v in zip(experts, data["moelora"]):
        ax.annotate(f"{v / m:.3g}{unit}", (n, v / m), textcoords="offset points", xytext=(-4, 6), ha="right",
                    fontsize=7, color="C3")
    own = data.get("this_adapter")
    if own and own["method"] == "mor" and own["r"] == data["r"]:
        ax.plot([own["num_experts"]], [own["parameters"] / m], "*", ms=14, color="gold", mec="k",
                label=f"this adapter (measured, N={own['num_experts']})")
    ax.set_xticks(experts)
    ax.set_ylim(0, None)
    ax.set_xlabel("number of experts N")
    ax.set_ylabel(f"trainable parameters ({'millions' if unit == 'M' else 'thousands'})")
    ax.set_title(f"Trainable parameters vs experts ({data['num_layers']} adapted layers, r={data['r']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ratio = [100 * v for v in data["mor_vs_moelora"]]
    ax_ratio.plot(experts, ratio, "o-", color="C0")
    for n, v in zip(experts, ratio):
        ax_ratio.annotate(f"{v:.0f}%", (n, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax_ratio.set_xticks(experts)
    ax_ratio.set_ylim(0, max(ratio) * 1.15)
    ax_ratio.set_xlabel("number of experts N")
    ax_ratio.set_ylabel("MoR / MoE-LoRA parameters (%)")
    ax_ratio.set_title("MoR's size relative to MoE-LoRA", fontsize=10)
    ax_ratio.grid(alpha=0.3)
    return _save(fig, path)


def plot_rank_spectrum(data: dict, path: PathLike) -> Path:
    """One log-scale panel per layer: singular values of the mixed update dW(g), of the shared
    (alpha/r) B A, of each expert D_i (grey), of the experts side by side [D_1 ... D_N], and of a
    LoRA model's B A when given; dotted lines at r and N*r; grey band = numerically zero."""
    layers = data["layers"]
    count = len(layers)
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = _figure(4.6 * cols + 0.4, 3.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    tiny = 1e-300
    for ax, (name, d) in zip(axes, layers.items()):
        r, n = d["r"], d["num_experts"]

        def draw(st, *args, **kwargs):
            sv = [v for v in st["singular_values"] if v > tiny]
            ax.plot(range(1, len(sv) + 1), sv, *args, **kwargs)

        for i, e in enumerate(d["experts"]):
            draw(e, "-", color="0.6", lw=0.8, label="each expert D_i" if i == 0 else None)
        draw(d["output_span"], "^-", color="C2", ms=3, lw=1,
             label=f"experts side by side [D_1..D_N] (rank {d['output_span']['numeric_rank']})")
        if d["shared"] is not None:
            draw(d["shared"], "s--", color="C1", ms=4, label=f"shared (a/r)BA = rank-{r} LoRA (rank {d['shared']['numeric_rank']})")
        if d["lora"] is not None:
            draw(d["lora"], "d-", color="C3", ms=4, label=f"LoRA model (a/r)BA (rank {d['lora']['numeric_rank']})")
        draw(d["mixed"], "o-", color="C0", ms=3, label=f"MoR mixed dW(g) (rank {d['mixed']['numeric_rank']})")
        ax.set_yscale("log")
        sigma_max = max(d["mixed"]["singular_values"][0], 1e-300)
        ax.axhspan(1e-300, data["rtol"] * sigma_max, color="0.85", alpha=0.6, lw=0)
        ymin = min([v for st in [d["mixed"], d["output_span"]] for v in st["singular_values"] if v > tiny] + [sigma_max])
        ymax = max([v for st in [d["output_span"], d["lora"] or d["mixed"]] for v in st["singular_values"]] + [sigma_max])
        ax.set_ylim(max(ymin / 5, 1e-20), ymax * 5)
        ax.axvline(r, color="k", ls=":", lw=1)
        ax.axvline(n * r, color="k", ls=":", lw=1)
        ax.text(r, 1.0, f" r={r}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        ax.text(n * r, 1.0, f" N*r={n * r}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("singular value index k")
        ax.set_ylabel("sigma_k")
        ax.set_title(f"{short_layer_name(name)} ({d['d_out']}x{d['d_in']}, r={r}, N={n})", fontsize=9)
        ranks = ["numeric rank / erank:", f"mixed dW(g): {d['mixed']['numeric_rank']} / {d['mixed']['effective_rank']:.1f}"]
        if d["shared"] is not None:
            ranks.append(f"shared BA: {d['shared']['numeric_rank']} / {d['shared']['effective_rank']:.1f}")
        if d["lora"] is not None:
            ranks.append(f"LoRA model: {d['lora']['numeric_rank']} / {d['lora']['effective_rank']:.1f}")
        ranks.append(f"[D_1..D_N]: {d['output_span']['numeric_rank']} / {d['output_span']['effective_rank']:.1f}")
        ax.text(0.98, 0.5, "\n".join(ranks), transform=ax.transAxes, ha="right", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": "w", "ec": "0.7", "alpha": 0.9})
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0].get_legend_handles_labels()
    labels = [re.sub(r" \(rank \d+\)$", "", lab) for lab in labels]
    fig.legend(handles[::-1], labels[::-1], loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    fig.suptitle(f"Singular values of the layer updates (routing g: {data['routing']}; grey band: "
                 f"< {data['rtol']:g} sigma_max, numerically zero)", fontsize=10)
    return _save(fig, path)
