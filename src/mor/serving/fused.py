"""A serving engine's linear layer plus the MoR / MoE-LoRA adapters of its output slices.

Serving engines fuse projections that read the same input: vLLM computes [W_q; W_k; W_v] x as
one ``qkv_proj`` and [W_gate; W_up] x as one ``gate_up_proj``. Each original projection keeps
its own adapter, so the fused layer computes, for every adapted slice s of its output
(columns c_s, in the engine's order):

    [W_g,s; down_s] x      for all slices at once: ONE product with the stacked (d_in, sum_s (N_s + R_s))
    G_s = gates_from_logits(W_g,s x)          (T, N)    mor.routing: softmax / top-k / uniform
    z_s = mix_s(G_s, down_s x)                (T, N*r)  MoRAdapter.mix: G_i * A x for each expert i
    out[:, c_s] += scale_s * z_s @ up_t_s     U_s z_s, with U_s built by the adapter itself

which is, slice by slice, the equation of ``MoRAdapter.forward`` (``MoELoRAAdapter.forward``):
the factors come from the adapters' own ``serving_factors()``, the gates from the same function
the training router uses. Nothing is merged and no routing is fixed: every token is routed.
The products with the token-independent factors go through a ``gemm`` the engine may give (vLLM's
CPU build: its own prepacked oneDNN GEMM, the one its base layers use; torch's elsewhere).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from ..config import MoRConfig
from ..layer import MoRAdapter
from ..routing import gates_from_logits
from ..errors import AdapterError

#: Adapter tensor names in a saved peft MoR folder, relative to the adapted module.
ADAPTER_PARAMS = ("lora_A", "lora_B", "expert_scales_in", "expert_scales_out", "router.weight")


Gemm = Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]  # weight_t (K, N) -> (x (T, K) -> x @ weight_t)


def torch_gemm(weight_t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ weight_t`` with torch: a served layer's GEMM unless the engine gives its own."""
    return functools.partial(torch.mm, mat2=weight_t)


@dataclass(frozen=True)
class ServedSlice:
    """Where one adapter's terms live in a fused layer (plain ints and strings: a compiler sees constants)."""

    name: str  # the original projection, e.g. "model.layers.0.self_attn.k_proj"
    columns: tuple[int, int]  # its output columns [start, stop) in the fused layer
    logits: tuple[int, int] | None  # columns of W_g x in the router product (None: uniform router)
    codes: tuple[int, int]  # columns of down x in the stacked product
    num_experts: int
    strategy: str
    top_k: int
    scale: float  # 1 for MoR (alpha/r lives in U), alpha/r for MoE-LoRA


