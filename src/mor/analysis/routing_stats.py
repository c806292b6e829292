"""Routing made visible: per-layer routing statistics measured with forward hooks on the routers.

For a router's gates G(x) in R^N over the real (non-padding) tokens of a probe set:

    entropy      mean over tokens of H(G(x)) = -sum_i G_i log2 G_i      (bits; log2 N = uniform)
    load_top     share of tokens whose top expert is i (a tie splits the token evenly, so a
                 uniform router shows 1/N each)                           (N,), sums to 1
    load_mean    mean gate of expert i                                   (N,), sums to 1
    jsd          generalised Jensen-Shannon divergence of the tasks' mean gates, equal weights:
                 H(mean_t g_t) - mean_t H(g_t)                            (bits; 0 = tasks route alike)

The routers are observed through the method's one routing measurement
(``mor.routing.GateRecorder``: forward hooks, hook output = the gates, shape (..., N)), so this
module reads the routing without touching the layer or the router. ``RoutingStatsCallback``
measures the statistics during training on a small fixed probe set per task, logs the layer
averages to the trainer's log (tensorboard), and appends one record per measurement to
``routing_stats.json``; ``mor analyze`` draws them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from transformers import TrainerCallback

from ..layer import find_routers
from ..routing import GateRecorder, GateSums
from ..safety import atomic_write_text
from ..errors import AdapterError

STATS_NAME = "routing_stats.json"


# -- pure statistics ---------------------------------------------------------------------------

def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits along the last dimension (0 log 0 = 0)."""
    p = p.double()
    return -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(-1)


def js_divergence(dists: torch.Tensor) -> float:
    """Generalised Jensen-Shannon divergence (bits) of T distributions (T, N), equal weights:
    H(mean) - mean H. For two distributions this is the usual JSD, in [0, 1]."""
    dists = torch.as_tensor(dists).double()
    return max(float(entropy_bits(dists.mean(0)) - entropy_bits(dists).mean()), 0.0)


def token_entropy_bits(gates: torch.Tensor) -> float:
    """Mean per-token routing entropy (bits) of gates (T, N)."""
    return float(entropy_bits(gates.reshape(-1, gates.shape[-1])).mean())


def expert_load(gates: torch.Tensor) -> dict[str, list[float]]:
    """``{"top": share of tokens whose top expert is i, "mean": mean gate of expert i}`` for gates (T, N)."""
    flat = gates.reshape(-1, gates.shape[-1]).double()
    top = top_expert_share(flat).sum(0) / max(flat.shape[0], 1)
    return {"top": top.tolist(), "mean": flat.mean(0).tolist()}


def top_expert_share(gates: torch.Tensor) -> torch.Tensor:
    """(T, N): 1 for each token's top expert, ties split evenly (rows sum to 1)."""
    top = (gates == gates.max(-1, keepdim=True).values).double()
    return top / top.sum(-1, keepdim=True)


# -- measuring with hooks ------------------------------------------------------------------------

class _Accumulator(GateSums):
    """Per-layer sums over the real tokens of one task: gates (``GateSums``), entropies and
    top-expert counts, in float64 on the CPU."""

    def __init__(self):
        super().__init__()
        self.top_count: torch.Tensor | float = 0.0  # (N,) after the first add
        self.entropy_sum = 0.0

    def add(self, gates: torch.Tensor) -> None:  # gates (T, N), real tokens only
        gates = gates.cpu().double()
        super().add(gates)
        self.top_count = self.top_count + top_expert_share(gates).sum(0)
        self.entropy_sum += float(entropy_bits(gates).sum())


