"""Issue #22, items 1-3: faults a real run meets. Preemption (real SIGTERM / SIGINT sent to a
training process: mid-step, a second one mid-checkpoint, kill -9 mid-final-save), a full disk
(a patched writer raising ENOSPC at a chosen write, and a real 3 MB tmpfs), a read-only folder
(a tmpfs mounted read-only: chmod does not stop root), and bad input that used to trace back.
Each asserts the exit status, the one `error:` line, and that earlier results are
byte-identical afterwards with no temporary file left."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mor.cli import main
from mor.safety import EXIT_PREEMPTED
from mor.data.builtin import write_builtin_suite
from mor.train.trainer import COMPLETE_MARKER
from test_no_data_loss import snapshot

ADAPTER_FILE = "adapter_model.safetensors"
WORKER = Path(__file__).with_name("fault_worker.py")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of an atomic write under ``folder``."""
    return [str(p) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=32, eval_size=4, tasks=["parity"])
    return folder / "parity"


def train_flags(model_dir, data, out, steps: int = 6):
    return ["train", "--model", model_dir, "--data", data, "--output", out, "--r", 2, "--num-experts", 2,
            "--batch-size", 4, "--max-steps", steps, "--save-steps", 2, "--seed", 0, "--no-eval", "--no-figures"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, parity):
    """The final adapter tensors of the run every interrupted run must reach after --resume."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli(*train_flags(tiny_model_dir, parity, out)) == 0
    return load_file(str(out / "adapter" / ADAPTER_FILE))


def assert_same_adapter(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(folder / "adapter" / ADAPTER_FILE))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # bit-identical on CPU


def run_worker(plan: str, record: Path, flags: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), plan, str(record), "--", *map(str, flags)],
                          capture_output=True, text=True, timeout=600)


def interrupt(tmp_path: Path, model_dir, data, plan: str):
    """``mor train`` into ``tmp_path/run`` in a worker that sends itself the signals of ``plan``:
    (output folder, train flags, the worker's record file, the finished process)."""
    out, record = tmp_path / "run", tmp_path / "record.json"
    flags = train_flags(model_dir, data, out)
    return out, flags, record, run_worker(plan, record, flags)


def resume_reaches(out: Path, flags: list, expected: dict[str, torch.Tensor]) -> None:
    """``--resume`` finishes the run with the adapter of the run that was never stopped."""
    assert run_cli(*flags, "--resume") == 0
    assert_same_adapter(out, expected)


def complete(out: Path) -> list[str]:
    return sorted(p.parent.name for p in out.glob(f"checkpoints/checkpoint-*/{COMPLETE_MARKER}"))


# -- item 1: preemption ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan, stop_step", [("SIGTERM@step:3", 3), ("SIGINT@step:3", 3),
                                             ("SIGTERM@checkpoint:2", 3)])  # mid-step, mid-checkpoint
def test_a_signal_finishes_the_step_checkpoints_it_and_resume_is_exact(tmp_path, tiny_model_dir, parity,
                                                                       uninterrupted, plan, stop_step):
    out, flags, record, done = interrupt(tmp_path, tiny_model_dir, parity, plan)
    signame = plan.split("@")[0]
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    assert f"received {signame}: finishing this step" in done.stderr
    stopped = re.findall(r"^stopped by .*$", done.stderr, flags=re.M)  # a line of its own
    assert len(stopped) == 1 and stopped[0].startswith(f"stopped by {signame} at step {stop_step}"), done.stderr
    assert f"checkpoint-{stop_step}; to continue, run the same command again with --resume" in stopped[0]
    assert "Traceback" not in done.stderr
    assert complete(out) == ["checkpoint-2", f"checkpoint-{stop_step}"] and not (out / "adapter").exists()
    before = json.loads(record.read_text())  # the complete checkpoints as they were when the signal came
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    resume_reaches(out, flags, uninterrupted)


