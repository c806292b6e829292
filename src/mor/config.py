"""``MoRConfig``: every setting of a MoR (or MoE-LoRA) adapter, documented and validated."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Union

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

METHODS = ("mor", "moelora")
ROUTERS = ("softmax", "mean", "balanced", "topk")
INITS = ("ones_noise", "ones")

#: Presets for ``target_modules`` (LLaMA-family names; other models: give the names).
TARGET_PRESETS: dict[str, list[str]] = {
    "ffn": ["gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention+ffn": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
ALL_LINEAR = "all-linear"


@dataclass
class MoRConfig:
    """Configuration of a Mixture-of-Ranks adapter (``method="mor"``) or of the MoE-LoRA
    baseline (``method="moelora"``: N independent LoRA experts with the same router).

    Per adapted layer ``W: d_in -> d_out`` MoR learns a shared pair ``A (r x d_in)``,
    ``B (d_out x r)``, expert scales ``Omega_A (N x r)``, ``Omega_B (N x d_out)`` and a router
    ``W_g (N x d_in)``; see ``mor.layer`` for the equation.
    """

    #: "mor" (shared A, B + per-expert scaling vectors) or "moelora" (N independent LoRA pairs).
    method: str = "mor"
    #: Rank r of the shared pair (MoR) or of each expert (MoE-LoRA). Must be >= 1.
    r: int = 8
    #: Number of experts N. Must be >= 1.
    num_experts: int = 8
    #: LoRA-style scale: the update is multiplied by alpha / r.
    alpha: float = 16.0
    #: Dropout on the adapter's input (not on the frozen base path). 0 disables it.
    dropout: float = 0.05
    #: Which modules to adapt: a list of module-name suffixes (e.g. ["gate_proj", "up_proj"]),
    #: a preset name ("ffn", "attention", "attention+ffn"), "all-linear" (every Linear/Conv1D
    #: but the output head), or any other string, read as a regular expression that must match
    #: the module's full dotted name.
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(TARGET_PRESETS["ffn"]))
    #: Router strategy: "softmax" (learned, the paper's best), "mean" (uniform 1/N weights, no
    #: router parameters), "balanced" (softmax + load-balancing auxiliary loss), "topk" (softmax
    #: kept on the top_k experts and renormalised).
    router: str = "softmax"
    #: Experts kept per token with router="topk".
    top_k: int = 2
    #: Coefficient of the load-balancing auxiliary loss with router="balanced".
    balance_coef: float = 0.01
    #: Initialisation of the expert scales: "ones_noise" (1 + N(0, init_scale_std^2), so the
    #: experts differ from the start) or "ones" (all experts identical; only the router breaks
    #: the symmetry). B starts at zero either way, so the adapted model equals the base model.
    init: str = "ones_noise"
    #: Standard deviation of the noise of init="ones_noise".
    init_scale_std: float = 0.1
    #: Seed for the adapter's initialisation (None: use torch's current generator).
    init_seed: Union[int, None] = None
    #: Name or path of the base model, recorded when saving (informational).
    base_model_name_or_path: Union[str, None] = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""

        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"MoRConfig.{name}={getattr(self, name)!r} is invalid: {allowed}.")

        check(self.method in METHODS, "method", f"choose one of {METHODS}")
        check(_is_int(self.r) and self.r >= 1, "r", "the rank must be an integer >= 1")
        check(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "need an integer >= 1 experts")
        check(self.router in ROUTERS, "router", f"choose one of {ROUTERS}")
        check(_is_int(self.top_k) and self.top_k >= 1, "top_k", "must be an integer >= 1")
        if self.router == "topk":
            check(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts={self.num_experts}")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(self.balance_coef >= 0, "balance_coef", "must be >= 0")
        check(self.init in INITS, "init", f"choose one of {INITS}")
        check(self.init_scale_std >= 0, "init_scale_std", "must be >= 0")
        targets = self.target_modules
        check(
            (isinstance(targets, str) and targets != "")
            or (isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) and t for t in targets)),
            "target_modules",
            "give a non-empty list of module names, a preset (ffn, attention, attention+ffn), 'all-linear' or a regex",
        )
        if isinstance(targets, tuple):
            self.target_modules = list(targets)

    @property
    def scaling(self) -> float:
        """The factor alpha / r applied to every expert's update."""
        return self.alpha / self.r

    @property
    def target_names(self) -> Union[list[str], str]:
        """target_modules with presets expanded (a list of suffixes, "all-linear" or a regex)."""
        if isinstance(self.target_modules, str) and self.target_modules in TARGET_PRESETS:
            return list(TARGET_PRESETS[self.target_modules])
        return self.target_modules

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"adapter_type": "mor", **asdict(self)}

    def save(self, folder: Union[str, Path]) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "MoRConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"adapter_type", "mor_version"})
        if unknown:
            raise ValueError(f"Unknown MoRConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "MoRConfig":
        data = read_adapter_config(folder)
        if data.get("adapter_type") != "mor":
            raise ValueError(f"{Path(folder) / CONFIG_NAME} is not a MoR/MoE-LoRA adapter config "
                             f"(adapter_type={data.get('adapter_type')!r}).")
        return cls.from_dict(data)


def read_adapter_config(folder: Union[str, Path]) -> dict:
    """The parsed adapter_config.json of an adapter folder (ours or peft's), with clear errors."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {folder}: pass a folder written by save_pretrained.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter.") from err


def MoELoRAConfig(**kwargs) -> MoRConfig:
    """Config of the MoE-LoRA baseline: ``MoRConfig(method="moelora", ...)``."""
    return MoRConfig(method="moelora", **kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
