"""The Trainer of a run: transformers' Trainer with what is ours added (saving only the adapter in
checkpoints, gathered whole under FSDP / ZeRO-3 and written by rank 0, see mor.runtime.distributed;
resuming from the last *complete* checkpoint; the router's auxiliary loss and its own learning rate;
which process trained on what), its callbacks, and the mapping of ``TrainConfig`` onto
``TrainingArguments``.

Trainer brings progress bars, logging (tensorboard), gradient accumulation, schedules, mixed
precision on GPU, gradient checkpointing and multi-process launch (``accelerate launch``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Union

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback

from .. import _compat
from ..config import WEIGHTS_NAME
from ..runtime.distributed import check_launch, load_adapter_file, save_adapter
from ..safety import atomic_write_text
from ..errors import SettingsError
from .config import TrainConfig

logger = logging.getLogger("mor")

COMPLETE_MARKER = "checkpoint_complete"


class AdapterTrainer(Trainer):
    """transformers' Trainer that saves and resumes the adapter (any peft method, MoR's included)
    through mor.runtime.distributed — gathered from FSDP / ZeRO-3 shards, written once by rank 0 — records
    which examples this process trained on, and logs the router's load-balancing loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_example_indices: list[int] = []  # this process's examples, from the batches' "example_index"
        self.resumed_from_step: int | None = None  # set by a --resume (see recipe.train_or_resume)
        if self.pop_callback(TensorBoardCallback) is not None:  # report_to="tensorboard"'s, which a lost folder stops
            self.add_callback(SideChannelTensorBoard())

    def _adapter_model(self):
        return self.accelerator.unwrap_model(self.model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        indices = inputs.pop("example_index", None)
        if indices is not None and model.training:
            self.trained_example_indices.extend(indices.tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank gathers the adapter (FSDP / ZeRO-3 shards need all of them); rank 0 writes it."""
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model_wrapped, output_dir, is_main_process=self.args.should_save)
        if self.processing_class is not None and self.args.should_save:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model  # the Trainer passes the FSDP-wrapped model under FSDP
        load_adapter_file(model, Path(resume_from_checkpoint) / WEIGHTS_NAME)  # into the shards, if sharded

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        aux = getattr(self._adapter_model(), "last_router_aux_loss", None)
        if aux is not None and "loss" in logs:
            logs["router_aux_loss"] = round(aux, 5)
        stats = getattr(self, "routing_stats", None)
        if stats is not None and "loss" in logs:
            logs.update(stats.pop_scalars())
        super().log(logs, *args, **kwargs)

    router_lr_multiplier: float = 1.0

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule, its warmup started one step earlier (see warmup_from_the_first_step)."""
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if fresh:
            warmup_from_the_first_step(scheduler, self.args.get_warmup_steps(num_training_steps))
        return scheduler

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the router's parameters (names containing "router") moved to
        their own groups at lr * ``router_lr_multiplier``."""
        optimizer = super().create_optimizer(model)
        if self.router_lr_multiplier != 1.0:
            split_router_groups(optimizer, self.model if model is None else model, self.router_lr_multiplier)
        return optimizer


def warmup_from_the_first_step(scheduler, warmup_steps: int) -> None:
    """Make step ``k`` (1-based) of the warmup run at ``k / warmup_steps`` of the peak: transformers'
    warmup schedules give the first optimizer step ``0 / warmup_steps``, a step that changes nothing
    (``--max-steps 1`` saved an untrained adapter). The warmup's multipliers are taken one step
    ahead; after it the schedule is transformers' own, unchanged (the peak is held one extra step)."""
    if not warmup_steps or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    scheduler.lr_lambdas = [functools.partial(_ahead_in_warmup, f, warmup_steps) for f in scheduler.lr_lambdas]
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    _compat.set_scheduler_last_lr(scheduler, [group["lr"] for group in scheduler.optimizer.param_groups])


def _ahead_in_warmup(factor, warmup_steps: int, step: int) -> float:
    return factor(step + 1) if step < warmup_steps else factor(step)


def split_router_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module, multiplier: float) -> None:
    """Move parameters whose name contains "router" into groups of their own whose lr is the
    original group's lr times ``multiplier`` (the scheduler then scales every group alike)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        router = [p for p in group["params"] if "router" in names.get(id(p), "")]
        rest = [p for p in group["params"] if "router" not in names.get(id(p), "")]
        if rest:
            groups.append({**group, "params": rest})
        if router:
            groups.append({**group, "params": router, "lr": group["lr"] * multiplier, "router": True})
    if not any(g.get("router") for g in groups):
        logger.warning("--router-lr-multiplier: the model has no parameter named *router*; nothing changed")
    optimizer.param_groups = groups


class SideChannelTensorBoard(TensorBoardCallback):
    """transformers' tensorboard logging as a side channel that cannot stop a run: when the event
    folder vanishes under the run (deleted by hand, a cleanup job), the next log starts a new
    writer there (the lost scalars stay lost); a write that fails all the same is a warning.
    (transformers' own callback dies in its writer thread and the run ends with the OSError.)"""

    def _drop_writer(self, why: str) -> None:
        logger.warning("tensorboard: %s; training goes on and logging restarts with a new event file", why)
        with contextlib.suppress(OSError):
            self.tb_writer.close()
        self.tb_writer = None  # on_log makes a new one, which creates the folder again

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tb_writer is not None and not Path(self.tb_writer.log_dir).is_dir():
            self._drop_writer(f"the event folder {self.tb_writer.log_dir} vanished during the run")
        try:
            super().on_log(args, state, control, logs=logs, **kwargs)
        except OSError as err:
            self._drop_writer(f"writing the event file failed ({err})")

    def on_train_end(self, args, state, control, **kwargs):
        try:
            super().on_train_end(args, state, control, **kwargs)
        except OSError as err:
            logger.warning("tensorboard: closing the event file failed (%s); the run's result is not affected", err)
            self.tb_writer = None


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once everything in it is written (atomically: a temporary
    file renamed into place), so that a run killed mid-save never resumes from half a checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"global_step": state.global_step}))
        return control


