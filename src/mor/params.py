"""Trainable-parameter counts of every method, in closed form, so tables compare like with like.

Per adapted layer d_in -> d_out, rank r, N experts (router: d_in*N weights, none for "mean"):

    lora      r*(d_in + d_out)
    dora      r*(d_in + d_out) + d_out                      (peft's magnitude vector)
    moelora   N*r*(d_in + d_out) + d_in*N
    mor       r*(d_in + d_out) + N*(r + d_out) + d_in*N
"""

from __future__ import annotations

from torch import nn

from .config import ALL_METHODS, MoRConfig
from .errors import SettingsError


def layer_parameter_count(method: str, d_in: int, d_out: int, r: int, num_experts: int = 1,
                          router: str = "softmax") -> int:
    """Trainable parameters of one adapted d_in -> d_out layer."""
    router_params = 0 if router == "mean" else d_in * num_experts
    if method == "lora":
        return r * (d_in + d_out)
    if method == "dora":
        return r * (d_in + d_out) + d_out
    if method == "moelora":
        return num_experts * r * (d_in + d_out) + router_params
    if method == "mor":
        return r * (d_in + d_out) + num_experts * (r + d_out) + router_params
    raise SettingsError(f"unknown method {method!r}; choose one of {ALL_METHODS}")


def target_shapes(model: nn.Module, target_modules="ffn") -> list[tuple[int, int]]:
    """(d_in, d_out) of every module that ``target_modules`` selects in ``model``."""
    from .quantized import linear_shape
    from .model import find_target_modules

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = find_target_modules(model, MoRConfig(target_modules=target_modules))
    return [linear_shape(getattr(module, "base_layer", module)) for module in map(model.get_submodule, names)]


def parameter_count(model: nn.Module, method: str, r: int, num_experts: int = 1, target_modules="ffn",
                    router: str = "softmax") -> int:
    """Closed-form trainable parameters of ``method`` on ``model``'s target modules."""
    return sum(layer_parameter_count(method, d_in, d_out, r, num_experts, router)
               for d_in, d_out in target_shapes(model, target_modules))


def count_trainable_parameters(model: nn.Module, include_frozen: bool = False) -> int:
    """The counted twin of ``parameter_count``: parameters that require gradients, for any wrapper
    (MoRModel, PeftModel, plain). ``include_frozen=True`` counts every parameter, for modules that
    hold only adapter tensors but were loaded for inference (requires_grad off)."""
    return sum(p.numel() for p in model.parameters() if include_frozen or p.requires_grad)
