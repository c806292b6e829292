"""A training run as a recipe of named phases:

    setup data -> setup model -> evaluate before -> trainer -> train (or resume) -> save adapter
    -> evaluate after -> write result (and the adapter's model card) -> push to the hub -> figures

``run_training(TrainConfig())`` is the run ``mor train`` makes. The pieces live beside this file:
the settings (``config``), the adapter (``adapters``), the data and model setup (``setup``), the
Trainer and its callbacks (``trainer``), the model card and the upload (``hub``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DataCollatorWithFlattening, set_seed

from .. import _compat
from ..analysis.routing_stats import STATS_NAME, RoutingStatsCallback
from ..data import Task, collate, tokenize_examples, training_examples
from ..eval.tasks import evaluate_model
from ..layer import find_routers
from ..quantized import keep_4bit_layout
from ..params import count_trainable_parameters
from ..runtime.distributed import (adapter_checksum, all_gather_objects, check_launch_before_start, checkpoint_state,
                                   gather_adapter_state_dict, save_adapter, world_size)
from ..runtime.loading import load_model, load_tokenizer
from ..errors import SettingsError
from ..safety import atomic_folder, atomic_write_text, check_training_space, nonfinite_tensors
from ..stopping import stop_cleanly
from .callbacks import FiniteCheckCallback, StopOnSignal, divergence_warning
from .run_folder import claim_run_folder, release_failed_run_folder, take_run_folder
from .adapters import apply_adapter
from .config import FIGURE_PROMPTS, TrainConfig
from .hub import check_hub_token, model_card, push_adapter
from .setup import (build_train_dataset, cast_frozen_base, choose_chat_template, load_train_and_eval_tasks,
                    resolve_base_dtype, routing_probes, scale_router_init)
from .trainer import (AdapterTrainer, CompleteCheckpointCallback, LaunchCheckCallback, discard_incomplete_checkpoints,
                      finished_run_state, last_complete_checkpoint, training_arguments)

logger = logging.getLogger("mor")

MAX_RECORDED_INDICES = 10_000  # result.json lists each process's example indices up to this many


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
    figures: Path | None = None  # folder of the routing figures drawn after training (written after result.json)
    resumed_from_step: int | None = None  # --resume: the checkpoint's step; ranks/train_seconds cover the steps after it
    hub_repo: str | None = None  # --push-to-hub: the repository the adapter was uploaded to

    def to_dict(self) -> dict:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out


def run_training(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train ``cfg.adapter`` on ``cfg.data``; save it to ``<output>/adapter``; evaluate before/after.

    The output folder must be new or empty, or hold this same run (``resume``, same settings),
    or ``overwrite`` must be set, and may not be, hold or lie inside an input (see
    :func:`mor.train.run_folder.claim_run_folder`). SIGTERM / SIGINT stop the run at a complete checkpoint
    (:class:`mor.train.callbacks.StopOnSignal`).
    """
    cfg.validate()
    if cfg.push_to_hub:
        check_hub_token()  # before hours of training, not after
    cfg.max_steps = cfg.steps  # recorded resolved: 140 on the built-in suite, else -1 (epochs)
    check_launch_before_start(training_arguments(cfg).world_size)
    settings = cfg.resume_settings()
    created = claim_run_folder(cfg.output, settings, overwrite=cfg.overwrite, resume=cfg.resume,
                               inputs={"--model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data})
    stop_on_signal = StopOnSignal()
    try:
        result, eval_tasks = _run(cfg, [stop_on_signal, *(callbacks or [])], settings)
    except BaseException:
        release_failed_run_folder(cfg.output, created)
        raise
    finally:
        stop_on_signal.restore()  # the process's own signal handlers again, however the run ended
    # 10. figures: router by task, routing over steps (a MoR run that was evaluated)
    if cfg.figures and cfg.adapter.method == "mor" and result.after is not None:
        result.figures = draw_figures_after_training(cfg, result.adapter_dir, eval_tasks)
    return result


def _run(cfg: TrainConfig, callbacks: list, settings: dict) -> tuple[TrainResult, list[Task]]:
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    choose_chat_template(tokenizer, cfg)
    run = SimpleNamespace(eval_seconds={}, before=None, after=None)

    # 1. setup data
    train_tasks, eval_tasks = load_train_and_eval_tasks(cfg)
    dataset, data_report = build_train_dataset(train_tasks, tokenizer, cfg)
    for index, example in enumerate(dataset):
        example["example_index"] = index  # which process trained on what (see AdapterTrainer.compute_loss)
    logger.info("training on %d examples from %s", len(dataset), data_report["tasks"])

    # 2. setup model
    model, base_dtype = setup_model(cfg)
    trainable = count_trainable_parameters(model)

    # 3. evaluate before (the adapter off)
    if cfg.evaluate and cfg.evaluate_before and eval_tasks and not cfg.resume:
        with model.disable_adapter(), stop_cleanly("scoring the base model before training",
                                                   "nothing was trained or saved yet"):
            run.before = _timed_evaluation(run, "before", model, tokenizer, eval_tasks, cfg)

    # 4. trainer (the inputs loaded and the disk has room: now the old run's files go), 5. train or resume
    trainer = build_trainer(cfg, model, tokenizer, dataset, train_tasks, callbacks, eval_tasks)
    check_training_space(cfg.output, trainable, save_total_limit=trainer.args.save_total_limit)
    take_run_folder(cfg.output, settings, overwrite=cfg.overwrite)
    start = time.perf_counter()
    outcome = train_or_resume(cfg, trainer)
    seconds = time.perf_counter() - start

    # 6. save the adapter
    warnings = [w for w in [divergence_warning(trainer.state.log_history, cfg.lr)] if w]
    for warning in warnings:
        logger.warning(warning)
    adapter_dir, ranks = save_trained_adapter(cfg, trainer, model, tokenizer, trainable, data_report)

    # 7. evaluate after
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded and cfg.evaluate and eval_tasks:
        logger.warning("the model is sharded (FSDP / DeepSpeed): skipping the evaluation after training; "
                       "run `mor eval --adapter %s` on one process", adapter_dir)
    if cfg.evaluate and eval_tasks and trainer.is_world_process_zero() and not sharded:
        model.eval()
        run.after = _timed_evaluation(run, "after", model, tokenizer, eval_tasks, cfg)
        if run.before is None and cfg.resume:
            with model.disable_adapter():
                run.before = evaluate_model(model, tokenizer, eval_tasks, cfg.scoring, cfg.eval_batch_size,
                                            cfg.eval_limit)

    # 8. write the result
    stats = getattr(trainer, "routing_stats", None)
    result = TrainResult(adapter_dir, trainable, seconds, outcome.global_step, outcome.training_loss,
                         data_report, run.before, run.after, world_size(), ranks, warnings,
                         routing_stats=stats.summary() if stats else None,
                         log_history=trainer.state.log_history, eval_seconds=run.eval_seconds or None,
                         base_dtype=str(base_dtype).replace("torch.", ""),
                         resumed_from_step=trainer.resumed_from_step)
    if trainer.is_world_process_zero():
        atomic_write_text(adapter_dir / "README.md", model_card(cfg, result))  # in place of peft's blank card
        if cfg.push_to_hub:  # 9. push the adapter and its card (a failed upload loses nothing)
            try:
                result.hub_repo = push_adapter(cfg, result)
            except Exception as err:
                result.warnings.append(f"--push-to-hub failed ({type(err).__name__}: {err}); the adapter is in "
                                       f"{adapter_dir}: upload it with `huggingface-cli upload <repo> {adapter_dir}`")
                logger.warning(result.warnings[-1])
        atomic_write_text(Path(cfg.output) / "result.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result, eval_tasks


def setup_model(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.dtype]:
    """The base with the adapter attached (seeded by ``cfg.seed`` unless it has its own seed), the
    frozen base in ``cfg.base_dtype``, the router's initial weights scaled."""
    attention = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    base = load_model(cfg.model, load_in_4bit=cfg.load_in_4bit, **attention)
    keep_4bit_layout(base)  # evaluated while it trains: a 4-bit base keeps the layout gradients flow through
    if cfg.adapter.init_seed is None:
        cfg.adapter.init_seed = cfg.seed
    model = apply_adapter(base, cfg.adapter, tokens_per_step=cfg.batch_size * cfg.max_length)
    base_dtype = resolve_base_dtype(cfg.base_dtype)
    if base_dtype != torch.float32:
        cast_frozen_base(model, base_dtype)
        logger.info("frozen base in %s; adapter parameters stay %s", base_dtype,
                    sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}))
    if cfg.router_init_scale != 1.0 and not cfg.resume:
        scale_router_init(model, cfg.router_init_scale)
    return model, base_dtype


def build_trainer(cfg: TrainConfig, model, tokenizer, dataset: list[dict], train_tasks: list[Task],
                  callbacks: list | None = None, eval_tasks: list[Task] | None = None) -> AdapterTrainer:
    """The AdapterTrainer of the run, with its callbacks: complete checkpoints, finite weights,
    the launch check, and the routing statistics of a MoR / MoE-LoRA adapter; with ``eval_steps``,
    the eval tasks' examples as its eval datasets (one loss per task)."""
    trainer = AdapterTrainer(
        model=model, args=training_arguments(cfg), train_dataset=dataset, processing_class=tokenizer,
        data_collator=batch_collator(tokenizer.pad_token_id, cfg.packing), eval_dataset=eval_datasets(cfg, tokenizer, eval_tasks or []),
        callbacks=[CompleteCheckpointCallback(), FiniteCheckCallback(), *(callbacks or [])],
    )
    trainer.add_callback(LaunchCheckCallback(trainer))
    trainer.router_lr_multiplier = cfg.router_lr_multiplier
    stats_every = cfg.logging_steps if cfg.routing_stats_steps is None else cfg.routing_stats_steps
    if stats_every and find_routers(model):
        trainer.routing_stats = RoutingStatsCallback(routing_probes(train_tasks, tokenizer, cfg),
                                                     Path(cfg.output) / STATS_NAME, stats_every).attach(trainer)
        trainer.add_callback(trainer.routing_stats)
    return trainer


def batch_collator(pad_token_id: int, packing: bool = False):
    """The run's collator: right-padded batches, or (``packing``) each batch's examples in one row
    without padding, positions restarting per example (transformers' DataCollatorWithFlattening).
    transformers keeps packed examples apart only when the 2-D attention mask is absent and no
    KV cache is made, so packed batches ask for none (``use_cache=False``). Both carry the
    examples' indices (which process trained on what)."""
    flatten = DataCollatorWithFlattening() if packing else None

    def collate_batch(batch: list[dict]) -> dict:
        features = [{key: example[key] for key in ("input_ids", "attention_mask", "labels")} for example in batch]
        tensors = {**flatten(features), "use_cache": False} if flatten else collate(features, pad_token_id)
        return {**tensors, "example_index": torch.tensor([example.get("example_index", -1) for example in batch])}

    return collate_batch


def eval_datasets(cfg: TrainConfig, tokenizer, eval_tasks: list[Task]) -> dict[str, list[dict]] | None:
    """``{task: tokenised examples}`` whose loss ``eval_steps`` logs (the first ``eval_limit`` of
    each eval task, built as training builds its examples)."""
    if not cfg.eval_steps:
        return None
    if not eval_tasks:
        raise SettingsError("--eval-steps needs eval tasks: a test split in --data, --holdout N or --eval-data")
    datasets = {}
    for task in eval_tasks:
        examples = training_examples(task, target=cfg.target, tokenizer=tokenizer,
                                     skipped=[] if cfg.skip_bad else None)[: cfg.eval_limit]
        datasets[task.name] = [dict(f) for f in tokenize_examples(examples, tokenizer, cfg.max_length).features]
    return datasets


def train_or_resume(cfg: TrainConfig, trainer: AdapterTrainer):
    """Train from scratch, or (``resume``) from the last complete checkpoint; a checkpoint that
    already holds every step is loaded, not trained past. Returns global_step and training_loss."""
    resume_from = None
    if cfg.resume:
        folder = Path(trainer.args.output_dir)
        discard_incomplete_checkpoints(folder)
        resume_from = last_complete_checkpoint(folder)
        if resume_from is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from scratch", folder)
        else:
            logger.info("resuming from %s", resume_from)
            trainer.resumed_from_step = int(resume_from.name.rsplit("-", 1)[1])
    finished = finished_run_state(trainer, resume_from, cfg) if resume_from else None
    if finished is None:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    logger.info("%s is the end of the run (step %d): nothing left to train", resume_from, finished.global_step)
    _compat.load_trainer_checkpoint(trainer, str(resume_from))  # Trainer would take one step past the end
    trainer.state = finished
    losses = [h["loss"] for h in finished.log_history if "loss" in h]
    return SimpleNamespace(global_step=finished.global_step, training_loss=losses[-1] if losses else None)


def save_trained_adapter(cfg: TrainConfig, trainer: AdapterTrainer, model, tokenizer, trainable: int,
                         data_report: dict) -> tuple[Path, list]:
    """Refuse non-finite weights; every rank gathers (FSDP / ZeRO-3 shards) and reports what it
    trained on; rank 0 writes ``<output>/adapter`` atomically with the tokenizer and training.json."""
    bad = nonfinite_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})
    if bad:  # FiniteCheckCallback stops earlier; this guards the final save whatever happened
        raise SettingsError(f"{len(bad)} trainable tensors hold NaN or inf after training (e.g. {bad[0]}); "
                               "nothing was saved as the adapter. Lower --lr and start again (--overwrite).")
    adapter_dir = Path(cfg.output) / "adapter"
    saved = gather_adapter_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        with atomic_folder(adapter_dir) as tmp_dir:
            save_adapter(trainer.model_wrapped, tmp_dir, state_dict=saved, is_main_process=True)
            tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / "training.json").write_text(json.dumps({
                "model": cfg.model, "adapter": cfg.adapter.to_dict(), "trainable_parameters": trainable,
                "world_size": world_size(), "train_config": cfg.to_dict(), "data": data_report,
            }, indent=2, default=str) + "\n")
    seen = trainer.trained_example_indices
    ranks = all_gather_objects({"examples": len(seen),
                                "example_indices": sorted(seen) if len(seen) <= MAX_RECORDED_INDICES else None,
                                "adapter_sha256": adapter_checksum(checkpoint_state(trainer.model_wrapped, saved))})
    return adapter_dir, ranks


