"""The MoR layer: a frozen linear layer plus a Mixture of Ranks.

For a frozen weight W (d_out x d_in), MoR learns one shared low-rank pair A (r x d_in),
B (d_out x r), per-expert scales Omega_A (N x r), Omega_B (N x d_out), and a router G. Expert
i is the rescaled LoRA

    D_i = (alpha / r) * diag(Omega_B[i]) @ B @ diag(Omega_A[i]) @ A          (d_out x d_in)

and the layer computes

    o = W x + sum_i G_i(x) * D_i x

It is computed as ONE product with an expanded rank of N*r (no tokens x N x d_out tensor):

    h = A x                                          (..., r)       r*d_in per token
    z = concat_i( G_i(x) * Omega_A[i] * h )          (..., N*r)
    B~ = [diag(Omega_B[1]) B, ..., diag(Omega_B[N]) B]   (d_out, N*r)   once per forward
    o = W x + (alpha / r) * B~ z                                      N*r*d_out per token

``MixtureLinear`` holds what every mixture-of-low-rank-experts layer shares (the base layer,
router, dropout, the expanded-rank forward, merge); ``MoRLinear`` only says how the expert
inputs and the stacked up-projection are formed. The MoE-LoRA baseline
(``mor.baselines.moelora``) is the same forward with N independent pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .routing import Router

try:  # GPT-2 style layers store W as (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or transformers ``Conv1D``; TypeError otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D and isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(
        f"cannot adapt a {type(layer).__name__}: MoR adapts torch.nn.Linear and transformers' Conv1D layers"
    )


class MixtureLinear(nn.Module):
    """A frozen linear layer plus a router-weighted mixture of N rank-r experts.

    Subclasses define ``expert_inputs(x) -> (..., N, r)`` (each expert's rank-r code of x) and
    ``stacked_up() -> (d_out, N*r)`` (the experts' up-projections side by side); the output is
    ``base(x) + scaling * B~ @ concat_i(G_i(x) * code_i)``.
    """

    def __init__(self, base_layer: nn.Module, r: int, num_experts: int, alpha: float, dropout: float,
                 router: str = "softmax", top_k: int = 2):
        super().__init__()
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W transposed
        self.base_layer = base_layer
        self.r = r
        self.num_experts = num_experts
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(self.in_features, num_experts, router, top_k)
        self.disabled = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    # -- what a subclass defines -------------------------------------------------------------
    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., N, r)
        raise NotImplementedError

    def stacked_up(self) -> torch.Tensor:  # (d_out, N*r)
        raise NotImplementedError

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (N, r, d_in), up (N, d_out, r)) with D_i = scaling * up[i] @ down[i]."""
        raise NotImplementedError

    # -- the shared maths ------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights G(x): (..., d_in) -> (..., N), non-negative, summing to 1."""
        return self.router(x)

    def mixed_codes(self, x: torch.Tensor) -> torch.Tensor:
        """z = concat_i( G_i(x) * code_i(x) ): (..., d_in) -> (..., N*r)."""
        dtype = self.adapter_dtype
        gates = self.route(x).to(dtype)  # (..., N)
        codes = self.expert_inputs(self.dropout(x.to(dtype)))  # (..., N, r)
        return (gates.unsqueeze(-1) * codes).flatten(-2)  # (..., N*r)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """sum_i G_i(x) D_i x = (alpha/r) B~ z for inputs (..., d_in) -> (..., d_out)."""
        return self.scaling * (self.mixed_codes(x) @ self.stacked_up().T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W x: (..., d_out)
        if self.disabled:
            return result
        z = self.mixed_codes(x)  # (..., N*r)
        if result.dtype != z.dtype:
            return result + (self.scaling * (z @ self.stacked_up().T)).to(result.dtype)
        # W x + (alpha/r) B~ z with the scale and the residual add fused into one addmm: fewer
        # passes over the (tokens, d_out) output, and backward scales only the small (T, N*r) grad.
        out = torch.addmm(result.reshape(-1, self.out_features), z.reshape(-1, z.shape[-1]), self.stacked_up().T,
                          alpha=self.scaling)
        return out.view(result.shape)

    def expert_deltas(self) -> torch.Tensor:
        """The experts' update matrices D_i (alpha/r included): (N, d_out, d_in)."""
        down, up = self.expert_factors()
        return self.scaling * up @ down

    def merged_delta(self, routing: torch.Tensor) -> torch.Tensor:
        """sum_i g_i D_i for a fixed weight vector g (N,): (d_out, d_in)."""
        g = routing.to(self.adapter_dtype).reshape(self.num_experts, 1, 1)
        return (g * self.expert_deltas()).sum(dim=0)

    @torch.no_grad()
    def merge(self, routing: torch.Tensor) -> nn.Module:
        """Fold sum_i g_i D_i into the base weight and return the plain base layer."""
        delta = self.merged_delta(routing).to(self.base_layer.weight.dtype)
        self.base_layer.weight += delta.T if self.fan_in_fan_out else delta
        return self.base_layer

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A.dtype  # an attribute, not a parameter walk: this runs per layer per decoded token

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, router={self.router.strategy!r}, scaling={self.scaling:g}")


class MoRLinear(MixtureLinear):
    """Mixture of Ranks: shared A, B; expert i rescales A's outputs and B's outputs."""

    def __init__(self, base_layer: nn.Module, r: int, num_experts: int, alpha: float = 16.0,
                 dropout: float = 0.0, router: str = "softmax", top_k: int = 2,
                 init: str = "ones_noise", init_scale_std: float = 0.1, generator: torch.Generator | None = None):
        super().__init__(base_layer, r, num_experts, alpha, dropout, router, top_k)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # A: (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # B: (d_out, r)
        self.expert_scales_in = nn.Parameter(torch.empty(num_experts, r, **factory))  # Omega_A: (N, r)
        self.expert_scales_out = nn.Parameter(torch.empty(num_experts, self.out_features, **factory))  # Omega_B
        self.router.to(**factory)
        self.reset_parameters(init, init_scale_std, generator)

    @torch.no_grad()
    def reset_parameters(self, init: str = "ones_noise", init_scale_std: float = 0.1,
                         generator: torch.Generator | None = None) -> None:
        """A: LoRA's Kaiming-uniform; B = 0 (so the layer starts as the base layer); Omega: ones,
        plus N(0, std^2) noise for init="ones_noise" so that experts differ from step one."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as LoRA does
        self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()
        for scales in (self.expert_scales_in, self.expert_scales_out):
            noise = torch.randn(scales.shape, generator=generator) * (init_scale_std if init == "ones_noise" else 0.0)
            scales.copy_(1.0 + noise)
        self.router.reset_parameters(generator)

    def expert_inputs(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.lora_A.T  # (..., r): A x, computed once for all experts
        return h.unsqueeze(-2) * self.expert_scales_in  # (..., N, r): Omega_A[i] * A x

    def stacked_up(self) -> torch.Tensor:
        up = self.expert_scales_out.unsqueeze(-1) * self.lora_B  # (N, d_out, r): diag(Omega_B[i]) B
        return up.permute(1, 0, 2).reshape(self.out_features, self.num_experts * self.r)  # (d_out, N*r)

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = self.expert_scales_in.unsqueeze(-1) * self.lora_A  # (N, r, d_in)
        up = self.expert_scales_out.unsqueeze(-1) * self.lora_B  # (N, d_out, r)
        return down, up
