"""Saving and loading an adapter trained on several processes: DDP, FSDP (1 and 2), DeepSpeed ZeRO.

Under DDP every rank holds the whole adapter and only the ``module.`` wrapper is in the way.
Under FSDP and ZeRO-3 each rank holds a shard: FSDP2 parameters are DTensors, FSDP1 views of a
flat parameter that are empty (or partial) outside ``summon_full_params``, ZeRO-3 parameters
are empty placeholders until ``deepspeed.zero.GatheredParameters``. ``gather_adapter_state_dict``
undoes all of these and returns full CPU tensors keyed exactly like the unwrapped model's own
adapter state dict; ``save_adapter`` writes them once, on rank 0, and refuses to write a tensor
that is empty or still sharded; ``load_adapter_file`` puts a saved adapter back into the
shards (resuming). ``check_launch`` stops a run that only looks multi-process.

Gathering is a collective: every rank must call these functions, in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from torch import nn
from ..errors import AdapterError, MissingInput

from .. import _compat

WRAPPER_CLASSES = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# -- ranks -----------------------------------------------------------------------------------

def world_size() -> int:
    """Number of processes of this run (1 when torch.distributed is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def check_launch_before_start(trainer_world_size: int) -> None:
    """``check_launch`` at the very start of a run, on every process alike, before anything is
    read or written: a launcher's WORLD_SIZE against the processes the Trainer's arguments see
    (``trainer_world_size``: ``TrainingArguments.world_size``). (Checked only
    at the Trainer's start, one process could fail on something else first and the launcher would
    stop the others before they said what was wrong.)"""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:
        on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")  # drops FSDP / DeepSpeed
        check_launch(trainer_world_size, fsdp=not on_cpu, deepspeed=not on_cpu, launched=launched)


def check_launch(trainer_world_size: int, fsdp: bool = False, deepspeed: bool = False,
                 launched: int | None = None) -> None:
    """RuntimeError when the launch is not what it seems; two traps of accelerate on CPU:

    - the Trainer sees fewer processes than torch.distributed runs (torchrun without
      ``ACCELERATE_USE_CPU=true``, or DeepSpeed, on CPU: accelerate sees 1 of 2), so every process
      trains on all the data and writes the adapter;
    - ``accelerate launch`` was asked for FSDP / DeepSpeed (``ACCELERATE_USE_FSDP`` /
      ``ACCELERATE_USE_DEEPSPEED``) but the Trainer runs without it (``ACCELERATE_USE_CPU=true``
      drops both silently).
    """
    for name, enabled in (("FSDP", fsdp), ("DEEPSPEED", deepspeed)):
        if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") and not enabled:
            raise RuntimeError(
                f"accelerate was asked for {name} (ACCELERATE_USE_{name}=true) but the Trainer runs without it "
                "(ACCELERATE_USE_CPU=true drops it): on CPU, train with DDP instead (README: Several processes)."
            )
    running = world_size() if launched is None else launched
    if running != trainer_world_size:
        raise RuntimeError(
            f"torch.distributed runs {running} processes but the Trainer (accelerate) sees "
            f"{trainer_world_size}: the data would not be split and every process would write the adapter. "
            "On CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` or "
            "`ACCELERATE_USE_CPU=true torchrun` (DDP); DeepSpeed and FSDP through the Trainer need GPUs "
            "(README: Several processes)."
        )


def end_process_group() -> None:
    """Destroy torch.distributed's process group, if this process has one, before the interpreter
    exits. A gloo rank that exits with its group alive can abort at shutdown ("terminate called
    without an active exception", SIGABRT: pytorch/pytorch#190489) although its work is done, and
    the launcher then reports the whole run as failed. Local: it waits for no other rank."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(value) -> list:
    """``value`` of every rank, in rank order (a one-element list on a single process)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# -- unwrapping and gathering ------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeed engine / torch.compile wrappers (FSDP2 wraps nothing)."""
    while type(model).__name__ in WRAPPER_CLASSES or type(model).__name__ == "OptimizedModule":
        model = _compat.compiled_original(model) if type(model).__name__ == "OptimizedModule" else model.module
    return model


def clean_name(name: str) -> str:
    """A parameter name without the segments FSDP1, activation checkpointing and compile insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _own_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter tensors as it sees them locally (possibly sharded or empty): the
    trainable parameters of a peft model (MoR, MoE-LoRA, LoRA, DoRA), keyed like its state dict."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _checkpoint_key(model: nn.Module, key: str) -> str:
    """The key ``key`` (a model state-dict key, with the adapter name) has in a saved peft file."""
    tuner = getattr(model, "base_model", None)
    adapter = getattr(model, "active_adapter", "default")
    if tuner is None or not hasattr(type(tuner), "_remove_adapter_name_from_key"):
        return key
    return type(tuner)._remove_adapter_name_from_key(key, adapter if isinstance(adapter, str) else adapter[0])


def _adapter_parameters(model: nn.Module, keys: set[str]) -> list[nn.Parameter]:
    """Parameters behind the adapter keys (a key is a dotted suffix of its parameter's name)."""
    params = []
    for name, param in model.named_parameters():
        name = clean_name(name)
        if param.requires_grad or any(name == k or name.endswith("." + k) for k in keys):
            params.append(param)
    return params


def _fsdp1_roots(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.fsdp_modules(model, root_only=True) if any(isinstance(m, FSDP) for m in model.modules()) else []


@contextlib.contextmanager
def _full_parameters(model: nn.Module, writeback: bool = False) -> Iterator[None]:
    """Within this block FSDP1 and ZeRO-3 parameters hold their full values (collective); with
    ``writeback``, changes made inside are written back into the shards on exit."""
    with contextlib.ExitStack() as stack:
        for root in _fsdp1_roots(model):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            stack.enter_context(FSDP.summon_full_params(root, writeback=writeback, recurse=True))
        inner = unwrap_model(model)
        zero3 = [p for p in _adapter_parameters(inner, set(_own_adapter_state(inner))) if hasattr(p, "ds_id")]
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if writeback else None))
        yield


def _full_cpu(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):  # FSDP2: all-gather the shards
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True).contiguous()


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU tensors of the adapter of ``model`` (wrapped or not), keyed like the
    unwrapped model's own adapter state dict. Collective under FSDP / ZeRO-3: call it on every rank.

    Raises ``ValueError`` if a tensor is still empty or sharded after gathering.
    """
    inner = unwrap_model(model)
    with _full_parameters(model):
        state = {clean_name(k): _full_cpu(v) for k, v in _own_adapter_state(inner).items()}
    check_full_state_dict(state, model)
    return state


def _full_shapes(model: nn.Module) -> dict[str, tuple]:
    """Full shapes of sharded parameters, by cleaned name: ZeRO-3's ``ds_shape`` and FSDP1's flat
    parameter metadata (an FSDP1 shard can be a partial 1-D view, not only an empty one)."""
    shapes = {clean_name(n): tuple(p.ds_shape) for n, p in model.named_parameters() if hasattr(p, "ds_shape")}
    for prefix, module in model.named_modules():
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        for fqn, shape in zip(getattr(flat, "_fqns", ()), getattr(flat, "_shapes", ())):
            shapes[clean_name(f"{prefix}.{fqn}" if prefix else fqn)] = tuple(shape)
    return shapes


def check_full_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> None:
    """ValueError unless every tensor is a full, non-empty, ordinary (not DTensor) tensor; with
    ``model``, the full shapes of its FSDP1 / ZeRO-3 parameters are checked too."""
    from torch.distributed.tensor import DTensor

    if not state:
        raise ValueError("the adapter state dict is empty: nothing to save (is this model wrapped with an adapter?)")
    problems = []
    full_shapes = _full_shapes(model) if model is not None else {}
    for key, tensor in state.items():
        if isinstance(tensor, DTensor):
            problems.append(f"{key} is a DTensor (an FSDP2 shard)")
        elif tensor.numel() == 0:
            problems.append(f"{key} is empty, shape {tuple(tensor.shape)} (an FSDP1 / ZeRO-3 shard)")
        else:
            name = clean_name(key)
            shape = next((s for full, s in full_shapes.items() if full == name or full.endswith("." + name)), None)
            if shape is not None and tuple(tensor.shape) != shape:
                problems.append(f"{key} has shape {tuple(tensor.shape)}, its full shape is {shape}")
    if problems:
        raise AdapterError(
            f"refusing to save a sharded adapter: {len(problems)} tensors are not full, e.g. {problems[:3]}. "
            "Gather them first with mor.runtime.distributed.gather_adapter_state_dict(model) on every rank."
        )


# -- loading -----------------------------------------------------------------------------------

def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy full adapter tensors (as ``gather_adapter_state_dict`` returns them) into ``model``,
    sharded or not. Collective under FSDP / ZeRO-3: every rank calls it with the same tensors.
    A missing, extra or mis-shaped tensor is a ``ValueError``; nothing is copied then.

    Under ZeRO-3 this sets the parameters, not the optimizer's fp32 master copies: load before
    ``deepspeed.initialize`` or resume through DeepSpeed's own checkpoint (the Trainer does)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    inner = unwrap_model(model)
    with _full_parameters(model, writeback=True):
        own = {clean_name(k): v for k, v in _own_adapter_state(inner).items()}
        if not set(tensors) <= set(own):  # a saved peft file: its keys carry no adapter name
            own = {_checkpoint_key(inner, k): v for k, v in own.items()}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = [k for k in sorted(set(own) & set(tensors)) if tuple(own[k].shape) != tuple(tensors[k].shape)]
        if missing or unexpected or wrong:
            raise AdapterError(f"the adapter tensors do not match the model: missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}, mis-shaped {wrong[:3]}; load the adapter this model was built for")
        with torch.no_grad():
            for key, target in own.items():
                source = tensors[key].to(target.dtype)
                if isinstance(target, DTensor):  # FSDP2: keep only this rank's shard
                    source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
                target.copy_(source.to(target.device) if not isinstance(source, DTensor) else source)


def load_adapter_file(model: nn.Module, path: Union[str, Path]) -> None:
    """Load an adapter_model.safetensors (peft's format) into ``model``, sharded or not, strictly
    (``load_adapter_state_dict``; every rank must call it under FSDP / ZeRO-3)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MissingInput(f"adapter weights not found: {path}")
    load_adapter_state_dict(model, load_file(str(path)))


# -- saving ------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, save_directory: Union[str, Path], state_dict: Mapping[str, torch.Tensor] | None = None,
                 is_main_process: bool | None = None) -> dict[str, torch.Tensor]:
    """Gather the adapter of ``model`` on every rank and write it once, from the main process.

    ``state_dict``: already gathered tensors (then nothing is gathered, and the call need not be
    collective). ``is_main_process``: defaults to rank 0. Returns the tensors that were written
    (every rank gets them). Nothing is written if any tensor is empty or sharded.
    """
    state = gather_adapter_state_dict(model) if state_dict is None else dict(state_dict)
    check_full_state_dict(state, model)
    own = {clean_name(k) for k in _own_adapter_state(unwrap_model(model))}
    if set(state) != own:
        raise AdapterError(f"the gathered adapter does not match the model: missing {sorted(own - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - own)[:3]}; nothing was written")
    if is_main_process is None:
        is_main_process = rank() == 0
    if is_main_process:
        write_adapter(unwrap_model(model), save_directory, state)
    return state


