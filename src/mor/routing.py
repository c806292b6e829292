"""Routers: the per-token expert weights G(x) in R^N of a MoR or MoE-LoRA adapter.

    softmax   G(x) = softmax(W_g x)                               (the paper's router)
    topk      softmax kept on the k largest logits, renormalised to sum to 1
    balanced  softmax; the model adds an auxiliary loss N * sum_i f_i * P_i that pushes towards an
              even load (f_i: share of tokens whose top expert is i, P_i: mean weight of expert i;
              the Switch-Transformer form, equal to 1 when the load is uniform)
    mean      G(x) = 1/N for every token (no parameters)

A router can be pinned to a fixed weight vector g (``fixed``): then every token gets g, which
is what makes the exact merge W' = W + sum_i g_i D_i possible.

Routing is measured one way: ``GateRecorder`` hooks the routers and sums their gates over the
real tokens; ``MoRModel.measure_routing`` reads a ``RoutingProfile`` off it, and
``mor.analysis.routing_stats`` adds entropy and load statistics on top of it.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError, DataError, MissingInput, SettingsError


class Router(nn.Module):
    """Maps inputs (..., d_in) to expert weights (..., N) that are >= 0 and sum to 1."""

    def __init__(self, in_features: int, num_experts: int, strategy: str = "softmax", top_k: int = 2, **factory):
        super().__init__()
        self.num_experts = num_experts
        self.strategy = strategy
        self.top_k = top_k
        # W_g: (N, d_in); the "mean" router has no parameters.
        self.weight = None if strategy == "mean" else nn.Parameter(torch.empty(num_experts, in_features, **factory))
        self.register_buffer("fixed", None, persistent=False)  # (N,) pinned routing, or None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.weight is not None:
            bound = 1.0 / math.sqrt(self.weight.shape[1])  # nn.Linear's default range
            values = torch.empty(self.weight.shape).uniform_(-bound, bound, generator=generator)
            with torch.no_grad():
                self.weight.copy_(values)

    def forward(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """G(x): (..., N). ``logits``: W_g x (..., N) in fp32 when the caller has it already (a MoR
        adapter at inference gets it from one product with A x)."""
        if self.fixed is not None:
            return self.fixed.to(x.dtype).expand(*x.shape[:-1], self.num_experts)
        if logits is None:
            if self.weight is None:
                return x.new_full((*x.shape[:-1], self.num_experts), 1.0 / self.num_experts)
            # fp32 whatever the activations' dtype, under autocast too (which would run this product in bf16):
            # the logits of N experts are cheap, bf16 ones are noisy (Switch Transformers' "selective precision")
            with torch.autocast(x.device.type, enabled=False) if autocast_enabled(x.device.type) \
                    else contextlib.nullcontext():
                logits = F.linear(x.float(), self.weight.float())  # W_g x: (..., N)
        probs = gates_from_logits(logits, self.strategy, self.top_k)
        return probs if probs.dtype == x.dtype else probs.to(x.dtype)

    def merge_routing(self) -> torch.Tensor:
        """The fixed weights (N,) a merge folds in: the pinned vector, or uniform for "mean"."""
        if self.fixed is not None:
            return self.fixed
        if self.weight is None:
            return torch.full((self.num_experts,), 1.0 / self.num_experts)
        raise SettingsError(
            "merging a learned router needs a fixed routing: model.merge_and_unload(routing=...) with "
            "routing=model.measure_routing(...) (a RoutingProfile), a weight vector of length num_experts, "
            "a saved routing_profile.json, or 'uniform'"
        )


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (torch < 2.4 has one function per device; a device
    autocast does not know, such as "meta", has none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:
        return False


def gates_from_logits(logits: torch.Tensor, strategy: str, top_k: int) -> torch.Tensor:
    """G(x) (..., N) from the router logits W_g x (..., N): their softmax, kept on the ``top_k``
    largest and renormalised for strategy "topk" (softmax and balanced are the plain softmax)."""
    probs = torch.softmax(logits, dim=-1)
    if strategy == "topk" and top_k < logits.shape[-1]:
        kept = torch.topk(logits, top_k, dim=-1).indices
        probs = probs * torch.zeros_like(probs).scatter_(-1, kept, 1.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def load_balancing_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss N * sum_i f_i P_i for router probabilities (T, N); for
    (L, T, N), the L layers' losses (L,) at once (a training step's layers in a few ops, not L times as many)."""
    num_experts = probs.shape[-1]
    top = probs.detach().argmax(dim=-1, keepdim=True)  # (..., T, 1)
    share = torch.zeros_like(probs).scatter_(-1, top, 1.0).mean(dim=-2)  # f_i: (..., N)
    mean_prob = probs.mean(dim=-2)  # P_i: (..., N)
    return num_experts * (share * mean_prob).sum(dim=-1)


