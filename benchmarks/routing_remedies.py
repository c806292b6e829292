"""Why does MoR's router stay near-uniform, and which mixture-of-experts remedy makes it learn?

Every setting trains MoR (r=8, N=8, FFN of SmolLM2-135M-Instruct) on the built-in 5-task suite
with the same seed, data and schedule, and reports what the routing did (mean per-token entropy,
share of the busiest expert, Jensen-Shannon divergence between the tasks' mean routing,
measured on a fixed probe set of 8 training prompts per task, see mor.analysis.routing_stats) and the
accuracy after training (label scoring on the suite's eval split). A diagnostics callback
records, at a few steps, the gradient norm of the router weights and of the shared B, ||B||, and
at the end how far the router weights moved from their init (relative Frobenius change).

    PYTHONPATH=src nice -n 10 python -m benchmarks.routing_remedies --steps 60 --out results/routing_remedies
    PYTHONPATH=src python -m benchmarks.routing_remedies --table results/routing_remedies   # print the table

Settings (``--only a,b`` runs a subset; each finished run writes <out>/<setting>.json):
    softmax       the paper's router, one learning rate for everything
    mean          uniform weights (the reference a learned router must beat)
    lr10, lr100   router learning rate x10, x100 (own optimizer parameter group)
    init10        router weights x10 at init (logit temperature 0.1)
    topk2         softmax on the top-2 logits
    balanced      Switch-style load-balancing loss, coefficient 0.01
    lr100_init10  both
    omega05       expert scales re-drawn as 1 + N(0, 0.5^2) (default std 0.1): experts distinct at init
    lr100_balanced, lr10_balanced   router lr x100 / x10 with the balance loss (coefficient 0.01)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.common import markdown_table
from mor.train.adapters import AdapterSpec
from mor.train import TrainConfig, run_training

SETTINGS = {
    "softmax": ({}, {}),
    "mean": ({"router": "mean"}, {}),
    "lr10": ({}, {"router_lr_multiplier": 10.0}),
    "lr100": ({}, {"router_lr_multiplier": 100.0}),
    "init10": ({}, {"router_init_scale": 10.0}),
    "topk2": ({"router": "topk", "top_k": 2}, {}),
    "balanced": ({"router": "balanced", "balance_coef": 0.01}, {}),
    "lr100_init10": ({}, {"router_lr_multiplier": 100.0, "router_init_scale": 10.0}),
    # experts made distinct at init: Omega = 1 + N(0, 0.5^2) instead of the default std 0.1
    # (the expert scales are re-drawn before step 1 by ExpertScaleInit; no eval, routing only)
    "omega05": ({}, {"evaluate": False}),
    # the mixture-of-experts combination: a fast router held back from collapse by the balance loss
    "lr100_balanced": ({"router": "balanced", "balance_coef": 0.01}, {"router_lr_multiplier": 100.0}),
    "lr10_balanced": ({"router": "balanced", "balance_coef": 0.01}, {"router_lr_multiplier": 10.0}),
}
EXPERT_SCALE_STD = {"omega05": 0.5}


class ExpertScaleInit(TrainerCallback):
    """Re-draws every expert scale vector (Omega_A, Omega_B) as 1 + N(0, std^2) before training."""

    def __init__(self, std: float, seed: int = 0):
        self.std, self.seed = std, seed

    def on_train_begin(self, args, state, control, model=None, **kw):
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "expert_scales" in name:
                    p.copy_(1.0 + self.std * torch.randn(p.shape, generator=g))
PROBE_STEPS = {1, 2, 5, 10, 20, 30, 40, 60, 80, 100}


class RouterDiagnostics(TrainerCallback):
    """Router vs shared-B gradient norms (after clipping) at a few steps; the router weights' relative movement."""

    def __init__(self):
        self.grads: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.moved: float | None = None

    @staticmethod
    def _params(model, key):
        return [(n, p) for n, p in model.named_parameters() if key in n and p.requires_grad]

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.initial = {n: p.detach().clone() for n, p in self._params(model, "router")}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        if step not in PROBE_STEPS:
            return

        def norm(ps):
            grads = [p.grad.float().norm() ** 2 for _, p in ps if p.grad is not None]
            return float(sum(grads) ** 0.5) if grads else 0.0

        router, lora_b = self._params(model, "router"), self._params(model, "lora_B")
        self.grads.append({"step": step, "router_grad_norm": norm(router), "lora_B_grad_norm": norm(lora_b),
                           "lora_B_norm": float(sum(p.detach().float().norm() ** 2 for _, p in lora_b) ** 0.5)})

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.initial:
            num = sum(float((p.detach() - self.initial[n]).norm() ** 2) for n, p in self._params(model, "router"))
            den = sum(float(t.norm() ** 2) for t in self.initial.values())
            self.moved = (num / den) ** 0.5