def test_a_signal_after_the_last_step_stops_before_the_adapter_is_saved_and_resume_finishes(
        tmp_path, tiny_model_dir, parity, uninterrupted):
    out, flags, record, done = interrupt(tmp_path, tiny_model_dir, parity, "SIGTERM@final-save")
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    assert re.search(r"^stopped by SIGTERM after the last step, before the adapter was saved and scored: the "
                     r"complete checkpoint is .*checkpoint-6; to finish, run the same command again with --resume",
                     done.stderr, flags=re.M), done.stderr[-2000:]
    assert not (out / "adapter").exists() and leftovers(out) == []  # the half-written adapter folder removed
    resume_reaches(out, flags, uninterrupted)


def test_a_second_signal_mid_checkpoint_stops_at_once_and_the_last_complete_checkpoint_is_intact(
        tmp_path, tiny_model_dir, parity, uninterrupted):
    out, flags, record, done = interrupt(tmp_path, tiny_model_dir, parity, "SIGTERM@step:3,SIGTERM@checkpoint:3")
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    assert "error: second signal (SIGTERM): stopped at once" in done.stderr and "Traceback" not in done.stderr
    assert complete(out) == ["checkpoint-2"]  # checkpoint-3 was cut mid-write: never marked complete
    before = json.loads(record.read_text())
    assert before and {k: v for k, v in snapshot(out).items() if k in before} == before
    resume_reaches(out, flags, uninterrupted)  # drops the cut checkpoint-3, resumes from checkpoint-2


def test_kill_9_mid_final_save_leaves_no_adapter_and_resume_completes_it(tmp_path, tiny_model_dir, parity,
                                                                         uninterrupted):
    out, flags, record, done = interrupt(tmp_path, tiny_model_dir, parity, "SIGKILL@final-save")
    assert done.returncode == -9
    assert not (out / "adapter").exists() and complete(out) == ["checkpoint-4", "checkpoint-6"]
    resume_reaches(out, flags, uninterrupted)
    assert leftovers(out) == []  # the temporary adapter folder the kill left is cleared on resume


@pytest.mark.parametrize("vanishes", ["event file", "event folder"])
def test_tensorboard_files_vanishing_under_a_run_neither_stop_it_nor_change_its_result(
        tmp_path, tiny_model_dir, parity, uninterrupted, monkeypatch, capsys, caplog, vanishes):
    """tensorboard is a side channel: its event file or folder deleted mid-training (by hand, a
    cleanup job) must not end the run. (transformers' own callback dies in its writer thread and
    the run ended with `error: [Errno 2] No such file or directory: ...events.out.tfevents...`.)"""
    pytest.importorskip("tensorboard")
    from transformers import TrainerCallback

    import mor.train

    deleted = []

    class Vanish(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:  # during step 4, after the first logs were written
                events = sorted(Path(args.output_dir).glob("runs/*/events.out.tfevents*"))
                assert events, "no tensorboard event file to delete"
                deleted.extend(events)
                if vanishes == "event file":
                    events[0].unlink()
                else:
                    shutil.rmtree(events[0].parent)

    run_training = mor.train.run_training
    monkeypatch.setattr(mor.train, "run_training",
                        lambda cfg, callbacks=None: run_training(cfg, [*(callbacks or []), Vanish()]))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="mor"):
        assert run_cli(*train_flags(tiny_model_dir, parity, out), "--logging-steps", 1) == 0
    assert deleted and "Traceback" not in capsys.readouterr().err
    assert_same_adapter(out, uninterrupted)
    assert json.loads((out / "result.json").read_text())["global_step"] == 6
    if vanishes == "event folder":
        assert "tensorboard: the event folder" in caplog.text and "vanished during the run" in caplog.text
        assert list(deleted[0].parent.glob("events.out.tfevents*"))  # logging went on in a new event file


# -- item 2/3: a full disk -------------------------------------------------------------------------

def test_enospc_at_a_checkpoint_write_is_an_error_line_and_resume_is_exact(tmp_path, tiny_model_dir, parity,
                                                                           uninterrupted, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = train_flags(tiny_model_dir, parity, out)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the disk fills up while checkpoint-4 is written
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert run_cli(*flags) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device while writing" in err and "checkpoint-4" in err
    assert "Traceback" not in err and complete(out) == ["checkpoint-2"]
    monkeypatch.setattr(torch, "save", real_save)
    resume_reaches(out, flags, uninterrupted)


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.decode().strip()}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 3 MB disk (tmpfs); filled up by the test with :func:`fill`."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=3m")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Take all free space of ``disk`` but ``leave`` bytes."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
        except OSError:
            pass


