"""Speed and memory of MoR against LoRA (peft), MoE-LoRA and a naive per-expert loop.

    python -m benchmarks.speed                      # full run (~10 min on 2 CPU cores)
    python -m benchmarks.speed --quick --skip-e2e   # a few seconds (the CI smoke test)
    python -m benchmarks.speed --device cuda --dtype bfloat16 --json speed.json

Part 1 -- one adapted linear layer, forward + backward (input requires grad, frozen base weight
included), at the FFN shapes of LLaMA-2-7B (4096->11008, 11008->4096) and SmolLM2 (576->1536):

    base      the frozen nn.Linear alone
    lora      peft's ``lora.Linear`` of rank r (what users compare to)
    mor       ``MoRAdapter`` in its tuner layer with N experts and shared rank r (the expanded-rank single GEMM)
    moelora   ``MoELoRALinear``, N independent rank-r experts
    naive     MoR computed expert by expert (A x once, then for each expert a rank-r product,
              a d_out-wide rescale and a gated accumulate -- the loop a person writes)

"full" rows time the whole layer; "adapter" rows time the adapter path alone (no base GEMM),
which is where the methods differ (at 7B shapes the base GEMM is ~97% of the layer). Methods are
interleaved within every round (the order rotates per round) and every ratio is the median of
per-round ratios, so a slow moment of a shared machine hits all methods alike.

Analytic FLOPs (multiply-add = 2 FLOPs), T tokens, fwd + bwd:
    base      2 T d_in d_out x 2   (fwd + grad of the input; W is frozen, so no grad-W GEMM --
              a trainable W would be x 3)
    adapter   every adapter GEMM x 3 (fwd, grad-input, grad-weight):
              lora    6 T r (d_in + d_out)
              mor     6 T (r d_in + N r d_out + N d_in)         (MOR_METHOD.md section 3, + router)
              moelora 6 T (N r d_in + N r d_out + N d_in)
              naive   same GEMMs as mor, plus ~6 N T d_out elementwise (not counted)

Part 2 -- end to end on SmolLM2 (``--model``; the embedded SmolLM2-135M-Instruct by default, a
tiny config-built LLaMA in --quick), adapters on the FFN gate/up/down, dropout 0, alpha = 2r:
    mor r=8 N=8; lora r=16 (parameter-matched to mor: 33,792 vs 33,856 per SmolLM2 layer);
    moelora r=2 N=8 (same expanded rank 16 as the LoRA, 38,400 params per layer).
  * training tokens/s: interleaved AdamW steps, all three models in one process.
  * peak training memory: each method in its own subprocess; after loading and wrapping the
    model, the kernel's RSS high-water mark is reset (/proc/self/clear_refs) and the increase
    of VmHWM over the pre-training RSS across two AdamW steps is reported (activations +
    gradients + optimiser state + allocator slack; on CUDA: max_memory_allocated increase).
    Next to it, the bytes autograd saves for backward in one step (saved_tensors_hooks,
    de-duplicated by storage, parameters excluded) -- deterministic, activations only.
  * inference latency (batch 1, greedy, KV cache, logits of the last position only): prefill of
    a prompt and mean per-token decode, for the base model, dynamic MoR (the router runs) and
    MoR merged with a routing profile measured on a few prompts (``merge_and_unload``).

Targets (printed with PASS/MISS): MoR layer at 7B shapes <= 1.15x LoRA; MoR adapter path
<= 0.8x MoE-LoRA's ("well under"); vectorised adapter >= 3x faster than the naive loop; merged
MoR within 2% of the base model (prefill and decode); peak training memory <= 1.15x LoRA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter
from mor.system import cpu_model

N_EXPERTS = 8
RANKS = (8, 32)
FULL_SHAPES = [("LLaMA-2-7B gate/up", 4096, 11008), ("LLaMA-2-7B down", 11008, 4096), ("SmolLM2 gate/up", 576, 1536)]
QUICK_SHAPES = [("tiny gate/up", 128, 344), ("tiny down", 344, 128)]
SEVEN_B = {"LLaMA-2-7B gate/up", "LLaMA-2-7B down"}
FFN = ["gate_proj", "up_proj", "down_proj"]
E2E_METHODS = ("lora", "mor", "moelora")
# method -> (r, N) of the end-to-end comparison
E2E_SETTINGS = {"lora": (16, 1), "mor": (8, 8), "moelora": (2, 8)}

TARGETS = {
    "layer_vs_lora": 1.15,  # MoR layer time / LoRA layer time at 7B shapes, <=
    "adapter_vs_moelora": 0.80,  # MoR adapter time / MoE-LoRA adapter time, <=
    "naive_speedup": 3.0,  # naive adapter time / MoR adapter time, >=
    "merged_vs_base": 1.02,  # merged MoR latency / base latency, <=
    "memory_vs_lora": 1.15,  # MoR peak training memory / LoRA's, <=
}


# -- small utilities ---------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="run", disable=not enabled, leave=False, file=sys.stderr)


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    lines = ([title] if title else []) + [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    s = s.replace(",", "").replace("x", "").replace("%", "").strip()
    try:
        float(s)
        return True
    except ValueError:
        return False


def f3(x: float) -> str:
    return "-" if x is None or x != x else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def rx(x: float) -> str:
    return "-" if x is None or x != x else f"{x:.3f}x"


# -- part 1: one layer --------------------------------------------------------------------------

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
            for k in range(rounds):
                order = cases[k % len(cases):] + cases[:k % len(cases)]
                for c in order:
                    c.times.append(time_step(c, x, grad_out, device))
                    if bar is not None:
                        bar.update(1)
        by_key = {c.key: c for c in cases}

        def paired(a: str, b: str) -> float:
            return median([ta / tb for ta, tb in zip(by_key[a].times, by_key[b].times)])

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
    return table(head, rows, f"Layer forward+backward, {layer['tokens']} tokens, N={layer['num_experts']} "
                             "(ratios: median of per-round ratios, same rank r)")


# -- part 2: end to end --------------------------------------------------------------------------

def build_model(spec: str, dtype, device, seed: int = 0):
    """``tiny`` (a config-built LLaMA, no download) or anything ``mor.loading.load_model`` takes."""
    if spec == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        from mor.loading import load_model

        model = load_model(None if spec == "smollm2" else spec, dtype=dtype).to(device)
    return model.eval()


def attach(model, method: str, seed: int = 0):
    """Wrap ``model`` with the end-to-end adapter of ``method`` (see E2E_SETTINGS)."""
    r, n = E2E_SETTINGS[method]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=FFN))
    from mor import MoRConfig, get_mor_model

    return get_mor_model(model, MoRConfig(method=method, r=r, num_experts=n, alpha=2 * r, dropout=0.0,
                                          target_modules=FFN, init_seed=seed))


def make_batch(model, batch: int, seq: int, device, seed: int = 0):
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def bench_training(args, device, dtype, log) -> dict:
    base = build_model(args.model, dtype, device)
    models = {}
    for method in E2E_METHODS:
        wrapped = attach(copy.deepcopy(base), method)
        wrapped.train()
        models[method] = (wrapped, make_optimizer(wrapped))
    del base
    batch = make_batch(models["lora"][0], args.e2e_batch, args.e2e_seq, device)
    for model, opt in models.values():  # warm-up (allocates grads and optimiser state)
        train_step(model, opt, batch)
    times = {m: [] for m in models}
    with progress(args.e2e_steps * len(models), "training steps", args.progress) as bar:
        for k in range(args.e2e_steps):
            for method in E2E_METHODS[k % 3:] + E2E_METHODS[:k % 3]:
                model, opt = models[method]
                sync(device)
                start = time.perf_counter()
                train_step(model, opt, batch)
                sync(device)
                times[method].append(time.perf_counter() - start)
                if bar is not None:
                    bar.update(1)
    tokens = args.e2e_batch * args.e2e_seq
    out = {"tokens_per_step": tokens, "steps": args.e2e_steps, "methods": {}}
    for method, ts in times.items():
        model = models[method][0]
        out["methods"][method] = {
            "r": E2E_SETTINGS[method][0], "N": E2E_SETTINGS[method][1],
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_min_s": min(ts), "step_median_s": median(ts), "tokens_per_s": tokens / median(ts), "times_s": ts,
            "time_vs_lora": median([a / b for a, b in zip(ts, times["lora"])]),
        }
    del models
    gc.collect()
    log("  done: training throughput")
    return out


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages, parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def memory_worker(args) -> dict:
    """Run in a fresh process: peak memory of two training steps of one method."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = attach(build_model(args.model, dtype, device), args.worker_memory)
    model.train()
    opt = make_optimizer(model)
    batch = make_batch(model, args.e2e_batch, args.e2e_seq, device)
    gc.collect()
    result = {"method": args.worker_memory}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(2):
            train_step(model, opt, batch)
        torch.cuda.synchronize(device)
        result.update(measure="cuda max_memory_allocated increase",
                      peak_bytes=torch.cuda.max_memory_allocated(device) - before)
    else:
        before = _proc_status("VmRSS")
        reset = _reset_hwm()
        for _ in range(2):
            train_step(model, opt, batch)
        if reset and before is not None:
            result.update(measure="VmHWM - VmRSS before (HWM reset via clear_refs)",
                          peak_bytes=_proc_status("VmHWM") - before)
        else:  # no /proc: the process-lifetime high-water mark (includes loading; less precise)
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            result.update(measure="ru_maxrss - rss before (includes loading)", peak_bytes=peak - (before or 0))
    result["saved_activation_bytes"] = saved_activation_bytes(model, batch)
    return result


