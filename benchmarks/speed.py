"""Speed and memory of MoR against LoRA (peft), MoE-LoRA and a naive per-expert loop: all parts, then
the PASS/MISS targets.

    python -m benchmarks.speed                      # full run (~10 min on 2 CPU cores)
    python -m benchmarks.speed --quick --skip-e2e   # a few seconds (the CI smoke test)
    python -m benchmarks.speed --only inference     # prefill / decode latency alone
    python -m benchmarks.speed --device cuda --dtype bfloat16 --json speed.json

The parts live in speed_layer.py (one layer, fwd+bwd, FLOPs), speed_e2e.py (training tok/s and
peak memory) and speed_inference.py (prefill / decode). How each is built and why the ratios are
medians of per-round ratios: docs/benchmarks.md. Tables go to stdout, every number to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.common import machine_info, rx, text_table, write_json
from benchmarks.speed_e2e import E2E_SETTINGS, bench_memory, bench_training, memory_worker, training_table
from benchmarks.speed_inference import bench_inference, inference_table
from benchmarks.speed_layer import RANKS, SEVEN_B, bench_layers, layer_table, profile_layers

TARGETS = {
    "layer_vs_lora": 1.15,  # MoR layer time / LoRA layer time at 7B shapes, <=
    "adapter_vs_moelora": 0.80,  # MoR adapter time / MoE-LoRA adapter time, <=
    "naive_speedup": 3.0,  # naive adapter time / MoR adapter time, >=
    "dynamic_vs_base": 1.10,  # dynamic MoR prefill / decode latency / base latency, <=
    "merged_vs_base": 1.02,  # merged MoR latency / base latency, <=
    "memory_vs_lora": 1.15,  # MoR peak training memory / LoRA's, <=
}
PARTS = ("layer", "train", "inference")


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
    if e2e and "inference" in e2e:  # batch 1, after a --prompt-len prefill
        models = e2e["inference"]["models"]
        for part, key in (("prefill", "prefill_vs_base"), ("decode per token", "decode_vs_base")):
            noise = f"noise floor: base copy / base = {models['base_copy'][key]:.3f}x"
            lora = f"; peft LoRA r16 unmerged: {models['lora_dynamic'][key]:.3f}x"
            add(f"dynamic MoR / base, {part}", models["mor_dynamic"][key], "<=", TARGETS["dynamic_vs_base"], noise + lora)
            add(f"merged MoR / base, {part}", models["mor_merged"][key], "<=", TARGETS["merged_vs_base"], noise)
    if e2e and "memory" in e2e:
        add("MoR / LoRA peak training memory", e2e["memory"]["mor"]["peak_vs_lora"], "<=",
            TARGETS["memory_vs_lora"])
    return out


def targets_table(targets: list[dict]) -> str:
    rows = [[t["target"], rx(t["value"]), f"{t['op']} {t['threshold']:g}x", t["status"], t["note"]] for t in targets]
    return text_table(["target", "measured", "needs", "result", "note"], rows, "Targets")


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
    p.add_argument("--only", choices=PARTS, default=None,
                   help="run one part: layer, train (training tok/s + peak memory) or inference")
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
    if args.only is None:
        args.parts = [part for part in PARTS if not (args.skip_layer and part == "layer")
                      and not (args.skip_e2e and part != "layer")]
    else:
        args.parts = [args.only]
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
    report = {"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker_memory", "parts")}}
    layer = e2e = None
    if "layer" in args.parts:
        layer = bench_layers(args, device, dtype, log)
        report["layer"] = layer
        print(layer_table(layer))
        diffs = ", ".join(f"{k}: {v:.1e}" for k, v in layer["naive_max_abs_diff"].items())
        print(f"(naive loop vs vectorised MoR, max |diff| of adapter output: {diffs})")
        print()
    if "train" in args.parts or "inference" in args.parts:
        e2e = {"model": args.model, "settings": {m: {"r": r, "N": n} for m, (r, n) in E2E_SETTINGS.items()}}
        report["e2e"] = e2e
    if "train" in args.parts:
        e2e["train"] = bench_training(args, device, dtype, log)
        e2e["memory"] = bench_memory(args, log)
        print(training_table(e2e))
        print()
    if "inference" in args.parts:
        e2e["inference"] = bench_inference(args, device, dtype, log)
        print(inference_table(e2e["inference"]))
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
        write_json(args.json_path, report)
    return report


if __name__ == "__main__":
    main()