def draw_figures_after_training(cfg: TrainConfig, adapter_dir: Path, eval_tasks: list[Task]) -> Path:
    """Router-by-task figures (and routing over steps) for the eval tasks of a finished MoR run,
    from the saved adapter, in ``<output>/figures``."""
    from ..analysis.analyze import analyze, routing_over_steps
    from ..data import task_prompts
    from ..runtime.loading import load_adapted

    model, tokenizer = load_adapted(cfg.model, adapter_dir)
    choose_chat_template(tokenizer, cfg)  # the run's prompts
    texts = {t.name: task_prompts(t, tokenizer, FIGURE_PROMPTS) for t in eval_tasks}
    folder = Path(cfg.output) / "figures"
    rerun = f"draw them with `mor analyze --adapter {adapter_dir} --data <the eval tasks> --output {folder}`"
    with stop_cleanly("drawing the figures after training", f"the adapter and result.json are saved in {cfg.output}, "
                      "the figures are not drawn", rerun=rerun), atomic_folder(folder) as tmp:  # all figures or none
        analyze(model, texts, tmp, tokenizer=tokenizer)
        stats = Path(cfg.output) / STATS_NAME
        if stats.is_file():
            routing_over_steps(stats, tmp)
    return folder


def _timed_evaluation(run: SimpleNamespace, name: str, model, tokenizer, tasks: list[Task], cfg: TrainConfig) -> dict:
    tic = time.perf_counter()
    results = evaluate_model(model, tokenizer, tasks, cfg.scoring, cfg.eval_batch_size, cfg.eval_limit)
    run.eval_seconds[name] = time.perf_counter() - tic
    return results