def test_a_full_disk_is_an_error_line_and_the_previous_results_stay(tiny_disk, tmp_path, tiny_model_dir, parity,
                                                                    capsys):
    run = tmp_path / "run"
    assert run_cli(*train_flags(tiny_model_dir, parity, run, steps=2)) == 0
    adapter = run / "adapter"
    lora, results = tiny_disk / "lora", tiny_disk / "results.json"
    export = ("export-lora", "--model", tiny_model_dir, "--adapter", adapter, "--routing", "uniform",
              "--output", lora, "--no-check")
    evaluate = ("eval", "--model", tiny_model_dir, "--data", parity, "--output", results, "--log-samples")
    assert run_cli(*export) == 0 and run_cli(*evaluate) == 0
    capsys.readouterr()
    fill(tiny_disk)
    before = snapshot(tiny_disk)
    for command in ((*export, "--overwrite"), (*evaluate, "--overwrite")):
        assert run_cli(*command) == 2, command[0]
        err = capsys.readouterr().err
        assert err.count("error: no space left on the device") == 1 and "Traceback" not in err, err
        assert snapshot(tiny_disk) == before and leftovers(tiny_disk) == [], command[0]
    assert run_cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--routing", "uniform",
                   "--output", tiny_disk / "merged") == 2  # the merged model's size is known up front
    assert "the merged model needs about" in capsys.readouterr().err and snapshot(tiny_disk) == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "lora", "results.json"]


def test_training_that_cannot_fit_on_the_disk_is_refused_before_it_starts(tiny_disk, tiny_model_dir, parity,
                                                                          capsys):
    assert run_cli(*train_flags(tiny_model_dir, parity, tiny_disk / "run")) == 2
    err = capsys.readouterr().err
    assert "training (the adapter and 2 checkpoints) needs about" in err and "free" in err
    assert sorted(p.name for p in tiny_disk.iterdir()) == []


# -- item 2/3: a read-only folder ------------------------------------------------------------------

def test_a_read_only_folder_is_an_error_line_before_any_work(tmp_path, tiny_model_dir, parity, capsys):
    run = tmp_path / "run"
    assert run_cli(*train_flags(tiny_model_dir, parity, run, steps=2)) == 0
    adapter = run / "adapter"
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "size=3m")
    try:
        (disk / "old").mkdir()
        (disk / "old" / "result.txt").write_text("previous result")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = snapshot(disk)
        model = ("--model", tiny_model_dir)
        for command in (train_flags(tiny_model_dir, parity, disk / "old", steps=1) + ["--overwrite"],
                        ("eval", *model, "--data", parity, "--output", disk / "results.json"),
                        ("merge", *model, "--adapter", adapter, "--routing", "uniform", "--output", disk / "m"),
                        ("analyze", *model, "--adapter", adapter, "--data", parity, "--output", disk / "old",
                         "--overwrite"),
                        ("export-lora", *model, "--adapter", adapter, "--routing", "uniform", "--output", disk / "l")):
            assert run_cli(*command) == 2, command[0]
            err = capsys.readouterr().err
            assert "the folder is read-only" in err and "choose a writable folder" in err, err
            assert snapshot(disk) == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- item 2: bad input that used to trace back -----------------------------------------------------

def test_a_model_path_that_does_not_exist_is_an_error_line(tmp_path, parity, capsys):
    assert run_cli("eval", "--model", "./tiny_typo", "--data", parity) == 2
    assert "error: --model ./tiny_typo: no such folder or file" in capsys.readouterr().err


