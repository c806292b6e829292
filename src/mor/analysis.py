"""Analyses of a MoR adapter: router specialisation by task, parameter scaling, rank spectrum.

Pure functions compute the numbers (JSON-able dicts); separate ``plot_*`` functions draw them
(matplotlib's object API with the Agg canvas: no pyplot, no global backend switch). ``analyze``
runs everything and writes ``analysis.json`` next to the PNGs; ``format_report`` prints the
numbers behind every figure.

1. Router specialisation (the paper's router figure). For each task, the mean router weight
   per expert over the task's real tokens, per layer (``MoRModel.measure_routing``). Numbers:
   per task the entropy of the routing (bits, averaged over layers; log2 N is uniform), and the
   Jensen-Shannon divergence between tasks' routing distributions (bits, log base 2):
   pairwise, and the generalised JSD of all tasks with equal weights,
   ``JSD = H(mean_t g_t) - mean_t H(g_t)``, computed per layer and averaged over layers. It is 0
   when every task routes alike and at most log2(#tasks) (1 bit for two tasks).

2. Parameter scaling. Closed-form trainable parameters (``mor.params``) against the number of
   experts N, for MoR, MoE-LoRA of the same r, LoRA of rank r (flat) and LoRA of rank N*r
   (MoE-LoRA's expanded rank, without the router).

3. Rank spectrum. For a mixture layer with expert updates D_i = (alpha/r) up_i down_i and a
   fixed routing g: singular values of the mixed update dW(g) = sum_i g_i D_i, of each D_i, of
   the shared LoRA pair (alpha/r) B A (MoR only: "a LoRA of the same shared rank", the
   structural reference used when no trained LoRA model is given), of the experts side by
   side [D_1 ... D_N] (the output subspace the mixture can reach over all routings), of the
   experts stacked [D_1; ...; D_N] (the input subspace it reads), and, when a peft LoRA model
   is given, of that LoRA's (alpha/r) B A on the same module.

   Every singular value is computed in float64 from the low-rank factors (two thin QRs and
   an SVD of the small core), never from a dense float32 product: the structural zeros then
   sit near 1e-16 * sigma_max, and the numeric rank counts sigma > ``rtol`` * sigma_max with
   ``rtol = 1e-6`` (far above float64 round-off, far below any real direction of an adapter
   stored in bf16/fp32). The effective rank is Roy & Vetterli's (2007) exp(entropy of
   sigma / sum sigma).

   What the spectrum shows for MoR, and why: every D_i = (alpha/r) diag(Omega_B[i]) B
   diag(Omega_A[i]) A has its rows in the row space of the shared A, so for ANY fixed g the
   mixed update is M(g) A with M(g) of size d_out x r: rank(dW(g)) <= r, exactly like a LoRA of
   rank r (its column space differs from B's and moves with g). The N*r expanded rank of the
   paper lives in the output space only: [D_1 ... D_N] has rank up to N*r, so an
   input-dependent router can send different tokens to up to N*r output directions, but a
   merged (fixed-routing) MoR layer is a rank-r update. MoE-LoRA (independent A_i) reaches
   rank N*r even for a fixed g.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .layer import MoRAdapter
from .routing import RoutingProfile
from .params import layer_parameter_count, target_shapes
from .routing_stats import entropy_bits, js_divergence  # noqa: F401  (re-exported: analysis.entropy_bits)

DEFAULT_EXPERTS = (1, 2, 4, 8, 12, 16)
#: Numeric rank: singular values above RANK_RTOL * sigma_max count.
RANK_RTOL = 1e-6
#: File names written by ``analyze``.
FIGURES = {
    "routing_by_task": "routing_by_task.png",
    "routing_by_task_layers": "routing_by_task_layers.png",
    "parameters_vs_experts": "parameters_vs_experts.png",
    "rank_spectrum": "rank_spectrum.png",
}
#: Drawn from a training run's routing_stats.json (not by ``analyze``, which needs no run).
ROUTING_OVER_STEPS = "routing_over_steps.png"
NUMBERS_NAME = "analysis.json"
DPI = 120

PathLike = Union[str, Path]


# ==================================================================================================
# 1. Router specialisation
# ==================================================================================================

def _is_texts(data) -> bool:
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(t, str) for t in data)


def task_routing_profiles(model, task_batches: Mapping[str, Iterable], tokenizer=None,
                          **measure_kwargs) -> dict[str, RoutingProfile]:
    """Routing profile of every task: ``{task: model.measure_routing(data)}``.

    Each task's data is an iterable of batches (dicts with ``input_ids`` and
    ``attention_mask``) or a list of strings, which needs ``tokenizer``. Extra keyword
    arguments (``batch_size``, ``max_length``, ``progress``) go to ``measure_routing``.
    """
    if not task_batches:
        raise ValueError("task_batches is empty: give at least one task, e.g. {'mmlu': [...texts...]}")
    profiles = {}
    for task, data in task_batches.items():
        if isinstance(data, str):
            raise TypeError(f"task {task!r}: give a list of strings or an iterable of batches, not one string")
        texts = _is_texts(data)
        if texts and tokenizer is None:
            raise ValueError(f"task {task!r} is a list of strings: pass tokenizer= to tokenise it")
        try:
            profiles[task] = model.measure_routing(list(data), tokenizer=tokenizer, **measure_kwargs) if texts \
                else model.measure_routing(data, **measure_kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"task {task!r}: {err}") from err
    return profiles


def _layer_names(profiles: Mapping[str, RoutingProfile]) -> list[str]:
    tasks = list(profiles)
    names = list(profiles[tasks[0]].weights)
    for task in tasks[1:]:
        if set(profiles[task].weights) != set(names):
            raise ValueError(f"profiles of {tasks[0]!r} and {task!r} cover different layers; measure both on one adapter")
    return names


def _stack(profiles: Mapping[str, RoutingProfile]) -> tuple[list[str], list[str], torch.Tensor]:
    """(tasks, layers, weights (T, L, N) float64)."""
    if not profiles:
        raise ValueError("no routing profiles given")
    layers = _layer_names(profiles)
    tasks = list(profiles)
    weights = torch.stack([torch.stack([torch.as_tensor(profiles[t].weights[n]).double().reshape(-1) for n in layers])
                           for t in tasks])
    return tasks, layers, weights


def average_profiles(profiles: Mapping[str, RoutingProfile]) -> RoutingProfile:
    """Per-layer mean of several tasks' profiles (equal task weights)."""
    _, layers, weights = _stack(profiles)
    mean = weights.mean(0).float()
    return RoutingProfile({name: mean[i] for i, name in enumerate(layers)})