class RoutingRecorder(GateRecorder):
    """The routing recorder of the method (``mor.routing.GateRecorder``: hooks every router of
    ``model``, sums the gates per task and layer; ``profile(task)`` is what
    ``MoRModel.measure_routing`` returns for the same batches), keeping entropies and top-expert
    counts as well for :meth:`summary`. Set ``task`` and ``mask`` before each forward."""

    accumulator = _Accumulator

    def __init__(self, model: nn.Module):
        routers = find_routers(model)
        if not routers:
            raise AdapterError("the model has no router (mor.routing.Router): routing statistics need a MoR or "
                                 "MoE-LoRA adapter")
        super().__init__(routers)

    def gate_means(self) -> dict[str, dict[str, list[float]]]:
        """Per task and layer, the mean gate over the task's real tokens (N values)."""
        return {task: {layer: (acc.gate_sum / max(acc.tokens, 1)).tolist() for layer, acc in layers.items()}
                for task, layers in self.sums.items()}

    def summary(self) -> dict:
        """Statistics per layer (over all tasks' tokens) and per task, plus their layer averages."""
        if not self.sums:
            raise RuntimeError("no tokens were routed while recording; run at least one forward pass")
        tasks = list(self.sums)
        layers = list(self.sums[tasks[0]])
        per_layer = {}
        for layer in layers:
            accs = [self.sums[t][layer] for t in tasks]
            tokens = sum(a.tokens for a in accs)
            task_means = torch.stack([a.gate_sum / max(a.tokens, 1) for a in accs])  # (T, N)
            per_layer[layer] = {
                "entropy_bits": sum(a.entropy_sum for a in accs) / max(tokens, 1),
                "jsd_bits": js_divergence(task_means) if len(tasks) > 1 else 0.0,
                "load_top": (sum(a.top_count for a in accs) / max(tokens, 1)).tolist(),
                "load_mean": (sum(a.gate_sum for a in accs) / max(tokens, 1)).tolist(),
            }
        num_experts = len(per_layer[layers[0]]["load_top"])
        per_task = {t: {"entropy_bits": _mean(self.sums[t][l].entropy_sum / max(self.sums[t][l].tokens, 1)
                                              for l in layers),
                        "tokens": self.sums[t][layers[0]].tokens} for t in tasks}
        uniform = math.log2(num_experts) if num_experts > 1 else 0.0
        entropy = _mean(v["entropy_bits"] for v in per_layer.values())
        return {
            "num_experts": num_experts,
            "uniform_entropy_bits": uniform,
            "entropy_bits": entropy,
            "entropy_normalized": entropy / uniform if uniform else 1.0,
            "jsd_bits": _mean(v["jsd_bits"] for v in per_layer.values()),
            "load_top_max": _mean(max(v["load_top"]) for v in per_layer.values()),
            "tasks": per_task,
            "layers": per_layer,
        }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def measure_routing_stats(model: nn.Module, probes: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
                          gate_means: bool = False) -> dict:
    """Routing statistics of ``model`` on ``probes`` ({task: [batches with input_ids, attention_mask]}),
    in eval mode without gradients; the model's train/eval mode is restored afterwards.
    ``gate_means`` adds each task's mean gate per layer under ``["tasks"][task]["gate_mean"]``."""
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model) as recorder:
            device = next(model.parameters()).device
            for task, batches in probes.items():
                recorder.task = task
                for batch in batches:
                    mask = batch.get("attention_mask")
                    recorder.mask = mask
                    model(input_ids=batch["input_ids"].to(device),
                          attention_mask=None if mask is None else mask.to(device))
        summary = recorder.summary()
        if gate_means:
            for task, means in recorder.gate_means().items():
                summary["tasks"][task]["gate_mean"] = means
        return summary
    finally:
        model.train(was_training)


