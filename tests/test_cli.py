"""The `mor` command line end to end on a tiny config-built LLaMA and tiny generated tasks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mor.train import trainer as train_module
from mor.cli import main
from mor.train.adapters import AdapterSpec
from mor.data.builtin import write_builtin_suite
from mor.train import TrainConfig, run_training
from mor.train.trainer import last_complete_checkpoint


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> list[str]:
    """Two built-in tasks, 24 train / 8 test records each."""
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=24, eval_size=8, tasks=["parity", "colour"])
    return [str(folder / "parity"), str(folder / "colour")]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


HEAVY = ("torch", "peft", "transformers")


def test_mor_help_and_import_mor_import_neither_peft_nor_torch():
    # `mor --help` lists every command from its @command help without importing a command's heavy modules
    code = """if True:
        import sys
        import mor
        after_import = [m for m in sys.argv[1:] if m in sys.modules]
        from mor.cli import main
        try:
            main(["--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
        after_help = [m for m in sys.argv[1:] if m in sys.modules]
        print("heavy after import mor:", after_import, "after mor --help:", after_help)
    """
    done = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "heavy after import mor: [] after mor --help: []" in done.stdout, done.stdout
    from mor.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert len(commands) >= 9 and all(f"\n    {name} " in done.stdout for name in commands), done.stdout
    # `python -m mor.cli` runs through the same import machinery (mor.startup's finder hands runpy the code)
    done = subprocess.run([sys.executable, "-m", "mor.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "export-vllm" in done.stdout, done.stderr


@pytest.mark.parametrize("command", ["train", "eval", "merge", "export-lora", "export-vllm", "compare"])
def test_a_commands_help_imports_neither_peft_nor_torch(command):
    # `mor train --help` lists every flag generated from MoRConfig's and TrainConfig's fields (their
    # schema is MoROptions, a plain dataclass) without importing torch, peft or transformers: instant
    code = f"""if True:
        import sys
        from mor.cli import main
        try:
            main(["{command}", "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
        print("heavy after help:", [m for m in sys.argv[1:] if m in sys.modules])
    """
    done = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "heavy after help: []" in done.stdout, done.stdout
    assert "usage: mor " + command in done.stdout


@pytest.mark.parametrize("method", ["mor", "moelora", "lora", "dora"])
def test_train_eval_merge_analyze_for_each_method(tmp_path, tiny_model_dir, tiny_tasks, method, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_model_dir, "--method", method, "--r", 4, "--num-experts", 3,
                   "--data", *tiny_tasks, "--output", out, "--max-steps", 3, "--batch-size", 4,
                   "--save-steps", 2, "--eval-limit", 4) == 0
    printed = capsys.readouterr().out
    assert "before acc" in printed and "parity" in printed and "average" in printed
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["global_step"] == 3 and set(result["after"]["tasks"]) == {"parity", "colour"}

    for scoring in ("label", "text"):
        assert run_cli("eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", *tiny_tasks,
                       "--limit", 4, "--scoring", scoring, "--output", tmp_path / f"eval-{scoring}.json") == 0
        assert json.loads((tmp_path / f"eval-{scoring}.json").read_text())["tasks"]["parity"]["n"] == 4
    if method in ("mor", "moelora"):
        assert (out / "figures").is_dir() == (method == "mor")
        assert run_cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--data", tiny_tasks[0],
                       "--output", tmp_path / "merged") == 0
        printed = capsys.readouterr().out
        diff = float(printed.split("same fixed routing: ")[1].split()[0])
        assert diff <= 1e-5
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert run_cli("eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", *tiny_tasks,
                       "--limit", 4, "--merged") == 0
        assert "merged" in capsys.readouterr().out
        assert run_cli("analyze", "--model", tiny_model_dir, "--adapter", adapter, "--data", *tiny_tasks,
                       "--limit", 8, "--output", tmp_path / "fig") == 0
        assert sorted(p.suffix for p in (tmp_path / "fig").iterdir() if p.suffix == ".png")


def test_resume_after_a_kill_gives_the_same_adapter(tmp_path, tiny_model_dir, tiny_tasks, monkeypatch):
    def config(out):
        return TrainConfig(model=str(tiny_model_dir), adapter=AdapterSpec(r=4, num_experts=3, dropout=0.1),
                           data=tiny_tasks, output=str(out), max_steps=6, save_steps=3, batch_size=4,
                           evaluate=False, lr=5e-3)

    run_training(config(tmp_path / "straight"))
    expected = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))

    class Killed(Exception):
        pass

    original = train_module.CompleteCheckpointCallback.on_save

    def kill_after_first_checkpoint(self, args, state, control, **kw):
        original(self, args, state, control, **kw)
        raise Killed

    monkeypatch.setattr(train_module.CompleteCheckpointCallback, "on_save", kill_after_first_checkpoint)
    with pytest.raises(Killed):
        run_training(config(tmp_path / "killed"))
    monkeypatch.undo()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-3"
    # a checkpoint the kill left half-written must be ignored, not resumed from
    half = checkpoints / "checkpoint-6"
    shutil.copytree(checkpoints / "checkpoint-3", half)
    (half / "checkpoint_complete").unlink()
    (half / "adapter_model.safetensors").write_bytes(b"garbage")

    cfg = config(tmp_path / "killed")
    cfg.resume = True
    result = run_training(cfg)
    assert result.global_step == 6
    resumed = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5)


def test_malformed_data_stops_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": ""}\n')
    assert run_cli("train", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "o",
                   "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err
    assert run_cli("train", "--model", tiny_model_dir, "--data", tmp_path / "missing.json",
                   "--output", tmp_path / "o") == 2
    assert "missing.json" in capsys.readouterr().err


def test_unknown_target_module_is_a_clear_error(tmp_path, tiny_model_dir, tiny_tasks, capsys):
    assert run_cli("train", "--model", tiny_model_dir, "--data", *tiny_tasks, "--target-modules", "c_attn",
                   "--output", tmp_path / "o", "--max-steps", 1, "--no-eval") == 2
    assert "matches no module" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_on_commonsense_records(tmp_path, smollm2_path, commonsense, capsys):
    """A few ARC-Easy and boolq records through the real model: train 2 steps, eval both scorings."""
    data = tmp_path / "data"
    for task in ("ARC-Easy", "boolq"):
        records = json.loads((commonsense / task / "train.json").read_text())[:8]
        (data / task).mkdir(parents=True)
        (data / task / "train.json").write_text(json.dumps(records))
        (data / task / "test.json").write_text(json.dumps(json.loads((commonsense / task / "test.json").read_text())[:6]))
    tasks = [data / "ARC-Easy", data / "boolq"]
    assert run_cli("train", "--model", smollm2_path, "--data", *tasks, "--output", tmp_path / "run",
                   "--max-steps", 2, "--batch-size", 2, "--target", "text", "--max-length", 128,
                   "--no-figures") == 0
    printed = capsys.readouterr().out
    assert "before acc_norm" in printed
    assert run_cli("eval", "--model", smollm2_path, "--adapter", tmp_path / "run" / "adapter",
                   "--data", commonsense / "ARC-Easy", "--limit", 5, "--scoring", "text") == 0
    assert "ARC-Easy" in capsys.readouterr().out


def test_eval_log_samples_keeps_every_records_scores_for_paired_comparisons(tmp_path, tiny_model_dir, tiny_tasks):
    out = tmp_path / "run"
    assert run_cli("train", "--model", tiny_model_dir, "--r", 4, "--num-experts", 3, "--data", *tiny_tasks,
                   "--output", out, "--max-steps", 2, "--batch-size", 4, "--no-eval", "--no-figures") == 0
    for merged in ([], ["--merged"]):
        path = tmp_path / f"eval{len(merged)}.json"
        assert run_cli("eval", "--model", tiny_model_dir, "--adapter", out / "adapter", "--data", *tiny_tasks,
                       "--limit", 6, "--scoring", "text", "--output", path, "--log-samples", *merged) == 0
        results = json.loads(path.read_text())
        for task in ("parity", "colour"):
            rows = results["samples"][task]
            assert [r["index"] for r in rows] == list(range(6)) == list(range(results["tasks"][task]["n"]))
            assert sum(r["acc"] for r in rows) / 6 == pytest.approx(results["tasks"][task]["acc"])
            assert sum(r["acc_norm"] for r in rows) / 6 == pytest.approx(results["tasks"][task]["acc_norm"])
            assert all(r["acc"] == float(r["pred"] == r["gold"]) and len(r["logprobs"]) >= 2 for r in rows)
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", out / "adapter", "--data", *tiny_tasks,
                   "--limit", 6, "--output", tmp_path / "plain.json") == 0
    assert "samples" not in json.loads((tmp_path / "plain.json").read_text())  # aggregates only, unless asked


def _command_raising(monkeypatch, error: BaseException) -> None:
    """`mor eval` replaced by a handler that raises ``error``."""
    import mor.cli as cli

    cli.build_parser(["eval"])  # registers the commands
    monkeypatch.setattr(cli.COMMANDS["eval"], "run", lambda args: (_ for _ in ()).throw(error))


def test_a_users_mistake_is_one_error_line_and_a_bug_is_a_traceback(monkeypatch, capsys):
    from mor.errors import MorError, SettingsError

    _command_raising(monkeypatch, SettingsError("--lr 0: give a finite learning rate above 0"))
    assert run_cli("eval", "--data", "x") == 2
    err = capsys.readouterr().err
    assert err == "error: --lr 0: give a finite learning rate above 0\n"  # one line, no traceback
    assert run_cli("-v", "eval", "--data", "x") == 2  # -v: the traceback too, then the same line
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("error: --lr 0: give a finite learning rate above 0\n")
    # a ValueError that is not a MorError is a bug in mor or a library: never dressed up as a user's mistake
    _command_raising(monkeypatch, ValueError("an internal invariant broke"))
    with pytest.raises(ValueError, match="internal invariant"):
        run_cli("eval", "--data", "x")
    assert issubclass(SettingsError, ValueError) and issubclass(SettingsError, MorError)  # old `except ValueError` still works


def test_a_missing_optional_package_names_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    import mor.errors
    from mor.data.tables import table_rows
    from mor.errors import MissingExtra

    real = importlib.util.find_spec
    monkeypatch.setattr(mor.errors.importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real(name, *a))
    table = tmp_path / "task.parquet"
    table.write_bytes(b"not read")
    with pytest.raises(MissingExtra, match=r'pip install "mor-adapters\[train\]"'):
        table_rows(table)
    _command_raising(monkeypatch, MissingExtra("x needs 'datasets': pip install \"mor-adapters[train]\""))
    assert run_cli("eval", "--data", "x") == 2
    assert capsys.readouterr().err.startswith("error: x needs 'datasets'")
