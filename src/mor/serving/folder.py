"""The serving folder: a base model folder that vLLM (with mor's plugin) serves with a MoR adapter
applied dynamically.

``export_for_vllm(adapter, output, model=None)`` writes

- the base model's files (hard links where the file system allows, else copies): weights,
  tokenizer, generation config;
- ``config.json``: the base config with ``architectures`` renamed ``MoR<Arch>`` (say
  ``MoRLlamaForCausalLM``) and a ``mor_serving`` section holding the adapter's config. A vLLM
  without the plugin does not know that architecture and refuses the folder: it never serves the
  base model silently in the adapter's place;
- ``mor_adapter.safetensors``: the adapter's own tensors, unchanged, named
  ``mor_adapter.<module>.<param>`` (``mor_adapter.model.layers.0.mlp.up_proj.lora_A``). vLLM's
  weight loader streams them to the plugin beside the base weights (a sharded base's
  ``model.safetensors.index.json`` lists them too).

Everything is checked before anything is written: a supported architecture, an adapter for this
base (sizes and embedding fingerprint), finite weights, targets the server can place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Union

import torch

from ..config import CONFIG_NAME, PEFT_TYPE, WEIGHTS_NAME, MoRConfig, read_adapter_config
from ..export import serve_command  # noqa: F401  (mor.serving.serve_command)
from ..errors import AdapterError, MissingInput
from .fused import build_adapter, group_by_module, placement

FORMAT_VERSION = 1
SECTION = "mor_serving"  # the key of config.json that holds the adapter's settings
ADAPTER_FILE = "mor_adapter.safetensors"
TENSOR_PREFIX = "mor_adapter."
INDEX_NAME = "model.safetensors.index.json"

#: Base architectures the plugin serves: vLLM's LLaMA-family classes (one code path each, tested).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: The projections vLLM fuses in these models (their ``packed_modules_mapping``) and those it keeps.
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
PLACEABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def served_architecture(arch: str) -> str:
    return "MoR" + arch


def export_for_vllm(adapter_dir: Union[str, Path], output_dir: Union[str, Path], model: Union[str, None] = None,
                    overwrite: bool = False) -> Path:
    """Write a folder that ``vllm serve`` / ``vllm.LLM`` serve as the base model with the MoR (or
    MoE-LoRA) adapter of ``adapter_dir`` applied per token. ``model``: the base (a folder, a hub
    id, a .gguf file, or the embedded default); default: the base the adapter records."""
    from ..safety import atomic_folder, claim_output_folder, nonfinite_tensors

    adapter_dir = Path(adapter_dir)
    data = read_adapter_config(adapter_dir)
    if not isinstance(data, dict) or data.get("peft_type") != PEFT_TYPE:
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise AdapterError(f"{adapter_dir} holds a {kind or 'non-MoR'} adapter, not MoR/MoE-LoRA: vLLM serves peft "
                             "LoRA folders itself (vllm serve BASE --enable-lora --lora-modules name=FOLDER)")
    config = MoRConfig.from_dict(data)
    beside = [key for key in ("modules_to_save", "trainable_token_indices") if getattr(config, key, None)]
    if beside:
        raise AdapterError(f"{adapter_dir} also trains {' and '.join(beside)}, which the MoR vLLM plugin does not "
                           "serve (it places the adapter's layers only): merge it with mor merge, or export per-task "
                           "LoRAs that carry them with mor export-lora")
    base_dir = base_model_folder(model or config.base_model_name_or_path)
    base_config = json.loads((base_dir / "config.json").read_text())
    arch = (base_config.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise AdapterError(f"{base_dir} is a {arch} model; the MoR vLLM plugin serves {', '.join(ARCHITECTURES)} "
                             "(export-lora gives per-task LoRAs that vLLM serves for any architecture)")
    tensors = adapter_tensors(adapter_dir)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise AdapterError(f"{adapter_dir / WEIGHTS_NAME}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); "
                             "this adapter is broken: retrain it")
    check_fits_base(config, tensors, base_dir, base_config)
    output_dir = claim_output_folder(output_dir, overwrite, inputs={"--adapter": adapter_dir, "--model": base_dir})

    from safetensors.torch import save_file

    served_config = dict(base_config, architectures=[served_architecture(arch)])
    served_config[SECTION] = {"format": FORMAT_VERSION, "base_architecture": arch,
                              "adapter_config": {k: v for k, v in data.items() if k != "base_model_fingerprint"}}
    with atomic_folder(output_dir) as tmp:
        for item in sorted(base_dir.iterdir()):
            if item.is_file() and item.name not in (CONFIG_NAME, "config.json", INDEX_NAME, WEIGHTS_NAME, ADAPTER_FILE):
                _link_or_copy(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(served_config, indent=2) + "\n")
        named = {TENSOR_PREFIX + key: value.contiguous() for key, value in tensors.items()}
        save_file(named, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        if (base_dir / INDEX_NAME).is_file():  # a sharded base: the loader reads only the files its index lists
            index = json.loads((base_dir / INDEX_NAME).read_text())
            index.setdefault("weight_map", {}).update({key: ADAPTER_FILE for key in named})
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return output_dir


def base_model_folder(model: Union[str, None]) -> Path:
    """A local folder holding the base's config.json and safetensors weights."""
    from ..runtime.loading import resolve_model_path

    resolved = resolve_model_path(model)
    folder = Path(resolved)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                       "*.txt", "*.jinja", "*.tiktoken"]))
        except Exception as err:  # offline, unknown repo, no access: say which and what to do
            raise AdapterError(f"base model {resolved!r} is neither a local folder nor reachable on the hub ({err}); "
                                 "pass --model with the base model's folder") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise AdapterError(f"{folder} has no config.json and *.safetensors weights; vLLM needs a safetensors model folder")
    return folder


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors by original module name: ``model.layers.0.mlp.up_proj.lora_A``."""
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise MissingInput(f"adapter weights not found: {path}")
    try:
        saved = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for damaged files
        raise AdapterError(f"{path} is damaged or not a safetensors file ({err}); re-save the adapter") from None
    tensors = {}
    for key, value in saved.items():
        if not key.startswith("base_model.model.") or ".mor." not in key:
            raise AdapterError(f"{path}: unexpected tensor {key!r}; expected peft MoR keys "
                                 "(base_model.model.<module>.mor.<param>)")
        tensors[key[len("base_model.model."):].replace(".mor.", ".", 1)] = value
    return tensors


def check_fits_base(config: MoRConfig, tensors: dict[str, torch.Tensor], base_dir: Path, base_config: dict) -> None:
    """Refuse an adapter made for another base: recorded sizes and embedding samples, every target
    present in the base with the adapter's shapes, and placeable by the server."""
    from safetensors import safe_open

    recorded = (config.base_model_fingerprint or {}).get("sizes") or {}
    for key, value in recorded.items():
        if value is not None and base_config.get(key) not in (None, value):
            raise AdapterError(f"the adapter was trained on a base with {key}={value}; {base_dir} has "
                                 f"{key}={base_config.get(key)}: pass --model with the base it was trained on")
    shapes = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        if file.name == ADAPTER_FILE:
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = (file, tuple(f.get_slice(key).get_shape()))
    samples = (config.base_model_fingerprint or {}).get("embedding_samples") or []
    embedding = shapes.get("model.embed_tokens.weight")
    if samples and embedding is not None:
        with safe_open(str(embedding[0]), framework="pt") as f:
            flat = f.get_tensor("model.embed_tokens.weight").reshape(-1).float()
        index = torch.arange(16) * ((flat.numel() - 1) // 15)
        if not torch.allclose(flat[index], torch.tensor(samples), rtol=2e-2, atol=1e-3):
            raise AdapterError(f"the adapter was trained on another base model than {base_dir} (its embedding "
                                 "fingerprint differs): pass --model with the base it was trained on")
    for name, own in group_by_module(tensors).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in PLACEABLE:
            raise AdapterError(f"the adapter targets {name!r}; the MoR vLLM plugin places adapters on "
                                 f"{', '.join(PLACEABLE)} (vLLM fuses and shards the others differently)")
        weight = shapes.get(name + ".weight")
        if weight is None:
            raise AdapterError(f"the adapter targets {name!r}, which {base_dir} does not have: pass --model with the "
                                 "base it was trained on")
        adapter = build_adapter(config, own, name)
        if (adapter.out_features, adapter.in_features) != weight[1]:
            raise AdapterError(f"{name}: the adapter maps {adapter.in_features} -> {adapter.out_features} features "
                                 f"but the base weight is {weight[1]}: pass --model with the base it was trained on")
        placement(name, PACKED)


def read_serving_section(hf_config) -> tuple[MoRConfig, str]:
    """(the adapter's MoRConfig, the base architecture) from a served folder's config (a
    transformers config object or dict); a clear error for a folder not made by export-vllm."""
    section = hf_config.get(SECTION) if isinstance(hf_config, dict) else getattr(hf_config, SECTION, None)
    if not isinstance(section, dict) or section.get("format") != FORMAT_VERSION:
        found = section.get("format") if isinstance(section, dict) else None
        raise AdapterError(f"this model's config.json has no '{SECTION}' section of format {FORMAT_VERSION} "
                             f"(found {found!r}): make the folder with `mor export-vllm --adapter DIR --output DIR`")
    return MoRConfig.from_dict(section["adapter_config"]), section["base_architecture"]


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no space used; the file stays if the base is deleted), else a copy."""
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)
