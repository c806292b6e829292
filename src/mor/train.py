"""A training run, built on transformers' Trainer: load model and tasks, attach an adapter,
train on the mixed task stream, save the adapter, evaluate before and after.

Trainer brings progress bars, logging (tensorboard), gradient accumulation, schedules, mixed
precision on GPU, gradient checkpointing and multi-process launch (``accelerate launch``); this
module only adds what is ours: saving only the adapter in checkpoints (gathered whole under
FSDP / ZeRO-3 and written by rank 0, see mor.distributed), resuming from the last *complete*
checkpoint, reporting the router's auxiliary loss, and recording which process trained on what.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Union

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from .config import WEIGHTS_NAME
from .data import (DataError, Task, has_split, load_eval_tasks, collate, load_hub_task, load_task_records, mix_tasks, multiple_choice_items, split_records,
                   tokenize_examples, training_examples)
from .distributed import (adapter_checksum, all_gather_objects, check_launch, check_launch_before_start,
                          checkpoint_state,
                          gather_adapter_state_dict, load_adapter_file, save_adapter, world_size)
from .loading import load_model, load_tokenizer
from .methods import AdapterSpec, apply_adapter
from .params import count_trainable_parameters
from .safety import (RESUME_FREE_SETTINGS, FiniteCheckCallback, atomic_folder, atomic_write_text, check_train_numbers,
                     claim_run_folder, divergence_warning, nonfinite_tensors, release_failed_run_folder)

logger = logging.getLogger("mor")

COMPLETE_MARKER = "checkpoint_complete"
MAX_RECORDED_INDICES = 10_000  # result.json lists each process's example indices up to this many
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name of a Hugging Face dataset


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI fills it from flags, scripts build it directly."""

    model: Union[str, None] = None  # hub id, local folder, .gguf file, or None for embedded SmolLM2
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    data: list[str] = field(default_factory=list)  # task files/folders; empty: the built-in suite
    eval_data: list[str] = field(default_factory=list)  # extra eval tasks (default: the data's test splits)
    holdout: int = 0  # carve this many eval records out of a task that has no test split
    target: str = "output"  # "output" (the record's own answer) or "text" (the correct option's text)
    mix: str = "proportional"  # proportional | uniform
    output: str = "runs/mor"
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_length: int = 256
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # write into a non-empty output folder (its old checkpoints are removed)
    skip_bad: bool = False
    save_steps: int = 50
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # a bitsandbytes nf4 frozen base (QLoRA-style)
    evaluate: bool = True  # score the eval tasks before and after training
    evaluate_before: bool = True  # also score with the adapter off (the "before" column)
    eval_limit: Union[int, None] = None
    eval_batch_size: int = 16
    builtin_train_size: Union[int, None] = None  # sizes of the built-in suite (None: its defaults)
    builtin_eval_size: Union[int, None] = None
    base_dtype: str = "fp32"  # frozen base weights: fp32 | bf16 | auto (bf16 where the hardware has it); adapter stays fp32
    group_by_length: bool = False  # batches of similar lengths (less padding); changes the example order
    router_lr_multiplier: float = 1.0  # the router's learning rate is lr times this (own optimizer group)
    router_init_scale: float = 1.0  # router weights multiplied by this after init (1/temperature of the logits)
    routing_stats_steps: Union[int, None] = None  # measure routing every this many steps; None: logging_steps; 0: off
    routing_probe_size: int = 8  # probe prompts per task for the routing statistics

    @property
    def scoring(self) -> str:
        """Evaluation matches the training target: label scoring for "output", option text for "text"."""
        return "text" if self.target == "text" else "label"


# -- data ----------------------------------------------------------------------------------------

