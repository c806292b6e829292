"""MoR: Mixture of Ranks adapters for Hugging Face models (arXiv 2410.13408), as a peft method.

    import mor, peft
    model = peft.get_peft_model(base_model, mor.MoRConfig(r=8, num_experts=8))
"""

from .runtime.system import silence_unactionable_warnings as _silence

_silence()  # before peft imports bitsandbytes, which logs a warning no user can act on

from .model import register as _register  # noqa: E402

_register()  # MoR becomes a peft method: get_peft_model, PeftModel.from_pretrained, TRL's peft_config

from .baselines.moelora import MoELoRAAdapter  # noqa: E402
from .config import MoELoRAConfig, MoRConfig  # noqa: E402
from .layer import MixtureLayer, MoRAdapter  # noqa: E402
from .model import MoRModel, RoutingProfile, get_mor_model, is_mor_model, load_adapter  # noqa: E402
from .params import count_trainable_parameters, layer_parameter_count, parameter_count  # noqa: E402
from .routing import Router, load_balancing_loss  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "MoRConfig", "MoELoRAConfig", "MoRAdapter", "MoELoRAAdapter", "MixtureLayer", "MoRModel", "RoutingProfile",
    "Router", "get_mor_model", "is_mor_model", "load_adapter", "parameter_count", "layer_parameter_count",
    "count_trainable_parameters", "load_balancing_loss",
]
