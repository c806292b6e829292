"""MoR as an axolotl adapter: ``plugins: [mor.integrations.axolotl.MoRPlugin]`` and ``adapter: mor``
in an axolotl YAML, with a ``mor:`` block of :class:`mor.MoRConfig`'s fields (and
``router_lr_multiplier``). Checked on axolotl 0.19.0 (see ``AXOLOTL_CHECKED``).

axolotl's extension points used: ``get_adapter_capabilities`` (axolotl then accepts ``adapter:
mor``), ``get_input_args`` (the ``mor:`` block, validated by axolotl's pydantic config: an unknown
key is axolotl's validation error naming it), ``load_adapter`` (``get_peft_model`` or, with
``lora_model_dir``, the strict ``mor.load_adapter``), ``create_optimizer`` / ``post_trainer_create``
(the router's learning-rate group) and ``add_callbacks_post_trainer`` (the router's load-balancing
loss in the logs). axolotl's ``merge-lora`` calls ``merge_and_unload()`` without a routing: merge
its output folder with ``mor merge`` instead (docs/trainers.md).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from .. import _compat
from ..config import MoRConfig
from ..train.config import TrainConfig
from . import BLOCK_FIELDS, mor_config

ADAPTER = "mor"
AXOLOTL_CHECKED = ((0, 19), (0, 20))  # [min, max): the axolotl releases this plugin was tested with
TRAINING_FIELDS = ("router_lr_multiplier",)  # from TrainConfig: a training setting, not the adapter's


def _block_field(cls, name: str):
    item = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    return (hint, Field(default=item.default, description=item.metadata.get("help")))


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is axolotl's validation error, naming it

    @model_validator(mode="after")
    def _valid_config(self):
        mor_config(self.model_dump())  # MoRConfig's own checks: one source for what is allowed
        return self


#: the ``mor:`` block: MoRConfig's fields and router_lr_multiplier, with their defaults and help
MoRBlock = create_model("MoRBlock", __base__=_Block,
                        **{name: _block_field(MoRConfig, name) for name in BLOCK_FIELDS},
                        **{name: _block_field(TrainConfig, name) for name in TRAINING_FIELDS})


class MoRArgs(BaseModel):
    """What the plugin adds to axolotl's config (``get_input_args``)."""

    mor: Optional[MoRBlock] = Field(default=None, description="MoR adapter settings (adapter: mor); "
                                                              "plugins: [mor.integrations.axolotl.MoRPlugin]")

    @model_validator(mode="before")
    @classmethod
    def _refuse_8bit(cls, data: Any):
        if isinstance(data, dict) and data.get("adapter") == ADAPTER and data.get("load_in_8bit"):
            raise ValueError("adapter: mor does not support load_in_8bit (MoR wraps float and bitsandbytes 4-bit "
                             "linear layers only): use load_in_4bit, or a full-precision base")
        return data


def _router_lr_multiplier(cfg) -> float:
    block = cfg.get("mor") or {}
    return float(block.get("router_lr_multiplier") or 1.0)


def check_axolotl_version(version: str) -> None:
    """ImportError, one line, for an axolotl outside the releases this plugin was tested with."""
    low, high = AXOLOTL_CHECKED
    if not low <= _compat._release(version) < high:
        raise ImportError(f"mor.integrations.axolotl supports axolotl>={low[0]}.{low[1]},<{high[0]}.{high[1]}; "
                          f"axolotl {version} is installed")


def _plugin_base():
    import axolotl
    from axolotl.integrations.base import BasePlugin

    check_axolotl_version(axolotl.__version__)
    return BasePlugin


class MoRPlugin(_plugin_base()):
    """The axolotl plugin of MoR (``plugins: [mor.integrations.axolotl.MoRPlugin]``)."""

    def get_input_args(self) -> str:
        return f"{__name__}.MoRArgs"

    def get_adapter_capabilities(self) -> list:
        from axolotl.integrations.base import AdapterCapabilities

        return [AdapterCapabilities(name=ADAPTER, lora_like=False)]

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.get("adapter") != ADAPTER:
            return None
        from peft import get_peft_model

        from ..model import load_adapter

        config = mor_config(cfg.get("mor"), cfg.get("base_model"))
        if config_only:
            return None, config
        if cfg.get("lora_model_dir"):  # axolotl's key for "continue from / run this adapter folder"
            model = load_adapter(model, cfg["lora_model_dir"], is_trainable=not inference)
            return model, model.peft_config["default"]
        return get_peft_model(model, config), config

    def create_optimizer(self, cfg, trainer):
        """The trainer's own optimizer with the router's parameters in groups of their own at lr times
        ``router_lr_multiplier`` (None when it is 1: axolotl's optimizer as it is)."""
        multiplier = _router_lr_multiplier(cfg)
        if cfg.get("adapter") != ADAPTER or multiplier == 1.0 or getattr(trainer, "mor_router_groups", False):
            return None
        from ..train.trainer import split_router_groups

        trainer.mor_router_groups = True  # axolotl's create_optimizer may call back into plugins
        optimizer = trainer.optimizer or trainer.create_optimizer()
        split_router_groups(optimizer, trainer.model, multiplier)
        return optimizer

    def post_trainer_create(self, cfg, trainer) -> None:
        # axolotl 0.19 never calls plugins' create_optimizer: build it here, before train() would
        optimizer = self.create_optimizer(cfg, trainer)
        if optimizer is not None:
            trainer.optimizer = optimizer

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        if cfg.get("adapter") != ADAPTER:
            return []
        return [RouterLossLogCallback()]


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class RouterLossLogCallback(_callback_base()):
    """Adds the router's load-balancing loss (router="balanced") to each logged loss, as ``mor train`` logs it."""

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        aux = getattr(model, "last_router_aux_loss", None)
        if logs is not None and aux is not None and "loss" in logs:
            logs["router_aux_loss"] = round(aux, 5)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["router_aux_loss"] = logs["router_aux_loss"]