def load_train_and_eval_tasks(cfg: TrainConfig) -> tuple[list[Task], list[Task]]:
    """Training tasks from ``cfg.data`` (or the built-in suite) and their eval tasks.

    A folder with train/test files gives both splits; a folder or file without a train split is
    all training data, unless ``holdout`` carves a seeded eval split out of it.
    """
    paths = [Path(p) for p in cfg.data] or _builtin_paths(cfg)
    train_tasks, eval_tasks = [], []
    for path in paths:
        if not path.exists() and HUB_ID.fullmatch(str(path)):
            train, held = _hub_task_splits(str(path), cfg.skip_bad)
            train_tasks.append(train)
            eval_tasks.extend(held)
            continue
        if not path.exists():
            raise FileNotFoundError(f"--data {path}: no such file or folder (nor a Hugging Face dataset id)")
        if path.is_dir() and has_split(path, "train"):
            train_tasks.append(load_task_records(path, skip_bad=cfg.skip_bad, split="train"))
            if has_split(path, "test"):
                eval_tasks.append(load_task_records(path, skip_bad=cfg.skip_bad, split="test"))
            continue
        split = "test" if path.is_dir() and has_split(path, "test") else None
        task = load_task_records(path, skip_bad=cfg.skip_bad, split=split)
        if cfg.holdout:
            task, held = split_records(task, eval_size=cfg.holdout, seed=cfg.seed)
            eval_tasks.append(held)
        train_tasks.append(task)
    names = [t.name for t in train_tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"two --data entries have the same task name: {names}; rename one of them")
    eval_tasks.extend(load_eval_tasks(cfg.eval_data, cfg.skip_bad))
    return train_tasks, eval_tasks


def _hub_task_splits(dataset_id: str, skip_bad: bool) -> tuple[Task, list[Task]]:
    """Train split (and test split, when there is one) of a Hugging Face dataset id."""
    try:
        train = load_hub_task(dataset_id, split="train", skip_bad=skip_bad)
    except (OSError, ConnectionError) as err:
        raise FileNotFoundError(f"--data {dataset_id}: not a local file or folder, and the Hugging Face "
                                f"dataset could not be loaded ({err})") from err
    try:
        return train, [load_hub_task(dataset_id, split="test", skip_bad=skip_bad)]
    except ValueError:  # the dataset has no "test" split
        return train, []


def builtin_data_folder(output: Union[str, Path]) -> Path:
    """Where a run on the built-in suite writes its generated tasks: a folder of the run's own,
    of which only the built-in tasks' train/test files are ever read."""
    return Path(output) / "builtin-data"


def _builtin_paths(cfg: TrainConfig) -> list[Path]:
    from .tasks import DEFAULT_EVAL_SIZE, DEFAULT_TRAIN_SIZE, TASK_NAMES, write_builtin_suite

    folder = builtin_data_folder(cfg.output)
    write_builtin_suite(folder, seed=cfg.seed, train_size=cfg.builtin_train_size or DEFAULT_TRAIN_SIZE,
                        eval_size=cfg.builtin_eval_size or DEFAULT_EVAL_SIZE)
    return [folder / name for name in sorted(TASK_NAMES)]