class ServedMixtureLinear(nn.Module):
    """``base_layer`` (any module returning W x, or (W x, bias) as vLLM's linear layers do) plus
    the adapters of its output slices, computed per token (see the module docstring). ``gemm``
    turns each token-independent factor into the product with it (torch's by default; an engine
    passes its own, e.g. vLLM's prepacked CPU GEMM, so the adapter runs as fast as the base)."""

    def __init__(self, base_layer: nn.Module, adapters: Mapping[str, nn.Module], columns: Mapping[str, tuple[int, int]],
                 gemm: Gemm = torch_gemm):
        super().__init__()
        self.base_layer = base_layer
        first = next(iter(adapters.values()))
        self.in_features = first.in_features
        self.dtype = first.dtype  # the adapter's own dtype, as in peft (fp32 over a bf16 base)
        device = _device_of(base_layer)
        downs, routers, ups, slices = [], [], [], []  # the stacked product's rows, fp32 router rows, U^T, slices
        stack_router = self.dtype == torch.float32  # then one product gives W_g x and down x, as in MoRAdapter
        width = router_width = 0  # columns so far of the stacked product and of the separate router product
        with torch.no_grad():
            for name, adapter in adapters.items():
                if adapter.in_features != self.in_features or adapter.dtype != self.dtype:
                    raise ValueError(f"{name}: every adapter of one fused layer needs the same input size and dtype")
                down, up, scale = adapter.serving_factors()  # (A, B, scale): B (d_out, R)
                up_t = up.T  # (R, d_out)
                router = adapter.router.weight  # W_g (N, d_in); None for the uniform router
                n = adapter.num_experts
                logits = None
                if router is not None and stack_router:
                    downs.append(router.detach())
                    logits = (width, width + n)
                    width += n
                elif router is not None:
                    routers.append(router.detach().float())
                    logits = (router_width, router_width + n)
                    router_width += n
                downs.append(down.detach())
                codes = (width, width + down.shape[0])
                width += down.shape[0]
                ups.append(up_t.detach().contiguous())
                start, stop = columns[name]
                if stop - start != up_t.shape[1]:
                    raise AdapterError(f"{name}: the adapter writes {up_t.shape[1]} outputs but the served layer has "
                                         f"{stop - start} in columns {start}:{stop}")
                slices.append(ServedSlice(name, (start, stop), logits, codes, n, adapter.router.strategy,
                                          adapter.router.top_k, float(scale)))
        self.slices = tuple(slices)
        self.mixes: tuple[Callable, ...] = tuple(adapter.mix for adapter in adapters.values())
        # token-independent factors, built once into the engine's GEMMs: [W_g; down]^T of every
        # slice side by side (the shrink), each slice's U^T (its expand)
        self.gemm_name = getattr(gemm, "__name__", type(gemm).__name__)
        self.shrink = gemm(torch.cat(downs).t().contiguous().to(device))
        self.expands: tuple[Callable, ...] = tuple(gemm(up_t.to(device)) for up_t in ups)
        self.register_buffer("router_t", torch.cat(routers).t().contiguous().to(device) if routers else None,
                             persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if isinstance(result, tuple):  # vLLM's linear layers return (output, output_bias)
            return (self.add_update(x, result[0]), *result[1:])
        return self.add_update(x, result)

    def add_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (W x) plus every slice's U_s z_s, in place when the dtypes agree."""
        tokens, stacked, logits = self._products(x)
        flat = out.reshape(-1, out.shape[-1])  # (T, d_out)
        work = flat if flat.dtype == self.dtype else flat.to(self.dtype)
        for part, mix, expand in zip(self.slices, self.mixes, self.expands):
            z = mix(self._gates(part, tokens, logits), stacked[:, part.codes[0]:part.codes[1]])  # (T, N*r)
            work[:, part.columns[0]:part.columns[1]].add_(expand(z), alpha=part.scale)
        return out if work is flat else work.to(out.dtype).view(out.shape)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each slice's router output G(x) (T, N) for inputs x, as the forward computes it (a probe)."""
        tokens, _, logits = self._products(x)
        return {part.name: self._gates(part, tokens, logits) for part in self.slices}

    def _products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (T, d_in) in the adapter's dtype, [W_g,s x, down_s x]_s, the fp32 router logits)."""
        tokens = x.reshape(-1, self.in_features)
        if tokens.dtype != self.dtype:
            tokens = tokens.to(self.dtype)
        stacked = self.shrink(tokens)  # (T, sum_s (N_s + R_s)): every slice's shrink in one product
        logits = stacked if self.router_t is None else tokens.float() @ self.router_t
        return tokens, stacked, logits

    def _gates(self, part: ServedSlice, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if part.logits is None:  # the uniform ("mean") router
            return tokens.new_full((tokens.shape[0], part.num_experts), 1.0 / part.num_experts)
        gates = gates_from_logits(logits[:, part.logits[0]:part.logits[1]], part.strategy, part.top_k)
        return gates if gates.dtype == self.dtype else gates.to(self.dtype)

    def extra_repr(self) -> str:
        return ("slices=" + ", ".join(f"{p.name.rsplit('.', 1)[-1]}[{p.columns[0]}:{p.columns[1]}]" for p in self.slices)
                + f", gemm={self.gemm_name}")


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


# -- building the adapters from saved tensors -----------------------------------------------------------------

def build_adapter(config: MoRConfig, tensors: Mapping[str, torch.Tensor], name: str) -> nn.Module:
    """The MoRAdapter / MoELoRAAdapter of ``config`` holding the saved ``tensors`` of one module
    ({"lora_A": ..., ...}); a missing, extra or mis-shaped tensor is an error naming it."""
    from ..baselines.moelora import MoELoRAAdapter

    a, b = tensors.get("lora_A"), tensors.get("lora_B")
    if a is None or b is None:
        raise AdapterError(f"{name}: the adapter has no lora_A/lora_B tensors (found {sorted(tensors)})")
    d_in, d_out = a.shape[-1], b.shape[-2]
    common = dict(r=config.r, num_experts=config.num_experts, alpha=config.alpha, router=config.router,
                  top_k=config.top_k, dtype=a.dtype)
    adapter = (MoELoRAAdapter(d_in, d_out, **common) if config.method == "moelora"
               else MoRAdapter(d_in, d_out, init=config.init, **common))
    own = adapter.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(own[k].shape)})"
             for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise AdapterError(f"{name}: the adapter tensors do not match its config "
                             f"(method={config.method}, r={config.r}, num_experts={config.num_experts}, "
                             f"router={config.router}): missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{name}: adapter tensors {bad} hold NaN or inf; the adapter is broken: retrain it")
    adapter.load_state_dict({k: v.to(a.dtype) for k, v in tensors.items()})
    return adapter.eval().requires_grad_(False)


