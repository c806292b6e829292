"""What a training run adds to transformers' Trainer as callbacks: the NaN/inf stop
(:class:`FiniteCheckCallback`), the preemption-safe stop on SIGTERM / SIGINT (:class:`StopOnSignal`),
and the divergence warning after training."""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import TrainingDiverged
from ..stopping import EXIT_PREEMPTED, SignalHandlers, Stopped

DIVERGENCE_FACTOR = 1.5  # a final logged loss above 1.5x the first one is reported as divergence


class FiniteCheckCallback(TrainerCallback):
    """Stops training with :class:`TrainingDiverged` as soon as a logged loss or a trainable
    weight is NaN/inf, before that step's checkpoint is written."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, param in model.named_parameters():
                if param.requires_grad and not torch.isfinite(param.detach()).all():
                    raise TrainingDiverged(
                        f"training diverged at step {state.global_step}: {name} holds NaN or inf after the "
                        f"update (learning rate {args.learning_rate:g}); no adapter was saved from this run's "
                        "end. Lower --lr and start again (--overwrite).")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged at step {state.global_step}: the loss is {loss} "
                                   f"(learning rate {args.learning_rate:g}); no adapter was saved from this "
                                   "run's end. Lower --lr and start again (--overwrite).")
        return control


class StopOnSignal(TrainerCallback):
    """Preemption-safe training: on the first SIGTERM or SIGINT the step in progress finishes,
    a complete checkpoint is written (marked complete like every checkpoint, gathered across
    ranks by the trainer's own save), and :class:`Stopped` (status :data:`EXIT_PREEMPTED`) says
    where and how to resume. Under several processes the ranks agree on the step to stop at (a
    max all-reduce each step), so a signal that reaches one rank stops all of them together. A
    second signal stops at once; the last complete checkpoint is untouched, since a checkpoint
    is marked complete only after everything in it is written. After the last step (while the
    adapter is saved and scored) a signal stops at once with :data:`EXIT_PREEMPTED`: the last
    step's checkpoint is complete, and ``--resume`` saves and scores again. The handlers stay
    until :meth:`restore` (``run_training`` calls it however the run ends).

    (transformers' ``enable_jit_checkpoint`` handles SIGTERM only, acts 3 s after it, and saves
    without the ``on_save`` event that marks a checkpoint complete, so it is not used.)"""

    def __init__(self, resume_hint: str = "run the same command again with --resume"):
        self.resume_hint = resume_hint
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.last_checkpoint: Path | None = None  # set when training ended without a signal
        self._handlers = SignalHandlers(self._handle)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.last_checkpoint is not None:
            self.restore()
            raise Stopped(f"stopped by {name} after the last step, before the adapter was saved and scored: the "
                          f"complete checkpoint is {self.last_checkpoint}; to finish, {self.resume_hint}.",
                          EXIT_PREEMPTED)
        if self.received is not None:
            self.restore()
            raise Stopped(f"second signal ({name}): stopped at once. The last complete checkpoint is intact; "
                          f"to continue, {self.resume_hint}.", 128 + signum)
        self.received = signum
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"\nreceived {name}{rank}: finishing this step, then writing a checkpoint (send it again to stop "
              "at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        """Put back the signal handlers there were before training."""
        self._handlers.restore()

    def on_train_begin(self, args, state, control, **kwargs):
        self._handlers.install()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            self.last_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            return control
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another process"
        folder = Path(args.output_dir) / f"checkpoint-{self.stopped_at}"
        raise Stopped(f"stopped by {name} at step {self.stopped_at}: the complete checkpoint is {folder}; to "
                      f"continue, {self.resume_hint}.", EXIT_PREEMPTED)


def divergence_warning(log_history: list[dict], lr: float) -> str | None:
    """A warning when the last logged training loss ends far above the first one."""
    losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if len(losses) < 2:
        return None
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    if last > DIVERGENCE_FACTOR * first:
        return (f"the training loss rose from {first:.4g} (step {first_step}) to {last:.4g} (step {last_step}): "
                f"the run diverged and the adapter is likely worse than none; lower --lr (now {lr:g}).")
    return None
