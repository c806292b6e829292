"""The GPU check: one command that measures MoR where users train and serve, on one CUDA GPU.

    python -m benchmarks.gpu                 # CUDA: results/gpu.json and the tables (fits 8 min on one H100)
    python -m benchmarks.gpu --cpu --tiny    # the same code at tiny shapes on the CPU, in seconds (CI runs it)
    make bench-gpu                           # the first, plus the table written into docs/results.md

Five sections, each a table (every number in the JSON, with the machine and versions):

- layer:  one adapted linear layer, forward + backward, at LLaMA-2-7B / Llama-3-8B FFN and attention
          shapes, bf16 autocast over a bf16 frozen W with fp32 adapter weights (the Trainer's mixed
          precision): base, peft's LoRA r=16, MoR r=8 N=8, MoE-LoRA N=8 r=2. Achieved TFLOP/s from the
          analytic FLOPs of the layer's GEMMs, and the layer's "bound": the summed time of plain bf16
          matmuls of exactly those GEMM shapes (a layer at its bound does nothing but its GEMMs).
- step:   training steps of a LLaMA-architecture model of about 1B parameters with random weights
          (no download), frozen base bf16, through our Trainer path (mor.train.trainer.AdapterTrainer,
          training_arguments, the run's collator): MoR / LoRA step-time ratio (interleaved rounds)
          and peak GPU memory.
- decode: greedy decoding at batch 1 and 32 on the same model: the base, peft's LoRA (unmerged)
          and dynamic MoR, eager and with transformers' static cache + torch.compile (mode
          reduce-overhead: CUDA graphs), tokens/s.
- served: mor.serving's fused layer (ServedMixtureLinear, vLLM's qkv / gate_up / down layout at
          Llama-3-8B's shapes, no vLLM) against the base linear, 1 to 256 tokens.
- qlora:  an nf4 (bitsandbytes) base with MoR: 20 training steps through the Trainer path, the merge
          under the measured routing, and the largest logit difference merged vs un-merged.

Without CUDA the CUDA-only rows (CUDA graphs, peak GPU memory, nf4 on CUDA) say "skipped: no
CUDA"; a missing optional package (bitsandbytes) says so in its row. ``--tiny`` never writes
results/gpu.json (its default output is results/gpu-tiny.json, which git ignores).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PrinterCallback, TrainerCallback

from benchmarks.common import (machine_info, markdown_table, median, paired_ratio, read_json, rotations, sync,
                               write_json)

SKIP_NO_CUDA = "skipped: no CUDA"
SECTIONS = ("layer", "step", "served", "qlora", "decode")  # decode last: its compiles may meet the budget
DOCS_BEGIN, DOCS_END = "<!-- gpu-check -->", "<!-- /gpu-check -->"
PACKAGES = ("transformers", "peft", "accelerate", "triton", "bitsandbytes", "mor-adapters")

# the adapters compared (matched budgets, as everywhere in this project): name -> (method, r, N)
LORA, MOR, MOELORA = "LoRA r=16", "MoR r=8 N=8", "MoE-LoRA N=8 r=2"
ADAPTERS = {LORA: ("lora", 16, 1), MOR: ("mor", 8, 8), MOELORA: ("moelora", 2, 8)}

# ~1.1B parameters (TinyLlama-1.1B's shape): the model of the step and decoding sections
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
MODEL_QLORA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
MODEL_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the full GPU check, or ``--tiny`` (the same code in seconds)."""

    layer_shapes: tuple  # (model, layer, d_in, d_out)
    layer_tokens: tuple
    model: dict  # LlamaConfig of the step and decoding sections
    step_batch: int
    step_length: int
    step_steps: int  # steps per train() call; the first skip_steps of each are not timed
    skip_steps: int  # the first steps build optimizer state and warm kernels up
    step_rounds: int
    decode_batches: tuple
    prompt_length: int
    new_tokens: int
    decode_rounds: int
    served_layers: tuple  # (layer, d_in, output slices)
    served_tokens: tuple
    qlora_model: dict
    qlora_steps: int
    qlora_batch: int
    qlora_length: int
    rounds: int  # interleaved rounds of the layer and served sections
    reps: int  # calls per timing in those sections


