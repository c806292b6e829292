"""Training cost per step of each arm, measured honestly: every arm's model lives in one process and
the arms take turns, step by step, for ``rounds`` rounds (a shared machine slows them alike); each
round's time is divided by the reference arm's in the same round, and the median of those ratios
(with its IQR) is reported -- never wall time of runs that ran beside other jobs. A second copy of
the reference gives the noise floor. A step is forward + backward and the optimizer step the run's
Trainer builds (its router groups included), timed apart, on batches drawn as the training draws
them (all tasks mixed; each round a new batch, the same for every arm).

The optimizer is also timed alone under each of torch's AdamW implementations (for-loop, foreach,
fused) on the same gradients: an adapter with many small tensors (MoR's per-expert vectors) pays a
per-tensor overhead that the multi-tensor implementations remove."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..errors import PlanError
from ..safety import atomic_write_text
from .plan import Plan, match_budget

ADAMW = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _batches(plan: Plan, tokenizer, splits, count: int) -> list[dict]:
    """``count`` training batches of the plan's size drawn as its training draws them: every train
    task's examples together, shuffled (seed 0), grouped by length when the plan's training is,
    so that lengths and padding are the mix's."""
    import random

    from ..data import collate, tokenize_examples, training_examples

    examples = [e for task in splits.train.values()
                for e in training_examples(task, target=plan.train.get("target", "output"), tokenizer=tokenizer)]
    random.Random(0).shuffle(examples)
    size = int(plan.train.get("batch_size", 8))
    tokenized = list(tokenize_examples(examples, tokenizer, int(plan.train.get("max_length", 256))).features)
    if plan.train.get("group_by_length"):  # as transformers' LengthGroupedSampler: megabatches of 50, longest first
        mega = 50 * size
        tokenized = [f for i in range(0, len(tokenized), mega)
                     for f in sorted(tokenized[i:i + mega], key=lambda f: -len(f["input_ids"]))]
    starts = range(0, len(tokenized) - size + 1, size)  # the batches in training order; every k-th of them,
    batches = [collate([dict(f) for f in tokenized[b:b + size]], tokenizer.pad_token_id)  # the lengths' whole spread
               for b in starts[:: max(1, len(starts) // count)][:count]]
    if not batches:
        raise PlanError(f"plan {plan.name}: fewer training examples ({len(examples)}) than one batch ({size})")
    return [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in batches]


def _run_optimizer(cfg, model):
    """The optimizer the run's Trainer builds (``optim`` default, router groups) for ``model``."""
    from ..train.trainer import AdapterTrainer, training_arguments

    trainer = AdapterTrainer(model=model, args=training_arguments(cfg))
    trainer.router_lr_multiplier = cfg.router_lr_multiplier
    return trainer.create_optimizer(), trainer.args.optim


def _interleaved(contenders: dict, run, rounds: int, warmup: int, log, what: str,
                 batches: list | None = None) -> dict[str, list]:
    """``run(contender, batch)`` for every contender, taking turns (who goes first rotates), every
    contender on the round's batch (``batches[round]`` cycled; None without batches); the results
    of the rounds after ``warmup``."""
    out = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        order = list(contenders)
        batch = batches[r % len(batches)] if batches else None
        for name in order[r % len(order):] + order[:r % len(order)]:
            result = run(contenders[name], batch)
            if r >= warmup:
                out[name].append(result)
        log(f"cost: {what} round {r + 1}/{warmup + rounds}")
    return out


def ratio_row(times: list[float], reference: list[float]) -> dict:
    """Median and IQR of the per-round ratios ``times[i] / reference[i]``, median seconds."""
    ratios = [a / b for a, b in zip(times, reference)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return dict(ratio=statistics.median(ratios), iqr=[q[0], q[2]], seconds=statistics.median(times))


def reference_arm(plan: Plan) -> str:
    """The arm every other is timed against: the plan's first LoRA arm, else its first arm."""
    return next((name for name, arm in plan.arms.items() if arm.adapter.get("method") == "lora"), next(iter(plan.arms)))


def build_contenders(plan: Plan, batch_count: int, log=print) -> tuple[dict, list[dict], str]:
    """Every arm's model and optimizer built as a training builds them (base dtype, router init, the
    Trainer's optimizer with its router groups), in train mode, plus a second copy of the reference
    arm ("noise floor"); ``batch_count`` training batches (see ``_batches``); the optimizer's name."""
    from ..runtime.loading import load_model, load_tokenizer
    from ..train import TrainConfig
    from ..train.recipe import setup_model
    from .runner import Worker

    worker = Worker(plan, log=log)
    tokenizer = load_tokenizer(plan.model)
    batches = _batches(plan, tokenizer, worker.splits, batch_count)
    match_budget(plan, load_model(plan.model))
    reference = reference_arm(plan)
    contenders = dict(plan.arms, **{"noise floor": plan.arms[reference]})
    built, optim = {}, None
    for name, arm in contenders.items():
        lr = plan.arm_grid(arm)[0]
        cfg = TrainConfig.from_dict(worker.train_config(arm, lr, 0, plan.steps(), plan.work_dir() / "cost"))
        model, _ = setup_model(cfg)
        model.train()
        optimizer, optim = _run_optimizer(cfg, model)
        built[name] = (model, optimizer)
    return built, batches, optim


def training_step(pair, batch) -> tuple[float, float]:
    """One step of a (model, optimizer) pair on ``batch``: (forward + backward, optimizer) seconds."""
    model, optimizer = pair
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(**batch).loss.backward()
    middle = time.perf_counter()
    optimizer.step()
    return middle - start, time.perf_counter() - middle


def measure_cost(plan: Plan, rounds: int = 20, warmup: int = 3, log=print, optimizers: bool = True) -> dict:
    """Interleaved step times of every arm against the reference (the plan's first LoRA arm, else its
    first arm); with ``optimizers``, also every AdamW implementation on the last step's gradients."""
    import torch

    from .runner import _machine

    built, batches, optim = build_contenders(plan, warmup + rounds, log)
    reference = reference_arm(plan)
    contenders = dict(plan.arms, **{"noise floor": plan.arms[reference]})
    times = _interleaved(built, training_step, rounds, warmup, log, "training step", batches)
    total = {name: [f + o for f, o in t] for name, t in times.items()}
    forward_backward = {name: [f for f, _ in t] for name, t in times.items()}
    optimizer_only = {name: [o for _, o in t] for name, t in times.items()}

    def row(name: str) -> dict:
        model, optimizer = built[name]
        arm = contenders[name]
        return dict(arm=name, label=arm.label or name, **ratio_row(total[name], total[reference]),
                    forward_backward=ratio_row(forward_backward[name], forward_backward[reference]),
                    optimizer=ratio_row(optimizer_only[name], optimizer_only[reference]),
                    tensors=sum(len(g["params"]) for g in optimizer.param_groups),
                    parameters=sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
                    lrs=sorted({g["lr"] for g in optimizer.param_groups}), implementation=_implementation(optimizer))

    shapes = [tuple(b["input_ids"].shape) for b in batches]
    cost = dict(reference=plan.arms[reference].label or reference, rounds=rounds,
                batch=[shapes[0][0], statistics.median(s[1] for s in shapes), max(s[1] for s in shapes)],
                optim=optim, noise_floor=row("noise floor")["ratio"], arms=[row(name) for name in plan.arms],
                machine=_machine())
    if not optimizers:
        return cost
    # the same gradients (the last backward's), every AdamW implementation, interleaved
    variants = {(name, impl): torch.optim.AdamW([{k: g[k] for k in ("params", "lr", "betas", "eps", "weight_decay")}
                                                 for g in built[name][1].param_groups], **kwargs)
                for name in plan.arms for impl, kwargs in ADAMW.items()}
    seconds = _interleaved(variants, lambda opt, _: _timed(opt.step), rounds, warmup, log, "optimizer")
    adamw = [dict(arm=name, label=plan.arms[name].label or name, implementation=impl,
                  **ratio_row(seconds[(name, impl)], seconds[(reference, impl)]))
             for name in plan.arms for impl in ADAMW]
    return dict(cost, adamw=adamw)


def _implementation(optimizer) -> str:
    """Which of ``ADAMW`` an optimizer runs."""
    return "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "for-loop"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_cost(plan: Plan, rounds: int = 20, log=print) -> Path:
    cost = measure_cost(plan, rounds=rounds, log=log)
    path = plan.results_dir() / "cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(cost, indent=1) + "\n")
