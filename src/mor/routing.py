"""Routers: the per-token expert weights G(x) in R^N of a MoR or MoE-LoRA layer.

    softmax   G(x) = softmax(W_g x)                               (the paper's router)
    topk      softmax kept on the k largest logits, renormalised to sum to 1
    balanced  softmax, plus an auxiliary loss N * sum_i f_i * P_i that pushes towards an even
              load (f_i: share of tokens whose top expert is i, P_i: mean weight of expert i;
              the Switch-Transformer form, equal to 1 when the load is uniform)
    mean      G(x) = 1/N for every token (no parameters)

A router can also be pinned to a fixed weight vector g (``fixed``): then every token gets g,
which is what makes the exact merge W' = W + sum_i g_i D_i possible.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Router(nn.Module):
    """Maps inputs (..., d_in) to expert weights (..., N) that are >= 0 and sum to 1."""

    def __init__(self, in_features: int, num_experts: int, strategy: str = "softmax", top_k: int = 2):
        super().__init__()
        self.num_experts = num_experts
        self.strategy = strategy
        self.top_k = top_k
        # W_g: (N, d_in); the "mean" router has no parameters.
        self.weight = None if strategy == "mean" else nn.Parameter(torch.empty(num_experts, in_features))
        self.register_buffer("fixed", None, persistent=False)  # (N,) pinned routing, or None
        self.aux_loss: torch.Tensor | None = None  # load-balancing loss of the last forward
        self._token_mask: torch.Tensor | None = None  # (...,) set while measuring a profile
        self._profile_sum: torch.Tensor | None = None
        self._profile_count = 0
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
            gates = self.fixed.to(x.dtype).expand(*lead, self.num_experts)
        elif self.weight is None:
            gates = x.new_full((*lead, self.num_experts), 1.0 / self.num_experts)
        else:
            # The router runs in fp32 whatever the activations' dtype: softmax over a few logits
            # is cheap and bf16 logits make the routing noisy.
            logits = x.float() @ self.weight.float().T  # (..., N)
            probs = torch.softmax(logits, dim=-1)
            if self.strategy == "topk" and self.top_k < self.num_experts:
                kept = torch.topk(logits, self.top_k, dim=-1).indices
                mask = torch.zeros_like(probs).scatter_(-1, kept, 1.0)
                probs = probs * mask
                probs = probs / probs.sum(dim=-1, keepdim=True)
            if self.strategy == "balanced" and self.training:
                self.aux_loss = load_balancing_loss(probs.reshape(-1, self.num_experts))
            gates = probs.to(x.dtype)
        if self._token_mask is not None:
            self._accumulate_profile(gates)
        return gates

    # -- routing profiles (mean weight per expert over real tokens) ---------------------------
    def start_profile(self) -> None:
        self._profile_sum = None
        self._profile_count = 0

    def _accumulate_profile(self, gates: torch.Tensor) -> None:
        mask = self._token_mask.to(gates.device, torch.float32).reshape(-1, 1)  # (T, 1)
        flat = gates.detach().float().reshape(-1, self.num_experts)  # (T, N)
        if mask.shape[0] != flat.shape[0]:
            raise ValueError(
                f"routing profile: the attention mask covers {mask.shape[0]} tokens but the layer saw "
                f"{flat.shape[0]}; pass the same batch to the model that the mask belongs to"
            )
        total = (flat * mask).sum(dim=0)
        self._profile_sum = total if self._profile_sum is None else self._profile_sum + total
        self._profile_count += int(mask.sum().item())

    def profile(self) -> torch.Tensor:
        """Mean routing weights (N,) over every real token seen since ``start_profile``."""
        if not self._profile_count:
            raise RuntimeError("no tokens were routed while measuring; give at least one non-empty input")
        return (self._profile_sum / self._profile_count).cpu()


def load_balancing_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss N * sum_i f_i P_i for router probabilities (T, N)."""
    num_experts = probs.shape[-1]
    top = probs.argmax(dim=-1)  # (T,)
    share = torch.bincount(top, minlength=num_experts).to(probs.dtype) / max(top.numel(), 1)  # f_i
    mean_prob = probs.mean(dim=0)  # P_i
    return num_experts * (share * mean_prob).sum()
