"""Wiring MoR into a Hugging Face model as a registered peft method.

After ``import mor``, ``peft.get_peft_model(model, MoRConfig())``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and TRL's ``SFTTrainer(peft_config=MoRConfig())`` take MoR like
LoRA. peft does the target matching, module swapping, save/load and disabling; ``MoRModel`` (the
tuner, as ``LoraModel`` is LoRA's) adds what is MoR's own: routing profiles, running with fixed
routing, the exact merge with fixed routing, and the router's load-balancing loss. The peft model
reaches them by attribute: ``peft_model.measure_routing(...)``, ``peft_model.merge_and_unload(routing)``.

peft has no public registry for methods outside its ``PeftType`` enum, so ``register()`` writes
MoR into peft.mapping's dictionaries (through ``mor._compat``); it refuses a peft version outside the
tested range.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from . import _compat
from .baselines.moelora import MoELoRAAdapter
from .config import CONFIG_NAME, PEFT_TYPE, WEIGHTS_NAME, MoRConfig, read_adapter_config
from .errors import AdapterError, DataError, MissingInput, SettingsError
from .layer import MixtureLayer, MoRAdapter, named_mixture_layers, reusing_factors
from .quantized import compute_dtype, keep_4bit_states, linear_shape
from .routing import GateRecorder, Routing, RoutingProfile, mean_balancing_loss, resolve_routing


# -- the tuner -------------------------------------------------------------------------------------

def make_adapter(config: MoRConfig, base_layer: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """The MoR (or MoE-LoRA) adapter of ``config`` for ``base_layer``, in the layer's compute dtype."""
    d_in, d_out = linear_shape(base_layer)
    common = dict(r=config.r, num_experts=config.num_experts, alpha=config.alpha, dropout=config.dropout,
                  router=config.router, top_k=config.top_k, generator=generator, use_rslora=config.use_rslora,
                  dtype=compute_dtype(base_layer), device=base_layer.weight.device)
    if config.method == "moelora":
        return MoELoRAAdapter(d_in, d_out, **common)
    return MoRAdapter(d_in, d_out, init=config.init, init_scale_std=config.init_scale_std, **common)


