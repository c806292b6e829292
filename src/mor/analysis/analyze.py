"""Analyses of a MoR adapter, as numbers: routing by task, parameter scaling, rank spectrum.

Pure functions return JSON-able dicts: ``routing_stats`` (per-task entropy, JSD between tasks,
bits), ``parameter_scaling`` (closed-form trainable parameters vs N experts), ``rank_spectrum``
(float64 singular values of each layer's mixed update, experts and shared B A; numeric rank =
#sigma > RANK_RTOL * sigma_max). ``*_table`` functions print them; ``analyze`` measures, computes,
draws (``mor.analysis.plots``) and writes ``analysis.json``; ``format_report`` prints that file.
What each number means and why MoR's mixed update has rank <= r: docs/method.md, sections 4 and 9.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from ..layer import MoRAdapter
from ..params import count_trainable_parameters, layer_parameter_count, target_shapes
from ..errors import AdapterError
from .plots import FIGURES, draw_figures, short_layer_name
from ..runtime.report import text_table
from ..routing import RoutingProfile
from .routing_stats import entropy_bits, js_divergence  # noqa: F401  (re-exported: analysis.entropy_bits)

DEFAULT_EXPERTS = (1, 2, 4, 8, 12, 16)
#: Numeric rank: singular values above RANK_RTOL * sigma_max count.
RANK_RTOL = 1e-6
#: The numbers file ``analyze`` writes next to the figures (plots.FIGURES).
NUMBERS_NAME = "analysis.json"

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
            raise AdapterError(f"profiles of {tasks[0]!r} and {task!r} cover different layers; measure both on one adapter")
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
    weights = text_table(
        ["task", *(f"e{i}" for i in range(n)), "H(bits)", "H/log2N", "top"],
        [[t, *(f"{v:.4f}" for v in s["mean_weights"][t]), f"{s['per_task'][t]['entropy_bits']:.4f}",
          f"{s['per_task'][t]['entropy_normalized']:.4f}", f"e{s['per_task'][t]['top_expert']}"] for t in tasks],
        f"Mean router weight per expert (averaged over {len(s['layers'])} layers; uniform = {1 / n:.4f})")
    jsd = text_table(
        ["", *(t[:10] for t in tasks)], [[t, *(f"{v:.3g}" for v in row)] for t, row in zip(tasks, s["jsd_pairwise"])],
        "Jensen-Shannon divergence between tasks (bits, mean over layers; 0 = identical routing, 1 = disjoint)")
    return (f"{weights}\n\n{jsd}\nSpecialisation: JSD of all {len(tasks)} tasks = {s['jsd_mean']:.4g} bits (mean over "
            f"layers; max {log2_or_zero(len(tasks)):.3g}); most task-dependent layer: {s['jsd_max_layer']}")


def log2_or_zero(x: int) -> float:
    return math.log2(x) if x > 1 else 0.0


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
                                "parameters": sum(count_trainable_parameters(a, include_frozen=True)
                                                  for a in model.mor_adapters().values())}
    return data


def parameter_table(data: dict) -> str:
    """Plain-text table of ``parameter_scaling``'s numbers."""
    rows = [[n, f"{data['mor'][i]:,}", f"{data['moelora'][i]:,}", f"{data['lora'][i]:,}", f"{data['lora_rank_Nr'][i]:,}",
             f"{100 * data['mor_vs_moelora'][i]:.1f}%"] for i, n in enumerate(data["experts"])]
    table = text_table(["N", "MoR", "MoE-LoRA", "LoRA r", "LoRA N*r", "MoR/MoE-LoRA"], rows,
                       f"Trainable parameters vs number of experts (r={data['r']}, {data['num_layers']} adapted layers, "
                       f"router={data['router']})")
    own = data.get("this_adapter")
    if own:
        table += (f"\nThis adapter: {own['method']} r={own['r']} N={own['num_experts']} router={own['router']}: "
                  f"{own['parameters']:,} parameters")
    return table


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
    """(A (r, d_in), B (d_out, r), scale) of the peft LoRA module whose name ends with
    ``layer_name``, or None."""
    for name, module in lora_model.named_modules():
        if not (name == layer_name or name.endswith("." + layer_name)):
            continue
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        active = getattr(module, "active_adapters", None) or list(lora_a.keys())
        adapter = active[0] if active[0] in lora_a else next(iter(lora_a.keys()))
        return lora_a[adapter].weight, lora_b[adapter].weight, float(module.scaling[adapter])
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
    """Spectra of one mixture layer for routing g (N,): mixed update, each expert, experts side by
    side and stacked, shared (alpha/r) B A (MoR), a LoRA model's (alpha/r) B A (docs/method.md, section 9)."""
    n, r, s = layer.num_experts, layer.r, layer.scaling
    down, up, _ = layer.expert_factors(torch.float64)
    down, up = down.detach().cpu(), up.detach().cpu()  # (N, r, d_in), (N, d_out, r)
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
        a, b, scale = lora
        data["lora"] = spectrum_stats(lowrank_singular_values(scale * b.double(), a.double().T), r, rtol)
        data["lora"]["r"] = int(a.shape[0])
    return data


