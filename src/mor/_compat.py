"""Everything mor borrows from other libraries' private names, in one place.

Each entry below uses a name that its library does not promise to keep (a leading underscore, or
writing into a module's tables). The versions each was checked on are in ``CHECKED``; outside
them, :func:`check_versions` (called when MoR registers with peft, i.e. at import) fails with one
line naming the installed and the supported versions, never a traceback deep in a forward.
``tests/test_compat.py`` checks that no other module of the package touches another library's
private name, and that every private hook mor overrides is listed in ``OVERRIDDEN_HOOKS``.
"""

from __future__ import annotations

import importlib.metadata

#: library -> ([min, max) release range the private names below were checked on, what needs it)
CHECKED: dict[str, tuple[tuple[int, int], tuple[int, int], str]] = {
    "peft": ((0, 18), (0, 22), "MoR registers in peft.mapping and subclasses peft's BaseTuner"),
    # 4.55: LLaMA-Factory 0.9.5's floor; below 4.56 the dtype keyword is torch_dtype (dtype_kwargs)
    "transformers": ((4, 55), (6, 0), "the Trainer's _load_from_checkpoint, checked on 4.55 to 5.19"),
}

#: private methods of other libraries' classes that mor's subclasses override, by the class they
#: override it on: peft's tuner hooks (every tuner implements them; peft has no other extension
#: point for a new method) and the Trainer's checkpoint loader.
OVERRIDDEN_HOOKS: dict[str, tuple[str, ...]] = {
    "peft.tuners.tuners_utils.BaseTuner": ("_pre_injection_hook", "_post_injection_hook", "_create_and_replace",
                                           "_check_target_module_exists", "_remove_adapter_name_from_key",
                                           "_replace_module"),
    "transformers.Trainer": ("_load_from_checkpoint",),
}