class MoRModel(BaseTuner):
    """The peft tuner of MoR / MoE-LoRA (``peft_model.base_model`` is one)."""

    prefix = "mor"
    tuner_layer_cls = MixtureLayer
    target_module_mapping: dict = {}

    # -- injection (called by peft) --------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: MoRConfig, adapter_name: str) -> None:
        keep_4bit_states(model)  # before any forward: a later merge dequantises 4-bit weights as loaded
        seed = config.init_seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        fingerprint = base_fingerprint(model)
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = fingerprint
        elif not fingerprints_match(config.base_model_fingerprint, fingerprint):
            warnings.warn(
                f"adapter {adapter_name!r} was trained on a different base model "
                f"({config.base_model_name_or_path!r}; recorded shapes/weights differ from this model's): "
                "its outputs will not be what was trained. Load it onto the base it was trained on.",
                stacklevel=2,
            )

    @staticmethod
    def _check_target_module_exists(config: MoRConfig, key: str):
        return check_target_module_exists(config, key)

    def _create_and_replace(self, config: MoRConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **_kwargs) -> None:
        base = target.base_layer if isinstance(target, MixtureLayer) else target
        try:
            adapter = make_adapter(config, base, self._generator)
        except TypeError as err:
            raise SettingsError(f"MoRConfig.target_modules selects {current_key!r}: {err}; name the linear "
                                "projections instead") from err
        if isinstance(target, MixtureLayer):
            target.update_layer(adapter_name, adapter)
            return
        layer = MixtureLayer(target, adapter_name, adapter)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)
        self._replace_module(parent, target_name, layer, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise SettingsError(f"MoRConfig.target_modules={self.peft_config[adapter_name].target_modules!r} matches "
                                f"no module of {type(model).__name__}; its linear layers are named {leaves}") from err
        self._install_balance_loss(model)  # here, not in peft's _post_injection_hook (peft >=0.20 only)

    def forward(self, *args, **kwargs):
        # through the module call, so that the balance loss's hooks on the model run (peft <0.21 calls
        # self.model.forward, which skips them)
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The model's ``generate`` (peft's ``PeftModel.generate`` calls this one), each MoR adapter's
        U built once for the whole call (:func:`mor.layer.reusing_factors`), not at every token."""
        with reusing_factors(self.model):
            return self.model.generate(*args, **kwargs)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's hook for swapping a module in (a mixture layer around its base) and back (unload, merge):
        # set it, nothing more; an adapter is built on its base layer's device. (BaseTuner's version also
        # writes the old module's weight onto a new one without a base layer, which undid a merged
        # trainable_token_indices embedding; LoRA overrides it alike.)
        setattr(parent, child_name, new_module)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # "<layer>.mor.<adapter>.router.weight" -> "<layer>.mor.router.weight" (peft's default only
        # removes the adapter name when it is the second-to-last part of the key)
        return key.replace(f".{cls.prefix}.{adapter_name}.", f".{cls.prefix}.")

    # -- the router's load-balancing loss ---------------------------------------------------------
    def _install_balance_loss(self, model: nn.Module) -> None:
        """For router="balanced": add balance_coef x mean over layers of N sum_i f_i P_i to the loss
        (training only), reported as output["router_aux_loss"] — with forward hooks, so it works
        whichever wrapper (PeftModel, Trainer, TRL) calls the model."""
        if getattr(self, "_balance_hooks", None):
            for handle in self._balance_hooks:
                handle.remove()
        self._balance_hooks, self._router_gates = [], []
        self.last_router_aux_loss = None
        balanced = {name for name, cfg in self.peft_config.items() if cfg.router == "balanced"}
        if not balanced:
            return

        def collect(router, _inputs, gates):  # the gates only: the loss is computed once for all layers
            if router.training and router.fixed is None:
                self._router_gates.append(gates.reshape(-1, gates.shape[-1]))

        def clear(_module, _args):
            self._router_gates.clear()

        def add_to_loss(_module, _args, output):
            if not self._router_gates:
                return output
            aux = mean_balancing_loss(self._router_gates)
            self._router_gates.clear()
            coef = max(self.peft_config[name].balance_coef for name in balanced)
            self.last_router_aux_loss = float(aux.detach())
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss + coef * aux
            if isinstance(output, dict):
                output["router_aux_loss"] = aux.detach()
            return output

        for layer in self.mor_layers().values():
            for name in balanced & set(layer.mor):
                self._balance_hooks.append(layer.mor[name].router.register_forward_hook(collect))
        self._balance_hooks.append(model.register_forward_pre_hook(clear))
        self._balance_hooks.append(model.register_forward_hook(add_to_loss))

    # -- MoR's own verbs ------------------------------------------------------------------------------
    def mor_layers(self) -> dict[str, MixtureLayer]:
        """Every mixture layer, by its dotted name in the transformers model."""
        return named_mixture_layers(self.model)

    def mor_adapters(self) -> dict[str, nn.Module]:
        """The active adapter's MoRAdapter / MoELoRAAdapter of every layer, by layer name."""
        name = self._active_adapter_name()
        return {layer_name: layer.mor[name] for layer_name, layer in self.mor_layers().items() if name in layer.mor}

    @property
    def mor_config(self) -> MoRConfig:
        """The active adapter's config."""
        return self.peft_config[self._active_adapter_name()]

    def _active_adapter_name(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise SettingsError(f"routing verbs act on one adapter; active adapters are {active}: call set_adapter")
        return active[0]

    def _routers(self) -> dict[str, nn.Module]:
        return {layer_name: adapter.router for layer_name, adapter in self.mor_adapters().items()}

    def resolve_routing(self, routing: Routing) -> dict[str, torch.Tensor]:
        """Per-layer fixed weights (N,) from a profile, a single vector, a mapping, a path or "uniform"."""
        if routing is None:
            if self.mor_config.router != "mean":
                raise SettingsError(
                    "merging a learned router needs a fixed routing: pass routing=model.measure_routing(...) "
                    "(a RoutingProfile), a weight vector of length num_experts, a saved profile's path, or 'uniform'")
            routing = "uniform"
        return resolve_routing(self.mor_adapters(), routing)

    @contextlib.contextmanager
    def fixed_routing(self, routing: Routing) -> Iterator[None]:
        """Run with every router pinned to fixed weights (the un-merged twin of a merge)."""
        adapters = self.mor_adapters()
        weights = self.resolve_routing(routing)
        routers = {name: adapter.router for name, adapter in adapters.items()}
        try:
            for name, router in routers.items():
                router.fixed = weights[name].to(adapters[name].lora_A.device)  # a profile is on the CPU; the model may not be
            yield
        finally:
            for router in routers.values():
                router.fixed = None

    @torch.no_grad()
    def measure_routing(self, batches: Iterable, tokenizer=None, batch_size: int = 8, max_length: int = 512,
                        progress: bool = False) -> RoutingProfile:
        """Mean router weights of every layer over the real (non-padding) tokens of ``batches``:
        dicts with ``input_ids`` and ``attention_mask`` (e.g. a DataLoader), or strings with ``tokenizer``."""
        no_tokens = ("no tokens to route while measuring the routing: every input text is empty (or tokenises to "
                     "nothing); give records with text, or a saved --routing profile")
        if tokenizer is not None:
            texts = list(batches)
            if not any(texts):
                raise DataError(no_tokens)
            batches = _tokenized_batches(texts, tokenizer, batch_size, max_length)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="measuring routing", unit="batch")
        was_training = self.model.training
        self.model.eval()
        device = next(p for p in self.model.parameters()).device
        try:
            with GateRecorder(self._routers()) as recorder:
                for batch in batches:
                    input_ids = batch["input_ids"].to(device)
                    mask = batch.get("attention_mask")
                    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                    recorder.mask = mask
                    self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            self.model.train(was_training)
        if not recorder.tokens():
            raise DataError(no_tokens)
        return recorder.profile()

    def merge_and_unload(self, routing: Routing = None, progressbar: bool = False, safe_merge: bool = True,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold sum_i g_i D_i into each base weight and return the plain transformers model.

        ``routing``: a RoutingProfile (per layer), one weight vector (N,) for all layers, a path to a
        saved profile, or "uniform"; it may be omitted only for router="mean" (or inside
        ``fixed_routing``). A 4-bit base comes back as a plain model in the dtype it was loaded in
        (its non-quantised weights' dtype; see ``MixtureLayer.merge``).
        """
        pinned = all(router.fixed is not None for router in self._routers().values())
        context = contextlib.nullcontext() if routing is None and pinned else self.fixed_routing(routing)
        with context:
            model = _compat.unload_and_optionally_merge(self, merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                      adapter_names=adapter_names)
        self._install_balance_loss(model)
        dequantize_model(model)
        return model

    def unload(self) -> nn.Module:
        model = super().unload()
        self._install_balance_loss(model)
        return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantised linear layer (bitsandbytes, torchao) by a plain ``nn.Linear`` in the
    dtype its weights were loaded in, its weight dequantised by ``quantized.dense_weight``, and drop the
    quantisation config: a merged model is then a plain model of one dtype that saves and reloads."""
    from .quantized import dense_weight, is_quantized, plain_linear, stored_dtype

    quantized = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)]
    for name in quantized:
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                plain_linear(layer, dense_weight(layer, stored_dtype(layer))))
    if quantized or getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(model, attr, False):
                setattr(model, attr, False)
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return model


