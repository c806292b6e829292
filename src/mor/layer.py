"""The MoR layer: a frozen linear layer plus a Mixture of Ranks.

For a frozen weight W (d_out x d_in), MoR learns one shared low-rank pair A (r x d_in),
B (d_out x r), per-expert scales Omega_A (N x r), Omega_B (N x d_out), and a router G. Expert
i is the rescaled LoRA D_i = (alpha/r) diag(Omega_B[i]) B diag(Omega_A[i]) A = U_i A, and the
layer computes o = W x + sum_i G_i(x) D_i x as ONE product of expanded rank N*r:

    h = A x                                                   (..., r)
    G = route(x)                                              (..., N)
    z = concat_i( G_i * h )                                   (..., N*r)
    U = (alpha/r) [diag(Omega_B[i]) B diag(Omega_A[i])]_i     (d_out, N*r), independent of the tokens
    o = W x + U z

``MoRAdapter`` is that maths for one adapter; ``MixtureLayer`` is the peft tuner layer that
wraps a frozen ``nn.Linear`` / ``Conv1D`` / quantised linear and holds one adapter per name.
The MoE-LoRA baseline (``mor.baselines.moelora.MoELoRAAdapter``) plugs into the same layer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _compat
from .errors import AdapterError, SettingsError
from .options import update_scale
from .quantized import dense_weight, is_quantized, linear_shape, plain_linear, stored_dtype
from .routing import Router, autocast_enabled


class Factors(NamedTuple):
    """A low-rank update ``scale * B @ A``, in the one order every function giving adapter factors
    uses (``expert_factors``, ``serving_factors``, ``mor.export.lora_factors``)."""

    A: torch.Tensor  # down: (R, d_in), or (N, r, d_in) expert by expert
    B: torch.Tensor  # up: (d_out, R), or (N, d_out, r) expert by expert
    scale: float  # alpha/r, or 1 where it is folded into B


class TokenIndependentFactors(NamedTuple):
    """What a MoR forward multiplies by that does not depend on the tokens."""

    up_t: torch.Tensor  # U^T: (N*r, d_out)
    router_and_down_t: torch.Tensor | None  # [W_g; A]^T: (d_in, N + r), or None: router and A apart


class ExpertMixture(nn.Module):
    """What every mixture of low-rank experts derives from its ``expert_factors()``
    (A (N, r, d_in), B (N, d_out, r), scale, with D_i = scale * B[i] @ A[i])."""

    def expert_deltas(self) -> torch.Tensor:
        """The experts' update matrices D_i (alpha/r included): (N, d_out, d_in)."""
        down, up, scale = self.expert_factors()
        return scale * up @ down

    def merged_delta(self, routing: torch.Tensor) -> torch.Tensor:
        """sum_i g_i D_i for a fixed weight vector g (N,): (d_out, d_in), a rank-r matrix for MoR."""
        g = routing.to(self.lora_A).reshape(self.num_experts, 1, 1)  # the adapter's device and dtype
        return (g * self.expert_deltas()).sum(dim=0)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, scaling={self.scaling:g}")