def routing_stats(profiles: Mapping[str, RoutingProfile]) -> dict:
    """Numbers behind the routing figures (JSON-able).

    Keys: tasks, layers, num_experts, uniform_entropy_bits (log2 N), weights ({task: L x N}),
    mean_weights ({task: N}, averaged over layers), per task entropy_bits / entropy_normalized
    (mean over layers of H(g_layer), and divided by log2 N), top_expert / top_weight (of the
    layer-averaged weights), jsd_mean (generalised JSD of all tasks, mean over layers, bits),
    jsd_per_layer, jsd_pairwise (T x T, mean over layers).
    """
    tasks, layers, w = _stack(profiles)
    t_count, l_count, n = w.shape
    jsd_per_layer = [js_divergence(w[:, layer]) for layer in range(l_count)]
    pairwise = [[sum(js_divergence(w[[a, b], layer]) for layer in range(l_count)) / l_count
                 for b in range(t_count)] for a in range(t_count)]
    ent = entropy_bits(w)  # (T, L)
    mean_w = w.mean(1)  # (T, N)
    uniform = math.log2(n) if n > 1 else 0.0
    per_task = {}
    for i, task in enumerate(tasks):
        per_task[task] = {
            "entropy_bits": float(ent[i].mean()),
            "entropy_normalized": float(ent[i].mean() / uniform) if uniform else 1.0,
            "top_expert": int(mean_w[i].argmax()),
            "top_weight": float(mean_w[i].max()),
        }
    return {
        "tasks": tasks,
        "layers": layers,
        "num_experts": n,
        "uniform_entropy_bits": uniform,
        "weights": {t: w[i].tolist() for i, t in enumerate(tasks)},
        "mean_weights": {t: mean_w[i].tolist() for i, t in enumerate(tasks)},
        "per_task": per_task,
        "jsd_mean": sum(jsd_per_layer) / l_count,
        "jsd_max_layer": layers[max(range(l_count), key=jsd_per_layer.__getitem__)],
        "jsd_per_layer": jsd_per_layer,
        "jsd_pairwise": pairwise,
    }


