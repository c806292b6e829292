"""Training runs: the settings (``config.TrainConfig``), the adapter of a run
(``adapters.AdapterSpec``), the data and model setup (``setup``), transformers' Trainer with what
is ours (``trainer``), and the recipe that puts them together (``recipe.run_training``).

    from mor.train import TrainConfig, AdapterSpec, run_training
    run_training(TrainConfig(data=["tasks/boolq"], adapter=AdapterSpec(r=8, num_experts=8)))
"""


from importlib import import_module

#: The public names and the module of each, imported on first use: the settings (``TrainConfig``,
#: ``AdapterSpec``) load without torch, so ``mor train --help`` is instant.
_PUBLIC = {"AdapterSpec": "adapters", "apply_adapter": "adapters", "TrainConfig": "config",
           "TrainResult": "recipe", "run_training": "recipe"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mor.train' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
