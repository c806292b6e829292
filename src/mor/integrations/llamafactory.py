"""MoR in LLaMA-Factory: ``peft_config: {name: mor, ...}`` in a LLaMA-Factory v1 YAML, trained with

    python -m mor.integrations.llamafactory sft CONFIG.yaml [key=value ...]

LLaMA-Factory's stable trainer (``llamafactory-cli train``) accepts only ``finetuning_type`` lora,
oft, freeze or full, and has no extension point. Its v1 trainer (0.9.5) builds every adapter
through a registry, ``PeftPlugin(name)``: this module registers ``PeftPlugin("mor")``, and the
entry script above is LLaMA-Factory's own v1 launcher with that registration done first (its
``llamafactory-cli`` loads no outside plugin). Checked on llamafactory 0.9.5 (``LLAMAFACTORY_CHECKED``).

The ``peft_config`` block takes MoRConfig's fields, and ``adapter_name_or_path`` (one MoR folder:
continue training it, or run it un-merged). An unknown key is an error naming it. LLaMA-Factory's
own adapter loading merges adapters with ``merge_and_unload()`` (no routing); MoR folders are never
merged here: merge or export them with ``mor merge`` / ``mor export-lora`` (docs/trainers.md).
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Optional

from .. import _compat
from ..errors import MorError, SettingsError
from . import BLOCK_FIELDS, mor_config

PLUGIN = "mor"
LLAMAFACTORY_CHECKED = ((0, 9), (0, 10))  # [min, max): the llamafactory releases this plugin was tested with
LOADING_KEYS = ("adapter_name_or_path",)  # what the block takes besides MoRConfig's fields (and "name")
COMMANDS = ("sft", "train")  # LLaMA-Factory v1's launcher commands that build a model with PeftPlugin
USAGE = "usage: python -m mor.integrations.llamafactory sft CONFIG.yaml [key=value ...]"


def check_llamafactory_version(version: Optional[str] = None) -> None:
    """ImportError, one line, for a llamafactory outside the releases this plugin was tested with."""
    low, high = LLAMAFACTORY_CHECKED
    try:
        version = version or importlib.metadata.version("llamafactory")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("mor.integrations.llamafactory needs LLaMA-Factory: pip install llamafactory==0.9.5 "
                          "(docs/trainers.md says which of its dependencies a CPU needs)") from None
    if not low <= _compat._release(version) < high:
        raise ImportError(f"mor.integrations.llamafactory supports llamafactory>={low[0]}.{low[1]},"
                          f"<{high[0]}.{high[1]} (its v1 PeftPlugin registry); llamafactory {version} is installed")


def block_config(block: dict, base_model: Optional[str] = None):
    """The MoRConfig of a ``peft_config: {name: mor, ...}`` block; a key it does not know is an error naming it."""
    for key in block:
        if key not in (*BLOCK_FIELDS, *LOADING_KEYS, "name"):
            raise SettingsError(f"peft_config.{key} is not a MoR setting; name: mor takes {', '.join(BLOCK_FIELDS)} "
                                f"and {', '.join(LOADING_KEYS)}")
    if block.get("router") == "balanced":
        raise SettingsError("peft_config.router=balanced is not supported in LLaMA-Factory: its v1 trainer computes "
                            "the loss from the logits, so the router's load-balancing loss would never be trained. "
                            "Use router softmax, topk or mean here, or train balanced with mor train, TRL or axolotl")
    return mor_config(block, base_model)


def get_mor_model(model, config: dict, is_train: bool = False):
    """LLaMA-Factory's ``PeftPlugin("mor")``: a new MoR adapter on ``model``, or with
    ``adapter_name_or_path`` the saved one (trainable when training), never merged."""
    from peft import get_peft_model

    from ..model import load_adapter

    settings = block_config(config, getattr(model, "name_or_path", None))
    folders = config.get("adapter_name_or_path")
    if folders:
        folders = [folders] if isinstance(folders, str) else list(folders)
        if len(folders) != 1:
            raise SettingsError(f"peft_config.adapter_name_or_path names {len(folders)} folders; MoR takes one: "
                                "MoR adapters cannot be merged into the base without a routing (merge one with "
                                "mor merge, then train or run the next on the merged model)")
        return load_adapter(model, folders[0], is_trainable=is_train)
    settings.inference_mode = not is_train
    model = get_peft_model(model, settings)
    if is_train:
        model.print_trainable_parameters()
    return model


def register() -> None:
    """Register ``PeftPlugin("mor")`` with LLaMA-Factory (idempotent)."""
    check_llamafactory_version()
    from llamafactory.v1.plugins.model_plugins.peft import PeftPlugin

    try:
        registered = PeftPlugin(PLUGIN)["__call__"]
    except ValueError:  # not registered yet
        registered = None
    if registered is not get_mor_model:
        PeftPlugin(PLUGIN).register()(get_mor_model)


def main(argv: Optional[list] = None) -> int:
    """``python -m mor.integrations.llamafactory sft CONFIG.yaml [key=value ...]``: LLaMA-Factory's v1
    launcher, in this process, with MoR registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS or len(argv) < 2:
        print(f"error: {USAGE} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        register()
    except ImportError as err:  # no llamafactory, or one outside the checked releases
        print(f"error: {err}", file=sys.stderr)
        return 2
    from llamafactory.v1 import launcher

    saved, sys.argv = sys.argv, ["llamafactory", *argv]  # the launcher reads its command and config from sys.argv
    try:
        launcher.main()
    except MorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
