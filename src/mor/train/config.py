"""``TrainConfig``: every setting of a training run, the one place where each one's default and
meaning live. The ``mor train`` flags are generated from these fields (``--batch-size`` is
``batch_size``), a ``--config run.yaml`` file uses the field names as keys, and errors name the
flag. Adding a training option is adding a field here (and using it in the recipe).

Field metadata: ``help`` (the flag's help text), ``choices``, ``flag`` (a flag name other than the
field's, e.g. ``--no-eval`` for ``evaluate``), ``resume_free`` (a ``--resume`` may change it), ``added``
(``mor.train.adapters.ADDED``: added after runs were first recorded; at its default it matches a record
written before it existed).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from ..data.builtin import DEFAULT_TRAIN_SIZE
from ..data.sources import EVAL_SPLIT, TRAIN_SPLIT
from ..data.tables import parse_columns
from ..errors import MissingInput, SettingsError
from .adapters import ADDED, AdapterSpec, without_added_defaults

# The default run (`mor train` alone, or run_training(TrainConfig())) must finish in under 10
# minutes on a 2-core CPU: SmolLM2 takes about 2.7 s per step of 8 examples there, and each
# evaluation pass over 5 tasks x 40 records about 35 s.
BUILTIN_STEPS = 140
BUILTIN_EVAL_SIZE = 40
FIGURE_PROMPTS = 40  # prompts per task for the routing figures after training


def setting(default, help: str, **meta):
    """A dataclass field with its help text (and optional choices / flag / resume_free / added)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI fills it from flags (and ``--config``), scripts
    build it directly. ``run_training(TrainConfig())`` is the same run as ``mor train``."""

    model: Optional[str] = setting(None, "hub id, local folder or .gguf file (default: the embedded "
                                         "SmolLM2-135M-Instruct)")
    adapter: AdapterSpec = field(default_factory=AdapterSpec, metadata={"help": "the adapter (its own flags)"})
    data: list[str] = setting([], "tasks: JSON list / JSONL / parquet / arrow / CSV files, folders of them, datasets "
                                  "save_to_disk folders, or hub:NAME[:CONFIG] hub datasets; each is one task named after "
                                  "it (default: the built-in multi-task suite)")
    data_split: str = setting(TRAIN_SPLIT, "the split of --data to train on, where it has named splits (a folder's "
                                           "<split>.json, a DatasetDict, a hub dataset)")
    eval_split: str = setting(EVAL_SPLIT, "the split of --data and --eval-data to evaluate, where they hold it")
    columns: dict = setting({}, "map record fields onto the data's columns, FIELD=COLUMN pairs separated by commas "
                                "(e.g. instruction=question,output=answer; fields: instruction, input, output, answer, "
                                "choices, label, question, messages)", parse=parse_columns)
    eval_data: list[str] = setting([], "extra eval tasks (default: the test splits of --data)")
    holdout: int = setting(0, "carve this many eval records out of tasks with no test split")
    target: str = setting("output", "output: the record's answer; text: the correct option's text "
                                    "(evaluation then scores option texts, lm-eval style)", choices=("output", "text"))
    chat_template: Optional[str] = setting(None, "a Jinja chat template (its text or a file holding it) for chat and "
                                                 "instruction records, in place of the tokenizer's")
    use_chat_template: bool = setting(True, "render records as plain text (chat turns as 'User: ...', "
                                            "'Assistant: ...'), not through the tokenizer's chat template",
                                      flag="--no-chat-template")
    mix: str = setting("proportional", "how tasks are mixed: proportional to their size, or uniform",
                       choices=("proportional", "uniform"))
    output: str = setting("runs/mor", "run folder: adapter/, checkpoints/, result.json, figures/")
    max_steps: Optional[int] = setting(None, f"optimizer steps (default: {BUILTIN_STEPS} on the built-in suite, "
                                             "else train for --epochs)", resume_free=True)
    epochs: float = setting(1.0, "passes over the data when --max-steps is not given", resume_free=True)
    batch_size: int = setting(8, "examples per device per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-3, "learning rate (1e-3 for MoR, MoE-LoRA, LoRA and DoRA alike)")
    warmup_ratio: float = setting(0.05, "fraction of the steps spent warming the learning rate up (rounded up to "
                                        "whole steps; the first step already runs at lr/warmup steps, never at 0)")
    lr_scheduler: str = setting("cosine", "learning-rate schedule (a transformers SchedulerType: cosine, linear, "
                                          "constant, constant_with_warmup, ...)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_length: int = setting(256, "truncate examples to this many tokens")
    seed: int = setting(0, "seed of the data order, the task mixing and the adapter's initialisation")
    resume: bool = setting(False, "continue from the last complete checkpoint in --output", resume_free=True)
    overwrite: bool = setting(False, "replace a non-empty --output folder (its old checkpoints are removed)",
                              resume_free=True)
    skip_bad: bool = setting(False, "skip malformed records and report how many")
    save_steps: int = setting(50, "save a checkpoint every this many steps", resume_free=True)
    logging_steps: int = setting(10, "log the loss every this many steps", resume_free=True)
    report_to: str = setting("tensorboard", "where the trainer's logs go besides the console (tensorboard: "
                                            "<output>/checkpoints/runs)", choices=("none", "tensorboard", "wandb", "mlflow"),
                             resume_free=True)
    eval_steps: Optional[int] = setting(None, "every this many steps, log the loss on the eval tasks (eval_<task>_loss; "
                                              "default: never)", resume_free=True)
    packing: bool = setting(False, "pack each micro-batch's examples into one row without padding, positions restarting "
                                   "per example so that none attends to another (transformers' "
                                   "DataCollatorWithFlattening; the loss stays on the answers only)", **ADDED)
    bf16: Optional[bool] = setting(None, "bf16 autocast for forward and backward (adapter and optimizer stay fp32; "
                                         "default: on a GPU with bf16, else off; on CPU through torch's CPU autocast)")
    attn_implementation: Optional[str] = setting(None, "the base model's attention (eager, sdpa, flash_attention_2, ...; "
                                                       "passed to from_pretrained; default: transformers' choice)")
    push_to_hub: bool = setting(False, "upload the adapter and a model card to the Hugging Face Hub after training "
                                       "(needs a token: huggingface-cli login or HF_TOKEN)", resume_free=True)
    hub_model_id: Optional[str] = setting(None, "the hub repository --push-to-hub uploads to (default: the --output "
                                                "folder's name, under your account)", resume_free=True)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    load_in_4bit: bool = setting(False, "quantise the frozen base to bitsandbytes nf4 (QLoRA-style); the adapter "
                                        "trains in fp32", **ADDED)
    evaluate: bool = setting(True, "skip the before/after evaluation", flag="--no-eval", resume_free=True)
    evaluate_before: bool = setting(True, "skip the evaluation with the adapter off (the 'before' column)",
                                    flag="--no-eval-before")
    eval_limit: Optional[int] = setting(None, "score at most this many records per eval task", resume_free=True)
    eval_batch_size: int = setting(16, "batch size of the evaluation", resume_free=True)
    builtin_train_size: Optional[int] = setting(None, f"training records per task of the built-in suite (default: "
                                                      f"{DEFAULT_TRAIN_SIZE})")
    builtin_eval_size: int = setting(BUILTIN_EVAL_SIZE, "eval records per task of the built-in suite")
    base_dtype: str = setting("fp32", "dtype of the frozen base (adapter and optimizer stay fp32); auto: bf16 where "
                                      "the hardware runs it natively (CPU with AVX512-BF16/AMX, GPU with bf16)",
                              choices=("fp32", "bf16", "auto"))
    group_by_length: bool = setting(False, "batch examples of similar length (less padding; changes the order)", **ADDED)
    router_lr_multiplier: float = setting(1.0, "router learning rate = lr times this (own optimizer group)")
    router_init_scale: float = setting(1.0, "multiply the router's initial weights by this (1/temperature of its "
                                            "logits at init)")
    routing_stats_steps: Optional[int] = setting(None, "measure routing entropy/load/divergence every N steps "
                                                       "(default: every logging step; 0: off)")
    routing_probe_size: int = setting(8, "probe prompts per task for the routing statistics")
    figures: bool = setting(True, "skip the routing figures after training a MoR adapter", flag="--no-figures",
                            resume_free=True)

    def __post_init__(self):
        self.columns = parse_columns(self.columns)  # "field=column,..." (a flag) or a mapping (a --config file)

    @property
    def scoring(self) -> str:
        """Evaluation matches the training target: label scoring for "output", option text for "text"."""
        return "text" if self.target == "text" else "label"

    @property
    def builtin(self) -> bool:
        """True when the run trains on the built-in suite (no ``data``)."""
        return not self.data

    @property
    def steps(self) -> int:
        """``max_steps`` resolved: its value, else BUILTIN_STEPS on the built-in suite, else -1 (epochs)."""
        if self.max_steps is not None:
            return self.max_steps
        return BUILTIN_STEPS if self.builtin else -1

    def validate(self) -> None:
        """Refuse settings that would silently do something else (``--max-steps 0`` trained one
        step; ``--grad-accum 0`` divided by zero), naming the flag."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise SettingsError(f"{flag_name(TrainConfig, name)} {getattr(self, name)}: {what}.")

        need(self.steps == -1 or self.steps >= 1, "max_steps", "give at least 1 (or leave it out to train for --epochs)")
        need(self.steps >= 1 or (math.isfinite(self.epochs) and self.epochs > 0), "epochs", "give a number above 0")
        for name in ("batch_size", "grad_accum", "save_steps", "max_length", "logging_steps", "eval_batch_size",
                     "builtin_eval_size", "routing_probe_size"):
            need(getattr(self, name) >= 1, name, "give at least 1")
        need(self.builtin_train_size is None or self.builtin_train_size >= 1, "builtin_train_size", "give at least 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "give a finite learning rate above 0, e.g. 1e-3")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "give a fraction in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "give 0 or more")
        need(self.holdout >= 0, "holdout", "give 0 or more")
        need(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "give at least 1")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "give at least 1 (or leave it out)")
        need(self.hub_model_id is None or self.push_to_hub, "hub_model_id", "give --push-to-hub too")
        need(self.chat_template is None or self.use_chat_template, "chat_template",
             "give --chat-template or --no-chat-template, not both")
        need(self.routing_stats_steps is None or self.routing_stats_steps >= 0, "routing_stats_steps",
             "give 0 (off) or more")
        for item in fields(self):
            choices = item.metadata.get("choices")
            if choices:
                need(getattr(self, item.name) in choices, item.name, f"choose one of {', '.join(choices)}")

    def resume_settings(self) -> dict:
        """The settings a ``--resume`` must share with the run it continues."""
        free = {f.name for f in fields(self) if f.metadata.get("resume_free")}
        if not self.builtin:  # the built-in suite's sizes do not touch a run on --data
            free |= {"builtin_train_size", "builtin_eval_size"}
        settings = {k: v for k, v in asdict(self).items() if k not in free and k != "adapter"}
        return {**settings, "adapter": self.adapter.to_dict()}

    @staticmethod
    def resume_key(settings: dict) -> dict:
        """``resume_settings()`` as a ``--resume`` compares them, recorded or now: without the settings added
        since at their defaults (:func:`~mor.train.adapters.without_added_defaults`)."""
        adapter = settings.get("adapter")
        key = without_added_defaults(settings, TrainConfig)
        return {**key, "adapter": without_added_defaults(adapter, AdapterSpec)} if isinstance(adapter, dict) else key

    def to_dict(self) -> dict:
        """Every setting but the adapter's (recorded in training.json as ``train_config``)."""
        return {k: v for k, v in asdict(self).items() if k != "adapter"}

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> "TrainConfig":
        """A config from ``{field: value}``: run settings and adapter settings side by side (or
        the adapter's under ``"adapter"``); an unknown key is an error naming it."""
        values = dict(values)
        nested = values.pop("adapter", None) or {}
        if not isinstance(nested, dict):
            raise SettingsError(f"{source}: 'adapter' must be a mapping of adapter settings")
        run_names = {f.name for f in fields(cls)} - {"adapter"}
        adapter_names = {f.name for f in fields(AdapterSpec)}
        unknown = sorted((set(values) - run_names - adapter_names) | (set(nested) - adapter_names))
        if unknown:
            raise SettingsError(f"{source}: unknown settings {unknown}; known: {sorted(run_names | adapter_names)}")
        adapter = AdapterSpec(**{k: v for k, v in {**values, **nested}.items() if k in adapter_names})
        return cls(adapter=adapter, **{k: v for k, v in values.items() if k in run_names})


def flag_name(cls, name: str) -> str:
    """The command-line flag of field ``name`` of the settings dataclass ``cls``."""
    return cls.__dataclass_fields__[name].metadata.get("flag") or "--" + name.replace("_", "-")


def read_mapping_file(path: Union[str, Path], where: str) -> dict:
    """The mapping in a YAML or JSON file (by suffix); errors start with ``where`` (e.g. "--config run.yaml")."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{where}: no such file")
    import yaml

    try:
        values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SettingsError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SettingsError(f"{where}: give a mapping (key: value), not a {type(values).__name__}")
    return values


def read_settings_file(path: Union[str, Path]) -> dict:
    """``{field: value}`` of a YAML or JSON run file (``mor train --config run.yaml``)."""
    values = read_mapping_file(path, f"--config {path}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
