"""One way to put any of the four compared adapters on a model: MoR and MoE-LoRA (ours, as peft
methods) and LoRA and DoRA (peft's own implementations, not rewritten). Every adapter field, its
default and its meaning come from ``MoRConfig``; LoRA/DoRA read r, alpha, dropout and targets from it."""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from .config import MoRConfig
from .model import find_target_modules, get_mor_model
from .params import parameter_count

METHODS = ("mor", "moelora", "lora", "dora")
#: The MoRConfig fields a training run sets (the ``mor train`` flags are generated from them).
ADAPTER_FIELDS = ("r", "num_experts", "alpha", "dropout", "target_modules", "router", "top_k", "balance_coef",
                  "init", "init_scale_std", "init_seed")


class AdapterSpec:
    """The adapter of a training run: a method and a ``MoRConfig`` holding every field (fields a
    method does not use are ignored by it: LoRA and DoRA have no experts or router)."""

    def __init__(self, method: str = "mor", **config_fields):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
        unknown = sorted(set(config_fields) - set(ADAPTER_FIELDS))
        if unknown:
            raise ValueError(f"unknown adapter fields {unknown}; known: {ADAPTER_FIELDS}")
        self.method = method
        self.config = MoRConfig(method=method if method in ("mor", "moelora") else "mor", **config_fields)

    def __getattr__(self, name: str):
        if name in ADAPTER_FIELDS:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name in ADAPTER_FIELDS:
            setattr(self.config, name, value)
        else:
            super().__setattr__(name, value)

    def parameter_count(self, model: nn.Module) -> int:
        """Closed-form trainable parameters of this adapter on ``model`` (see mor.params)."""
        return parameter_count(model, self.method, self.r, self.num_experts, self.target_modules, self.router)

    def to_dict(self) -> dict:
        return {"method": self.method, **{name: getattr(self.config, name) for name in ADAPTER_FIELDS}}

    def __repr__(self) -> str:
        return f"AdapterSpec({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Freeze ``model`` and attach the adapter of ``spec``; returns the peft model."""
    if spec.method in ("mor", "moelora"):
        return get_mor_model(model, spec.config)
    import torch
    from peft import LoraConfig, get_peft_model

    # Resolve the targets with the same matcher so that every method adapts exactly the same modules.
    names = find_target_modules(model, spec.config)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        use_dora=spec.method == "dora", task_type="CAUSAL_LM")
    if spec.init_seed is not None:
        torch.manual_seed(spec.init_seed)
    return get_peft_model(model, config)


def config_field_help() -> dict[str, tuple[object, str]]:
    """{field: (default, help)} of the adapter fields, from MoRConfig's metadata."""
    meta = {f.name: f for f in fields(MoRConfig)}
    return {name: (meta[name].default, meta[name].metadata.get("help", "")) for name in ADAPTER_FIELDS}
