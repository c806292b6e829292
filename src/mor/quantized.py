"""The frozen base layers MoR wraps, as it reads them: the shape and compute dtype of any linear
layer, and the weights of quantised ones, bitsandbytes 4-bit above all (peft keeps the same apart in
``tuners/lora/bnb.py``).

A merge folds the update into W, so it needs W as the layer holds it: :func:`dense_weight`
dequantises a 4-bit layer with bitsandbytes' own ``dequantize_4bit`` from its state as loaded
(:func:`keep_4bit_states`, :func:`unpacked_4bit`), and :func:`plain_linear` is the merged layer.
On a CPU with AVX512-BF16 bitsandbytes repacks 4-bit weights for a bf16 kernel at the first
inference forward; :func:`keep_4bit_layout` stops that for a model evaluated while it trains.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import _compat


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer (nn.Linear and its quantised subclasses, or Conv1D)."""
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    raise TypeError(f"cannot adapt a {type(layer).__name__}: MoR adapts torch.nn.Linear (including "
                    "bitsandbytes / torchao quantised linears) and transformers' Conv1D layers")


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or a quantised layer's compute dtype."""
    dtype = getattr(layer, "compute_dtype", None)  # bitsandbytes Linear4bit
    if dtype is not None:
        return dtype
    weight = layer.weight
    if weight.dtype.is_floating_point and type(weight) in (torch.Tensor, nn.Parameter):
        return weight.dtype
    return torch.float32 if not weight.dtype.is_floating_point else weight.dtype


def is_quantized(layer: nn.Module) -> bool:
    """True for layers whose weight is not a plain float tensor (bitsandbytes, torchao, ...)."""
    return type(layer.weight) not in (torch.Tensor, nn.Parameter) or not layer.weight.dtype.is_floating_point


def is_4bit(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (its weight carries a ``quant_state``)."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def keep_4bit_states(model: nn.Module) -> None:
    """Remember each bitsandbytes 4-bit layer's quantisation state as loaded, before its first forward.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first no-grad forward in
    eval mode for a bf16 kernel, rounding the per-block absmax to bf16 (its own inverse cannot undo
    that). With the state kept, :func:`unpacked_4bit` gives back the weight as loaded, bit for bit.
    The copy is shallow: it holds the original absmax (one byte per 64 weights), not the weights."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and not getattr(state, "packing_format_for_cpu", False):
            module.mor_quant_state = copy.copy(state)


def unpacked_4bit(layer: nn.Module):
    """(codes, quant_state) of a bitsandbytes 4-bit layer in bitsandbytes' standard layout, as
    ``bitsandbytes.functional.dequantize_4bit`` takes them: the layer's own if it was never repacked
    for the CPU kernel, else the codes unpacked by bitsandbytes' inverse and the state
    :func:`keep_4bit_states` kept (the inverse's bf16-rounded state if none was kept)."""
    weight = layer.weight
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    codes, inverse_state = _compat.unpack_4bit_for_cpu(weight.data.clone(), copy.copy(state))
    return codes, getattr(layer, "mor_quant_state", inverse_state)


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit layers for its CPU bf16 kernel (see
    :func:`keep_4bit_states`): a repacked layer passes no gradient to its input (bitsandbytes 0.50
    registers no backward for that kernel) and computes differently from the training forward, so a
    model that is evaluated while it trains must keep the layout it trains with. Returns how many
    layers it applies to (0 off a CPU with AVX512-BF16)."""
    kept = 0
    for module in model.modules():
        if is_4bit(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def stored_dtype(layer: nn.Module) -> torch.dtype:
    """The float dtype a layer's weight is held in: for a bitsandbytes 4-bit layer the dtype its weights
    had when they were quantised (that of the model's other weights, e.g. fp32 when loaded without a
    dtype), else :func:`compute_dtype`. A merged 4-bit layer takes it, so the model stays one dtype."""
    if is_4bit(layer):
        state = layer.weight.quant_state
        return getattr(state, "original_dtype", None) if getattr(state, "packing_format_for_cpu", False) \
            else state.dtype
    return compute_dtype(layer)


@torch.no_grad()
def dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W (d_out, d_in) as the layer holds it. A bitsandbytes 4-bit layer is dequantised by
    bitsandbytes' own ``dequantize_4bit`` from its state as loaded (:func:`unpacked_4bit`): the exact
    weight its training forward multiplies by. Other quantised layers (8-bit, torchao) are read off
    the layer's own output on the identity."""
    if is_4bit(layer):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(*unpacked_4bit(layer)).to(dtype)
    if not is_quantized(layer):
        weight = layer.weight.to(dtype)
        return weight.T if isinstance(layer, Conv1D) else weight
    d_in, _ = linear_shape(layer)
    device = layer.weight.device
    rows = []
    for start in range(0, d_in, 1024):
        eye = torch.eye(d_in, dtype=compute_dtype(layer), device=device)[start:start + 1024]
        out = layer(eye)
        if getattr(layer, "bias", None) is not None:
            out = out - layer.bias.to(out.dtype)
        rows.append(out.to(dtype))
    return torch.cat(rows).T  # (d_out, d_in)


def plain_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` (d_out, d_in) and the bias of ``layer``."""
    d_out, d_in = weight.shape
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear
