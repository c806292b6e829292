"""Is a bf16 frozen base worth it on this CPU, at equal results? Three measurements:

1. One matmul at SmolLM2's FFN shape (1024 x 576 @ 576 x 1536): fp32, bf16 tensors, and fp32
   tensors under ``torch.autocast("cpu", torch.bfloat16)`` -- which dtype really runs, how fast.
2. Real training steps on SmolLM2 with MoR r=8 N=8 on the FFN (AdamW, lr 1e-3, clip 1.0, batch
   8, max 128 tokens, commonsense train data): the fp32 base and the bf16 base (adapter and
   optimizer fp32) from the same init on the same batches, steps interleaved so a busy moment
   of the shared machine hits both; per-step time min/median and the median of per-round
   ratios; the losses side by side. A third model (bf16 base, length-grouped batches) measures
   padding's share of the step time.
3. Evaluation time and accuracy of the two trained models on the commonsense test splits.

    PYTHONPATH=src nice -n 10 python -m benchmarks.bf16_step --steps 50 --json results/bf16_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mor.data import collate, load_task_records, multiple_choice_items, tokenize_examples, training_examples
from mor.runtime.loading import load_model, load_tokenizer
from mor.train.adapters import AdapterSpec, apply_adapter
from mor.train.setup import cast_frozen_base

COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
TASKS = ("ARC-Easy", "openbookqa", "boolq")


def matmul_check(rounds: int = 30) -> dict:
    torch.manual_seed(0)
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def fp32():
        return a @ b

    def bf16():
        return a16 @ b16

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    out = {}
    for name, fn in (("fp32", fp32), ("bf16_tensors", bf16), ("fp32_under_autocast", autocast)):
        for _ in range(3):
            y = fn()
        times = []
        for _ in range(rounds):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        out[name] = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "out_dtype": str(y.dtype)}
    for name in ("bf16_tensors", "fp32_under_autocast"):
        out[name]["ratio_to_fp32"] = out[name]["median_ms"] / out["fp32"]["median_ms"]
    return out


def batches(tokenizer, steps: int, batch_size: int, max_length: int, grouped: bool, seed: int = 0) -> list[dict]:
    features = []
    for task in TASKS:
        records = load_task_records(COMMONSENSE / task, split="train")
        examples = training_examples(records, target="output", tokenizer=tokenizer)[: steps * batch_size]
        features += list(tokenize_examples(examples, tokenizer, max_length).features)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(features), generator=g).tolist()[: steps * batch_size]
    chosen = [features[i] for i in order]
    if grouped:  # transformers' LengthGroupedSampler idea: sort within megabatches of 50 batches
        mega = 50 * batch_size
        chosen = [f for s in range(0, len(chosen), mega)
                  for f in sorted(chosen[s:s + mega], key=lambda f: -len(f["input_ids"]))]
        blocks = [chosen[s:s + batch_size] for s in range(0, len(chosen), batch_size)]
        perm = torch.randperm(len(blocks), generator=g).tolist()
        chosen = [f for i in perm for f in blocks[i]]
    out = []
    for s in range(steps):
        out.append(collate(chosen[s * batch_size:(s + 1) * batch_size], tokenizer.pad_token_id))
    return out


def padding_share(bs: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in bs)
    total = sum(b["attention_mask"].numel() for b in bs)
    return 1 - real / total


def build(dtype: torch.dtype, init_seed: int = 0):
    spec = AdapterSpec(method="mor", r=8, num_experts=8, dropout=0.0, init_seed=init_seed)
    model = apply_adapter(load_model(None), spec)
    if dtype != torch.float32:
        cast_frozen_base(model, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def step(model, params, opt, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--grouped-steps", type=int, default=15, help="steps timed with length-grouped batches (0: none)")
    parser.add_argument("--eval-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"threads": torch.get_num_threads(), "cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
              "matmul": matmul_check()}
    print(json.dumps(report["matmul"], indent=1))

    tokenizer = load_tokenizer(None)
    plain = batches(tokenizer, args.steps, args.batch_size, args.max_length, grouped=False)
    grouped = batches(tokenizer, args.steps, args.batch_size, args.max_length, grouped=True)
    report["padding_share"] = {"random": padding_share(plain), "grouped": padding_share(grouped)}
    # fp32_seed1: the fp32 run with another adapter init -- the noise scale the bf16 losses are judged by
    variants = {"fp32": (torch.float32, plain), "bf16": (torch.bfloat16, plain), "fp32_seed1": (torch.float32, plain)}
    if args.grouped_steps:
        variants["bf16_grouped"] = (torch.bfloat16, grouped)
    models = {name: build(dtype, init_seed=1 if name == "fp32_seed1" else 0) for name, (dtype, _) in variants.items()}
    losses = {name: [] for name in variants}
    times = {name: [] for name in variants}
    names = list(variants)
    for s in range(args.steps):
        active = names if s < args.grouped_steps else names[:3]  # length grouping: timing only, fewer steps
        for name in active[s % len(active):] + active[: s % len(active)]:  # rotate the order every step
            tic = time.perf_counter()
            losses[name].append(step(*models[name], variants[name][1][s]))
            times[name].append(time.perf_counter() - tic)
        print(f"step {s + 1}: " + "  ".join(f"{n} {losses[n][-1]:.4f} ({times[n][-1]:.2f}s)" for n in active), flush=True)
    skip = 2  # warm-up steps left out of the timing
    report["step_seconds"] = {n: {"min": min(t[skip:]), "median": statistics.median(t[skip:])} for n, t in times.items()}
    report["step_ratio_to_fp32"] = {n: statistics.median(a / b for a, b in zip(times[n][skip:], times["fp32"][skip:]))
                                    for n in names if n != "fp32"}
    report["losses"] = losses

    def gap(a, b):
        d = [abs(x - y) for x, y in zip(losses[a], losses[b])]
        return {"max": max(d), "mean": sum(d) / len(d), "mean_last10": sum(d[-10:]) / len(d[-10:])}

    report["loss_abs_diff"] = {"fp32_vs_bf16": gap("fp32", "bf16"), "fp32_vs_fp32_seed1 (noise)": gap("fp32", "fp32_seed1"),
                               "step1_fp32_vs_bf16": abs(losses["fp32"][0] - losses["bf16"][0]),
                               "mean_loss_last10": {n: sum(v[-10:]) / len(v[-10:]) for n, v in losses.items()
                                                    if n != "bf16_grouped"}}
    print(json.dumps({k: report[k] for k in ("padding_share", "step_seconds", "step_ratio_to_fp32",
                                             "loss_abs_diff")}, indent=1), flush=True)

    from mor.eval.scoring import evaluate_tasks

    items = {t: multiple_choice_items(load_task_records(COMMONSENSE / t, split="test"), scoring="label",
                                      tokenizer=tokenizer) for t in TASKS}
    report["eval"] = {}
    for repeat in range(args.eval_repeats):  # interleaved: fp32, bf16, bf16, fp32
        for name in (("fp32", "bf16") if repeat == 0 else ("bf16", "fp32")):
            model = models[name][0].eval()
            tic = time.perf_counter()
            res = evaluate_tasks(model, tokenizer, items, batch_size=16, limit=args.eval_limit, scoring="label",
                                 progress=False)
            row = report["eval"].setdefault(name, {"seconds": [], "average_acc": res["average"]["acc"],
                                                   "tasks": {t: r["acc"] for t, r in res["tasks"].items()}})
            row["seconds"].append(time.perf_counter() - tic)
            print(name, json.dumps(row), flush=True)
    report["eval"]["ratio_bf16_to_fp32_min"] = min(report["eval"]["bf16"]["seconds"]) / min(report["eval"]["fp32"]["seconds"])
    report["settings"] = vars(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
