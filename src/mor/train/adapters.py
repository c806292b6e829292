"""One way to put any of the four compared adapters on a model: MoR and MoE-LoRA (ours, as peft
methods) and LoRA and DoRA (peft's own implementations, not rewritten). Every adapter field, its
default and its meaning come from ``MoRConfig`` (its fields, ``mor.options.MoROptions``); LoRA/DoRA read
r, alpha, dropout and targets from it. ``AdapterSpec`` itself imports neither torch nor peft, so the
``mor train`` flags generated from it cost nothing to list."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ..errors import SettingsError
from ..options import ALL_METHODS, INITS, METHODS, ROUTERS, TARGET_PRESETS, MoROptions

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

    from ..config import MoRConfig


def parse_targets(value: str):
    """``--target-modules``: a preset or a regex stays a string; otherwise comma-separated names."""
    if value in (*TARGET_PRESETS, "all-linear"):
        return value
    if "," not in value and any(c in value for c in "*.[](|"):
        return value  # a regular expression over full module names
    return [name.strip() for name in value.split(",") if name.strip()]


ADDED = {"added": True}
"""Field metadata (here and in ``TrainConfig``) of a setting added after runs and results were first recorded,
whose default does what was done before it existed (``use_rslora=False``, no ``modules_to_save``,
``packing=False``)."""


def without_added_defaults(values: Mapping[str, Any], cls) -> dict:
    """``values`` (the fields of the dataclass ``cls``) without its ``ADDED`` settings where they hold their
    default: the one rule by which a record or result key written before such a setting existed still
    matches (``mor train --resume``'s ``mor_run.json``, ``mor compare``'s result keys)."""
    added = {f.name: f.default for f in fields(cls) if f.metadata.get("added")}
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def _from_mor(name: str, **meta):
    """The MoRConfig field ``name``: same default, same help (one source)."""
    source = MoROptions.__dataclass_fields__[name]
    return field(default=source.default, metadata={**source.metadata, **meta})


@dataclass
class AdapterSpec:
    """The adapter of a training run: a method and the ``MoRConfig`` fields a run sets (fields a
    method does not use are ignored by it: LoRA and DoRA have no experts or router)."""

    method: str = field(default="mor", metadata={"help": "the adapter: mor, moelora (ours), lora or dora (peft's)",
                                                  "choices": ALL_METHODS})
    r: int = _from_mor("r")
    num_experts: int = _from_mor("num_experts")
    alpha: Optional[float] = _from_mor("alpha")
    use_rslora: bool = _from_mor("use_rslora", **ADDED)
    dropout: float = _from_mor("dropout")
    target_modules: Union[list[str], str] = _from_mor("target_modules", parse=parse_targets)
    router: str = _from_mor("router", choices=ROUTERS)
    top_k: int = _from_mor("top_k")
    balance_coef: float = _from_mor("balance_coef")
    init: str = _from_mor("init", choices=INITS)
    init_scale_std: float = _from_mor("init_scale_std")
    init_seed: Optional[int] = _from_mor("init_seed", flag=None)  # no flag of its own: --seed seeds the adapter
    modules_to_save: Optional[list[str]] = _from_mor("modules_to_save", **ADDED)

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise SettingsError(f"method={self.method!r} is unknown; choose one of {ALL_METHODS}")
        resolved = self.options()  # validates every field, naming it; resolves alpha and target presets
        self.alpha, self.target_modules = resolved.alpha, resolved.target_modules

    def options(self) -> MoROptions:
        """These fields as ``MoROptions`` (validated, presets and alpha resolved; no peft needed)."""
        return MoROptions(**self._mor_fields())

    def mor_config(self) -> MoRConfig:
        """These fields as a ``MoRConfig`` (LoRA and DoRA read r, alpha, dropout, targets from it)."""
        from ..config import MoRConfig

        return MoRConfig(**self._mor_fields())

    def _mor_fields(self) -> dict:
        return {"method": self.method if self.method in METHODS else "mor",
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "method"}}

    def to_peft_config(self, model: nn.Module | None = None) -> PeftConfig:
        """The peft config of this adapter. LoRA/DoRA targets are resolved on ``model`` with MoR's
        matcher, so that every method adapts exactly the same modules."""
        config = self.mor_config()
        if self.method in METHODS:
            return config
        from peft import LoraConfig

        from ..model import find_target_modules

        targets = find_target_modules(model, config) if model is not None else config.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_dora=self.method == "dora", use_rslora=self.use_rslora,
                          modules_to_save=self.modules_to_save, task_type="CAUSAL_LM")

    def parameter_count(self, model: nn.Module) -> int:
        """Closed-form trainable parameters of this adapter on ``model`` (see mor.params)."""
        from ..params import parameter_count

        return parameter_count(model, self.method, self.r, self.num_experts, self.target_modules, self.router)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def key(self) -> dict:
        """What a result depends on: ``to_dict()`` without the settings added since at their defaults
        (:func:`without_added_defaults`), so that results keyed before those settings existed still match."""
        return without_added_defaults(self.to_dict(), AdapterSpec)


def apply_adapter(model: nn.Module, spec: AdapterSpec, tokens_per_step: int = 0) -> nn.Module:
    """Freeze ``model`` and attach the adapter of ``spec``; returns the peft model.

    Refused before anything is allocated: an adapter whose weights, gradients, Adam moments and
    the activations of ``tokens_per_step`` tokens (batch size x sequence length) do not fit in
    the memory left (see :func:`mor.safety.check_adapter_fits`)."""
    import torch
    from peft import get_peft_model

    from ..config import MoRConfig
    from ..model import get_mor_model
    from ..safety import check_adapter_fits

    check_adapter_fits(*training_size(model, spec, tokens_per_step))
    config = spec.to_peft_config(model)
    if isinstance(config, MoRConfig):
        return get_mor_model(model, config)

    if spec.init_seed is not None:
        torch.manual_seed(spec.init_seed)
    return get_peft_model(model, config)


def training_size(model: nn.Module, spec: AdapterSpec, tokens_per_step: int = 0) -> tuple[int, str, int]:
    """(trainable parameters, a description, activation floats) of training ``spec`` on ``model``
    with ``tokens_per_step`` tokens a step. A mixture layer keeps, per token, the router's logits
    and gates (2N), the down-projection (r) and the per-expert products (N*r), twice over for the
    backward pass; a LoRA/DoRA layer keeps its r-dimensional down-projection. ``modules_to_save``
    adds a full trainable copy of each module it names (peft's ModulesToSaveWrapper), e.g. a
    vocabulary-sized ``lm_head``."""
    from ..params import layer_parameter_count, target_shapes

    shapes = target_shapes(model, spec.target_modules)
    parameters = sum(layer_parameter_count(spec.method, d_in, d_out, spec.r, spec.num_experts, spec.router)
                     for d_in, d_out in shapes)
    mixture = spec.method in METHODS
    per_token = 2 * (spec.num_experts * spec.r + 2 * spec.num_experts + spec.r if mixture else spec.r)
    what = f"the {spec.method} adapter (r={spec.r}" + (f", {spec.num_experts} experts" if mixture else "") \
        + f", {len(shapes)} layers)"
    saved = saved_module_parameters(model, spec.modules_to_save or [])
    if saved:
        what += f" with trainable copies of {', '.join(spec.modules_to_save)} ({saved:,} parameters; --modules-to-save)"
    return parameters + saved, what, per_token * len(shapes) * tokens_per_step


def saved_module_parameters(model: nn.Module, names: list[str]) -> int:
    """Parameters of the modules of ``model`` that ``names`` match as peft's ``modules_to_save`` does (a
    module name ending with one of them: peft.utils.other._set_trainable): peft trains a copy of each."""
    matched = [module for key, module in model.named_modules() if any(key.endswith(name) for name in names)]
    return sum(p.numel() for p in {id(p): p for module in matched for p in module.parameters()}.values())