def _tokenized_batches(texts: list[str], tokenizer, batch_size: int, max_length: int) -> Iterator[dict]:
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)


# -- the model card of an adapter folder ---------------------------------------------------------------

LOADING_HEADING = "## Loading this MoR adapter"


def write_model_card(folder: Union[str, Path]) -> None:
    """Add how to load a MoR / MoE-LoRA adapter folder to its README.md (peft's model card, or a new one):
    peft knows the method only after ``import mor``, else ``KeyError: 'MOR'``. Other folders are left alone."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE:
        return
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    if LOADING_HEADING in text:
        return
    base = config.get("base_model_name_or_path") or "the base model it was trained on"
    section = (f"\n{LOADING_HEADING}\n\n"
             f"A `{config.get('method', 'mor')}` adapter of the `mor` package (Mixture of Ranks, arXiv 2410.13408; "
             f"router `{config.get('router')}`) for `{base}`. MoR is not built into peft: `import mor` registers it, "
             "and without it peft's loaders fail with `KeyError: 'MOR'`.\n\n"
             "```python\nimport mor  # pip install mor: registers MoR with peft\n"
             "from peft import AutoPeftModelForCausalLM\n\n"
             "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n\n"
             "or `mor.load_adapter(base_model, folder)`, `mor generate --adapter folder`. "
             "A plain transformers model or standard LoRA folders that load without `mor`: `mor merge`, "
             "`mor export-lora`.\n")
    closing = text.find("\n---\n", 3) if text.startswith("---\n") else -1
    start = closing + len("\n---\n") if closing >= 0 else 0  # after peft's metadata block: the first thing read
    card.write_text(text[:start] + section + text[start:])


# -- the base model's fingerprint --------------------------------------------------------------------

def base_fingerprint(model: nn.Module) -> dict:
    """Cheap identity of a base model: its architecture sizes and 16 values of its input embeddings
    (embeddings stay in float under 4-bit quantisation, so a quantised copy still matches)."""
    config = getattr(model, "config", None)
    sizes = {k: getattr(config, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    samples = []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dtype.is_floating_point and weight.device.type != "meta":
        flat = weight.detach().reshape(-1)
        index = (torch.arange(16) * ((flat.numel() - 1) // 15)).to(flat.device)
        samples = [round(float(v), 6) for v in flat[index].float().cpu()]
    return {"sizes": sizes, "embedding_samples": samples}


def fingerprints_match(recorded: dict, current: dict) -> bool:
    if recorded.get("sizes") != current.get("sizes"):
        return False
    a, b = recorded.get("embedding_samples") or [], current.get("embedding_samples") or []
    if not a or not b:
        return True
    return len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=1e-3)


# -- registration with peft -----------------------------------------------------------------------

def register() -> None:
    """Make MoR a peft method (idempotent); refuse a peft or transformers outside the tested ranges."""
    _compat.check_versions()
    _compat.register_peft_method(PEFT_TYPE, MoRConfig, MoRModel, MoRModel.prefix)


# -- entry points ----------------------------------------------------------------------------------

def is_mor_model(model: nn.Module) -> bool:
    """True for a peft model (or tuner) carrying MoR / MoE-LoRA adapters."""
    tuner = getattr(model, "base_model", model)
    return isinstance(tuner, MoRModel) or isinstance(model, MoRModel)


def get_mor_model(model: nn.Module, config: MoRConfig, adapter_name: str = "default"):
    """``peft.get_peft_model(model, config)``: freeze ``model``, put MoR adapters on its targets."""
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=adapter_name)


def load_adapter(model: nn.Module, adapter_dir: Union[str, Path], is_trainable: bool = False) -> nn.Module:
    """Attach any adapter this project writes or reads: MoR / MoE-LoRA, LoRA / DoRA (all peft
    folders), or a MoR folder in the pre-peft format of mor 0.1 (converted in memory, with a warning)."""
    from peft import PeftModel

    from .safety import check_adapter_weights

    adapter_dir = Path(adapter_dir)
    data = read_adapter_config(adapter_dir)
    check_adapter_weights(adapter_dir)  # unreadable, NaN/inf or absurdly large weights: refused here
    legacy = data.get("adapter_type") == "mor" and "peft_type" not in data
    if legacy or data.get("peft_type") == PEFT_TYPE:
        # built from the config, then loaded strictly: a missing, extra or mis-shaped tensor is an
        # error that names it (peft's own loader only warns about missing ones)
        if legacy:
            warnings.warn(f"{adapter_dir} is a MoR adapter in the pre-peft format of mor 0.1; loading it by "
                          f"conversion. Convert it once with: mor convert-adapter {adapter_dir} NEW_FOLDER",
                          stacklevel=2)
        config = MoRConfig.from_dict(data)
        config.inference_mode = not is_trainable
        tensors = legacy_state_dict(adapter_dir) if legacy else _read_weights(adapter_dir, _load_peft_weights)
        peft_model = get_mor_model(model, config)
        load_state_strict(peft_model, tensors, adapter_dir / WEIGHTS_NAME)
    elif "peft_type" in data:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
        check_peft_tensors(peft_model, _read_weights(adapter_dir, _load_peft_weights), adapter_dir / WEIGHTS_NAME,
                           data.get("peft_type"))
    else:
        raise AdapterError(f"{adapter_dir / CONFIG_NAME} is neither a MoR/MoE-LoRA nor a peft adapter config")
    if not is_trainable:
        peft_model.eval()
        for p in peft_model.parameters():
            p.requires_grad_(False)
    return peft_model


def _load_peft_weights(folder: str) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    return load_peft_weights(folder, device="cpu")


def _read_weights(adapter_dir: Path, reader) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise MissingInput(f"adapter weights not found: {path}")
    try:
        return reader(str(adapter_dir))
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise AdapterError(f"{path} is corrupted or not a safetensors file ({err}); re-save the adapter") from err


def load_state_strict(peft_model: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
                      adapter_name: str = "default") -> None:
    """Load saved adapter tensors (peft's key format) so that a missing, extra or mis-shaped tensor
    is an error naming it, never a silent partial load. The expected tensors are those peft saves for
    the adapter: MoR's own, and the modules_to_save / trainable_token_indices trained beside it."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    own = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise AdapterError(
            f"{path} does not match this model and config: "
            + "; ".join(part for part in (
                f"{len(missing)} missing tensors (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})" if unexpected else "",
                f"shape mismatches {wrong[:3]}" if wrong else "") if part)
            + ". Load it onto the same base model it was trained on, with its own adapter_config.json.")
    set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)


