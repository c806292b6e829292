"""Inference latency, batch 1, greedy with a KV cache: prefill of a prompt and per-token decode for
the base model, a second copy of it (the noise floor), dynamic MoR (the router runs, timed through
``get_base_model()``: the transformers model with MoR layers inside) and MoR merged with a
routing profile.

    python -m benchmarks.speed --only inference    # this part alone, with its targets

How it is built: docs/benchmarks.md, section "Speed: inference". Numbers go to stdout and ``--json``.
"""

from __future__ import annotations

import copy
import inspect
import time

import torch

from benchmarks.common import f3, median, paired_ratio, progress, rotations, rx, sync, text_table
from benchmarks.speed_e2e import attach, build_model


def _routing_batches(args, model, device):
    """A few prompts for the routing profile: real text when a tokenizer loads, else random ids."""
    prompts = ["The capital of France is", "Question: why is the sky blue? Answer:",
               "def fibonacci(n):", "Translate to German: good morning"]
    if args.model != "tiny":
        try:
            from mor.runtime.loading import load_tokenizer

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


def _nonzero_updates(model):
    """B = 0 at init: give the adapter a non-trivial update (the cost is the same, the outputs differ)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def bench_inference(args, device, dtype, log) -> dict:
    loaded = build_model(args.model, dtype, device)
    dynamic = _nonzero_updates(attach(copy.deepcopy(loaded), "mor"))
    merged_src = copy.deepcopy(dynamic)
    profile = merged_src.measure_routing(_routing_batches(args, loaded, device))
    merged = merged_src.merge_and_unload(profile).eval()
    lora = _nonzero_updates(attach(copy.deepcopy(loaded), "lora"))
    # Every model is a fresh copy: the loaded one may sit in file-backed (mmap) pages, which read
    # slower than copied memory. base_copy is the base model again: its ratio to base is the noise
    # floor of these timings (the merged model is structurally the base model too). lora_dynamic is
    # peft's LoRA r=16 unmerged on the same layers: what any dynamic adapter costs per call here.
    models = {"base": copy.deepcopy(loaded), "base_copy": copy.deepcopy(loaded),
              "lora_dynamic": lora.get_base_model(), "mor_dynamic": dynamic.get_base_model(), "mor_merged": merged}
    del loaded
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, models["base"].config.vocab_size, (1, args.prompt_len), generator=g).to(device)
    for m in models.values():  # warm-up
        generation_times(m, prompt[:, :8], 2, device)
    times = {k: {"prefill": [], "decode": []} for k in models}
    with progress(args.infer_repeats * len(models), "inference", args.progress) as bar:
        for order in rotations(list(models), args.infer_repeats):
            for name in order:
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
            "prefill_vs_base": paired_ratio(t["prefill"], times["base"]["prefill"]),
            "decode_vs_base": paired_ratio(t["decode"], times["base"]["decode"]),
            "times_s": t,
        }
    log("  done: inference")
    return out



def inference_table(inf: dict) -> str:
    rows = [[n, f3(v["prefill_min_s"] * 1e3), f3(v["prefill_median_s"] * 1e3), rx(v["prefill_vs_base"]),
             f3(v["decode_min_s_per_token"] * 1e3), f3(v["decode_median_s_per_token"] * 1e3), rx(v["decode_vs_base"])]
            for n, v in inf["models"].items()]
    return text_table(["model", "prefill min ms", "prefill med ms", "/base", "decode min ms/tok",
                       "decode med ms/tok", "/base"], rows,
                      f"Inference, batch 1: prefill {inf['prompt_tokens']} tokens, then {inf['generated_tokens']} "
                      f"greedy tokens with KV cache ({inf['repeats']} interleaved repeats)")
