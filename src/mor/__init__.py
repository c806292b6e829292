"""MoR: Mixture of Ranks adapters for Hugging Face models (arXiv 2410.13408).

    import mor
    model = mor.get_mor_model(base_model, mor.MoRConfig(r=8, num_experts=8))
"""

from .baselines.moelora import MoELoRALinear
from .config import MoELoRAConfig, MoRConfig
from .layer import MixtureLinear, MoRLinear
from .model import MoRModel, RoutingProfile, find_target_modules, get_mor_model, load_adapter
from .params import count_trainable_parameters, layer_parameter_count, parameter_count
from .routing import Router, load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "MoRConfig", "MoELoRAConfig", "MoRLinear", "MoELoRALinear", "MixtureLinear", "MoRModel", "RoutingProfile",
    "Router", "get_mor_model", "load_adapter", "find_target_modules", "parameter_count", "layer_parameter_count",
    "count_trainable_parameters", "load_balancing_loss",
]