def mean_balancing_loss(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over layers of :func:`load_balancing_loss` of each layer's router probabilities (T, N),
    in fp32; the layers stacked into one computation when they routed the same tokens (a decoder's do)."""
    gates = [g.float() for g in gates]
    if all(g.shape == gates[0].shape for g in gates):
        return load_balancing_loss(torch.stack(gates)).mean()
    return torch.stack([load_balancing_loss(g) for g in gates]).mean()


# -- routing profiles ------------------------------------------------------------------------

@dataclass
class RoutingProfile:
    """Fixed routing for every mixture layer: layer name -> expert weights g (N,), summing to 1.

    Measured as the mean router output over a task's tokens (``measure_routing``); with it,
    W' = W + sum_i g_i D_i is an exact merge. Layer names are relative to the transformers model.
    """

    weights: dict[str, torch.Tensor]

    def mean(self) -> torch.Tensor:
        """Expert weights averaged over layers: (N,)."""
        return torch.stack(list(self.weights.values())).mean(dim=0)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the profile as JSON ``{layer name: [g_1, ..., g_N]}`` (atomically)."""
        from .safety import atomic_write_text

        return atomic_write_text(path, json.dumps({k: v.tolist() for k, v in self.weights.items()}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RoutingProfile":
        """The profile a ``save`` wrote (the one reader of routing_profile.json files)."""
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"routing profile not found: {path} (give a routing_profile.json or 'uniform')")
        try:
            data = json.loads(path.read_text())
            return cls({k: torch.tensor(v, dtype=torch.float32) for k, v in data.items()})
        except json.JSONDecodeError as err:
            raise AdapterError(f"{path} is not a routing profile (invalid JSON: {err})") from err
        except (AttributeError, TypeError, ValueError) as err:
            raise AdapterError(f"{path} is not a routing profile ({err})") from err


class GateSums:
    """The gates of one router summed over the real tokens it saw: ``gate_sum`` (N,), ``tokens``.
    Summed in float64 (float32 on MPS, which has no float64) on the gates' device."""

    def __init__(self):
        self.gate_sum: torch.Tensor | None = None  # (N,), after the first add
        self.tokens = 0

    def add(self, gates: torch.Tensor) -> None:
        """Add gates (T, N) of T real tokens."""
        total = gates.to(torch.float32 if gates.device.type == "mps" else torch.float64).sum(0)  # (N,)
        self.gate_sum = total if self.gate_sum is None else self.gate_sum + total
        self.tokens += gates.shape[0]

    def mean(self) -> torch.Tensor:
        """The mean gate g (N,) over the tokens, float32 on the CPU."""
        return (self.gate_sum / self.tokens).float().cpu()


class GateRecorder:
    """Context manager: a forward hook on every router of ``routers`` ({layer name: router}) adds
    its gates G(x) over the batch's real tokens to the sums of the current ``task``. Before each
    forward, set ``mask`` to the batch's attention mask (None: every token is real) and, to
    separate tasks, ``task``. ``sums[task][layer]`` is an ``accumulator`` (``GateSums``, or a
    subclass that keeps more statistics)."""

    accumulator = GateSums

    def __init__(self, routers: Mapping[str, nn.Module]):
        self.routers = dict(routers)
        self.task: str = "all"
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, dict[str, GateSums]] = {}  # task -> layer -> sums
        self._handles = []

    def __enter__(self) -> "GateRecorder":
        self._handles = [router.register_forward_hook(self._hook(name)) for name, router in self.routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(_router, _inputs, gates):
            flat = gates.detach().reshape(-1, gates.shape[-1])  # (T, N)
            if self.mask is not None:
                keep = self.mask.reshape(-1).to(flat.device).bool()
                if keep.numel() != flat.shape[0]:
                    raise DataError(f"routing: the attention mask covers {keep.numel()} tokens but router {name} "
                                    f"saw {flat.shape[0]}; set the recorder's mask to the batch's attention mask")
                flat = flat[keep]
            self.sums.setdefault(self.task, {}).setdefault(name, self.accumulator()).add(flat)
        return hook

    def tokens(self, task: str = "all") -> int:
        """Real tokens routed for ``task`` (0 if none)."""
        layers = self.sums.get(task, {})
        return next(iter(layers.values())).tokens if layers else 0

    def profile(self, task: str = "all") -> RoutingProfile:
        """The routing profile of ``task``: every layer's mean gate over the task's real tokens."""
        if not self.tokens(task):
            raise DataError(f"no tokens were routed for {task!r} while recording; run a forward pass on "
                            "inputs with tokens")
        return RoutingProfile({layer: sums.mean() for layer, sums in self.sums[task].items()})


ROUTING_NAME = "routing_profile.json"  # a profile saved next to what it made
Routing = Union[RoutingProfile, torch.Tensor, Mapping[str, torch.Tensor], str, None]


# -- resolving a routing for every layer --------------------------------------------------------------------------------------

def resolve_routing(layers: Mapping[str, nn.Module], routing: Routing) -> dict[str, torch.Tensor]:
    """Per-layer routing weights g (N,) in fp32 for every layer of ``layers``.

    ``routing``: a ``RoutingProfile`` (anything with a ``weights`` mapping), a mapping
    {layer name: weights}, one vector (N,) for every layer, "uniform", or a path to a saved
    ``routing_profile.json``. A key may carry a wrapper prefix (``base_model.model.``): it
    matches the layer whose name it ends with.
    """
    if isinstance(routing, (str, Path)):
        if str(routing) == "uniform":
            return {name: torch.full((layer.num_experts,), 1.0 / layer.num_experts) for name, layer in layers.items()}
        routing = RoutingProfile.load(routing)
    if isinstance(routing, RoutingProfile):
        routing = routing.weights
    if isinstance(routing, torch.Tensor):
        routing = {name: routing for name in layers}
    resolved, missing = {}, []
    for name, layer in layers.items():
        key = name if name in routing else next((k for k in routing if k.endswith("." + name)), None)
        if key is None:
            missing.append(name)
            continue
        g = torch.as_tensor(routing[key], dtype=torch.float32).reshape(-1)
        if g.numel() != layer.num_experts:
            raise AdapterError(f"routing for {name} has {g.numel()} weights; the layer has "
                               f"num_experts={layer.num_experts}")
        if not torch.isfinite(g).all():
            raise AdapterError(f"routing for {name} holds NaN or inf ({g.tolist()}); a profile measured on NaN "
                               "outputs is no routing: measure it again (mor merge/export-lora --data) or pass 'uniform'")
        resolved[name] = g
    if missing:
        raise AdapterError(f"the routing profile has no weights for {len(missing)} layers, e.g. {missing[:3]}; "
                           "measure it on this adapter (mor merge/export-lora --data) or pass 'uniform'")
    return resolved