def group_by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"model.layers.0.mlp.up_proj.lora_A": t, ...} -> {"model.layers.0.mlp.up_proj": {"lora_A": t, ...}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param = next((p for p in ADAPTER_PARAMS if key.endswith("." + p)), None)
        if param is None:
            raise ValueError(f"unexpected adapter tensor {key!r}; a MoR adapter holds {ADAPTER_PARAMS}")
        grouped.setdefault(key[: -len(param) - 1], {})[param] = value
    return grouped


def placement(module_name: str, packed: Mapping[str, list[str]]) -> tuple[str, str, int]:
    """(engine module, packed name or leaf, slice index) of an original projection: with vLLM's
    ``packed_modules_mapping`` {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...},
    "model.layers.0.self_attn.k_proj" -> ("model.layers.0.self_attn.qkv_proj", "qkv_proj", 1)."""
    parent, _, leaf = module_name.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}" if parent else fused, fused, parts.index(leaf)
    return module_name, leaf, 0


def attach_adapters(root: nn.Module, config: MoRConfig, tensors: Mapping[str, torch.Tensor],
                    packed: Mapping[str, list[str]], output_sizes: Callable[[nn.Module], list[int]],
                    placeable: Callable[[nn.Module], bool], gemm: Gemm = torch_gemm) -> dict[str, ServedMixtureLinear]:
    """Wrap every linear layer of ``root`` that an adapter targets in a ``ServedMixtureLinear``.

    ``tensors``: the adapter's tensors by original module name ("model.layers.0.mlp.up_proj.lora_A");
    ``packed``: the engine's fused projections; ``output_sizes(module)``: a layer's output slices in
    order; ``placeable(module)``: whether a module is a linear layer this can wrap; ``gemm``: the
    engine's GEMM for the adapters' factors (``ServedMixtureLinear``). Returns the wrapped layers
    by engine name.
    """
    grouped: dict[str, dict[str, nn.Module]] = {}
    columns: dict[str, dict[str, tuple[int, int]]] = {}
    for name, own in group_by_module(tensors).items():
        engine_name, fused, index = placement(name, packed)
        try:
            layer = root.get_submodule(engine_name)
        except AttributeError:
            raise AdapterError(f"the adapter targets {name!r}, which this model does not have as {engine_name!r}: "
                                 "was the adapter trained on this architecture?") from None
        if not placeable(layer):
            raise AdapterError(f"the adapter targets {name!r} ({type(layer).__name__} {engine_name!r} here), which the "
                                 "MoR server cannot place: it adapts the linear projections (q/k/v/o, gate/up/down)")
        sizes = output_sizes(layer)
        if index >= len(sizes):
            raise AdapterError(f"{engine_name} has {len(sizes)} output slices; {name} would be slice {index}")
        start = sum(sizes[:index])
        grouped.setdefault(engine_name, {})[name] = build_adapter(config, own, name)
        columns.setdefault(engine_name, {})[name] = (start, start + sizes[index])
    served = {}
    for engine_name, adapters in grouped.items():
        ordered = dict(sorted(adapters.items(), key=lambda item: columns[engine_name][item[0]][0]))
        wrapper = ServedMixtureLinear(root.get_submodule(engine_name), ordered, columns[engine_name], gemm)
        root.set_submodule(engine_name, wrapper)
        served[engine_name] = wrapper
    return served