def run(name: str, steps: int, out: Path, base_dtype: str, batch_size: int = 8) -> dict:
    spec_kw, cfg_kw = SETTINGS[name]
    spec = AdapterSpec(method="mor", r=8, num_experts=8, **spec_kw)
    options = {"evaluate": True, **cfg_kw}
    cfg = TrainConfig(model=None, adapter=spec, output=str(Path("runs") / out.name / name),
                      max_steps=steps, batch_size=batch_size, lr=1e-3, logging_steps=10, save_steps=10 ** 6,
                      evaluate_before=False, builtin_eval_size=40, base_dtype=base_dtype,
                      routing_stats_steps=10, figures=False, **options)
    diag = RouterDiagnostics()
    extra = [ExpertScaleInit(EXPERT_SCALE_STD[name])] if name in EXPERT_SCALE_STD else []
    tic = time.perf_counter()
    result = run_training(cfg, callbacks=[*extra, diag])
    records = json.loads((Path(cfg.output) / "routing_stats.json").read_text())
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    row = {
        "setting": name, "adapter": spec.to_dict(), **{k: v for k, v in cfg_kw.items() if k != "evaluate"}, "steps": result.global_step, "batch_size": batch_size,
        "base_dtype": base_dtype,
        "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - tic,
        "eval_seconds": result.eval_seconds, "final_loss_logged": losses[-1] if losses else None,
        "acc": result.after and result.after["average"]["acc"],
        "acc_stderr": result.after and result.after["average"].get("acc_stderr"),
        "acc_tasks": result.after and {t: r["acc"] for t, r in result.after["tasks"].items()},
        "expert_scale_std": EXPERT_SCALE_STD.get(name, 0.1),
        "routing_first": result.routing_stats and result.routing_stats["first"],
        "routing_last": result.routing_stats and result.routing_stats["last"],
        "routing_over_steps": [{"step": r["step"], "entropy_bits": r["entropy_bits"], "jsd_bits": r["jsd_bits"],
                                "load_top_max": r["load_top_max"]} for r in records],
        "router_grads": diag.grads, "router_relative_change": diag.moved,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def table(rows: list[dict]) -> str:
    head = ("setting", "H start", "H end (bits)", "H/log2N", "top share", "JSD tasks (bits)", "router moved", "acc")
    lines = []
    for r in rows:
        first, last = r["routing_first"] or {}, r["routing_last"] or {}
        moved = r.get("router_relative_change")
        lines.append([
            r["setting"], f"{first.get('entropy_bits', float('nan')):.3f}", f"{last.get('entropy_bits', float('nan')):.3f}",
            f"{last.get('entropy_normalized', float('nan')):.3f}", f"{last.get('load_top_max', float('nan')):.3f}",
            f"{last.get('jsd_bits', float('nan')):.2g}", "-" if moved is None else f"{moved:.3g}",
            "-" if r["acc"] is None else f"{r['acc']:.3f} +- {r['acc_stderr'] or 0:.3f}"])
    return markdown_table(list(head), lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", default=",".join(SETTINGS))
    parser.add_argument("--base-dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/routing_remedies")
    parser.add_argument("--table", default=None, help="only print the table of the JSON files in this folder")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(p.read_text()) for p in sorted(Path(args.table).glob("*.json"))]
        order = list(SETTINGS)
        rows.sort(key=lambda r: order.index(r["setting"]) if r["setting"] in order else len(order))
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.only.split(","):
        rows.append(run(name, args.steps, Path(args.out), args.base_dtype, args.batch_size))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
