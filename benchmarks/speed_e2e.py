"""End-to-end training on SmolLM2 (or a tiny config-built LLaMA): tokens/s of interleaved AdamW
steps and peak training memory (one subprocess per method), for LoRA r=16, MoR r=8 N=8 and
MoE-LoRA N=8 r=2 on the FFN. Also the model builder the inference benchmark uses.

    python -m benchmarks.speed --only train        # training tok/s + peak memory (and targets)

How it is built: docs/benchmarks.md, section "Speed: end to end". Numbers go to stdout and ``--json``.
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import f3, median, paired_ratio, progress, rotations, rx, sync, text_table
from mor.params import count_trainable_parameters

FFN = ["gate_proj", "up_proj", "down_proj"]
E2E_METHODS = ("lora", "mor", "moelora")
# method -> (r, N) of the end-to-end comparison
E2E_SETTINGS = {"lora": (16, 1), "mor": (8, 8), "moelora": (2, 8)}
# the script that runs a memory worker (``--worker-memory METHOD``) in a fresh process
REPO = Path(__file__).resolve().parents[1]  # the memory workers run `python -m benchmarks.speed` from here


def build_model(spec: str, dtype, device, seed: int = 0):
    """``tiny`` (a config-built LLaMA, no download) or anything ``mor.runtime.loading.load_model`` takes."""
    if spec == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    else:
        from mor.runtime.loading import load_model

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
        for order in rotations(list(E2E_METHODS), args.e2e_steps):
            for method in order:
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
            "trainable_params": count_trainable_parameters(model),
            "step_min_s": min(ts), "step_median_s": median(ts), "tokens_per_s": tokens / median(ts), "times_s": ts,
            "time_vs_lora": paired_ratio(ts, times["lora"]),
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
            cmd = [sys.executable, "-m", "benchmarks.speed", "--worker-memory", method, "--model", args.model,
                   "--device", args.device, "--dtype", args.dtype, "--e2e-batch", str(args.e2e_batch),
                   "--e2e-seq", str(args.e2e_seq), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
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



def training_table(e2e: dict) -> str:
    tr = e2e["train"]
    mem = e2e["memory"]
    rows = []
    for m, v in tr["methods"].items():
        mm = mem[m]
        rows.append([m, v["r"], v["N"], f"{v['trainable_params']:,}", f3(v["step_min_s"]), f3(v["step_median_s"]),
                     f"{v['tokens_per_s']:.1f}", rx(v["time_vs_lora"]), f"{mm['peak_bytes'] / 2**20:.1f}",
                     rx(mm["peak_vs_lora"]), f"{mm['saved_activation_bytes'] / 2**20:.1f}", rx(mm["saved_vs_lora"])])
    return text_table(
        ["method", "r", "N", "trainable", "step min s", "step med s", "tok/s", "time/LoRA", "peak MiB", "/LoRA",
         "saved-act MiB", "/LoRA"], rows,
        f"End-to-end training on {e2e['model']} (FFN gate/up/down, {tr['tokens_per_step']} tokens/step, AdamW, "
        f"{tr['steps']} timed steps; peak = {mem['lora']['measure']}, 2 steps, subprocess per method)")
