"""MoE-LoRA: N independent LoRA experts (A_i, B_i) of rank r mixed by the same router as MoR.

    o = W x + (alpha / r) * sum_i G_i(x) * B_i A_i x

computed, like MoR, as one expanded-rank product: codes = [A_1; ...; A_N] x  (..., N, r) and
B~ = [B_1, ..., B_N]  (d_out, N*r). It has N*r*(d_in + d_out) adapter parameters per layer
against MoR's r*(d_in + d_out) + N*(r + d_out), plus the router's d_in*N for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layer import MixtureLinear


class MoELoRALinear(MixtureLinear):
    """N independent rank-r LoRA experts with a softmax (or mean / balanced / top-k) router."""

    def __init__(self, base_layer: nn.Module, r: int, num_experts: int, alpha: float = 16.0,
                 dropout: float = 0.0, router: str = "softmax", top_k: int = 2,
                 generator: torch.Generator | None = None, **_unused):
        super().__init__(base_layer, r, num_experts, alpha, dropout, router, top_k)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **factory))  # A_i: (N, r, d_in)
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, r, **factory))  # B_i: (N, d_out, r)
        self.router.to(**factory)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Each A_i Kaiming-uniform as in LoRA, each B_i = 0: the layer starts as the base layer."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()
        self.router.reset_parameters(generator)

    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        down = self.lora_A.reshape(self.num_experts * self.r, self.in_features)  # (N*r, d_in)
        return (x @ down.T).unflatten(-1, (self.num_experts, self.r))  # (..., N, r)

    def stacked_up(self) -> torch.Tensor:
        return self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_experts * self.r)  # (d_out, N*r)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B
