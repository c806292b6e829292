"""``MoRConfig``: every setting of a MoR (or MoE-LoRA) adapter as a peft config — the fields of
``mor.options.MoROptions`` (the single place where each field's default and meaning live, readable
without peft) on top of peft's ``PeftConfig``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft import PeftConfig

from .options import ALL_METHODS, INITS, METHODS, ROUTERS, TARGET_PRESETS, MoROptions
from .errors import AdapterError, MissingInput

__all__ = ["ALL_METHODS", "CONFIG_NAME", "INITS", "METHODS", "MoELoRAConfig", "MoRConfig", "PEFT_TYPE", "ROUTERS",
           "TARGET_PRESETS", "WEIGHTS_NAME", "read_adapter_config"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "MOR"


@dataclass
class MoRConfig(PeftConfig, MoROptions):
    """Configuration of a Mixture-of-Ranks adapter (``method="mor"``) or of the MoE-LoRA baseline
    (``method="moelora"``). Per adapted layer W: d_in -> d_out MoR learns A (r x d_in),
    B (d_out x r), expert scales Omega_A (N x r), Omega_B (N x d_out) and a router W_g (N x d_in);
    see ``mor.layer`` for the equation. Use it like any peft config: ``get_peft_model(model, MoRConfig())``.
    """

    task_type: Optional[str] = field(default="CAUSAL_LM", metadata={"help": "peft task type"})

    def __post_init__(self) -> None:
        super().__post_init__()  # peft's checks (task type, peft version)
        self.peft_type = PEFT_TYPE
        self.resolve()  # presets, alpha's default, validation (MoROptions)

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "MoRConfig":
        """The config of a saved MoR adapter folder (current or legacy format), with clear errors."""
        data = read_adapter_config(folder)
        if data.get("peft_type") != PEFT_TYPE and data.get("adapter_type") != "mor":
            raise AdapterError(f"{Path(folder) / CONFIG_NAME} is not a MoR/MoE-LoRA adapter config "
                                 f"(peft_type={data.get('peft_type')!r}).")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "MoRConfig":
        known = set(cls.__dataclass_fields__)
        legacy = {"adapter_type", "mor_version"}
        unknown = sorted(set(data) - known - legacy)
        if unknown:
            raise AdapterError(f"Unknown MoRConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known and k != "peft_type"})


def read_adapter_config(folder: Union[str, Path]) -> dict:
    """The parsed adapter_config.json of an adapter folder (ours or peft's), with clear errors."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise MissingInput(f"No {CONFIG_NAME} in {folder}: pass a folder written by save_pretrained.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(data, dict):
        raise AdapterError(f"{path} holds a JSON {type(data).__name__}, not an object of adapter settings "
                             "({\"peft_type\": ..., \"r\": ...}); re-save the adapter with save_pretrained.")
    return data


def MoELoRAConfig(**kwargs) -> MoRConfig:
    """Config of the MoE-LoRA baseline: ``MoRConfig(method="moelora", ...)``."""
    return MoRConfig(method="moelora", **kwargs)