def _as_routing_stats(profiles_or_stats) -> dict:
    if isinstance(profiles_or_stats, Mapping) and "jsd_mean" in profiles_or_stats:
        return dict(profiles_or_stats)
    return routing_stats(profiles_or_stats)


def routing_table(profiles) -> str:
    """Plain-text table: per task the mean weight of each expert (over layers), entropy, top
    expert; then the pairwise JSD and the headline specialisation number. Takes the profiles
    or ``routing_stats``' dict."""
    s = _as_routing_stats(profiles)
    tasks, n = s["tasks"], s["num_experts"]
    width = max([len("task")] + [len(t) for t in tasks])
    head = f"{'task':<{width}} " + " ".join(f"{'e' + str(i):>6}" for i in range(n)) + "  H(bits)  H/log2N  top"
    lines = [f"Mean router weight per expert (averaged over {len(s['layers'])} layers; uniform = {1 / n:.4f})", head]
    for t in tasks:
        row = " ".join(f"{v:6.4f}" for v in s["mean_weights"][t])
        p = s["per_task"][t]
        lines.append(f"{t:<{width}} {row}  {p['entropy_bits']:7.4f}  {p['entropy_normalized']:7.4f}  e{p['top_expert']}")
    lines.append("")
    lines.append("Jensen-Shannon divergence between tasks (bits, mean over layers; 0 = identical routing, 1 = disjoint)")
    lines.append(f"{'':<{width}} " + " ".join(f"{t[:10]:>10}" for t in tasks))
    for t, row in zip(tasks, s["jsd_pairwise"]):
        lines.append(f"{t:<{width}} " + " ".join(f"{v:10.3g}" for v in row))
    lines.append(f"Specialisation: JSD of all {len(tasks)} tasks = {s['jsd_mean']:.4g} bits (mean over layers; "
                 f"max {log2_or_zero(len(tasks)):.3g}); most task-dependent layer: {s['jsd_max_layer']}")
    return "\n".join(lines)


def log2_or_zero(x: int) -> float:
    return math.log2(x) if x > 1 else 0.0


def short_layer_name(name: str) -> str:
    """'model.layers.12.mlp.gate_proj' -> '12.gate_proj'; names without a block index keep their
    last two parts."""
    parts = name.split(".")
    idx = next((p for p in parts if p.isdigit()), None)
    if idx is None:
        return ".".join(parts[-2:])
    return f"{idx}.{parts[-1]}"


# ==================================================================================================
# 2. Parameter scaling
# ==================================================================================================

def adapted_shapes(model: nn.Module, target_modules="ffn") -> list[tuple[int, int]]:
    """(d_in, d_out) of the modules ``target_modules`` selects, for a plain or a MoR-wrapped model
    (its mixture layers count as the linear layers they wrap). ``target_modules=None`` on a
    MoR model: its own adapted layers."""
    if target_modules is None and hasattr(model, "mor_adapters"):
        return [(m.in_features, m.out_features) for m in model.mor_adapters().values()]
    return target_shapes(model, "ffn" if target_modules is None else target_modules)


