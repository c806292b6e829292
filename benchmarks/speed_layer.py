"""Speed of one adapted linear layer, forward + backward: MoR against LoRA (peft), MoE-LoRA and a
naive per-expert loop, at the FFN shapes of LLaMA-2-7B and SmolLM2, with analytic FLOPs.

    python -m benchmarks.speed --only layer        # this part alone (the targets table too)

How it is built (the methods, "full" vs "adapter" rows, interleaving, FLOPs): docs/benchmarks.md,
section "Speed: one layer". Numbers go to stdout and ``--json``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.common import f3, median, paired_ratio, progress, rotations, rx, sync, text_table
from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter

N_EXPERTS = 8
RANKS = (8, 32)
FULL_SHAPES = [("LLaMA-2-7B gate/up", 4096, 11008), ("LLaMA-2-7B down", 11008, 4096), ("SmolLM2 gate/up", 576, 1536)]
QUICK_SHAPES = [("tiny gate/up", 128, 344), ("tiny down", 344, 128)]
SEVEN_B = {"LLaMA-2-7B gate/up", "LLaMA-2-7B down"}


class NaiveMoRLoop(nn.Module):
    """MoR written expert by expert, as a person would: no D_i matrix, no expanded-rank GEMM.

    out = W x + (alpha/r) sum_i G_i(x) * Omega_B[i] * (B (Omega_A[i] * (A x)))
    """

    def __init__(self, layer: MixtureLayer):
        super().__init__()
        self.layer = layer

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer.mor["default"]
        gates = m.router(x)  # (..., N)
        h = x @ m.lora_A.T  # (..., r), once
        out = None
        for i in range(m.num_experts):
            y = ((h * m.expert_scales_in[i]) @ m.lora_B.T) * m.expert_scales_out[i]  # (..., d_out)
            term = gates[..., i:i + 1] * y
            out = term if out is None else out + term
        return m.scaling * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.base_layer(x) + self.adapter_delta(x)


def make_peft_lora(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = LoraLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.0)
    base.weight.requires_grad_(False)
    return layer


def lora_adapter_path(layer) -> callable:
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    drop, scale = layer.lora_dropout["default"], layer.scaling["default"]
    return lambda x: b(a(drop(x))) * scale


def layer_flops(method: str, tokens: int, d_in: int, d_out: int, r: int, n: int, part: str) -> float:
    base = 2 * tokens * d_in * d_out * 2
    adapter = {
        "base": 0,
        "lora": 6 * tokens * r * (d_in + d_out),
        "mor": 6 * tokens * (r * d_in + n * r * d_out + n * d_in),
        "naive": 6 * tokens * (r * d_in + n * r * d_out + n * d_in),
        "moelora": 6 * tokens * (n * r * d_in + n * r * d_out + n * d_in),
    }[method]
    return adapter + (base if part == "full" else 0)


@dataclass
class Case:
    shape: str
    d_in: int
    d_out: int
    part: str  # "full" | "adapter"
    method: str
    r: int
    fn: callable = field(repr=False)
    params: list = field(repr=False)
    times: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.part}/{self.method}" + (f"/r{self.r}" if self.method != "base" else "")


def build_cases(shape, d_in, d_out, ranks, n, device, dtype, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in ** 0.5  # shared frozen W

    def base_linear():
        lin = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        return lin

    def nonzero_b(module):  # B = 0 at init; make the update non-trivial (timings do not depend on it)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        return module

    cases = []
    base = base_linear()
    cases.append(Case(shape, d_in, d_out, "full", "base", 0, base, []))
    for r in ranks:
        lora = nonzero_b(make_peft_lora(base_linear(), r, 2 * r))
        adapter = dict(r=r, num_experts=n, alpha=2 * r, dropout=0.0, device=device, dtype=dtype)
        mor = nonzero_b(MixtureLayer(base_linear(), "default", MoRAdapter(d_in, d_out, **adapter)))
        moe = nonzero_b(MixtureLayer(base_linear(), "default", MoELoRAAdapter(d_in, d_out, **adapter)))
        naive = NaiveMoRLoop(mor)
        trainable = {m: [p for p in m.parameters() if p.requires_grad] for m in (lora, mor, moe)}
        cases += [
            Case(shape, d_in, d_out, "full", "lora", r, lora, trainable[lora]),
            Case(shape, d_in, d_out, "full", "mor", r, mor, trainable[mor]),
            Case(shape, d_in, d_out, "full", "moelora", r, moe, trainable[moe]),
            Case(shape, d_in, d_out, "adapter", "lora", r, lora_adapter_path(lora), trainable[lora]),
            Case(shape, d_in, d_out, "adapter", "mor", r, mor.mor["default"], trainable[mor]),
            Case(shape, d_in, d_out, "adapter", "moelora", r, moe.mor["default"], trainable[moe]),
            Case(shape, d_in, d_out, "adapter", "naive", r, naive.adapter_delta, trainable[mor]),
        ]
    return cases


def check_naive(cases, d_in, device, dtype) -> float:
    """Max |naive - vectorised| of the adapter output on a few tokens (sanity check)."""
    worst = 0.0
    x = torch.randn(16, d_in, device=device, dtype=dtype)
    mors = {c.r: c for c in cases if c.part == "adapter" and c.method == "mor"}
    with torch.no_grad():
        for c in cases:
            if c.method == "naive":
                worst = max(worst, (c.fn(x) - mors[c.r].fn(x)).abs().max().item())
    return worst


def time_step(case: Case, x: torch.Tensor, grad_out: torch.Tensor, device) -> float:
    for p in case.params:
        p.grad = None
    x.grad = None
    sync(device)
    start = time.perf_counter()
    y = case.fn(x)
    y.backward(grad_out)
    sync(device)
    return time.perf_counter() - start


def bench_layers(args, device, dtype, log) -> dict:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    tokens = args.tokens
    results, ratios, checks = [], {}, {}
    for shape, d_in, d_out in shapes:
        cases = build_cases(shape, d_in, d_out, args.ranks, N_EXPERTS, device, dtype)
        checks[shape] = check_naive(cases, d_in, device, dtype)
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(tokens, d_out, device=device, dtype=dtype)
        small = 2 * tokens * d_in * d_out < 20e9  # cheap shapes get more rounds
        rounds = args.repeats * (5 if small and not args.quick else 1)
        # warm-up on a few tokens (code paths, allocator), then the timed rounds at full size
        xw = torch.randn(min(tokens, 64), d_in, device=device, dtype=dtype, requires_grad=True)
        gw = torch.randn(min(tokens, 64), d_out, device=device, dtype=dtype)
        for c in cases:
            time_step(c, xw, gw, device)
        with progress(rounds * len(cases), f"{shape} ({tokens} tokens)", args.progress) as bar:
            for order in rotations(cases, rounds):
                for c in order:
                    c.times.append(time_step(c, x, grad_out, device))
                    if bar is not None:
                        bar.update(1)
        by_key = {c.key: c for c in cases}

        def paired(a: str, b: str) -> float:
            return paired_ratio(by_key[a].times, by_key[b].times)

        for c in cases:
            row = {
                "shape": shape, "d_in": d_in, "d_out": d_out, "tokens": tokens, "part": c.part,
                "method": c.method, "r": c.r, "N": N_EXPERTS if c.method in ("mor", "moelora", "naive") else None,
                "gflop": layer_flops(c.method, tokens, d_in, d_out, c.r, N_EXPERTS, c.part) / 1e9,
                "min_s": min(c.times), "median_s": median(c.times), "rounds": len(c.times), "times_s": c.times,
            }
            if c.method != "base":
                row["vs_lora"] = paired(c.key, f"{c.part}/lora/r{c.r}")
                row["vs_moelora"] = paired(c.key, f"{c.part}/moelora/r{c.r}")
                row["vs_mor"] = paired(c.key, f"{c.part}/mor/r{c.r}")
                if c.part == "full":
                    row["vs_base"] = paired(c.key, "full/base")
            row["gflops_per_s"] = row["gflop"] / row["median_s"]
            results.append(row)
        for r in args.ranks:
            ratios[f"{shape}/r{r}"] = {
                "mor_vs_lora_full": paired(f"full/mor/r{r}", f"full/lora/r{r}"),
                "mor_vs_moelora_full": paired(f"full/mor/r{r}", f"full/moelora/r{r}"),
                "mor_vs_lora_adapter": paired(f"adapter/mor/r{r}", f"adapter/lora/r{r}"),
                "mor_vs_moelora_adapter": paired(f"adapter/mor/r{r}", f"adapter/moelora/r{r}"),
                "naive_vs_mor_adapter": paired(f"adapter/naive/r{r}", f"adapter/mor/r{r}"),
            }
        del cases, x, grad_out
        gc.collect()
        log(f"  done: {shape}")
    return {"tokens": tokens, "num_experts": N_EXPERTS, "ranks": list(args.ranks), "results": results,
            "ratios": ratios, "naive_max_abs_diff": checks}


def layer_table(layer: dict) -> str:
    rows = []
    for r in layer["results"]:
        rows.append([
            r["shape"], f"{r['d_in']}->{r['d_out']}", r["part"], r["method"], r["r"] or "-",
            f"{r['gflop']:.2f}", f3(r["min_s"]), f3(r["median_s"]), f"{r['gflops_per_s']:.1f}",
            rx(r.get("vs_lora")), rx(r.get("vs_moelora")), rx(r.get("vs_base")),
        ])
    head = ["shape", "d_in->d_out", "part", "method", "r", "GFLOP", "min s", "median s", "GFLOP/s",
            "/LoRA", "/MoE-LoRA", "/base"]
    return text_table(head, rows, f"Layer forward+backward, {layer['tokens']} tokens, N={layer['num_experts']} "
                             "(ratios: median of per-round ratios, same rank r)")


def profile_layers(args, device, dtype) -> str:
    from torch.profiler import ProfilerActivity, profile

    shape, d_in, d_out = (QUICK_SHAPES if args.quick else FULL_SHAPES)[0]
    r = args.ranks[0]
    cases = [c for c in build_cases(shape, d_in, d_out, [r], N_EXPERTS, device, dtype)
             if c.part == "full" and c.method in ("lora", "mor")]
    x = torch.randn(args.tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, d_out, device=device, dtype=dtype)
    parts = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for c in cases:
        time_step(c, x, g, device)
        with profile(activities=activities) as prof:
            time_step(c, x, g, device)
        parts.append(f"torch.profiler: {shape} {c.key}\n"
                     + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return "\n\n".join(parts)

