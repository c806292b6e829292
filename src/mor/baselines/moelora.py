"""MoE-LoRA: N independent LoRA experts (A_i, B_i) of rank r mixed by the same router as MoR.

    o = W x + (alpha / r) * sum_i G_i(x) * B_i A_i x

computed, like MoR, as one expanded-rank product: codes = [A_1; ...; A_N] x (..., N, r) and
B~ = [B_1, ..., B_N] (d_out, N*r). It has N*r*(d_in + d_out) adapter parameters per layer
against MoR's r*(d_in + d_out) + N*(r + d_out), plus the router's d_in*N for both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..options import update_scale
from ..layer import ExpertMixture, Factors
from ..routing import Router


class MoELoRAAdapter(ExpertMixture):
    """N independent rank-r LoRA experts with a router: ``forward(x)`` is sum_i G_i(x) B_i A_i x."""

    def __init__(self, in_features: int, out_features: int, r: int, num_experts: int, alpha: float,
                 dropout: float = 0.0, router: str = "softmax", top_k: int = 2,
                 generator: torch.Generator | None = None, use_rslora: bool = False, **factory):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_experts, self.scaling = r, num_experts, update_scale(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(in_features, num_experts, router, top_k, **factory)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, **factory))  # A_i: (N, r, d_in)
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, **factory))  # B_i: (N, d_out, r)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Each A_i Kaiming-uniform as in LoRA, each B_i = 0: the layer starts as the base layer."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()
        self.router.reset_parameters(generator)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i G_i(x) B_i A_i x (times alpha/r), plus ``base_out`` (W x) when given."""
        down, up, scale = self.serving_factors()  # [A_1; ...; A_N] (N*r, d_in), B~ (d_out, N*r), alpha/r
        up_t = up.T  # (N*r, d_out)
        gates = self.router(x)  # (..., N)
        codes = self.dropout(x) @ down.T  # [A_i x]_i: (..., N*r)
        z = self.mix(gates, codes)  # G_i * A_i x: (..., N*r)
        if base_out is None:
            return scale * (z @ up_t)
        out = torch.addmm(base_out.reshape(-1, self.out_features), z.reshape(-1, z.shape[-1]), up_t,
                          alpha=scale)  # W x + (alpha/r) B~ z in one pass over the output
        return out.view(base_out.shape)

    def mix(self, gates: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """z: each expert's code A_i x (..., N*r) times its gate G_i (..., N)."""
        return gates.repeat_interleave(self.r, dim=-1) * codes

    def serving_factors(self) -> Factors:
        """([A_1; ...; A_N] (N*r, d_in), B~ = [B_1, ..., B_N] (d_out, N*r), alpha/r): the update is
        alpha/r times B~ ``mix(G, [A_i x]_i)``."""
        return Factors(self.lora_A.flatten(0, 1), self.lora_B.permute(1, 0, 2).flatten(1), self.scaling)

    def expert_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """(A (N, r, d_in), B (N, d_out, r), scale) with D_i = scale * B[i] @ A[i], in ``dtype`` when given."""
        a, b = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        return Factors(a, b, self.scaling)