class MoRAdapter(ExpertMixture):
    """One MoR adapter of a d_in -> d_out layer: ``forward(x)`` is sum_i G_i(x) D_i x."""

    def __init__(self, in_features: int, out_features: int, r: int, num_experts: int, alpha: float,
                 dropout: float = 0.0, router: str = "softmax", top_k: int = 2, init: str = "ones_noise",
                 init_scale_std: float = 0.1, generator: torch.Generator | None = None, use_rslora: bool = False,
                 **factory):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_experts, self.scaling = r, num_experts, update_scale(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = Router(in_features, num_experts, router, top_k, **factory)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))  # A: (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))  # B: (d_out, r)
        self.expert_scales_in = nn.Parameter(torch.empty(num_experts, r, **factory))  # Omega_A: (N, r)
        self.expert_scales_out = nn.Parameter(torch.empty(num_experts, out_features, **factory))  # Omega_B
        self._factors_cache: tuple[list, TokenIndependentFactors] | None = None  # see token_independent_factors
        self._reusing_factors = False  # True inside reusing_factors(model)
        self.register_load_state_dict_post_hook(_drop_factors_after_load)
        self.reset_parameters(init, init_scale_std, generator)

    @torch.no_grad()
    def reset_parameters(self, init: str = "ones_noise", init_scale_std: float = 0.1,
                         generator: torch.Generator | None = None) -> None:
        """A: LoRA's Kaiming-uniform; B = 0 (the layer starts as the base layer); Omega: ones, plus
        N(0, std^2) noise for init="ones_noise" so that experts differ from step one."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as LoRA does
        self.lora_A.copy_(torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()
        std = init_scale_std if init == "ones_noise" else 0.0
        for scales in (self.expert_scales_in, self.expert_scales_out):
            scales.copy_(1.0 + torch.randn(scales.shape, generator=generator) * std)
        self.router.reset_parameters(generator)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i G_i(x) D_i x, plus ``base_out`` (W x) when given; without gradients the sum is
        written into ``base_out``."""
        factors = self.token_independent_factors()  # U^T (and [W_g; A]^T), cached while no gradient is needed
        tokens = x.reshape(-1, self.in_features)  # (T, d_in)
        gates, h = self.route_and_down(tokens, factors.router_and_down_t)  # G(x): (T, N), A x: (T, r), once
        z = self.mix(gates, h)  # G_i * A x, expert by expert: (T, N*r)
        if base_out is None:
            return (z @ factors.up_t).view(*x.shape[:-1], self.out_features)  # sum_i G_i U_i A x = U z
        # W x + U z as one addmm: one pass over the (tokens, d_out) output instead of two; without
        # gradients, in place into W x (which the caller hands over): no copy of the output
        out = base_out.reshape(-1, self.out_features)  # (T, d_out)
        out = torch.addmm(out, z, factors.up_t) if torch.is_grad_enabled() else out.addmm_(z, factors.up_t)
        return out.view(base_out.shape)

    @staticmethod
    def mix(gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """z = concat_i(G_i * h): gates (T, N) times the shared code h = A x (T, r), as (T, N*r)."""
        return (gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)

    def serving_factors(self) -> Factors:
        """(A (r, d_in), U (d_out, N*r), 1.0): the update is U ``mix(G, A x)`` (alpha/r lives in U;
        a server that fuses several layers' products, mor.serving, reads this)."""
        return Factors(self.lora_A, self.token_independent_factors().up_t.T, 1.0)

    def route_and_down(self, x: torch.Tensor, router_and_down_t: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G(x) (T, N), A dropout(x) (T, r)) for tokens x (T, d_in).

        Given the stacked [W_g; A]^T (d_in, N + r) and with dropout the identity (generation,
        evaluation), the router logits and A x come from ONE product: at one decoded token a second
        product costs more than its arithmetic. The router module still runs on the logits, so
        forward hooks on it (routing profiles, the balance loss) see the gates as always.
        """
        if router_and_down_t is None or (self.training and not isinstance(self.dropout, nn.Identity)) \
                or autocast_enabled(x.device.type):  # autocast would give bf16 logits: the router's own fp32 product
            return self.router(x), F.linear(self.dropout(x), self.lora_A)
        logits_and_h = torch.mm(x, router_and_down_t)  # [W_g x, A x]: (T, N + r)
        n = self.num_experts
        return self.router(x, logits=logits_and_h[:, :n]), logits_and_h[:, n:]

    def token_independent_factors(self) -> TokenIndependentFactors:
        """U^T (N*r, d_out) and, where one product gives what the router computes (fp32, a learned
        router), the stacked [W_g; A]^T (d_in, N + r).

        Built from the parameters at every call, except inside :func:`reusing_factors` (generation
        and evaluation open it): there they are built at the first call without gradients and
        reused until the block ends, since at one decoded token rebuilding U costs more than the
        adapter's own product (docs/results.md, "U at decode"). Inside the block an in-place update
        (an optimizer step, ``load_state_dict``) or new storage (``.to()``) rebuilds them, and so do
        ``train()`` / ``eval()``; a write through ``.data`` is not seen until the block ends.
        """
        # the parameter dicts, not attribute access: this runs at every call, 90 times per decoded token
        params = (*_compat.direct_parameters(self), *_compat.direct_parameters(self.router))  # A, B, Omega_A, Omega_B, W_g
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return TokenIndependentFactors(self._build_stacked_up_t(), None)
        if not self._reusing_factors or torch.compiler.is_compiling():  # torch.compile: in its graph (no pointer compares)
            return self._build_factors()
        # new storage (.to(), .data =) changes the pointer; in-place updates bump the version
        key = _compat.parameter_versions(params)
        if self._factors_cache is None or self._factors_cache[0] != key:
            self._factors_cache = (key, self._build_factors())
        return self._factors_cache[1]

    @torch.no_grad()
    def _build_factors(self) -> TokenIndependentFactors:
        router_weight = self.router.weight
        stack = router_weight is not None and self.lora_A.dtype == router_weight.dtype == torch.float32
        router_and_down_t = torch.cat([router_weight, self.lora_A]).t() if stack else None
        return TokenIndependentFactors(self._build_stacked_up_t(), router_and_down_t)

    def drop_factors(self) -> None:
        """Forget the factors kept inside :func:`reusing_factors` (the next call rebuilds them)."""
        self._factors_cache = None

    def train(self, mode: bool = True) -> "MoRAdapter":
        self.drop_factors()  # train() / eval() start from the parameters as they are now
        return super().train(mode)

    def _build_stacked_up_t(self) -> torch.Tensor:
        """U^T (N*r, d_out): U_i^T = (alpha/r) diag(Omega_A[i]) B^T diag(Omega_B[i]), built in the
        stacked layout (N, r, d_out) itself (no transposed copy): two products over N*r*d_out elements,
        which a training step pays forward and backward in every layer."""
        scales_in = self.scaling * self.expert_scales_in  # (alpha/r) Omega_A: (N, r)
        up_t = scales_in.unsqueeze(-1) * (self.expert_scales_out.unsqueeze(1) * self.lora_B.t())  # (N, r, d_out)
        return up_t.reshape(self.num_experts * self.r, self.out_features)  # [U_i^T]_i stacked

    def expert_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """(A (N, r, d_in), B (N, d_out, r), scale) with D_i = scale * B[i] @ A[i], computed in
        ``dtype`` when given (float64 for spectra: in fp32 diag(Omega_A[i]) A rounds A's row space)."""
        a, b, omega_a, omega_b = (t if dtype is None else t.to(dtype) for t in
                                  (self.lora_A, self.lora_B, self.expert_scales_in, self.expert_scales_out))
        return Factors(omega_a.unsqueeze(-1) * a, omega_b.unsqueeze(-1) * b, self.scaling)  # diag(Omega_A[i]) A, diag(Omega_B[i]) B


def _drop_factors_after_load(adapter: MoRAdapter, _incompatible_keys) -> None:
    adapter.drop_factors()  # whatever the loader wrote through, the next forward reads the loaded weights


@contextlib.contextmanager
def reusing_factors(model: nn.Module) -> Iterator[None]:
    """Inside the block, each MoR adapter of ``model`` builds its token-independent factors (U) once,
    at its first forward without gradients, and reuses them; at exit they are dropped. Generation
    (``MoRModel.generate``, so ``peft_model.generate``) and evaluation open it: the weights do not
    change during one call. Outside it nothing is kept, so a write through ``.data`` (weight
    averaging, EMA, a loader) is always seen by the next forward. Nested blocks are fine."""
    adapters = [m for m in model.modules() if isinstance(m, MoRAdapter)] if isinstance(model, nn.Module) else []
    before = [adapter._reusing_factors for adapter in adapters]
    for adapter in adapters:
        adapter._reusing_factors = True
    try:
        yield
    finally:
        for adapter, reusing in zip(adapters, before):
            adapter._reusing_factors = reusing
            adapter.drop_factors()


# -- the peft tuner layer --------------------------------------------------------------------------


class MixtureLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer plus router-weighted mixtures of low-rank experts, one per adapter name:
    ``forward(x) = base_layer(x) + sum over active adapters of mor[name](x)``."""

    adapter_layer_names = ("mor",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, adapter: nn.Module):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # frozen: only adapters train
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # Conv1D keeps W transposed
        self.mor = nn.ModuleDict()
        self.merged_adapters = []
        self._disable_adapters = False
        self.update_layer(adapter_name, adapter)

    def update_layer(self, adapter_name: str, adapter: nn.Module) -> None:
        """Add ``adapter`` (a MoRAdapter or MoELoRAAdapter) under ``adapter_name`` and make it active."""
        device = self.base_layer.weight.device
        self.mor[adapter_name] = adapter.to(device=device if device.type != "meta" else None)
        self.set_adapter(self.active_adapters + [adapter_name] if adapter_name not in self.active_adapters
                         else self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # W x: (..., d_out)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.mor:
                adapter = self.mor[name]  # runs in its own dtype (fp32 over a bf16 / 4-bit base)
                dtype = adapter.dtype
                if x.dtype == result.dtype == dtype:  # no casts to call: one decoded token is many small calls
                    result = adapter(x, base_out=result)
                elif torch.is_grad_enabled() and autocast_enabled(x.device.type):
                    # autocast runs the adapter's products in its own dtype: casting x and the (tokens, d_out)
                    # output to the adapter's dtype and back would only add passes over them, forward and
                    # backward (without gradients the sum is written in place, which autocast does not cast)
                    result = adapter(x, base_out=result)
                else:
                    result = adapter(x.to(dtype), base_out=result.to(dtype)).to(result.dtype)
        return result

    # -- merging with fixed routing -----------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold sum_i g_i D_i into W for each adapter whose router is pinned (``fixed_routing``)
        or uniform (router="mean"). A quantised base becomes a plain linear layer in the dtype its
        weights were loaded in (:func:`stored_dtype`; dequantised by :func:`dense_weight`, the update
        added in fp32)."""
        names = check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        base = self.base_layer
        dtype = stored_dtype(base)
        weight = dense_weight(base, torch.float32)
        for name in names:
            adapter = self.mor[name]
            weight = weight + adapter.merged_delta(adapter.router.merge_routing()).float()
            if safe_merge and not torch.isfinite(weight).all():
                raise AdapterError(f"merging adapter {name!r} would give non-finite weights; it is broken")
        if is_quantized(base):
            self.base_layer = plain_linear(base, weight.to(dtype))
        else:
            base.weight.data = (weight.T if self.fan_in_fan_out else weight).to(base.weight.dtype).contiguous()
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        raise RuntimeError("a merged MoR layer cannot be unmerged: merge a copy (copy.deepcopy) to keep both")

    def __repr__(self) -> str:
        return "mor." + super().__repr__()


# -- finding the layers: the one way (the peft model, export, routing statistics, analysis, the CLI) -

def _transformers_root_prefix(model: nn.Module) -> str:
    """Dotted name of the outermost transformers ``PreTrainedModel`` inside ``model`` ("" if it
    is ``model`` itself or none is found): module names are made relative to it."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():  # pre-order: the outermost comes first
        if isinstance(module, PreTrainedModel):
            return name
    return ""


def named_mixture_layers(model: nn.Module) -> dict[str, MixtureLayer]:
    """Every mixture layer (peft's wrapper around an adapted linear) of ``model``, keyed by its name
    relative to the transformers model (wrapper prefixes such as ``base_model.model.`` stripped)."""
    prefix = _transformers_root_prefix(model)
    return {name[len(prefix) + 1:] if prefix else name: module for name, module in model.named_modules()
            if isinstance(module, MixtureLayer)}


def mixture_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The active MoR / MoE-LoRA adapter of every mixture layer of ``model``, keyed as in
    :func:`named_mixture_layers`."""
    layers = {}
    for name, module in named_mixture_layers(model).items():
        active = [a for a in module.active_adapters if a in module.mor]
        if len(active) != 1:
            raise SettingsError(f"{name}: one adapter at a time (export, routing statistics); active adapters are {active}")
        layers[name] = module.mor[active[0]]
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no MoR / MoE-LoRA layers; "
                           "load a MoR or MoE-LoRA adapter onto the model first")
    return layers


def find_routers(model: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: router}`` of the active MoR / MoE-LoRA adapter of every mixture layer (names
    as in :func:`mixture_layers`); ``{}`` for a model without mixture layers (a LoRA / DoRA run). Two
    active adapters are an error, as in :func:`mixture_layers`: routing statistics never silently stop."""
    if not named_mixture_layers(model):
        return {}
    return {name: adapter.router for name, adapter in mixture_layers(model).items()}


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside any wrapper (``model`` itself if it is one)."""
    prefix = _transformers_root_prefix(model)
    return model.get_submodule(prefix) if prefix else model


# -- the maths ----------------------------------------------------------------------------------
