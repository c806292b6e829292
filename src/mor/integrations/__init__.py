"""MoR inside other trainers: ``mor.integrations.axolotl.MoRPlugin`` (an axolotl plugin) and
``mor.integrations.llamafactory`` (LLaMA-Factory's ``PeftPlugin("mor")``, with its entry script
``python -m mor.integrations.llamafactory sft CONFIG.yaml``). Each imports its trainer only when used;
what they share (the adapter block of a trainer's config) is here."""

from __future__ import annotations

import dataclasses
from typing import Optional

from peft import PeftConfig

from ..config import MoRConfig

#: MoRConfig's own fields (not peft's bookkeeping ones) that a trainer's adapter block takes
BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(MoRConfig)
                     if f.name not in {g.name for g in dataclasses.fields(PeftConfig)} | {"base_model_fingerprint"})


def mor_config(block: Optional[dict], base_model: Optional[str] = None) -> MoRConfig:
    """The MoRConfig of a trainer's adapter block (its other keys, e.g. router_lr_multiplier, left out)."""
    fields = {k: v for k, v in (block or {}).items() if k in BLOCK_FIELDS and v is not None}
    return MoRConfig(**fields, base_model_name_or_path=base_model)
