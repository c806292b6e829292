"""Training runs: the settings (``config.TrainConfig``), the adapter of a run
(``adapters.AdapterSpec``), the data and model setup (``setup``), transformers' Trainer with what
is ours (``trainer``), and the recipe that puts them together (``recipe.run_training``).

    from mor.train import TrainConfig, AdapterSpec, run_training
    run_training(TrainConfig(data=["tasks/boolq"], adapter=AdapterSpec(r=8, num_experts=8)))
"""

from .adapters import AdapterSpec, apply_adapter
from .config import TrainConfig
from .recipe import TrainResult, run_training

__all__ = ["AdapterSpec", "TrainConfig", "TrainResult", "apply_adapter", "run_training"]