def _release(version: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def supported_range(library: str) -> str:
    low, high, _ = CHECKED[library]
    return f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


def check_version(library: str, version: str | None = None) -> None:
    """ImportError, one line, when ``library``'s installed version is outside the checked range."""
    version = version or importlib.metadata.version(library)
    low, high, why = CHECKED[library]
    if not low <= _release(version) < high:
        raise ImportError(f"mor supports {library}{supported_range(library)} ({why}); {library} {version} is "
                          f"installed. Install a supported one: pip install '{library}{supported_range(library)}'")


def check_versions() -> None:
    """Every checked library that is installed must be in its range (called at registration)."""
    import peft

    check_version("peft", peft.__version__)
    check_version("transformers")


# -- peft ----------------------------------------------------------------------------------------------

def register_peft_method(peft_type: str, config_cls, model_cls, prefix: str) -> None:
    """Make ``peft_type`` a peft method. peft's own ``register_peft_method`` only takes members of
    its ``PeftType`` enum, so the three tables it fills are written here, as it writes them."""
    import peft
    from peft import mapping

    tables = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")
    missing = [name for name in tables if not isinstance(getattr(mapping, name, None), dict)]
    if missing:
        raise ImportError(f"mor supports peft{supported_range('peft')}: peft {peft.__version__} has no "
                          f"peft.mapping.{missing[0]}, where MoR registers")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    if _release(peft.__version__) < (0, 21):
        _add_peft_type(peft_type)
        _save_with_tuner_keys(peft_type, model_cls)


def _add_peft_type(peft_type: str) -> None:
    """peft <0.21 saves only the methods of its ``PeftType`` enum (``get_peft_model_state_dict``
    checks ``config.peft_type in list(PeftType)``): add a member, as ``enum`` stores its members."""
    from peft.utils.peft_types import PeftType

    if peft_type in PeftType._member_map_:
        return
    member = str.__new__(PeftType, peft_type)
    member._name_, member._value_ = peft_type, peft_type
    PeftType._member_map_[peft_type] = member
    PeftType._value2member_map_[peft_type] = member
    PeftType._member_names_.append(peft_type)


def _save_with_tuner_keys(peft_type: str, model_cls) -> None:
    """peft <0.21 removes the adapter name from a saved key only where it is the second-to-last
    part; peft 0.21 asks the tuner (``_remove_adapter_name_from_key``), which MoR's router key needs
    (``<layer>.mor.<adapter>.router.weight``). Wrap peft's ``get_peft_model_state_dict`` wherever a
    loaded module holds it, so MoR files are the same on every supported peft."""
    import sys

    from peft.utils import save_and_load

    original = save_and_load.get_peft_model_state_dict
    if getattr(original, "mor_wrapped", False):
        return

    def get_peft_model_state_dict(model, state_dict=None, adapter_name="default", *args, **kwargs):
        tensors = original(model, state_dict, adapter_name, *args, **kwargs)
        if getattr(model.peft_config[adapter_name], "peft_type", None) != peft_type:
            return tensors
        return {model_cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in tensors.items()}

    get_peft_model_state_dict.mor_wrapped = True
    get_peft_model_state_dict.__doc__ = original.__doc__
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get("get_peft_model_state_dict") is original:  # no lazy imports
            module.get_peft_model_state_dict = get_peft_model_state_dict


def include_all_linear_layers(config, model):
    """``config`` with target_modules="all-linear" expanded to ``model``'s linear layers, as peft does."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def is_excluded(match) -> bool:
    """True when peft's ``check_target_module_exists`` answered "excluded" (exclude_modules)."""
    from peft.tuners.tuners_utils import _ExcludedModule

    return isinstance(match, _ExcludedModule)


def unload_and_optionally_merge(tuner, **kwargs):
    """peft's walk over the tuner layers that merges (or not) and puts the base layers back."""
    return tuner._unload_and_optionally_merge(**kwargs)


# -- bitsandbytes ----------------------------------------------------------------------------------------

def unpack_4bit_for_cpu(codes, quant_state):
    """bitsandbytes' inverse of its CPU bf16 repacking of 4-bit weights: (codes, state) in its
    standard layout (checked on bitsandbytes 0.49-0.50; older releases never repack)."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as err:
        raise ImportError(f"this bitsandbytes ({importlib.metadata.version('bitsandbytes')}) repacked a 4-bit "
                          "weight for its CPU kernel but has no inverse mor knows (checked on 0.49-0.50)") from err
    return _convert_weight_packed_for_cpu_inverse(codes, quant_state)


# -- torch -------------------------------------------------------------------------------------------

def parameter_versions(params) -> list[tuple[int, int]]:
    """(storage pointer, in-place version counter) of each tensor: any change to one changes its entry."""
    return [(p.data_ptr(), p._version) for p in params]


def direct_parameters(module):
    """The parameters registered on ``module`` itself (not its children), without named_parameters' walk."""
    return module._parameters.values()


def compiled_original(model):
    """The module a ``torch.compile`` wrapper (OptimizedModule) wraps."""
    return model._orig_mod


# -- transformers ------------------------------------------------------------------------------------

def dtype_kwargs(dtype) -> dict:
    """The keyword of ``from_pretrained`` / ``from_config`` that sets the weights' dtype: ``dtype`` since
    transformers 4.56, ``torch_dtype`` before (4.55, which LLaMA-Factory 0.9.5 allows)."""
    import transformers

    return {"dtype" if _release(transformers.__version__) >= (4, 56) else "torch_dtype": dtype}


def require_training_argument(name: str, what: str) -> None:
    """ValueError, one line, when this transformers' TrainingArguments lacks ``name`` (transformers 4.x
    lacks train_sampling_strategy, which ``mor train`` sets): the library runs on 4.55, ``mor train`` on 5."""
    import inspect

    from transformers import TrainingArguments

    if name not in inspect.signature(TrainingArguments).parameters:
        raise ValueError(f"{what} needs a transformers whose TrainingArguments takes {name} (5.x); transformers "
                         f"{importlib.metadata.version('transformers')} is installed: pip install 'transformers>=5,<6'")


def load_trainer_checkpoint(trainer, folder: str) -> None:
    """The Trainer's loading of a checkpoint's model weights, without training a step."""
    trainer._load_from_checkpoint(folder)


def set_scheduler_last_lr(scheduler, lrs: list[float]) -> None:
    """What ``scheduler.get_last_lr()`` answers (the Trainer logs it) after its lambdas were changed."""
    scheduler._last_lr = lrs
