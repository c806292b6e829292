"""Wiring a MoR (or MoE-LoRA) adapter into a Hugging Face model: find the target modules, swap
them for mixture layers, and save / load / disable / merge — PEFT's verbs, without peft.

peft 0.21's ``register_peft_method`` only accepts names already in its ``PeftType`` enum, so
MoR cannot be registered there without patching peft; ``MoRModel`` mirrors ``PeftModel``'s
interface instead (``get_mor_model``, ``print_trainable_parameters``, ``save_pretrained``,
``from_pretrained``, ``disable_adapter``, ``merge_and_unload``).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .baselines.moelora import MoELoRALinear
from .config import ALL_LINEAR, CONFIG_NAME, WEIGHTS_NAME, MoRConfig, read_adapter_config
from .layer import Conv1D, MixtureLinear, MoRLinear

ROUTING_NAME = "routing_profile.json"


# -- finding and swapping target modules ---------------------------------------------------

def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_target_modules(model: nn.Module, config: MoRConfig) -> list[str]:
    """Dotted names of the modules ``config.target_modules`` selects; ValueError if none, or if
    a selected module is not a Linear/Conv1D."""
    targets = config.target_names
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, MixtureLinear) or name.endswith(".base_layer"):
            continue
        if targets == ALL_LINEAR:
            selected = _is_adaptable(module) and module is not output_head
        elif isinstance(targets, str):
            selected = re.fullmatch(targets, name) is not None
        else:
            selected = any(name == t or name.endswith("." + t) for t in targets)
        if not selected:
            continue
        if not _is_adaptable(module):
            raise ValueError(
                f"MoRConfig.target_modules selects {name!r}, a {type(module).__name__}; MoR adapts only "
                "torch.nn.Linear and transformers' Conv1D layers: name the linear projections instead"
            )
        names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_adaptable(m)})
        raise ValueError(
            f"MoRConfig.target_modules={config.target_modules!r} matches no module of "
            f"{type(model).__name__}; its linear layers are named {leaves}"
        )
    return names


def make_layer(base_layer: nn.Module, config: MoRConfig, generator: torch.Generator | None = None) -> MixtureLinear:
    """The mixture layer of ``config.method`` around ``base_layer``."""
    common = dict(r=config.r, num_experts=config.num_experts, alpha=config.alpha, dropout=config.dropout,
                  router=config.router, top_k=config.top_k, generator=generator)
    if config.method == "moelora":
        return MoELoRALinear(base_layer, **common)
    return MoRLinear(base_layer, init=config.init, init_scale_std=config.init_scale_std, **common)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


# -- routing profiles ------------------------------------------------------------------------

@dataclass
class RoutingProfile:
    """Fixed routing for every mixture layer: layer name -> expert weights g (N,), summing to 1.

    Measured as the mean router output over a task's tokens (``MoRModel.measure_routing``);
    with it, W' = W + sum_i g_i D_i is an exact merge.
    """

    weights: dict[str, torch.Tensor]

    def mean(self) -> torch.Tensor:
        """Expert weights averaged over layers: (N,)."""
        return torch.stack(list(self.weights.values())).mean(dim=0)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps({k: v.tolist() for k, v in self.weights.items()}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RoutingProfile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing profile not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a routing profile (invalid JSON: {err})") from err
        return cls({k: torch.tensor(v, dtype=torch.float32) for k, v in data.items()})


Routing = Union[RoutingProfile, torch.Tensor, Mapping[str, torch.Tensor], str, None]


# -- the model wrapper ------------------------------------------------------------------------

class MoRModel(nn.Module):
    """A Hugging Face model whose target modules carry MoR (or MoE-LoRA) adapters.

    It forwards like the wrapped model (attributes it does not have are looked up there, so
    ``generate``, ``config`` and gradient checkpointing work) and adds the router's
    load-balancing loss to ``loss`` when ``router="balanced"`` and the model is training.
    """

    def __init__(self, model: nn.Module, config: MoRConfig):
        super().__init__()
        self.mor_config = config
        self.base_model = model
        self.last_router_aux_loss: float | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        for name in find_target_modules(model, config):
            _set_submodule(model, name, make_layer(model.get_submodule(name), config, generator))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        output = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux = self.router_aux_loss()
        if aux is not None:
            self.last_router_aux_loss = float(aux.detach())
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss + self.mor_config.balance_coef * aux
            output["router_aux_loss"] = aux.detach()
        return output

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # -- introspection ------------------------------------------------------------------------
    def mor_layers(self) -> dict[str, MixtureLinear]:
        """Every mixture layer, by its dotted name in the base model."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MixtureLinear)}

    def router_aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss over layers from the last training forward (router="balanced")."""
        if self.mor_config.router != "balanced" or not self.training:
            return None
        losses = []
        for layer in self.mor_layers().values():
            if layer.router.aux_loss is not None:
                losses.append(layer.router.aux_loss)
                layer.router.aux_loss = None
        return torch.stack(losses).mean() if losses else None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter's tensors, keyed by '<layer name>.<parameter>'."""
        state = {}
        for name, layer in self.mor_layers().items():
            for pname, param in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    state[f"{name}.{pname}"] = param.detach()
        return state

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, Path], **_ignored) -> None:
        """Write adapter_config.json and adapter_model.safetensors (adapter weights only)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if self.mor_config.base_model_name_or_path is None:
            self.mor_config.base_model_name_or_path = getattr(self.base_model.config, "_name_or_path", None)
        self.mor_config.save(folder)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "adapter_type": "mor",
                                                                 "method": self.mor_config.method})

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: Union[str, Path], is_trainable: bool = False) -> "MoRModel":
        """Wrap ``model`` with the adapter saved in ``adapter_dir``; every tensor must match."""
        config = MoRConfig.load(adapter_dir)
        wrapped = cls(model, config)
        wrapped.load_adapter_weights(Path(adapter_dir) / WEIGHTS_NAME)
        if not is_trainable:
            wrapped.eval()
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped

    def load_adapter_weights(self, path: Union[str, Path]) -> None:
        """Load adapter tensors strictly: a missing, extra or mis-shaped tensor is an error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adapter weights not found: {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is corrupted or not a safetensors file ({err}); re-save the adapter") from err
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match this model and config: "
                + "; ".join(part for part in (
                    f"{len(missing)} missing tensors (e.g. {missing[:3]})" if missing else "",
                    f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})" if unexpected else "",
                    f"shape mismatches {wrong[:3]}" if wrong else "") if part)
                + ". Load it onto the same base model it was trained on, with its own adapter_config.json."
            )
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    # -- adapter on / off, fixed routing ----------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model is exactly the base model."""
        layers = list(self.mor_layers().values())
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, state in zip(layers, previous):
                layer.disabled = state

    def resolve_routing(self, routing: Routing) -> dict[str, torch.Tensor]:
        """Per-layer fixed weights (N,) from a profile, a single vector, a mapping or "uniform"."""
        layers = self.mor_layers()
        n = self.mor_config.num_experts
        if routing is None:
            if self.mor_config.router != "mean":
                raise ValueError(
                    "merging a learned router needs a fixed routing: pass routing=model.measure_routing(...) "
                    "(a RoutingProfile), a weight vector of length num_experts, or 'uniform'"
                )
            routing = "uniform"
        if isinstance(routing, str):
            if routing != "uniform":
                return self.resolve_routing(RoutingProfile.load(routing))
            return {name: torch.full((n,), 1.0 / n) for name in layers}
        if isinstance(routing, RoutingProfile):
            routing = routing.weights
        if isinstance(routing, torch.Tensor):
            routing = {name: routing for name in layers}
        missing = sorted(set(layers) - set(routing))
        if missing:
            raise ValueError(f"the routing profile has no weights for {len(missing)} layers, e.g. {missing[:3]}; "
                             "measure it on this adapter")
        resolved = {}
        for name in layers:
            g = torch.as_tensor(routing[name], dtype=torch.float32).reshape(-1)
            if g.numel() != n:
                raise ValueError(f"routing for {name} has {g.numel()} weights; this adapter has num_experts={n}")
            resolved[name] = g
        return resolved

    @contextlib.contextmanager
    def fixed_routing(self, routing: Routing) -> Iterator[None]:
        """Run with every router pinned to fixed weights (the un-merged twin of a merge)."""
        layers = self.mor_layers()
        weights = self.resolve_routing(routing)
        try:
            for name, layer in layers.items():
                layer.router.fixed = weights[name].to(layer.lora_A.device)
            yield
        finally:
            for layer in layers.values():
                layer.router.fixed = None

    @torch.no_grad()
    def measure_routing(self, batches: Iterable, tokenizer=None, batch_size: int = 8, max_length: int = 512,
                        progress: bool = False) -> RoutingProfile:
        """Mean router weights of every layer over the real (non-padding) tokens of ``batches``.

        ``batches`` is an iterable of dicts with ``input_ids`` and ``attention_mask`` (e.g. a
        DataLoader), or a list of strings together with ``tokenizer``.
        """
        if tokenizer is not None:
            batches = _tokenized_batches(list(batches), tokenizer, batch_size, max_length)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="measuring routing", unit="batch")
        layers = self.mor_layers()
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        for layer in layers.values():
            layer.router.start_profile()
        try:
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                for layer in layers.values():
                    layer.router._token_mask = mask
                self.base_model(input_ids=input_ids, attention_mask=mask)
            return RoutingProfile({name: layer.router.profile() for name, layer in layers.items()})
        finally:
            for layer in layers.values():
                layer.router._token_mask = None
            self.train(was_training)

    # -- merge / unload ---------------------------------------------------------------------------
    def merge_and_unload(self, routing: Routing = None) -> nn.Module:
        """Fold sum_i g_i D_i into each base weight and return the plain transformers model.

        ``routing``: a RoutingProfile (per layer), one weight vector (N,) for all layers, a path
        to a saved profile, or "uniform"; it may be omitted only for router="mean".
        """
        weights = self.resolve_routing(routing)
        for name, layer in self.mor_layers().items():
            _set_submodule(self.base_model, name, layer.merge(weights[name]))
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; return the plain base model."""
        for name, layer in self.mor_layers().items():
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model


def _tokenized_batches(texts: list[str], tokenizer, batch_size: int, max_length: int) -> Iterator[dict]:
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)


# -- entry points ----------------------------------------------------------------------------------

def get_mor_model(model: nn.Module, config: MoRConfig) -> MoRModel:
    """Freeze ``model``, put MoR (or MoE-LoRA) adapters on ``config.target_modules``, wrap it."""
    return MoRModel(model, config)


def load_adapter(model: nn.Module, adapter_dir: Union[str, Path], is_trainable: bool = False) -> nn.Module:
    """Attach any adapter this project writes: MoR / MoE-LoRA (our format) or LoRA / DoRA (peft)."""
    adapter_dir = Path(adapter_dir)
    data = read_adapter_config(adapter_dir)
    if data.get("adapter_type") == "mor":
        return MoRModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    if "peft_type" in data:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    raise ValueError(f"{adapter_dir / CONFIG_NAME} is neither a MoR/MoE-LoRA nor a peft adapter config")