def bench_memory(args, log) -> dict:
    out = {}
    with progress(len(E2E_METHODS), "memory (subprocess per method)", args.progress) as bar:
        for method in E2E_METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker-memory", method, "--model", args.model,
                   "--device", args.device, "--dtype", args.dtype, "--e2e-batch", str(args.e2e_batch),
                   "--e2e-seq", str(args.e2e_seq), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker for {method} failed:\n{proc.stderr[-3000:]}")
            out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            if bar is not None:
                bar.update(1)
    for method in out:
        out[method]["peak_vs_lora"] = out[method]["peak_bytes"] / out["lora"]["peak_bytes"]
        out[method]["saved_vs_lora"] = out[method]["saved_activation_bytes"] / out["lora"]["saved_activation_bytes"]
    log("  done: memory")
    return out


def _routing_batches(args, model, device):
    """A few prompts for the routing profile: real text when a tokenizer loads, else random ids."""
    prompts = ["The capital of France is", "Question: why is the sky blue? Answer:",
               "def fibonacci(n):", "Translate to German: good morning"]
    if args.model != "tiny":
        try:
            from mor.loading import load_tokenizer

            tok = load_tokenizer(None if args.model == "smollm2" else args.model)
            return [{k: v.to(device) for k, v in tok(p, return_tensors="pt").items()} for p in prompts]
        except Exception:  # noqa: BLE001 - fall back to random ids
            pass
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, model.config.vocab_size, (1, 12), generator=g).to(device)}
            for _ in prompts]