def build_train_dataset(tasks: list[Task], tokenizer, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Tokenised, mixed training stream and a report (examples per task, truncations, skips)."""
    per_task = {t.name: training_examples(t, target=cfg.target, tokenizer=tokenizer,
                                          skipped=t.skipped if cfg.skip_bad else None) for t in tasks}
    empty = [name for name, examples in per_task.items() if not examples]
    if empty:
        raise DataError(f"task {empty[0]}: no record gives a --target {cfg.target} example (all skipped, e.g. "
                        f"{next(t.skipped[0] for t in tasks if t.name == empty[0])}).")
    stream = [example for _, example in mix_tasks(per_task, mode=cfg.mix, seed=cfg.seed)]
    tokenized = tokenize_examples(stream, tokenizer, cfg.max_length)
    report = {
        "tasks": {name: len(examples) for name, examples in per_task.items()},
        "examples": len(tokenized),
        "truncated": tokenized.truncated,
        "skipped": {t.name: len(t.skipped) for t in tasks if t.skipped},
    }
    if tokenized.truncated:
        logger.warning("%s (max_length=%d); e.g. %s", tokenized.summary(), cfg.max_length,
                       tokenized.truncated_sources[:3])
    for task in tasks:
        if task.skipped:
            logger.warning("task %s: skipped %d bad records (--skip-bad), e.g. %s", task.name, len(task.skipped),
                           task.skipped[:2])
    return [dict(f) for f in tokenized.features], report


# -- trainer ---------------------------------------------------------------------------------------

class AdapterTrainer(Trainer):
    """transformers' Trainer that saves and resumes the adapter (any peft method, MoR's included)
    through mor.distributed — gathered from FSDP / ZeRO-3 shards, written once by rank 0 — records
    which examples this process trained on, and logs the router's load-balancing loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_example_indices: list[int] = []  # this process's examples, from the batches' "example_index"

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

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the router's parameters (names containing "router") moved to
        their own groups at lr * ``router_lr_multiplier``."""
        optimizer = super().create_optimizer(model)
        if self.router_lr_multiplier != 1.0:
            split_router_groups(optimizer, self.model if model is None else model, self.router_lr_multiplier)
        return optimizer


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


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete once everything in it is written (atomically: a temporary
    file renamed into place), so that a run killed mid-save never resumes from half a checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                tmp = folder / (COMPLETE_MARKER + ".tmp")
                tmp.write_text(json.dumps({"global_step": state.global_step}))
                os.replace(tmp, folder / COMPLETE_MARKER)
        return control


class LaunchCheckCallback(TrainerCallback):
    """Stops a multi-process run that is not what it seems (see mor.distributed.check_launch)."""

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


def _discard_incomplete_checkpoints(folder: Path) -> None:
    for child in folder.glob("checkpoint-*"):
        if child.is_dir() and not (child / COMPLETE_MARKER).is_file():
            logger.warning("removing incomplete checkpoint %s (the run stopped while writing it)", child)
            shutil.rmtree(child, ignore_errors=True)


def _checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing under the name this transformers uses: ``activation_checkpointing``
    from 5.20 on, ``gradient_checkpointing`` before (5.16-5.19, the range vLLM 0.32 needs)."""
    import inspect

    names = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        report_to = []
    return TrainingArguments(
        output_dir=str(Path(cfg.output) / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the total steps
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,  # the starting loss, against which divergence is judged
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        remove_unused_columns=False,
        label_names=["labels"],
        **_checkpointing_arguments(cfg.gradient_checkpointing),
        dataloader_pin_memory=on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


# -- the run ---------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    adapter_dir: Path
    trainable_parameters: int
    train_seconds: float
    global_step: int
    final_loss: float | None
    data_report: dict
    before: dict | None = None  # evaluation results with the adapter disabled
    after: dict | None = None
    world_size: int = 1  # processes that trained together
    ranks: list | None = None  # per process: examples it trained on (indices into the mixed stream), adapter sha256
    warnings: list[str] = field(default_factory=list)  # e.g. a loss that ended far above its start
    routing_stats: dict | None = None  # first/last routing statistics (full records: routing_stats.json)
    log_history: list | None = None  # the trainer's logs (loss per logging step, routing scalars)
    eval_seconds: dict | None = None  # wall time of the before/after evaluations
    base_dtype: str = "fp32"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out


def evaluate_model(model, tokenizer, tasks: list[Task], scoring: str, batch_size: int = 16,
                   limit: int | None = None) -> dict:
    """Zero-shot multiple-choice accuracy per task (see mor.evaluate)."""
    from .evaluate import evaluate_tasks

    items = {t.name: multiple_choice_items(t, scoring=scoring, tokenizer=tokenizer) for t in tasks}
    return evaluate_tasks(model, tokenizer, items, batch_size=batch_size, limit=limit, scoring=scoring)


def resolve_base_dtype(name: str) -> torch.dtype:
    """torch dtype of the frozen base for ``--base-dtype``: fp32, bf16, or auto (bf16 on a GPU
    with bf16, or a CPU with native bf16 matmuls -- AVX512-BF16 or AMX -- else fp32)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"base_dtype={name!r}: choose fp32, bf16 or auto")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def cast_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen (requires_grad=False) floating parameter to ``dtype`` in place; the
    trainable adapter parameters keep their dtype. Returns how many parameters were cast."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def scale_router_init(model: torch.nn.Module, scale: float) -> int:
    """Multiply every router weight by ``scale`` (logits scale alike: a temperature of 1/scale at
    init). Returns how many router tensors were scaled."""
    from .routing_stats import find_routers

    scaled = 0
    with torch.no_grad():
        for router in find_routers(model).values():
            for param in router.parameters():
                param.mul_(scale)
                scaled += 1
    return scaled


def routing_probes(tasks: list[Task], tokenizer, cfg: TrainConfig) -> dict[str, list[dict]]:
    """A fixed probe set for the routing statistics: the first ``routing_probe_size`` training
    examples (prompt and target) of every task, tokenised and right-padded."""
    probes = {}
    for task in tasks:
        examples = training_examples(task, target=cfg.target, tokenizer=tokenizer,
                                     skipped=[] if cfg.skip_bad else None)[: cfg.routing_probe_size]
        features = list(tokenize_examples(examples, tokenizer, cfg.max_length).features)
        if features:
            batch = collate(features, tokenizer.pad_token_id)
            probes[task.name] = [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}]
    return probes


def resume_settings(cfg: TrainConfig) -> dict:
    """The settings a ``--resume`` must share with the run it continues."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_SETTINGS and k != "adapter"}
    return {**settings, "adapter": cfg.adapter.to_dict()}



def run_training(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train ``cfg.adapter`` on ``cfg.data``; save it to ``<output>/adapter``; evaluate before/after.

    The output folder must be new or empty, or hold this same run (``resume``, same settings),
    or ``overwrite`` must be set (see :func:`mor.safety.claim_run_folder`).
    """
    check_train_numbers(cfg)
    check_launch_before_start(training_arguments(cfg).world_size)
    created = claim_run_folder(cfg.output, resume_settings(cfg), overwrite=cfg.overwrite, resume=cfg.resume)
    try:
        return _run_training(cfg, callbacks)
    except BaseException:
        release_failed_run_folder(cfg.output, created)
        raise


def _run_training(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    from transformers import set_seed

    set_seed(cfg.seed)
    output = Path(cfg.output)
    tokenizer = load_tokenizer(cfg.model)
    train_tasks, eval_tasks = load_train_and_eval_tasks(cfg)
    dataset, data_report = build_train_dataset(train_tasks, tokenizer, cfg)
    for index, example in enumerate(dataset):
        example["example_index"] = index  # which process trained on what (see AdapterTrainer.compute_loss)
    logger.info("training on %d examples from %s", len(dataset), data_report["tasks"])

    base = load_model(cfg.model, load_in_4bit=cfg.load_in_4bit)
    if cfg.adapter.init_seed is None:
        cfg.adapter.init_seed = cfg.seed
    model = apply_adapter(base, cfg.adapter)
    trainable = count_trainable_parameters(model)
    base_dtype = resolve_base_dtype(cfg.base_dtype)
    if base_dtype != torch.float32:
        cast_frozen_base(model, base_dtype)
        logger.info("frozen base in %s; adapter parameters stay %s", base_dtype,
                    sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}))
    if cfg.router_init_scale != 1.0 and not cfg.resume:
        scale_router_init(model, cfg.router_init_scale)

    before = None
    eval_seconds = {}
    if cfg.evaluate and cfg.evaluate_before and eval_tasks and not cfg.resume:
        tic = time.perf_counter()
        with model.disable_adapter():
            before = evaluate_model(model, tokenizer, eval_tasks, cfg.scoring, cfg.eval_batch_size, cfg.eval_limit)
        eval_seconds["before"] = time.perf_counter() - tic

    args = training_arguments(cfg)
    resume_from = None
    if cfg.resume:
        _discard_incomplete_checkpoints(Path(args.output_dir))
        resume_from = last_complete_checkpoint(args.output_dir)
        if resume_from is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch", args.output_dir)
        else:
            logger.info("resuming from %s", resume_from)

    def collate_with_indices(batch):
        return {**collate(batch, tokenizer.pad_token_id),
                "example_index": torch.tensor([example["example_index"] for example in batch])}

    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collate_with_indices,
        callbacks=[CompleteCheckpointCallback(), FiniteCheckCallback(), *(callbacks or [])],
    )
    trainer.add_callback(LaunchCheckCallback(trainer))
    trainer.router_lr_multiplier = cfg.router_lr_multiplier
    stats_every = cfg.logging_steps if cfg.routing_stats_steps is None else cfg.routing_stats_steps
    from .routing_stats import STATS_NAME, RoutingStatsCallback, find_routers

    if stats_every and find_routers(model):
        trainer.routing_stats = RoutingStatsCallback(routing_probes(train_tasks, tokenizer, cfg), output / STATS_NAME,
                                                     stats_every).attach(trainer)
        trainer.add_callback(trainer.routing_stats)
    start = time.perf_counter()
    finished = _finished_run_state(trainer, resume_from, cfg) if resume_from else None
    if finished is not None:  # Trainer would take one step past the end of a finished run
        logger.info("%s is the end of the run (step %d): nothing left to train", resume_from, finished.global_step)
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = finished
        losses = [h["loss"] for h in finished.log_history if "loss" in h]
        outcome = SimpleNamespace(global_step=finished.global_step, training_loss=losses[-1] if losses else None)
    else:
        outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start

    adapter_dir = output / "adapter"
    warnings = [w for w in [divergence_warning(trainer.state.log_history, cfg.lr)] if w]
    for warning in warnings:
        logger.warning(warning)
    bad = nonfinite_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})
    if bad:  # FiniteCheckCallback stops earlier; this guards the final save whatever happened
        raise ValueError(f"{len(bad)} trainable tensors hold NaN or inf after training (e.g. {bad[0]}); "
                         "nothing was saved as the adapter. Lower --lr and start again (--overwrite).")
    # every rank gathers (FSDP / ZeRO-3 shards) and reports what it trained on; rank 0 writes, atomically
    saved = gather_adapter_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        with atomic_folder(adapter_dir) as tmp_dir:
            save_adapter(trainer.model_wrapped, tmp_dir, state_dict=saved, is_main_process=True)
            _write_run_files(tokenizer, tmp_dir, cfg, trainable, data_report)
    seen = trainer.trained_example_indices
    ranks = all_gather_objects({"examples": len(seen),
                                "example_indices": sorted(seen) if len(seen) <= MAX_RECORDED_INDICES else None,
                                "adapter_sha256": adapter_checksum(checkpoint_state(trainer.model_wrapped, saved))})

    after = None
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded and cfg.evaluate and eval_tasks:
        logger.warning("the model is sharded (FSDP / DeepSpeed): skipping the evaluation after training; "
                       "run `mor eval --adapter %s` on one process", adapter_dir)
    if cfg.evaluate and eval_tasks and trainer.is_world_process_zero() and not sharded:
        model.eval()
        tic = time.perf_counter()
        after = evaluate_model(model, tokenizer, eval_tasks, cfg.scoring, cfg.eval_batch_size, cfg.eval_limit)
        eval_seconds["after"] = time.perf_counter() - tic
        if before is None and cfg.resume:
            with model.disable_adapter():
                before = evaluate_model(model, tokenizer, eval_tasks, cfg.scoring, cfg.eval_batch_size,
                                        cfg.eval_limit)
    stats = getattr(trainer, "routing_stats", None)
    result = TrainResult(adapter_dir, trainable, seconds, outcome.global_step, outcome.training_loss,
                         data_report, before, after, world_size(), ranks, warnings,
                         routing_stats=stats.summary() if stats else None,
                         log_history=trainer.state.log_history, eval_seconds=eval_seconds or None,
                         base_dtype=str(base_dtype).replace("torch.", ""))
    if trainer.is_world_process_zero():
        atomic_write_text(output / "result.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result


def _finished_run_state(trainer: Trainer, checkpoint: Path, cfg: TrainConfig) -> TrainerState | None:
    """The checkpoint's trainer state when it already holds every step of this run, else None."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    total = cfg.max_steps
    if total <= 0:  # epochs, counted as Trainer counts them
        batches = len(trainer.get_train_dataloader())
        total = math.ceil(cfg.epochs * max(batches // cfg.grad_accum + int(batches % cfg.grad_accum > 0), 1))
    return state if state.global_step >= total else None


def _write_run_files(tokenizer, folder: Path, cfg: TrainConfig, trainable: int, data_report: dict) -> None:
    """The tokenizer and training.json next to the adapter."""
    tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({
        "model": cfg.model, "adapter": cfg.adapter.to_dict(), "trainable_parameters": trainable,
        "world_size": world_size(),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "adapter"}, "data": data_report,
    }, indent=2, default=str) + "\n")


def summarise(result: TrainResult) -> dict[str, Any]:
    """Before/after accuracy per task (the numbers the CLI prints)."""
    rows = {}
    if result.after:
        for task, after in result.after["tasks"].items():
            before = (result.before or {}).get("tasks", {}).get(task, {})
            rows[task] = {"n": after.get("n"), "before": before.get("acc"), "after": after.get("acc"),
                          "chance": after.get("chance")}
    return rows