def parameter_scaling(model: nn.Module, r: int, experts: Sequence[int] = DEFAULT_EXPERTS, target_modules="ffn",
                      router: str = "softmax") -> dict:
    """Closed-form trainable parameters against the number of experts N.

    Returns {r, router, target_modules, num_layers, experts, mor, moelora, lora (rank r,
    constant), lora_rank_Nr (LoRA of rank N*r), mor_vs_moelora (ratio), this_adapter}: lists
    aligned with ``experts``. ``this_adapter`` (MoRModel only) is the adapter's own N, r,
    method and its actual tensor count, for a check of the closed form.
    """
    experts = [int(n) for n in experts]
    if not experts or min(experts) < 1 or int(r) < 1:
        raise ValueError("need r >= 1 and at least one number of experts >= 1")
    shapes = adapted_shapes(model, target_modules)

    def count(method: str, rank: int, n: int) -> int:
        return sum(layer_parameter_count(method, d_in, d_out, rank, n, router) for d_in, d_out in shapes)

    mor = [count("mor", r, n) for n in experts]
    moelora = [count("moelora", r, n) for n in experts]
    data = {
        "r": int(r), "router": router, "target_modules": target_modules, "num_layers": len(shapes),
        "experts": experts, "mor": mor, "moelora": moelora,
        "lora": [count("lora", r, 1)] * len(experts),
        "lora_rank_Nr": [count("lora", n * r, 1) for n in experts],
        "mor_vs_moelora": [a / b for a, b in zip(mor, moelora)],
        "this_adapter": None,
    }
    if hasattr(model, "mor_adapters"):
        cfg = model.mor_config
        data["this_adapter"] = {"method": cfg.method, "r": cfg.r, "num_experts": cfg.num_experts,
                                "router": cfg.router,
                                "parameters": sum(p.numel() for a in model.mor_adapters().values()
                                                  for p in a.parameters())}
    return data


def parameter_table(data: dict) -> str:
    """Plain-text table of ``parameter_scaling``'s numbers."""
    lines = [f"Trainable parameters vs number of experts (r={data['r']}, {data['num_layers']} adapted layers, "
             f"router={data['router']})",
             f"{'N':>3} {'MoR':>12} {'MoE-LoRA':>12} {'LoRA r':>12} {'LoRA N*r':>12} {'MoR/MoE-LoRA':>13}"]
    for i, n in enumerate(data["experts"]):
        lines.append(f"{n:>3} {data['mor'][i]:>12,} {data['moelora'][i]:>12,} {data['lora'][i]:>12,} "
                     f"{data['lora_rank_Nr'][i]:>12,} {100 * data['mor_vs_moelora'][i]:>12.1f}%")
    own = data.get("this_adapter")
    if own:
        lines.append(f"This adapter: {own['method']} r={own['r']} N={own['num_experts']} router={own['router']}: "
                     f"{own['parameters']:,} parameters")
    return "\n".join(lines)


# ==================================================================================================
# 3. Rank spectrum
# ==================================================================================================