def _cache_of(out):
    """The KV cache of a model output (``cache`` in transformers >= 5.x, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generation_times(model, prompt, steps: int, device) -> tuple[float, float]:
    kw = _cache_kwarg(model)
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
        cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    sync(device)
    return prefill, (time.perf_counter() - start) / steps


def bench_inference(args, device, dtype, log) -> dict:
    base = build_model(args.model, dtype, device)
    dynamic = attach(copy.deepcopy(base), "mor")
    with torch.no_grad():  # B = 0 at init; give the adapter a non-trivial update
        for name, p in dynamic.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    dynamic.eval()
    merged_src = copy.deepcopy(dynamic)
    profile = merged_src.measure_routing(_routing_batches(args, base, device))
    merged = merged_src.merge_and_unload(profile).eval()
    # base_copy is the base model again: its ratio to base is the noise floor of these timings
    # (the merged model is structurally the base model too, plain nn.Linear layers)
    models = {"base": base, "base_copy": copy.deepcopy(base), "mor_dynamic": dynamic.get_base_model(), "mor_merged": merged}
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, base.config.vocab_size, (1, args.prompt_len), generator=g).to(device)
    for m in models.values():  # warm-up
        generation_times(m, prompt[:, :8], 2, device)
    times = {k: {"prefill": [], "decode": []} for k in models}
    names = list(models)
    with progress(args.infer_repeats * len(models), "inference", args.progress) as bar:
        for k in range(args.infer_repeats):
            for name in names[k % len(names):] + names[:k % len(names)]:
                p, d = generation_times(models[name], prompt, args.gen_tokens, device)
                times[name]["prefill"].append(p)
                times[name]["decode"].append(d)
                if bar is not None:
                    bar.update(1)
    out = {"prompt_tokens": args.prompt_len, "generated_tokens": args.gen_tokens, "repeats": args.infer_repeats,
           "routing_profile_mean": [round(v, 4) for v in profile.mean().tolist()], "models": {}}
    for name, t in times.items():
        out["models"][name] = {
            "prefill_min_s": min(t["prefill"]), "prefill_median_s": median(t["prefill"]),
            "decode_min_s_per_token": min(t["decode"]), "decode_median_s_per_token": median(t["decode"]),
            "prefill_vs_base": median([a / b for a, b in zip(t["prefill"], times["base"]["prefill"])]),
            "decode_vs_base": median([a / b for a, b in zip(t["decode"], times["base"]["decode"])]),
            "times_s": t,
        }
    log("  done: inference")
    return out


def e2e_tables(e2e: dict) -> str:
    parts = []
    tr = e2e["train"]
    mem = e2e["memory"]
    rows = []
    for m, v in tr["methods"].items():
        mm = mem[m]
        rows.append([m, v["r"], v["N"], f"{v['trainable_params']:,}", f3(v["step_min_s"]), f3(v["step_median_s"]),
                     f"{v['tokens_per_s']:.1f}", rx(v["time_vs_lora"]), f"{mm['peak_bytes'] / 2**20:.1f}",
                     rx(mm["peak_vs_lora"]), f"{mm['saved_activation_bytes'] / 2**20:.1f}", rx(mm["saved_vs_lora"])])
    parts.append(table(
        ["method", "r", "N", "trainable", "step min s", "step med s", "tok/s", "time/LoRA", "peak MiB", "/LoRA",
         "saved-act MiB", "/LoRA"], rows,
        f"End-to-end training on {e2e['model']} (FFN gate/up/down, {tr['tokens_per_step']} tokens/step, AdamW, "
        f"{tr['steps']} timed steps; peak = {mem['lora']['measure']}, 2 steps, subprocess per method)"))
    inf = e2e["inference"]
    rows = [[n, f3(v["prefill_min_s"] * 1e3), f3(v["prefill_median_s"] * 1e3), rx(v["prefill_vs_base"]),
             f3(v["decode_min_s_per_token"] * 1e3), f3(v["decode_median_s_per_token"] * 1e3), rx(v["decode_vs_base"])]
            for n, v in inf["models"].items()]
    parts.append(table(["model", "prefill min ms", "prefill med ms", "/base", "decode min ms/tok",
                        "decode med ms/tok", "/base"], rows,
                       f"Inference, batch 1: prefill {inf['prompt_tokens']} tokens, then {inf['generated_tokens']} "
                       f"greedy tokens with KV cache ({inf['repeats']} interleaved repeats)"))
    return "\n\n".join(parts)


# -- targets ---------------------------------------------------------------------------------------

def evaluate_targets(layer: dict | None, e2e: dict | None, quick: bool) -> list[dict]:
    out = []

    def add(name, value, op, threshold, note=""):
        ok = value <= threshold if op == "<=" else value >= threshold
        out.append({"target": name, "value": value, "op": op, "threshold": threshold,
                    "status": "PASS" if ok else "MISS", "note": note})

    if layer:
        for key, ratio in layer["ratios"].items():
            shape = key.rsplit("/", 1)[0]
            if shape in SEVEN_B or quick:
                add(f"MoR layer / LoRA layer, {key}", ratio["mor_vs_lora_full"], "<=", TARGETS["layer_vs_lora"])
            add(f"MoR adapter / MoE-LoRA adapter, {key}", ratio["mor_vs_moelora_adapter"], "<=",
                TARGETS["adapter_vs_moelora"])
            add(f"naive loop / MoR adapter, {key}", ratio["naive_vs_mor_adapter"], ">=", TARGETS["naive_speedup"])
    if e2e:
        models = e2e["inference"]["models"]
        for part, key in (("prefill", "prefill_vs_base"), ("decode per token", "decode_vs_base")):
            add(f"merged MoR / base, {part}", models["mor_merged"][key], "<=", TARGETS["merged_vs_base"],
                f"noise floor: base copy / base = {models['base_copy'][key]:.3f}x")
        add("MoR / LoRA peak training memory", e2e["memory"]["mor"]["peak_vs_lora"], "<=",
            TARGETS["memory_vs_lora"])
    return out


def targets_table(targets: list[dict]) -> str:
    rows = [[t["target"], rx(t["value"]), f"{t['op']} {t['threshold']:g}x", t["status"], t["note"]] for t in targets]
    return table(["target", "measured", "needs", "result", "note"], rows, "Targets")


# -- CLI -------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and a tiny config-built LLaMA (seconds)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per layer shape (default 5; 1 in --quick); shapes under 20 GFLOP get 5x (not in --quick)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer call (default 2048; 128 in --quick)")
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="shared ranks r of the layer part")
    p.add_argument("--json", dest="json_path", default=None, help="write every number to this JSON file")
    p.add_argument("--skip-e2e", action="store_true", help="only the layer benchmark")
    p.add_argument("--skip-layer", action="store_true", help="only the end-to-end benchmark")
    p.add_argument("--model", default=None, help="end-to-end model: 'smollm2' (default), 'tiny', a folder, "
                                                 "a hub id or a .gguf file ('tiny' in --quick)")
    p.add_argument("--e2e-batch", type=int, default=None, help="training batch size (default 2)")
    p.add_argument("--e2e-seq", type=int, default=None, help="training sequence length (default 128)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed training steps per method (default 3)")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill prompt tokens (default 256)")
    p.add_argument("--gen-tokens", type=int, default=None, help="generated tokens per repeat (default 16)")
    p.add_argument("--infer-repeats", type=int, default=None, help="inference repeats per model (default 15: prefill of a 135M model varies by a few per cent between calls)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one MoR and one LoRA layer step with torch.profiler (first shape)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(repeats=1 if quick else 5, tokens=128 if quick else 2048, model="tiny" if quick else "smollm2",
                    e2e_batch=2 if quick else 2, e2e_seq=16 if quick else 128, e2e_steps=2 if quick else 3,
                    prompt_len=16 if quick else 256, gen_tokens=4 if quick else 16, infer_repeats=2 if quick else 15)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker_memory:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(args)))
        return {}
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info(device)
    wall = time.perf_counter()
    print(f"MoR speed benchmark  {info['date']}")
    print(f"machine: {info['cpu']} ({info['cpu_count']} CPUs){' / ' + info['gpu'] if 'gpu' in info else ''}; "
          f"torch {info['torch']}, {info['threads']} threads; device {info['device']}, dtype {args.dtype}"
          f"{'; QUICK mode' if args.quick else ''}")
    print()
    report = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "worker_memory"}}
    layer = e2e = None
    if not args.skip_layer:
        layer = bench_layers(args, device, dtype, log)
        report["layer"] = layer
        print(layer_table(layer))
        diffs = ", ".join(f"{k}: {v:.1e}" for k, v in layer["naive_max_abs_diff"].items())
        print(f"(naive loop vs vectorised MoR, max |diff| of adapter output: {diffs})")
        print()
    if not args.skip_e2e:
        e2e = {"model": args.model, "settings": {m: {"r": r, "N": n} for m, (r, n) in E2E_SETTINGS.items()}}
        e2e["train"] = bench_training(args, device, dtype, log)
        e2e["memory"] = bench_memory(args, log)
        e2e["inference"] = bench_inference(args, device, dtype, log)
        report["e2e"] = e2e
        print(e2e_tables(e2e))
        print()
    report["targets"] = evaluate_targets(layer, e2e, args.quick)
    print(targets_table(report["targets"]))
    if args.profile:
        report["profile"] = profile_layers(args, device, dtype)
        print()
        print(report["profile"])
    report["wall_s"] = time.perf_counter() - wall
    print(f"\nwall time: {report['wall_s']:.1f} s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
