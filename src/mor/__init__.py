"""MoR: Mixture of Ranks adapters for Hugging Face models (arXiv 2410.13408), as a peft method.

    import mor, peft
    model = peft.get_peft_model(base_model, mor.MoRConfig(r=8, num_experts=8))

``import mor`` is instant: the names below are imported on first use, and MoR is registered with
peft (get_peft_model, PeftModel.from_pretrained, TRL's peft_config) as soon as peft is imported,
before or after mor (see ``mor.startup``).
"""

from importlib import import_module

from .startup import register_with_peft_when_imported, silence_unactionable_warnings

silence_unactionable_warnings()  # before peft imports bitsandbytes, which logs a warning no user can act on
register_with_peft_when_imported()

__version__ = "0.2.0"

#: The public names, and the module of each (imported when the name is first used).
_PUBLIC = {
    "MoRConfig": "config", "MoELoRAConfig": "config", "MoRAdapter": "layer", "MoELoRAAdapter": "baselines.moelora",
    "MixtureLayer": "layer", "MoRModel": "model", "RoutingProfile": "model", "Router": "routing",
    "get_mor_model": "model", "is_mor_model": "model", "load_adapter": "model", "parameter_count": "params",
    "layer_parameter_count": "params", "count_trainable_parameters": "params", "load_balancing_loss": "routing",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mor' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
