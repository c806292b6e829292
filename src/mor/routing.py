"""Routers: the per-token expert weights G(x) in R^N of a MoR or MoE-LoRA adapter.

    softmax   G(x) = softmax(W_g x)                               (the paper's router)
    topk      softmax kept on the k largest logits, renormalised to sum to 1
    balanced  softmax; the model adds an auxiliary loss N * sum_i f_i * P_i that pushes towards an
              even load (f_i: share of tokens whose top expert is i, P_i: mean weight of expert i;
              the Switch-Transformer form, equal to 1 when the load is uniform)
    mean      G(x) = 1/N for every token (no parameters)

A router can be pinned to a fixed weight vector g (``fixed``): then every token gets g, which
is what makes the exact merge W' = W + sum_i g_i D_i possible.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.fixed is not None:
            return self.fixed.to(x.dtype).expand(*lead, self.num_experts)
        if self.weight is None:
            return x.new_full((*lead, self.num_experts), 1.0 / self.num_experts)
        # fp32 whatever the activations' dtype: softmax over a few logits is cheap, bf16 logits are noisy
        logits = x.float() @ self.weight.float().T  # (..., N)
        probs = torch.softmax(logits, dim=-1)
        if self.strategy == "topk" and self.top_k < self.num_experts:
            kept = torch.topk(logits, self.top_k, dim=-1).indices
            probs = probs * torch.zeros_like(probs).scatter_(-1, kept, 1.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs.to(x.dtype)

    def merge_routing(self) -> torch.Tensor:
        """The fixed weights (N,) a merge folds in: the pinned vector, or uniform for "mean"."""
        if self.fixed is not None:
            return self.fixed
        if self.weight is None:
            return torch.full((self.num_experts,), 1.0 / self.num_experts)
        raise ValueError(
            "merging a learned router needs a fixed routing: model.merge_and_unload(routing=...) with "
            "routing=model.measure_routing(...) (a RoutingProfile), a weight vector of length num_experts, "
            "a saved routing_profile.json, or 'uniform'"
        )


def load_balancing_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss N * sum_i f_i P_i for router probabilities (T, N)."""
    num_experts = probs.shape[-1]
    top = probs.argmax(dim=-1)  # (T,)
    share = torch.bincount(top, minlength=num_experts).to(probs.dtype) / max(top.numel(), 1)  # f_i
    mean_prob = probs.mean(dim=0)  # P_i
    return num_experts * (share * mean_prob).sum()