def rank_spectrum(model, profile=None, layers=None, lora_model: nn.Module | None = None, max_layers: int = 3,
                  rtol: float = RANK_RTOL) -> dict:
    """Singular-value spectra of a few mixture layers (``layer_spectrum`` of each).

    ``profile``: the routing g per layer: a RoutingProfile, one (N,) tensor, a mapping, a saved
    profile's path, or None / "uniform" (1/N). ``layers``: names, indices into
    ``model.mor_adapters()``, "all", or None (``max_layers`` evenly spaced: first, middle, last).
    ``lora_model``: optional peft LoRA model on the same base; its (alpha/r) B A on the same
    module is added as "lora" (a trained LoRA of rank r is the real comparison; without it the
    MoR layer's own shared (alpha/r) B A, "shared", is the structural one).
    """
    all_layers = model.mor_adapters()
    if not all_layers:
        raise AdapterError("the model has no mixture layers")
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
    rows = []
    for name, d in data["layers"].items():
        lead = [short_layer_name(name), f"{d['d_out']}x{d['d_in']}", d["r"], d["num_experts"]]
        ex = d["experts"]
        matrices = [("mixed dW(g)", d["mixed"]), ("shared (a/r)BA", d["shared"]),
                    ("expert D_i (mean)", {"numeric_rank": sum(e["numeric_rank"] for e in ex) / len(ex),
                                           "effective_rank": sum(e["effective_rank"] for e in ex) / len(ex),
                                           "energy_top_r": sum(e["energy_top_r"] or 0 for e in ex) / len(ex)}),
                    ("out-span [D_1..D_N]", d["output_span"]), ("in-span [D_1;..;D_N]", d["input_span"]),
                    ("LoRA model (a/r)BA", d["lora"])]
        for label, st in matrices:
            if st is None:
                continue
            rank, top = st["numeric_rank"], st["energy_top_r"]
            rows.append([*lead, label, f"{rank:.1f}" if isinstance(rank, float) else rank, f"{st['effective_rank']:.2f}",
                         "" if top is None else f"{top:.3f}"])
            lead = ["", "", "", ""]  # the layer's columns on its first row only
    return text_table(["layer", "shape", "r", "N", "matrix", "rank", "erank", "top-r"], rows,
                      f"Rank spectrum (routing: {data['routing']}; numeric rank = #sigma > {data['rtol']:g} sigma_max; "
                      "erank = Roy-Vetterli effective rank; top-r = share of ||dW||_F^2 in the top r sigma)")


def routing_over_steps_table(records: Sequence[Mapping]) -> str:
    """One line per measured step: mean entropy, entropy / log2 N, JSD between tasks, busiest share."""
    return text_table(["step", "H(bits)", "H/log2N", "JSD(bits)", "top share"],
                      [[r["step"], f"{r['entropy_bits']:.4f}", f"{r['entropy_normalized']:.4f}", f"{r['jsd_bits']:.3g}",
                        f"{r['load_top_max']:.3f}"] for r in records])


def routing_over_steps(stats: PathLike, folder: PathLike | None = None) -> str:
    """The routing statistics a training run logged over its steps (its routing_stats.json), as a
    headed table; with ``folder``, also drawn there as routing_over_steps.png."""
    from .plots import ROUTING_OVER_STEPS, plot_routing_over_steps
    from .routing_stats import load_stats

    records = load_stats(stats)
    if folder is not None:
        plot_routing_over_steps(records, Path(folder) / ROUTING_OVER_STEPS)
    return f"== Routing over training ({ROUTING_OVER_STEPS}, from {stats}) ==\n" + routing_over_steps_table(records)


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
    numbers = {"routing": routing, "parameters": scaling, "rank_spectrum": spectrum}
    paths = draw_figures(numbers, out_dir)
    numbers["figures"] = {k: p.name for k, p in paths.items()}
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