def probe_batches(texts: Mapping[str, Sequence[str]], tokenizer, max_length: int = 256,
                  batch_size: int = 8) -> dict[str, list[dict]]:
    """Tokenised, right-padded probe batches per task from ``{task: [texts]}``."""
    out = {}
    for task, items in texts.items():
        items = list(items)
        out[task] = [dict(tokenizer(items[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                    max_length=max_length)) for i in range(0, len(items), batch_size)]
    return out


# -- during training -----------------------------------------------------------------------------

SCALARS = ("entropy_bits", "entropy_normalized", "jsd_bits", "load_top_max")


class RoutingStatsCallback(TrainerCallback):
    """Every ``every`` optimiser steps (and at step 0 and the last step) measures the routing
    statistics on a fixed probe set, puts the layer averages into the trainer's next log
    (``routing/<stat>``: tensorboard and the console), writes per-layer scalars to tensorboard
    when it is on, and appends the full record to ``path`` (JSON list, rewritten each time)."""

    def __init__(self, probes: Mapping[str, Sequence[Mapping[str, torch.Tensor]]], path: Union[str, Path],
                 every: int):
        if every < 1:
            raise ValueError(f"routing stats interval must be >= 1 step, got {every}")
        self.probes = probes
        self.path = Path(path)
        self.every = every
        self.records: list[dict] = []
        self.pending: dict[str, float] = {}  # scalars for the trainer's next log
        self.trainer = None  # set by attach(): where to find the tensorboard writer

    def attach(self, trainer) -> "RoutingStatsCallback":
        self.trainer = trainer
        return self

    def measure(self, model, step: int, write: bool = True) -> dict:
        """The statistics at ``step``; ``write``: keep, save and log them (rank 0 of a run)."""
        record = {"step": step, **measure_routing_stats(model, self.probes)}
        if not write:
            return record
        self.records = [r for r in self.records if r["step"] != step] + [record]
        atomic_write_text(self.path, json.dumps(self.records) + "\n")
        self.pending = {f"routing/{k}": round(record[k], 6) for k in SCALARS}
        self._tensorboard(record)
        return record

    def _tensorboard(self, record: dict) -> None:
        writer = None
        for cb in getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []):
            writer = getattr(cb, "tb_writer", None) or writer
        if writer is None or not Path(writer.log_dir).is_dir():  # the folder vanished: the trainer's next log
            return                                                # starts a new writer (train.trainer)
        for layer, stats in record["layers"].items():
            short = _short(layer)
            writer.add_scalar(f"routing_layers/entropy_bits/{short}", stats["entropy_bits"], record["step"])
            writer.add_scalar(f"routing_layers/jsd_bits/{short}", stats["jsd_bits"], record["step"])
            writer.add_scalar(f"routing_layers/load_top_max/{short}", max(stats["load_top"]), record["step"])

    def pop_scalars(self) -> dict[str, float]:
        scalars, self.pending = self.pending, {}
        return scalars

    # Every process measures at the same steps (under FSDP / ZeRO-3 the forward pass is a collective
    # that gathers the sharded parameters, so rank 0 alone would wait for the others forever); only
    # rank 0 keeps, writes and logs the records.
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        zero = state.is_world_process_zero
        if zero and not self.records and self.path.is_file():  # a resumed run: keep the records up to its checkpoint
            self.records = [r for r in load_stats(self.path) if r["step"] <= state.global_step]
        if model is not None:  # (a resumed run measures its checkpoint's step again: the same weights, the same record)
            self.measure(model, state.global_step, write=zero)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        last = state.max_steps and state.global_step >= state.max_steps
        if model is not None and (state.global_step % self.every == 0 or last):
            self.measure(model, state.global_step, write=state.is_world_process_zero)
        return control

    def summary(self) -> dict | None:
        """First and last record's layer averages (for the run's result.json)."""
        if not self.records:
            return None
        first, last = self.records[0], self.records[-1]
        return {"file": self.path.name, "records": len(self.records),
                "first": {"step": first["step"], **{k: first[k] for k in SCALARS}},
                "last": {"step": last["step"], **{k: last[k] for k in SCALARS}}}


def _short(name: str) -> str:
    parts = name.split(".")
    idx = next((p for p in parts if p.isdigit()), None)
    return f"{idx}.{parts[-1]}" if idx is not None else ".".join(parts[-2:])


def load_stats(path: Union[str, Path]) -> list[dict]:
    """The per-step records of a run: ``routing_stats.json`` itself or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_NAME
    return json.loads(path.read_text())