def lowrank_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right.T`` (left (m, k), right (n, k)) in float64, from two thin
    QRs and the SVD of the small core: exact structure, no dense m x n product. Length min(m, n, k)."""
    left, right = left.detach().double().cpu(), right.detach().double().cpu()
    _, r_left = torch.linalg.qr(left)
    _, r_right = torch.linalg.qr(right)
    return torch.linalg.svdvals(r_left @ r_right.T)


def spectrum_stats(sv: torch.Tensor, r: int | None = None, rtol: float = RANK_RTOL) -> dict:
    """{singular_values, numeric_rank (sigma > rtol * sigma_max), effective_rank (Roy & Vetterli:
    exp of the entropy of sigma / sum sigma), energy_top_r (share of ||.||_F^2 in the top r)}."""
    sv = torch.sort(sv.double().clamp_min(0), descending=True).values
    top = float(sv[0]) if sv.numel() else 0.0
    out = {"singular_values": sv.tolist(), "numeric_rank": 0, "effective_rank": 0.0, "energy_top_r": None}
    if top > 0:
        out["numeric_rank"] = int((sv > rtol * top).sum())
        p = sv / sv.sum()
        p = p[p > 0]
        out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
        if r is not None:
            energy = sv.pow(2)
            out["energy_top_r"] = float(energy[:r].sum() / energy.sum())
    return out


def _lora_factors(lora_model: nn.Module, layer_name: str):
    """(scaling, B (d_out, r), A (r, d_in)) of the peft LoRA module whose name ends with
    ``layer_name``, or None."""
    for name, module in lora_model.named_modules():
        if not (name == layer_name or name.endswith("." + layer_name)):
            continue
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        active = getattr(module, "active_adapters", None) or list(lora_a.keys())
        adapter = active[0] if active[0] in lora_a else next(iter(lora_a.keys()))
        return float(module.scaling[adapter]), lora_b[adapter].weight, lora_a[adapter].weight
    return None


def _resolve_layers(layer_names: list[str], layers, max_layers: int) -> list[str]:
    if layers == "all":
        return layer_names
    if layers is None:
        count = min(max_layers, len(layer_names))
        if count <= 1:
            return layer_names[:count]
        idx = sorted({round(i * (len(layer_names) - 1) / (count - 1)) for i in range(count)})
        return [layer_names[i] for i in idx]
    chosen = []
    for item in ([layers] if isinstance(layers, (str, int)) else layers):
        if isinstance(item, int):
            chosen.append(layer_names[item])
        elif item in layer_names:
            chosen.append(item)
        else:
            raise KeyError(f"{item!r} is not a mixture layer of this model (e.g. {layer_names[:2]})")
    return chosen


@torch.no_grad()
def layer_spectrum(layer: nn.Module, g: torch.Tensor, lora: tuple | None = None, rtol: float = RANK_RTOL) -> dict:
    """Spectra of one mixture layer for routing g (N,); see the module docstring."""
    n, r, s = layer.num_experts, layer.r, layer.scaling
    if isinstance(layer, MoRAdapter):  # rebuild the factors in float64: an fp32 diag(Omega_A[i]) A rounds each
        a, b = layer.lora_A.detach().double().cpu(), layer.lora_B.detach().double().cpu()  # entry and leaves A's
        down = layer.expert_scales_in.detach().double().cpu().unsqueeze(-1) * a  # row space by ~1e-8
        up = layer.expert_scales_out.detach().double().cpu().unsqueeze(-1) * b
    else:
        down, up = (t.detach().double().cpu() for t in layer.expert_factors())  # (N, r, d_in), (N, d_out, r)
    g = torch.as_tensor(g).double().reshape(n, 1, 1)
    stack_up = lambda u: u.permute(1, 0, 2).reshape(layer.out_features, n * r)  # noqa: E731  (d_out, N*r)
    all_down = down.reshape(n * r, layer.in_features)  # (N*r, d_in)
    mixed = lowrank_singular_values(s * stack_up(g * up), all_down.T)
    experts = [lowrank_singular_values(s * up[i], down[i].T) for i in range(n)]
    # [D_1 ... D_N]: D_i = s up_i R_i^T Q_i^T with down_i^T = Q_i R_i; the Q_i^T blocks are orthonormal.
    r_down = [torch.linalg.qr(down[i].T)[1] for i in range(n)]
    out_span = torch.linalg.svdvals(torch.cat([s * up[i] @ r_down[i].T for i in range(n)], dim=1))
    # [D_1; ...; D_N]: D_i = s P_i (S_i down_i) with up_i = P_i S_i.
    s_up = [torch.linalg.qr(up[i])[1] for i in range(n)]
    in_span = torch.linalg.svdvals(torch.cat([s * s_up[i] @ down[i] for i in range(n)], dim=0))
    data = {
        "d_in": layer.in_features, "d_out": layer.out_features, "r": r, "num_experts": n, "scaling": s,
        "method": "mor" if isinstance(layer, MoRAdapter) else type(layer).__name__.replace("Adapter", "").lower(),
        "routing": g.reshape(-1).tolist(),
        "mixed": spectrum_stats(mixed, r, rtol),
        "experts": [spectrum_stats(e, r, rtol) for e in experts],
        "output_span": spectrum_stats(out_span, r, rtol),
        "input_span": spectrum_stats(in_span, r, rtol),
        "shared": None,
        "lora": None,
    }
    if isinstance(layer, MoRAdapter):
        data["shared"] = spectrum_stats(lowrank_singular_values(s * layer.lora_B, layer.lora_A.T), r, rtol)
    if lora is not None:
        scale, b, a = lora
        data["lora"] = spectrum_stats(lowrank_singular_values(scale * b.double(), a.double().T), r, rtol)
        data["lora"]["r"] = int(a.shape[0])
    return data


def rank_spectrum(model, profile=None, layers=None, lora_model: nn.Module | None = None, max_layers: int = 3,
                  rtol: float = RANK_RTOL) -> dict:
    """Singular-value spectra of a few mixture layers (see the module docstring).

    ``profile``: the routing g per layer: a RoutingProfile, one (N,) tensor, a mapping, a saved
    profile's path, or None / "uniform" (1/N). ``layers``: names, indices into
    ``model.mor_adapters()``, "all", or None (``max_layers`` evenly spaced: first, middle, last).
    ``lora_model``: optional peft LoRA model on the same base; its (alpha/r) B A on the same
    module is added as "lora" (a trained LoRA of rank r is the real comparison; without it the
    MoR layer's own shared (alpha/r) B A, "shared", is the structural one).
    """
    all_layers = model.mor_adapters()
    if not all_layers:
        raise ValueError("the model has no mixture layers")
    routing = model.resolve_routing("uniform" if profile is None else profile)
    names = _resolve_layers(list(all_layers), layers, max_layers)
    uniform = profile is None or (isinstance(profile, str) and profile == "uniform")
    result = {"rtol": rtol, "routing": "uniform" if uniform else "profile",
              "lora_model": lora_model is not None, "layers": {}}
    for name in names:
        lora = _lora_factors(lora_model, name) if lora_model is not None else None
        result["layers"][name] = layer_spectrum(all_layers[name], routing[name], lora, rtol)
    return result


def spectrum_table(data: dict) -> str:
    """Plain-text table of ``rank_spectrum``'s numbers."""
    lines = [f"Rank spectrum (routing: {data['routing']}; numeric rank = #sigma > {data['rtol']:g} sigma_max; "
             "erank = Roy-Vetterli effective rank; top-r = share of ||dW||_F^2 in the top r sigma)",
             f"{'layer':<16} {'shape':>10} {'r':>3} {'N':>3} {'matrix':<22} {'rank':>5} {'erank':>7} {'top-r':>7}"]
    for name, d in data["layers"].items():
        rows = [("mixed dW(g)", d["mixed"]), ("shared (a/r)BA", d["shared"]),
                ("expert D_i (mean)", None), ("out-span [D_1..D_N]", d["output_span"]),
                ("in-span [D_1;..;D_N]", d["input_span"]), ("LoRA model (a/r)BA", d["lora"])]
        shape = f"{d['d_out']}x{d['d_in']}"
        first = True
        for label, st in rows:
            if label.startswith("expert"):
                ex = d["experts"]
                rank = sum(e["numeric_rank"] for e in ex) / len(ex)
                erank = sum(e["effective_rank"] for e in ex) / len(ex)
                top = sum(e["energy_top_r"] or 0 for e in ex) / len(ex)
                vals = f"{rank:5.1f} {erank:7.2f} {top:7.3f}"
            elif st is None:
                continue
            else:
                top = st["energy_top_r"]
                vals = f"{st['numeric_rank']:5d} {st['effective_rank']:7.2f} {'' if top is None else f'{top:7.3f}':>7}"
            lead = f"{short_layer_name(name):<16} {shape:>10} {d['r']:>3} {d['num_experts']:>3}" if first else " " * 35
            lines.append(f"{lead} {label:<22} {vals}")
            first = False
    return "\n".join(lines)


# ==================================================================================================
# Drawing (matplotlib object API on the Agg canvas)
# ==================================================================================================

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_task_routing(profiles, path: PathLike, per_layer: bool = False) -> Path:
    """Draw the routing figure; takes the profiles or ``routing_stats``' dict.

    per_layer=False: grouped bars, mean router weight per expert (averaged over layers) for each
    task, dashed line at uniform 1/N; right, the pairwise JSD between tasks.
    per_layer=True: one heatmap per task, layers x experts, coloured by deviation from 1/N
    (shared scale), and a last column with the per-layer JSD across tasks.
    """
    s = _as_routing_stats(profiles)
    return (_plot_routing_layers if per_layer else _plot_routing_mean)(s, path)


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
    """Routing during training, from ``routing_stats.json`` (mor.routing_stats): per-token
    entropy (bits), Jensen-Shannon divergence between tasks (bits) and the busiest expert's share
    of tokens, against the optimiser step; one thin line per layer (colour = depth), the mean over
    layers thick."""
    if not records:
        raise ValueError("no routing records to draw (routing_stats.json is empty)")
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


def routing_over_steps_table(records: Sequence[Mapping]) -> str:
    """One line per measured step: mean entropy, entropy / log2 N, JSD between tasks, busiest share."""
    lines = ["step  H(bits)  H/log2N  JSD(bits)  top share"]
    for r in records:
        lines.append(f"{r['step']:>4}  {r['entropy_bits']:7.4f}  {r['entropy_normalized']:7.4f}  {r['jsd_bits']:9.3g}  "
                     f"{r['load_top_max']:9.3f}")
    return "\n".join(lines)


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


# ==================================================================================================
# Everything at once
# ==================================================================================================

def analyze(model, task_batches: Mapping[str, Iterable], out_dir: PathLike, tokenizer=None, *,
            experts: Sequence[int] = DEFAULT_EXPERTS, spectrum_layers=None, lora_model: nn.Module | None = None,
            max_layers: int = 3, **measure_kwargs) -> dict[str, Path]:
    """Measure, compute and draw everything; return {figure key: PNG path, "analysis": json path}.

    The rank spectrum uses the task-averaged routing profile; parameter scaling uses the
    adapter's own r, target layers and router type.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = task_routing_profiles(model, task_batches, tokenizer, **measure_kwargs)
    routing = routing_stats(profiles)
    cfg = model.mor_config
    scaling = parameter_scaling(model, cfg.r, experts, target_modules=None,
                                router="mean" if cfg.router == "mean" else "softmax")
    scaling["target_modules"] = cfg.target_modules
    spectrum = rank_spectrum(model, average_profiles(profiles), spectrum_layers, lora_model, max_layers)
    spectrum["routing"] = "mean profile of the tasks"
    paths = {
        "routing_by_task": plot_task_routing(routing, out_dir / FIGURES["routing_by_task"]),
        "routing_by_task_layers": plot_task_routing(routing, out_dir / FIGURES["routing_by_task_layers"], per_layer=True),
        "parameters_vs_experts": plot_parameter_scaling(scaling, out_dir / FIGURES["parameters_vs_experts"]),
        "rank_spectrum": plot_rank_spectrum(spectrum, out_dir / FIGURES["rank_spectrum"]),
    }
    numbers = {"routing": routing, "parameters": scaling, "rank_spectrum": spectrum,
               "figures": {k: p.name for k, p in paths.items()}}
    numbers_path = out_dir / NUMBERS_NAME
    numbers_path.write_text(json.dumps(numbers, indent=1) + "\n")
    paths["analysis"] = numbers_path
    return paths


def format_report(numbers: Union[dict, PathLike]) -> str:
    """The numbers behind every figure as text: ``analyze``'s numbers (the dict, or the path of
    ``analysis.json`` or of its folder)."""
    if not isinstance(numbers, Mapping):
        path = Path(numbers)
        numbers = json.loads((path / NUMBERS_NAME if path.is_dir() else path).read_text())
    parts = []
    if numbers.get("routing"):
        parts += [f"== Router specialisation ({FIGURES['routing_by_task']}, {FIGURES['routing_by_task_layers']}) ==",
                  routing_table(numbers["routing"])]
    if numbers.get("parameters"):
        parts += ["", f"== Parameter scaling ({FIGURES['parameters_vs_experts']}) ==", parameter_table(numbers["parameters"])]
    if numbers.get("rank_spectrum"):
        parts += ["", f"== Rank spectrum ({FIGURES['rank_spectrum']}) ==", spectrum_table(numbers["rank_spectrum"])]
    return "\n".join(parts)