class LaunchCheckCallback(TrainerCallback):
    """Stops a multi-process run that is not what it seems (see mor.runtime.distributed.check_launch)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.checked = False

    def on_step_begin(self, args, state, control, **kwargs):  # after accelerate / DeepSpeed set up the processes
        if not self.checked:
            check_launch(args.world_size, self.trainer.is_fsdp_enabled, self.trainer.is_deepspeed_enabled)
            self.checked = True
        return control


def last_complete_checkpoint(folder: Union[str, Path]) -> Path | None:
    """The highest-step ``checkpoint-N`` in ``folder`` that carries the completion marker."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = []
    for child in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            steps.append((int(match.group(1)), child))
    return max(steps)[1] if steps else None


def discard_incomplete_checkpoints(folder: Path) -> None:
    for child in folder.glob("checkpoint-*"):
        if child.is_dir() and not (child / COMPLETE_MARKER).is_file():
            logger.warning("removing incomplete checkpoint %s (the run stopped while writing it)", child)
            shutil.rmtree(child, ignore_errors=True)


def finished_run_state(trainer: Trainer, checkpoint: Path, cfg: TrainConfig) -> TrainerState | None:
    """The checkpoint's trainer state when it already holds every step of this run, else None."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    total = cfg.steps
    if total <= 0:  # epochs, counted as Trainer counts them
        batches = len(trainer.get_train_dataloader())
        total = math.ceil(cfg.epochs * max(batches // cfg.grad_accum + int(batches % cfg.grad_accum > 0), 1))
    return state if state.global_step >= total else None


def _checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing under the name this transformers uses: ``activation_checkpointing``
    from 5.20 on, ``gradient_checkpointing`` before (5.16-5.19, the range vLLM 0.32 needs)."""
    import inspect

    names = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _report_to(name: str) -> list[str]:
    """``--report-to`` as TrainingArguments takes it, refused when its package is missing."""
    if name == "none":
        return []
    if importlib.util.find_spec(name) is None:
        raise SettingsError(f"--report-to {name}: the {name} package is not installed; pip install {name}, "
                               "or choose --report-to none")
    return [name]


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """The transformers TrainingArguments of a run (checkpoints under ``<output>/checkpoints``)."""
    _compat.require_training_argument("train_sampling_strategy", "mor train")
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(Path(cfg.output) / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the total steps
        max_steps=cfg.steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,  # the starting loss, against which divergence is judged
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=_report_to(cfg.report_to),
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=cfg.eval_batch_size,
        prediction_loss_only=True,
        remove_unused_columns=False,
        label_names=["labels"],
        **_checkpointing_arguments(cfg.gradient_checkpointing),
        dataloader_pin_memory=on_gpu,
        bf16=bf16,
        use_cpu=bf16 and not on_gpu,  # bf16 on CPU is torch's CPU autocast, which transformers allows only so
        dataloader_num_workers=0,
        disable_tqdm=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )
