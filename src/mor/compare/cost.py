"""Training cost per step of each arm, measured honestly: every arm's model lives in one process and
the arms take turns, step by step, for ``rounds`` rounds (a shared machine slows them alike); each
round's step time is divided by the reference arm's in the same round, and the median of those
ratios (with its IQR) is reported -- never wall time of runs that ran beside other jobs. A second
copy of the reference gives the noise floor. Steps are forward, backward and AdamW on one real
batch of the plan's size."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..safety import atomic_write_text
from .plan import Plan, match_budget


def _batch(plan: Plan, tokenizer, splits) -> dict:
    """One training batch of the plan's size from its first task's train records."""
    from ..data import collate, tokenize_examples, training_examples

    task = next(iter(splits.train.values()))
    examples = training_examples(task, target=plan.train.get("target", "output"), tokenizer=tokenizer)
    tokenized = tokenize_examples(examples[: int(plan.train.get("batch_size", 8))], tokenizer,
                                  int(plan.train.get("max_length", 256)))
    batch = collate([dict(f) for f in tokenized.features], tokenizer.pad_token_id)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def measure_cost(plan: Plan, rounds: int = 20, warmup: int = 3, log=print) -> dict:
    """Interleaved step times of every arm against the reference (LoRA when the plan has it)."""
    import torch

    from ..runtime.loading import load_model, load_tokenizer
    from ..train import TrainConfig
    from ..train.recipe import setup_model
    from .runner import Worker, _machine

    worker = Worker(plan, log=log)
    tokenizer = load_tokenizer(plan.model)
    batch = _batch(plan, tokenizer, worker.splits)
    match_budget(plan, load_model(plan.model))
    reference = "lora" if "lora" in plan.arms else next(iter(plan.arms))
    contenders = dict(plan.arms, **{"noise floor": plan.arms[reference]})
    models = {}
    for name, arm in contenders.items():  # built as a training builds it (base dtype, router init)
        lr = plan.arm_grid(arm)[0]
        cfg = TrainConfig.from_dict(worker.train_config(arm, lr, 0, plan.steps(), plan.work_dir() / "cost"))
        model, _ = setup_model(cfg)
        model.train()
        models[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr))

    def step(model, optimizer) -> float:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {name: [] for name in models}
    for r in range(warmup + rounds):
        order = list(models)
        order = order[r % len(order):] + order[:r % len(order)]  # who goes first rotates
        for name in order:
            t = step(*models[name])
            if r >= warmup:
                times[name].append(t)
        log(f"cost round {r + 1}/{warmup + rounds}")
    ratios = {name: [a / b for a, b in zip(times[name], times[reference])] for name in models}

    def row(name: str, label: str) -> dict:
        q = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) >= 2 else [ratios[name][0]] * 3
        return dict(arm=name, label=label, ratio=statistics.median(ratios[name]), iqr=[q[0], q[2]],
                    seconds=statistics.median(times[name]))

    arms = [row(name, arm.label or name) for name, arm in plan.arms.items()]
    return dict(reference=plan.arms[reference].label or reference, rounds=rounds, batch=list(batch["input_ids"].shape),
                noise_floor=row("noise floor", "noise floor")["ratio"], arms=arms, machine=_machine())


def write_cost(plan: Plan, rounds: int = 20, log=print) -> Path:
    cost = measure_cost(plan, rounds=rounds, log=log)
    path = plan.results_dir() / "cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(cost, indent=1) + "\n")