def check_peft_tensors(peft_model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, peft_type) -> None:
    """After peft loaded an adapter of another method (LoRA, DoRA, ...): the file must hold exactly
    the tensors its config asks for. peft only warns about missing ones, so a MoR file whose config
    says LORA loaded as an empty LoRA (the base model) and a LoRA missing half its tensors loaded
    half; both are errors that name what differs."""
    from peft.utils import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(
            f"{path} does not hold the tensors its adapter_config.json (peft_type {peft_type}) asks for: "
            + "; ".join(part for part in (
                f"{len(missing)} of {len(expected)} missing (e.g. {missing[:2]})" if missing else "",
                f"{len(unexpected)} not of this adapter type (e.g. {unexpected[:2]})" if unexpected else "") if part)
            + ". The config and the weights come from different adapters, or the file is incomplete: re-save it.")


def legacy_state_dict(adapter_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of a mor 0.1 adapter folder under peft's key names:
    ``<layer>.lora_A`` -> ``base_model.model.<layer>.mor.lora_A``."""
    from safetensors.torch import load_file

    tensors = _read_weights(Path(adapter_dir), lambda folder: load_file(str(Path(folder) / WEIGHTS_NAME)))
    params = ("lora_A", "lora_B", "expert_scales_in", "expert_scales_out", "router.weight")
    converted = {}
    for key, value in tensors.items():
        param = next((p for p in params if key.endswith("." + p)), None)
        if param is None:
            raise AdapterError(f"{adapter_dir}: unexpected tensor {key!r} in a mor 0.1 adapter")
        layer = key[: -len(param) - 1]
        converted[f"base_model.model.{layer}.{MoRModel.prefix}.{param}"] = value
    return converted


def convert_legacy_adapter(adapter_dir: Union[str, Path], output_dir: Union[str, Path], model: nn.Module) -> Path:
    """Rewrite a mor 0.1 adapter folder as a peft MoR folder (``model``: its base model)."""
    from .safety import atomic_folder

    peft_model = load_adapter(model, adapter_dir)
    with atomic_folder(output_dir) as tmp:  # whole or not at all
        peft_model.save_pretrained(str(tmp))
    return Path(output_dir)


def find_target_modules(model: nn.Module, config: MoRConfig) -> list[str]:
    """Dotted names of the modules ``config.target_modules`` selects in a plain model, by peft's own
    matching rules (so LoRA/DoRA baselines adapt exactly the same modules); ValueError if none."""
    import copy

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _compat.include_all_linear_layers(copy.deepcopy(config), model)
    adapted = [name + "." for name, module in model.named_modules() if isinstance(module, MixtureLayer)]
    names = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in adapted):
            continue  # a mixture layer counts as the linear layer it wraps
        found = check_target_module_exists(config, name)
        if found and not _compat.is_excluded(found):
            try:
                linear_shape(getattr(module, "base_layer", module))
            except TypeError as err:
                raise SettingsError(f"MoRConfig.target_modules selects {name!r}: {err}; name the linear "
                                    "projections instead") from err
            names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SettingsError(f"MoRConfig.target_modules={config.target_modules!r} matches no module of "
                            f"{type(model).__name__}; its linear layers are named {leaves}")
    return names