FULL = Sizes(
    layer_shapes=(("LLaMA-2-7B", "gate/up", 4096, 11008), ("LLaMA-2-7B", "down", 11008, 4096),
                  ("LLaMA-2-7B", "q/k/v/o", 4096, 4096), ("Llama-3-8B", "gate/up", 4096, 14336),
                  ("Llama-3-8B", "down", 14336, 4096), ("Llama-3-8B", "k/v", 4096, 1024)),
    layer_tokens=(4096, 16384), model=MODEL_1B, step_batch=8, step_length=1024, step_steps=12, skip_steps=2, step_rounds=3,
    decode_batches=(1, 32), prompt_length=64, new_tokens=64, decode_rounds=3,
    served_layers=(("qkv_proj", 4096, (4096, 1024, 1024)), ("gate_up_proj", 4096, (14336, 14336)),
                   ("down_proj", 14336, (4096,))),
    served_tokens=(1, 8, 32, 256), qlora_model=MODEL_QLORA, qlora_steps=20, qlora_batch=8, qlora_length=256,
    rounds=5, reps=10)
TINY = Sizes(
    layer_shapes=(("tiny", "gate/up", 64, 128), ("tiny", "down", 128, 64)), layer_tokens=(32,),
    model=MODEL_TINY, step_batch=2, step_length=16, step_steps=2, skip_steps=1, step_rounds=1,
    decode_batches=(1, 4), prompt_length=8, new_tokens=3, decode_rounds=1,
    served_layers=(("qkv_proj", 64, (64, 32, 32)), ("down_proj", 128, (64,))), served_tokens=(1, 8),
    qlora_model=MODEL_TINY, qlora_steps=20, qlora_batch=2, qlora_length=16, rounds=2, reps=2)


# -- timing ---------------------------------------------------------------------------------------