def write_adapter(model: nn.Module, save_directory: Union[str, Path], state: Mapping[str, torch.Tensor]) -> None:
    """Write full adapter tensors ``state`` with ``model``'s config, as a peft adapter folder.

    Unsharded or FSDP2 models go through peft's ``save_pretrained(dir, state_dict=...)``. Under
    FSDP1 peft cannot match the cleaned names against the wrapped module tree, so the config and
    the tensors (under peft's checkpoint keys) are written here.
    """
    from ..model import write_model_card

    check_full_state_dict(state)
    folder = Path(save_directory)
    if not _fsdp1_roots(model) and not any("_fsdp_wrapped_module" in n for n, _ in model.named_modules()):
        model.save_pretrained(str(folder), state_dict=dict(state))
        write_model_card(folder)
        return
    from safetensors.torch import save_file

    from ..config import WEIGHTS_NAME

    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    config = model.peft_config[adapter]
    folder.mkdir(parents=True, exist_ok=True)
    inference_mode, config.inference_mode = config.inference_mode, True
    try:
        config.save_pretrained(str(folder))
    finally:
        config.inference_mode = inference_mode
    tensors = {}
    for key, value in checkpoint_state(model, state).items():
        if key.endswith("lora_magnitude_vector.weight"):  # DoRA: peft saves the vector without ".weight"
            key = key.removesuffix(".weight")
        tensors[key] = value.contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    write_model_card(folder)


def checkpoint_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (model state-dict keys) under the keys a saved adapter file uses (no adapter name)."""
    return {_checkpoint_key(unwrap_model(model), k): v for k, v in state.items()}


def adapter_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names and float32 bytes of ``state`` (equal iff the tensors are bit-identical)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
