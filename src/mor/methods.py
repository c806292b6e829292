"""One way to put any of the four compared adapters on a model: MoR and MoE-LoRA (ours),
LoRA and DoRA (peft's own implementations, not rewritten)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Union

from torch import nn

from .config import TARGET_PRESETS, MoRConfig
from .model import find_target_modules, get_mor_model
from .params import parameter_count

METHODS = ("mor", "moelora", "lora", "dora")


@dataclass
class AdapterSpec:
    """The adapter of a training run. Fields a method does not use are ignored by it
    (LoRA and DoRA have no experts or router)."""

    method: str = "mor"  # mor | moelora | lora | dora
    r: int = 8  # shared rank (MoR), rank per expert (MoE-LoRA), rank (LoRA, DoRA)
    num_experts: int = 8
    alpha: Union[float, None] = None  # None: 2 * r (scaling alpha / r = 2 for every method)
    dropout: float = 0.05
    router: str = "softmax"  # softmax | mean | balanced | topk
    top_k: int = 2
    balance_coef: float = 0.01
    target_modules: Union[list[str], str] = field(default_factory=lambda: "ffn")
    init_seed: Union[int, None] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {METHODS}")
        if self.alpha is None:
            self.alpha = 2.0 * self.r

    def mor_config(self) -> MoRConfig:
        return MoRConfig(method=self.method, r=self.r, num_experts=self.num_experts, alpha=self.alpha,
                         dropout=self.dropout, router=self.router, top_k=self.top_k,
                         balance_coef=self.balance_coef, target_modules=self.target_modules,
                         init_seed=self.init_seed)

    def parameter_count(self, model: nn.Module) -> int:
        """Closed-form trainable parameters of this adapter on ``model`` (see mor.params)."""
        return parameter_count(model, self.method, self.r, self.num_experts, self.target_modules, self.router)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_adapter(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Freeze ``model`` and attach the adapter of ``spec``; returns the wrapped model."""
    if spec.method in ("mor", "moelora"):
        return get_mor_model(model, spec.mor_config())
    from peft import LoraConfig, get_peft_model

    # Resolve the targets with our matcher so that every method adapts exactly the same modules
    # and a bad name gets the same clear error.
    targets = spec.target_modules
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        targets = TARGET_PRESETS[targets]
    names = find_target_modules(model, MoRConfig(target_modules=targets))
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        use_dora=spec.method == "dora", task_type="CAUSAL_LM")
    if spec.init_seed is not None:
        import torch

        torch.manual_seed(spec.init_seed)
    return get_peft_model(model, config)