def timed(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` (``reps`` calls, the GPU's queue drained before and after)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def interleaved(fns: dict, device: torch.device, rounds: int, reps: int, warm: bool = True) -> dict[str, list[float]]:
    """Per-call seconds of every function in ``fns``, one timing each per round, the order rotating
    (after one warm-up call each: kernels chosen, caches built, unless ``warm`` is False)."""
    for fn in fns.values() if warm else ():
        fn()
    times = {name: [] for name in fns}
    for order in rotations(list(fns), rounds):
        for name in order:
            times[name].append(timed(fns[name], device, reps))
    return times


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}" if seconds < 0.01 else f"{1e3 * seconds:.1f}"


# -- section 1: the layer -------------------------------------------------------------------------

def layer_gemms(method: str, tokens: int, d_in: int, d_out: int, r: int, n: int) -> list[tuple[int, int, int]]:
    """The (M, K, N) GEMMs of one layer's forward + backward with a frozen W and an input that needs
    a gradient: W x and its input gradient, then the adapter's shrink (width ``down``) and expand
    (width ``up``): forward, weight gradient and input gradient of each. MoR's shrink is [W_g; A]
    (N + r wide), its expand U (N*r); MoE-LoRA's [W_g; A_1..A_N] (N + N*r) and [B_1..B_N] (N*r)."""
    gemms = [(tokens, d_in, d_out), (tokens, d_out, d_in)]
    down, up = {"base": (0, 0), "lora": (r, r), "mor": (n + r, n * r), "moelora": (n + n * r, n * r)}[method]
    if down:
        gemms += [(tokens, d_in, down), (tokens, up, d_out),  # forward: shrink, expand
                  (d_out, tokens, up), (tokens, d_out, up),  # expand: weight gradient, input gradient
                  (down, tokens, d_in), (tokens, down, d_in)]  # shrink: weight gradient, input gradient
    return gemms


def gemm_flops(gemms) -> float:
    return float(sum(2 * m * k * n for m, k, n in gemms))


def build_layer(method: str, d_in: int, d_out: int, r: int, n: int, weight: torch.Tensor) -> nn.Module:
    """The frozen bf16 linear W with ``method``'s adapter in fp32 (as a Trainer run holds it), B != 0."""
    from benchmarks.speed_layer import make_peft_lora
    from mor import MixtureLayer, MoELoRAAdapter, MoRAdapter

    base = nn.Linear(d_in, d_out, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = nn.Parameter(weight, requires_grad=False)
    if method == "base":
        return base
    if method == "lora":
        layer = make_peft_lora(base, r, 2 * r).to(device=weight.device)
        for p in layer.parameters():  # peft builds them in W's dtype; get_peft_model would keep them fp32
            if p.requires_grad:
                p.data = p.data.float()
    else:
        cls = MoRAdapter if method == "mor" else MoELoRAAdapter
        adapter = cls(d_in, d_out, r=r, num_experts=n, alpha=2 * r, device=weight.device, dtype=torch.float32)
        layer = MixtureLayer(base, "default", adapter)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return layer


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One training pass of ``layer`` under bf16 autocast: forward, backward of ``grad``, gradients dropped."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def layer_section(sizes: Sizes, device: torch.device) -> dict:
    """Forward + backward of one layer per method and shape, against its matmul bound."""
    methods = {"base": ("base", 0, 0), **ADAPTERS}
    bound_cache: dict[tuple, float] = {}

    def matmul_seconds(shape):  # a plain bf16 matmul of one GEMM shape, measured once
        if shape not in bound_cache:
            m, k, n = shape
            a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
            torch.mm(a, b)
            bound_cache[shape] = median([timed(lambda: torch.mm(a, b), device, sizes.reps) for _ in range(3)])
        return bound_cache[shape]

    rows = []
    for model_name, layer_name, d_in, d_out in sizes.layer_shapes:
        torch.manual_seed(0)
        weight = (torch.randn(d_out, d_in, device=device) / d_in ** 0.5).to(torch.bfloat16)
        layers = {name: build_layer(m, d_in, d_out, r, n, weight) for name, (m, r, n) in methods.items()}
        for tokens in sizes.layer_tokens:
            x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
            times = interleaved({name: functools.partial(forward_backward, layer, x, grad)
                                 for name, layer in layers.items()}, device, sizes.rounds, sizes.reps)
            for name, (method, r, n) in methods.items():
                gemms = layer_gemms(method, tokens, d_in, d_out, r, n)
                seconds, bound = median(times[name]), sum(matmul_seconds(g) for g in gemms)
                rows.append({"model": model_name, "layer": layer_name, "d_in": d_in, "d_out": d_out, "tokens": tokens,
                             "method": name, "seconds": seconds, "times_s": times[name], "gflop": gemm_flops(gemms) / 1e9,
                             "tflops": gemm_flops(gemms) / seconds / 1e12, "bound_seconds": bound,
                             "of_bound": bound / seconds,
                             "vs_lora": paired_ratio(times[name], times[LORA]) if name != "base" else None})
        del layers, weight
    table = markdown_table(
        ["shape", "tokens", "method", "ms", "TFLOP/s", "bound ms", "of bound", "vs LoRA"],
        [[f"{r['model']} {r['layer']} {r['d_in']}→{r['d_out']}", r["tokens"], r["method"], ms(r["seconds"]),
          f"{r['tflops']:.3g}", ms(r["bound_seconds"]), f"{r['of_bound']:.2f}",
          "-" if r["vs_lora"] is None else f"{r['vs_lora']:.3f}x"] for r in rows])
    caption = ("frozen W bf16, adapter weights fp32, under bf16 autocast; input and output gradients bf16; "
               f"median of {sizes.rounds} interleaved rounds of {sizes.reps} calls")
    return {"rows": rows, "table": table, "caption": caption}


# -- the model of the step and decoding sections ----------------------------------------------------

def random_llama(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A LLaMA-architecture causal LM with random weights, built on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with device:
        return AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)


def with_adapter(base: nn.Module, name: str, **spec) -> nn.Module:
    """``base`` (its frozen weights) with the adapter ``name`` of ADAPTERS, as ``mor train`` attaches it."""
    from mor.train.adapters import AdapterSpec, apply_adapter

    method, r, n = ADAPTERS[name]
    return apply_adapter(base, AdapterSpec(method=method, r=r, num_experts=n, init_seed=0, **spec))


def random_batches(vocab: int, count: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "attention_mask": [1] * length, "labels": ids}
            for ids in torch.randint(3, vocab, (count, length), generator=g).tolist()]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (``steps``), the GPU's queue drained at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.steps, self.start = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.steps.append(time.perf_counter() - self.start)


def run_trainer(model: nn.Module, folder: Path, sizes_steps: int, batch: int, length: int, device: torch.device,
                data: list[dict], lr: float = 1e-4, router_lr_multiplier: float = 1.0, logging_steps: int = 10 ** 9):
    """Our Trainer path (AdapterTrainer, training_arguments of a TrainConfig, the run's collator):
    ``sizes_steps`` steps with bf16 autocast. Returns (trainer, StepTimer)."""
    from mor.train.config import TrainConfig
    from mor.train.recipe import batch_collator
    from mor.train.trainer import AdapterTrainer, training_arguments

    cfg = TrainConfig(output=str(folder), max_steps=sizes_steps, batch_size=batch, max_length=length, lr=lr,
                      lr_scheduler="constant", warmup_ratio=0.0, save_steps=10 ** 9, logging_steps=logging_steps,
                      report_to="none", bf16=True, router_lr_multiplier=router_lr_multiplier)
    args = training_arguments(cfg)
    args.disable_tqdm = True
    args.use_cpu = device.type == "cpu"
    timer = StepTimer(device)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, data_collator=batch_collator(0),
                             callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # the tables say it all
    trainer.router_lr_multiplier = router_lr_multiplier
    return trainer, timer


# -- section 2: the training step ---------------------------------------------------------------------

STEP_ARMS = {LORA: {}, MOR: {}, f"{MOR} balanced, router lr x100": {"router": "balanced"}}


def step_section(sizes: Sizes, device: torch.device, folder: Path) -> dict:
    """Training steps of the ~1B model per adapter, interleaved by train() call; MoR / LoRA ratios."""
    from mor.train.setup import cast_frozen_base

    data = random_batches(sizes.model["vocab_size"], sizes.step_batch * sizes.step_steps, sizes.step_length)
    arms = {}
    for name, spec in STEP_ARMS.items():
        model = with_adapter(random_llama(sizes.model, device, torch.float32), name.split(" balanced")[0], **spec)
        cast_frozen_base(model, torch.bfloat16)  # as mor train --base-dtype bf16: the adapter stays fp32
        multiplier = 100.0 if spec else 1.0
        arms[name] = run_trainer(model, folder / f"step{len(arms)}", sizes.step_steps, sizes.step_batch,
                                 sizes.step_length, device, data, router_lr_multiplier=multiplier)
    per_round = {name: [] for name in arms}
    peak = {name: None for name in arms}
    losses = {name: [] for name in arms}
    for order in rotations(list(arms), sizes.step_rounds):
        for name in order:
            trainer, timer = arms[name]
            timer.steps.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            output = trainer.train()
            if device.type == "cuda":
                rise = torch.cuda.max_memory_allocated(device) - before
                peak[name] = max(peak[name] or 0, rise)
            losses[name].append(output.training_loss)
            per_round[name].append(median(timer.steps[sizes.skip_steps:]))
    tokens = sizes.step_batch * sizes.step_length
    rows = []
    for name in arms:
        rows.append({"adapter": name, "step_seconds": median(per_round[name]), "per_round_s": per_round[name],
                     "tokens_per_s": tokens / median(per_round[name]),
                     "vs_lora": paired_ratio(per_round[name], per_round[LORA]),
                     "peak_rise_bytes": peak[name], "peak_vs_lora": None if peak[name] is None else peak[name] / peak[LORA],
                     "mean_losses": losses[name], "finite": all(math.isfinite(x) for x in losses[name])})
    parameters = sum(p.numel() for p in arms[LORA][0].model.parameters() if not p.requires_grad)
    table = markdown_table(
        ["adapter", "step ms", "tokens/s", "step vs LoRA", "peak memory rise (GiB)", "memory vs LoRA"],
        [[r["adapter"], ms(r["step_seconds"]), f"{r['tokens_per_s']:.0f}", f"{r['vs_lora']:.3f}x",
          SKIP_NO_CUDA if r["peak_rise_bytes"] is None else f"{r['peak_rise_bytes'] / 2 ** 30:.2f}",
          "-" if r["peak_vs_lora"] is None else f"{r['peak_vs_lora']:.3f}x"] for r in rows])
    caption = (f"LLaMA architecture, {parameters:,} frozen parameters (random), base bf16, adapters fp32, "
               f"bf16 autocast; batch {sizes.step_batch} x {sizes.step_length} tokens; {sizes.step_rounds} rounds of "
               f"{sizes.step_steps} steps per adapter, the first {sizes.skip_steps} of each untimed; peak memory: "
               "what a train() call adds to what was allocated before it")
    return {"rows": rows, "table": table, "caption": caption, "base_parameters": parameters, "tokens_per_step": tokens}


# -- section 3: decoding ---------------------------------------------------------------------------

def decode_section(sizes: Sizes, device: torch.device, deadline: float = math.inf) -> dict:
    """tokens/s of greedy decoding: base, peft LoRA and dynamic MoR on one bf16 base, eager at every
    batch first, then compiled (its first call compiles; none starts past ``deadline``)."""
    base = random_llama(sizes.model, device, torch.bfloat16).eval()
    models = {"base": base}
    for name in (LORA, MOR):
        models[name] = with_adapter(copy.deepcopy(base), name).eval()
        with torch.no_grad():  # a trained-looking update, not B = 0
            for param_name, param in models[name].named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.02)
    rows, eager_tokens = [], {}
    for mode in ("eager", "compiled"):
        for batch in sizes.decode_batches:
            if mode == "compiled" and device.type != "cuda":
                rows += [{"batch": batch, "mode": mode, "model": name, "skipped": SKIP_NO_CUDA} for name in models]
                continue
            ids = torch.randint(3, sizes.model["vocab_size"], (batch, sizes.prompt_length),
                                generator=torch.Generator().manual_seed(batch)).to(device)
            settings = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes.new_tokens,
                            min_new_tokens=sizes.new_tokens, do_sample=False, pad_token_id=0)
            if mode == "compiled":  # transformers then compiles the forward, mode reduce-overhead (CUDA graphs)
                settings["cache_implementation"] = "static"
            ready, first = {}, {}
            with torch.no_grad():
                for name, model in models.items():  # the first call (compiles, when compiled)
                    if time.perf_counter() > deadline:
                        continue
                    start = time.perf_counter()
                    tokens = model.generate(**settings)
                    sync(device)
                    first[name], ready[name] = time.perf_counter() - start, model
                    if mode == "eager":
                        eager_tokens[name, batch] = tokens
                    else:  # the same greedy tokens as eager? (bf16 near-ties may flip some)
                        first[name, "same"] = float((tokens == eager_tokens[name, batch]).float().mean())
                times = interleaved({name: (lambda m=model: m.generate(**settings)) for name, model in ready.items()},
                                    device, sizes.decode_rounds, 1, warm=False)
            for name in models:
                if name not in ready:
                    rows.append({"batch": batch, "mode": mode, "model": name,
                                 "skipped": "skipped: the time budget (--budget-s) was spent"})
                    continue
                seconds = median(times[name])
                rows.append({"batch": batch, "mode": mode, "model": name, "seconds": seconds, "times_s": times[name],
                             "tokens_per_s": batch * sizes.new_tokens / seconds, "first_call_s": first[name],
                             "vs_base": paired_ratio(times["base"], times[name]) if "base" in ready else None,
                             "same_tokens_as_eager": first.get((name, "same"))})
    table = markdown_table(
        ["batch", "mode", "model", "tokens/s", "throughput vs base", "first call s", "tokens = eager"],
        [[r["batch"], r["mode"], r["model"], r.get("skipped") or f"{r['tokens_per_s']:.1f}",
          "-" if r.get("vs_base") is None else f"{r['vs_base']:.3f}x",
          "-" if "skipped" in r else f"{r['first_call_s']:.1f}",
          "-" if r.get("same_tokens_as_eager") is None else f"{r['same_tokens_as_eager']:.3f}"]
         for r in sorted(rows, key=lambda r: (r["batch"], r["mode"] != "eager"))])
    dtypes = {name: sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}) for name, model in models.items()}
    caption = (f"the step section's model in bf16; prompts of {sizes.prompt_length} tokens, {sizes.new_tokens} new tokens "
               "(greedy, no early stop); adapter weights fp32 over the bf16 base (peft's default, LoRA and MoR alike)")
    return {"rows": rows, "table": table, "caption": caption, "prompt_length": sizes.prompt_length,
            "new_tokens": sizes.new_tokens,
            "adapter_dtypes": dtypes}  # peft's default over a bf16 base: fp32 adapter weights, for LoRA and MoR alike


# -- section 4: the served layer ---------------------------------------------------------------------

def served_section(sizes: Sizes, device: torch.device) -> dict:
    """mor.serving's fused layer against the base linear, bf16, per token count (eager, no gradients)."""
    from mor import MoRAdapter
    from mor.serving.fused import ServedMixtureLinear

    rows = []
    for layer_name, d_in, outs in sizes.served_layers:
        g = torch.Generator().manual_seed(0)
        base = nn.Linear(d_in, sum(outs), bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        adapters, columns, start = {}, {}, 0
        for i, out in enumerate(outs):
            adapter = MoRAdapter(d_in, out, r=8, num_experts=8, alpha=16, generator=g)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.normal_(0, 0.05, generator=g)
            adapters[f"slice{i}"] = adapter.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
            columns[f"slice{i}"], start = (start, start + out), start + out
        served = ServedMixtureLinear(base, adapters, columns)
        for tokens in sizes.served_tokens:
            x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                reference = base(x) + torch.cat([adapters[k](x) for k in adapters], dim=-1)
                error = float((served(x) - reference).abs().max())
                times = interleaved({"base": lambda: base(x), "served": lambda: served(x)}, device, sizes.rounds,
                                    sizes.reps * max(1, 20 // tokens))  # more calls at few tokens
            rows.append({"layer": layer_name, "d_in": d_in, "outputs": list(outs), "tokens": tokens,
                         "base_us": 1e6 * median(times["base"]), "served_us": 1e6 * median(times["served"]),
                         "vs_base": paired_ratio(times["served"], times["base"]), "max_abs_diff_vs_reference": error})
    table = markdown_table(
        ["layer", "tokens", "base µs", "MoR served µs", "vs base", "max abs diff vs MoRAdapter"],
        [[f"{r['layer']} {r['d_in']}→{'+'.join(map(str, r['outputs']))}", r["tokens"], f"{r['base_us']:.1f}",
          f"{r['served_us']:.1f}", f"{r['vs_base']:.3f}x", f"{r['max_abs_diff_vs_reference']:.2g}"] for r in rows])
    caption = "MoR r=8 N=8 on every slice, bf16, eager, no gradients; torch's GEMM (mor.serving.fused.torch_gemm)"
    return {"rows": rows, "table": table, "caption": caption}


# -- section 5: QLoRA ----------------------------------------------------------------------------------

def qlora_skipped(why: str) -> dict:
    return {"skipped": why, "table": markdown_table(["QLoRA (nf4 base, MoR r=8 N=8)", "result"], [["all", why]])}


def qlora_section(sizes: Sizes, device: torch.device, folder: Path) -> dict:
    """nf4 base + MoR: train through the Trainer path, merge under the measured routing, compare logits.
    (The check runs it on CUDA only; the code itself takes any device bitsandbytes runs on.)"""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA library it cannot load
        return qlora_skipped(f"skipped: bitsandbytes does not import ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:80] if str(err) else ''})")
    from mor.quantized import keep_4bit_layout
    from mor.runtime.loading import load_model

    saved = folder / "qlora-base"
    random_llama(sizes.qlora_model, torch.device("cpu"), torch.bfloat16).save_pretrained(saved)
    start = time.perf_counter()
    place = f"cuda:{torch.cuda.current_device()}" if device.type == "cuda" else str(device)
    base = load_model(str(saved), dtype=torch.bfloat16, load_in_4bit=True, device_map={"": place})
    keep_4bit_layout(base)
    model = with_adapter(base, MOR)
    data = random_batches(sizes.qlora_model["vocab_size"], sizes.qlora_batch * sizes.qlora_steps, sizes.qlora_length)
    trainer, timer = run_trainer(model, folder / "qlora", sizes.qlora_steps, sizes.qlora_batch, sizes.qlora_length,
                                 device, data, lr=1e-3, logging_steps=1)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    probe = torch.tensor([d["input_ids"] for d in data[: sizes.qlora_batch]], device=device)
    model.eval()
    with torch.no_grad():
        profile = model.measure_routing([{"input_ids": probe}])
        with model.fixed_routing(profile):
            unmerged = model(input_ids=probe).logits.float()
        merged_model = model.merge_and_unload(routing=profile)
        merged = merged_model(input_ids=probe).logits.float()
    diff = float((merged - unmerged).abs().max())
    row = {"steps": sizes.qlora_steps, "step_seconds": median(timer.steps[sizes.skip_steps:]), "losses": losses, "seconds_total": time.perf_counter() - start, "max_abs_logit_diff": diff,
           "max_abs_logit": float(unmerged.abs().max()), "merged_dtype": str(next(merged_model.parameters()).dtype),
           "finite": bool(torch.isfinite(merged).all())}
    table = markdown_table(["steps", "step ms", "loss, first → last step", "max abs logit", "max abs logit diff, merged vs un-merged",
                            "merged weights"],
                           [[row["steps"], ms(row["step_seconds"]), f"{losses[0]:.3f} → {losses[-1]:.3f}",
                             f"{row['max_abs_logit']:.2f}", f"{diff:.3g}", row["merged_dtype"]]])
    caption = (f"LLaMA architecture, {sizes.qlora_model['hidden_size']} wide, {sizes.qlora_model['num_hidden_layers']} "
               "layers (random), nf4 with double quantisation, compute bf16; MoR r=8 N=8 on the FFN, lr 1e-3, batch "
               f"{sizes.qlora_batch} x {sizes.qlora_length}; the logits of one batch under the measured routing")
    return {"rows": [row], "table": table, "caption": caption}


# -- the run -------------------------------------------------------------------------------------------

TITLES = {"layer": "The layer: forward + backward, bf16 autocast", "step": "The training step, our Trainer path",
          "decode": "Decoding, greedy", "served": "The served layer (mor.serving, no vLLM)",
          "qlora": "QLoRA: nf4 base, train, merge"}


def run_sections(args, sizes: Sizes, device: torch.device, report: dict, out: Path) -> None:
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mor-gpu-check-") as tmp:
        for name in args.only:
            start = time.perf_counter()
            try:
                if name == "layer":
                    result = layer_section(sizes, device)
                elif name == "step":
                    result = step_section(sizes, device, Path(tmp))
                elif name == "decode":
                    result = decode_section(sizes, device, deadline=start_all + args.budget_s)
                elif name == "served":
                    result = served_section(sizes, device)
                elif device.type != "cuda":  # nf4 on CUDA is what users run; the CPU kernels are another path
                    result = qlora_skipped(SKIP_NO_CUDA)
                else:
                    result = qlora_section(sizes, device, Path(tmp))
            except Exception as err:  # a broken section is a result too: the others still run
                if args.strict:
                    raise
                import traceback

                result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                          "table": f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            result["seconds"] = time.perf_counter() - start
            report["sections"][name] = result
            caption = f"{result['caption']}\n\n" if "caption" in result else ""
            print(f"\n## {TITLES[name]} ({result['seconds']:.0f} s)\n\n{caption}{result['table']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(out, report)  # after every section: a run stopped by its timeout keeps what it measured


def markdown_report(report: dict) -> str:
    """The docs/results.md block: the command, the machine, every section's table."""
    m = report["machine"]
    tiny = [f"**Tiny shapes (`--tiny`) on {m['device']}: this checks that the code runs; its timings measure "
            "nothing about a GPU.**", ""] if report["tiny"] else []
    lines = tiny + [f"`{report['command']}` — {m['date']}, {m.get('gpu') or m['cpu']}, torch {m['torch']}, "
             f"transformers {m.get('transformers')}, peft {m.get('peft')}, bitsandbytes {m.get('bitsandbytes')}"
             f" ({report['wall_s']:.0f} s; results in `{report['out']}`)."]
    for name, section in report["sections"].items():
        lines += ["", f"**{TITLES[name]}**" + (f" — {section['caption']}" if "caption" in section else ""), "",
                  section["table"]]
    return "\n".join(lines)


def update_docs(path: Path, block: str) -> None:
    """Put ``block`` between the gpu-check markers of ``path`` (an error if they are missing)."""
    from mor.safety import atomic_write_text

    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"error: {path} has no {DOCS_BEGIN} ... {DOCS_END} markers; add them where the GPU table goes")
    head, rest = text.split(DOCS_BEGIN, 1)
    atomic_write_text(path, head + DOCS_BEGIN + "\n" + block + "\n" + DOCS_END + rest.split(DOCS_END, 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the same code in seconds (CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="these sections")
    parser.add_argument("--out", default=None, help="the JSON (default results/gpu.json; with --tiny results/gpu-tiny.json)")
    parser.add_argument("--docs", default=None, help="also write the tables into this markdown file between "
                                                     f"{DOCS_BEGIN} and {DOCS_END} (make bench-gpu: docs/results.md)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no compile of the decode section starts after this many seconds (its rows say so)")
    parser.add_argument("--strict", action="store_true", help="stop at the first section that fails (tests)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the tables of that earlier run's JSON into --docs")
    args = parser.parse_args(argv)
    if args.render:
        report = read_json(args.render)
        if not report or "markdown" not in report:
            raise SystemExit(f"error: {args.render} is not a finished GPU check's JSON (no 'markdown' in it)")
        update_docs(Path(args.docs or "docs/results.md"), report["markdown"])
        print(f"wrote the tables of {args.render} into {args.docs or 'docs/results.md'}")
        return 0
    out = Path(args.out or ("results/gpu-tiny.json" if args.tiny else "results/gpu.json"))
    if args.tiny and out.resolve() == Path("results/gpu.json").resolve():
        raise SystemExit("error: --tiny never writes results/gpu.json (the GPU results); give another --out")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run `python -m benchmarks.gpu --cpu --tiny` for the CPU check "
                         "(CUDA-only rows then say 'skipped: no CUDA')")
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = TINY if args.tiny else FULL
    torch.backends.cuda.matmul.allow_tf32 = False  # the adapters' fp32 parts run as a Trainer run has them
    report = {"command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(device, PACKAGES), "sizes": asdict(sizes), "tiny": args.tiny, "out": str(out), "sections": {}}
    start = time.perf_counter()
    run_sections(args, sizes, device, report, out)
    report["wall_s"] = time.perf_counter() - start
    report["markdown"] = markdown_report(report)
    write_json(out, report)
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    if args.docs:
        update_docs(Path(args.docs), report["markdown"])
        print(f"wrote the tables into {args.docs}")
    return 1 if any("error" in s for s in report["sections"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
