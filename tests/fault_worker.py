"""``mor train`` in a process of its own that sends itself real signals at chosen points, for
tests/test_faults.py: ``python fault_worker.py PLAN RECORD -- <mor train flags>``.

PLAN is a comma-separated list of ``SIGNAL@POINT:STEP`` (``SIGTERM@step:3``: during step 3, i.e.
after its forward pass began; ``SIGTERM@checkpoint:3``: while checkpoint-3 is being written, after
its adapter and before its optimizer state; ``SIGKILL@final-save``: while the final adapter is
written; ``SIGTERM@score:2``: before the second scoring call (of `mor train`: the evaluation after
training; of `mor eval`: its second task); ``SIGTERM@compare-score:1``: before `mor compare` scores
its first run; ``SIGTERM@export``: after `mor export-lora` wrote a LoRA
into its temporary folder). Any mor command may follow ``--``. RECORD is a JSON file where the worker writes the sha256 of every file of the complete
checkpoints as they were when the first signal was sent (to show they are untouched afterwards).
Exit status: the CLI's (75 after a checkpoint, 128+N for a second signal), or -9 for SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

import mor.compare.runner
import mor.eval.scoring
import mor.export
import mor.train
import mor.train.recipe
import mor.train.trainer
from mor.cli import main


def complete_checkpoints(output: Path) -> dict[str, str]:
    out = {}
    for folder in sorted(output.glob("checkpoints/checkpoint-*")):
        if (folder / mor.train.trainer.COMPLETE_MARKER).is_file():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    out[str(path.relative_to(output))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main_with_plan(plan: str, record: Path, argv: list[str]) -> int:
    output = Path(argv[argv.index("--output") + 1]) if "--output" in argv else Path("no-output")
    points = []
    for item in plan.split(","):
        name, where = item.split("@")
        point, _, step = where.partition(":")
        points.append((getattr(signal, name), point, int(step) if step else None))
    sent = []

    def send(point: str, step: int | None) -> None:
        for index, (signum, at, at_step) in enumerate(points):
            if index not in sent and at == point and (at_step is None or at_step == step):
                if not sent:
                    record.write_text(json.dumps(complete_checkpoints(output)))
                sent.append(index)
                os.kill(os.getpid(), signum)

    class SendDuringStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            send("step", state.global_step + 1)  # the step that now runs

    save_model = mor.train.trainer.AdapterTrainer.save_model

    def save_model_then_signal(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if output_dir is not None:
            send("checkpoint", int(Path(output_dir).name.rsplit("-", 1)[-1]))  # before the optimizer state

    mor.train.trainer.AdapterTrainer.save_model = save_model_then_signal
    save_adapter = mor.train.recipe.save_adapter  # the final adapter's writer (checkpoints: AdapterTrainer's)

    def save_adapter_then_signal(model, folder, *args, **kwargs):
        result = save_adapter(model, folder, *args, **kwargs)
        if "checkpoint-" not in str(folder):
            send("final-save", None)  # the adapter written into its temporary folder, not yet renamed
        return result

    mor.train.recipe.save_adapter = save_adapter_then_signal
    score_items, scored = mor.eval.scoring.score_items, []

    def score_items_then_signal(*args, **kwargs):
        scored.append(1)
        send("score", len(scored))  # before the Nth scoring call (train: 1 before training, 2 after)
        return score_items(*args, **kwargs)

    mor.eval.scoring.score_items = score_items_then_signal
    export_lora = mor.export.export_lora

    def export_lora_then_signal(*args, **kwargs):
        folder = export_lora(*args, **kwargs)
        send("export", None)  # a LoRA folder written into the temporary output, not yet renamed
        return folder

    mor.export.export_lora = export_lora_then_signal
    compare_score, compared = mor.compare.runner.Worker.score, []

    def compare_score_then_signal(self, *args, **kwargs):
        compared.append(1)
        send("compare-score", len(compared))  # `mor compare`, before scoring its Nth run
        return compare_score(self, *args, **kwargs)

    mor.compare.runner.Worker.score = compare_score_then_signal
    run_training = mor.train.run_training
    mor.train.run_training = lambda cfg, callbacks=None: run_training(cfg, [*(callbacks or []), SendDuringStep()])
    return main(argv)


if __name__ == "__main__":
    split = sys.argv.index("--")
    sys.exit(main_with_plan(sys.argv[1], Path(sys.argv[2]), sys.argv[split + 1:]))
