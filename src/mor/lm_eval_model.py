"""MoR inside lm-evaluation-harness: the ``mor`` model type and :func:`make_lm`.

Importing this module registers the lm-eval model type ``"mor"`` (a subclass of lm-eval's
``HFLM``): the base model comes from :func:`mor.runtime.loading.load_model` (hub id, folder, ``.gguf``,
or nothing for the embedded SmolLM2), the adapter from :func:`mor.model.load_adapter` (MoR,
MoE-LoRA, LoRA, DoRA); everything else is HFLM's. Model arguments beyond ``hf``'s: ``adapter``,
``merged_routing`` (a routing profile JSON or ``uniform``: evaluate the merged model).
``python -m mor.lm_eval_model`` (``mor-lm-eval``) is lm-eval's CLI with the type registered;
:func:`make_lm` wraps a model object you already hold. Usage and every argument:
docs/evaluation.md, section 3.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM
from .errors import SettingsError

log = logging.getLogger(__name__)

MODEL_NAME = "mor"

__all__ = ["MoRLM", "make_lm", "load_base_and_adapter", "register", "main", "MODEL_NAME"]

# HFLM arguments that only make sense when HFLM loads the model itself from a path.
_UNSUPPORTED = ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file")


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype if dtype is not None else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise SettingsError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return value


def _resolve_device(device) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available; using the CPU")
        return torch.device("cpu")
    return device


def load_base_and_adapter(
    pretrained: str | None = None,
    adapter: str | Path | None = None,
    merged_routing: str | Path | None = None,
    tokenizer: str | None = None,
    dtype: Any = "float32",
    device: Any = None,
    trust_remote_code: bool = False,
):
    """``(model, tokenizer)``: :func:`mor.runtime.loading.load_adapted` (the base, the adapter if
    any, merged under ``merged_routing`` if given), on ``device``, in eval mode."""
    from mor.runtime.loading import load_adapted

    model, tok = load_adapted(pretrained, adapter, merge=merged_routing is not None, routing=merged_routing,
                              tokenizer=tokenizer, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    model.to(_resolve_device(device))
    return model, tok


def _inner_config(model):
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module.config
    return None


class _HFView(torch.nn.Module):
    """What HFLM reads from a model object (``config``, ``device``, ``tie_weights``), for a
    wrapper that does not expose them; forward and generate go to the wrapper."""

    def __init__(self, model: torch.nn.Module, config):
        super().__init__()
        self.inner = model
        self.config = config

    @property
    def device(self) -> torch.device:
        try:
            return next(self.inner.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def tie_weights(self, *args, **kwargs):  # the wrapped model is already built and tied
        return None

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


def _hf_like(model):
    if all(hasattr(model, attr) for attr in ("config", "device", "tie_weights")):
        return model
    config = _inner_config(model)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no Hugging Face config; lm-eval needs one")
    return _HFView(model, config)


class MoRLM(HFLM):
    """lm-eval's HFLM around a base model loaded by :mod:`mor.runtime.loading` with an optional
    adapter (MoR, MoE-LoRA, LoRA, DoRA). Registered as lm-eval model type ``"mor"``."""

    def __init__(
        self,
        pretrained: str | None = None,
        adapter: str | None = None,
        merged_routing: str | None = None,
        tokenizer: str | None = None,
        dtype: Any = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> None:
        bad = [k for k in _UNSUPPORTED if kwargs.get(k)]
        if bad:
            raise SettingsError(
                f"model type 'mor' does not take {', '.join(bad)}; attach adapters with adapter=<folder>"
            )
        for key in _UNSUPPORTED:
            kwargs.pop(key, None)
        if isinstance(pretrained, torch.nn.Module):  # an object: same as make_lm
            model, tok = pretrained, tokenizer
            if tok is None:
                raise ValueError("pass tokenizer= together with a model object")
        else:
            model, tok = load_base_and_adapter(
                pretrained,
                adapter=adapter,
                merged_routing=merged_routing,
                tokenizer=tokenizer,
                dtype=dtype,
                device=device,
                trust_remote_code=trust_remote_code,
            )
        super().__init__(pretrained=_hf_like(model), tokenizer=tok, trust_remote_code=trust_remote_code, **kwargs)
        self.mor_base = pretrained if isinstance(pretrained, (str, type(None))) else type(pretrained).__name__
        self.mor_adapter = None if adapter is None else str(adapter)
        self.mor_merged_routing = None if merged_routing is None else str(merged_routing)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(
            mor_base=self.mor_base or "smollm2 (embedded default)",
            mor_adapter=self.mor_adapter,
            mor_merged_routing=self.mor_merged_routing,
        )
        return info


def make_lm(model, tokenizer, batch_size: int | str = 8, **kwargs) -> HFLM:
    """Hand an already-built model (a transformers model, a peft model or a MoR model) and its
    tokenizer to lm-eval: returns an ``HFLM`` to pass as ``lm_eval.simple_evaluate(model=...)``.

    The model is evaluated where it is (its device and dtype are kept). ``kwargs`` are HFLM's
    (``max_length``, ``add_bos_token``, ``truncation``, ...).
    """
    if hasattr(model, "eval"):
        model.eval()
    return HFLM(pretrained=_hf_like(model), tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def register() -> type[MoRLM]:
    """Register :class:`MoRLM` as lm-eval model type ``"mor"`` (idempotent)."""
    if MODEL_NAME in model_registry:
        current = model_registry.get(MODEL_NAME)
        if current is MoRLM:
            return MoRLM
        if getattr(current, "__qualname__", None) == MoRLM.__qualname__ and getattr(
            current, "__module__", None
        ) in (__name__, "mor.lm_eval_model", "__main__"):
            return current  # this module imported twice (python -m): keep the first class
        raise ValueError(f"lm-eval model type {MODEL_NAME!r} is already taken by {current!r}")
    register_model(MODEL_NAME)(MoRLM)
    return MoRLM


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``mor`` model type available (``mor-lm-eval``)."""
    from lm_eval.__main__ import cli_evaluate

    import mor.lm_eval_model as registered  # register under the importable module name

    registered.register()
    if argv is not None:
        old_argv = sys.argv
        sys.argv = [old_argv[0] if old_argv else "mor-lm-eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = old_argv
    else:
        cli_evaluate()


if __name__ == "__main__":
    main()
else:
    register()