def test_an_invalid_target_modules_regex_is_an_error_line(tmp_path, tiny_model_dir, parity, capsys):
    assert run_cli(*train_flags(tiny_model_dir, parity, tmp_path / "run"), "--target-modules", ".*proj(") == 2
    assert "is invalid: not a valid regular expression" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_dot_and_an_output_under_a_file_are_error_lines(tmp_path, tiny_model_dir, parity, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    for output, message in ((".", "is the current folder"), ("afile/out", "is a file, so nothing can be written")):
        for command in (train_flags(tiny_model_dir, parity, output, steps=1),
                        ("eval", "--model", tiny_model_dir, "--data", parity, "--output", output)):
            assert run_cli(*command) == 2
            assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_measuring_routing_on_inputs_without_tokens_is_a_clear_error(tiny_model_dir):
    from mor.config import MoRConfig
    from mor.runtime.loading import load_model, load_tokenizer
    from mor.model import get_mor_model

    model = get_mor_model(load_model(str(tiny_model_dir)), MoRConfig(r=2, num_experts=2))
    for texts in ([], [""]):
        with pytest.raises(ValueError, match="no tokens to route"):
            model.measure_routing(texts, tokenizer=load_tokenizer(str(tiny_model_dir)))


# -- a clean stop in every phase (issue 34): scoring before / after training, `mor eval`, `mor export-lora` --

def stop_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stopped by ")]
    assert proc.returncode == EXIT_PREEMPTED and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_signal_while_scoring_before_or_after_training_stops_with_the_command_that_continues(
        tmp_path, tiny_model_dir, parity):
    flags = [f for f in train_flags(tiny_model_dir, parity, tmp_path / "run", steps=2) if f != "--no-eval"]
    line = stop_line(run_worker("SIGTERM@score:1", tmp_path / "record.json", flags))
    assert "while scoring the base model before training: nothing was trained" in line
    assert f"mor train --model {tiny_model_dir}" in line  # the command that starts it again
    assert not (tmp_path / "run" / "adapter").exists() and leftovers(tmp_path) == []

    line = stop_line(run_worker("SIGTERM@score:2", tmp_path / "record.json", flags))  # the scoring after
    assert "after the last step" in line and "--resume" in line
    assert not (tmp_path / "run" / "result.json").exists() and leftovers(tmp_path) == []
    assert run_cli(*flags, "--resume") == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["after"] is not None


def test_a_signal_during_mor_eval_or_export_lora_leaves_the_previous_output_and_names_the_command(
        tmp_path, tiny_model_dir, parity):
    assert run_cli(*train_flags(tiny_model_dir, parity, tmp_path / "run", steps=1)) == 0
    adapter = tmp_path / "run" / "adapter"
    results = tmp_path / "results.json"
    results.write_text("earlier results\n")
    flags = ["eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", parity, "--output", results,
             "--overwrite"]
    line = stop_line(run_worker("SIGTERM@score:1", tmp_path / "record.json", flags))
    assert line.startswith("stopped by SIGTERM while scoring: nothing was written to") and "mor eval" in line
    assert results.read_text() == "earlier results\n" and leftovers(tmp_path) == []

    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "earlier.txt").write_text("kept\n")
    flags = ["export-lora", "--model", tiny_model_dir, "--adapter", adapter, "--routing", "uniform", "--output",
             loras, "--overwrite"]
    line = stop_line(run_worker("SIGINT@export", tmp_path / "record.json", flags))
    assert "stopped by SIGINT while exporting LoRA folders: nothing was written to" in line and "mor export-lora" in line
    assert [p.name for p in loras.iterdir()] == ["earlier.txt"] and leftovers(tmp_path) == []


def test_a_signal_while_mor_compare_scores_keeps_the_training_and_the_rerun_only_scores(tmp_path, tiny_model_dir):
    from test_compare import tiny_plan

    plan = tiny_plan(tmp_path, tiny_model_dir, arms=dict(lora=dict(method="lora", r=4)), baseline=False, seeds=[0],
                     select=dict(lrs=[1e-3], widen=0))
    flags = ["compare", plan, "--no-report"]
    line = stop_line(run_worker("SIGTERM@compare-score:1", tmp_path / "record.json", flags))
    assert "while scoring lora_seed0: its training is finished" in line and "its scores were not written" in line
    assert "same `mor compare` command again" in line
    assert not (tmp_path / "results" / "lora_seed0.json").exists() and leftovers(tmp_path) == []
    (trained,) = (tmp_path / "work" / "train").glob("lora_*/result.json")
    stamp = trained.stat().st_mtime_ns
    assert run_cli(*flags) == 0
    assert (tmp_path / "results" / "lora_seed0.json").is_file() and trained.stat().st_mtime_ns == stamp  # not retrained
