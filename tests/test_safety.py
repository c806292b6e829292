"""Issue #13: nothing a user already has is overwritten, a diverged run never saves quietly,
bad input is an `error:` line (exit 2). One test per item of the issue, on the tiny LLaMA."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_tokenizer
from mor.cli import main
from mor.train.adapters import AdapterSpec
from mor.data.builtin import TASK_NAMES, write_builtin_suite
from mor.train import TrainConfig, run_training

ADAPTER_FILE = "adapter_model.safetensors"


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=32, eval_size=4, tasks=["parity"])
    return folder / "parity"


def _train(model_dir, data, out, method="mor", **kw):
    cfg = TrainConfig(model=str(model_dir), adapter=AdapterSpec(method=method, r=2, num_experts=2),
                      data=[str(data)], output=str(out), max_steps=kw.pop("max_steps", 2), batch_size=4,
                      save_steps=kw.pop("save_steps", 50), evaluate=False, **kw)
    return run_training(cfg)


@pytest.fixture(scope="module")
def mor_adapter(tmp_path_factory, tiny_model_dir, parity):
    out = tmp_path_factory.mktemp("mor-run") / "run"
    _train(tiny_model_dir, parity, out)
    return out / "adapter"


# 1. merge --output ----------------------------------------------------------------------------------

def test_merge_never_replaces_the_model_and_overwrites_a_folder_only_as_a_whole(tmp_path, tiny_model_dir, parity,
                                                                               mor_adapter, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = (base / "model.safetensors").read_bytes()
    merge = ("merge", "--model", base, "--adapter", mor_adapter, "--data", parity, "--limit", 4)
    assert run_cli(*merge, "--output", base) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert run_cli(*merge, "--output", base, "--overwrite") == 2  # never, even with --overwrite
    assert (base / "model.safetensors").read_bytes() == before

    used = tmp_path / "used"
    shutil.copytree(mor_adapter, used)
    assert run_cli(*merge, "--output", used) == 2
    err = capsys.readouterr().err
    assert f"{used} is not empty" in err and "--overwrite" in err
    assert (used / ADAPTER_FILE).is_file()
    assert run_cli(*merge, "--output", used, "--overwrite") == 0
    assert not (used / ADAPTER_FILE).exists() and not (used / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(used)


def test_atomic_folder_leaves_the_old_result_when_the_write_fails(tmp_path):
    from mor.safety import atomic_folder

    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(folder) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    assert sorted(p.name for p in folder.iterdir()) == ["old.txt"]


# 2. train --output / --resume ------------------------------------------------------------------------

def test_train_into_a_used_folder_is_refused_and_resume_checks_the_settings(tmp_path, tiny_model_dir, parity,
                                                                           caplog, capsys):
    out = tmp_path / "run"
    common = ("train", "--model", tiny_model_dir, "--data", parity, "--output", out, "--r", 2, "--num-experts", 2,
              "--batch-size", 4, "--no-eval", "--no-figures")
    assert run_cli(*common, "--max-steps", 4, "--save-steps", 2, "--seed", 0) == 0
    capsys.readouterr()
    adapter_a = (out / "adapter" / ADAPTER_FILE).read_bytes()
    result_a = (out / "result.json").read_text()

    assert run_cli(*common, "--max-steps", 2, "--seed", 1) == 2
    err = capsys.readouterr().err
    assert f"--output {out} is not empty" in err and "--overwrite" in err and "--resume" in err
    assert (out / "adapter" / ADAPTER_FILE).read_bytes() == adapter_a
    assert (out / "result.json").read_text() == result_a

    assert run_cli(*common, "--max-steps", 6, "--seed", 1, "--resume") == 2
    assert "seed: 0 in the run, 1 now" in capsys.readouterr().err
    assert run_cli(*common, "--max-steps", 6, "--r", 4, "--resume") == 2
    assert "adapter.r: 2 in the run, 4 now" in capsys.readouterr().err

    assert run_cli(*common, "--max-steps", 2, "--save-steps", 2, "--seed", 1, "--overwrite") == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]  # not A's -4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mor"):
        assert run_cli(*common, "--max-steps", 3, "--save-steps", 2, "--seed", 1, "--resume") == 0
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in caplog.text


# 3. non-finite loss or weights -------------------------------------------------------------------------

def test_nonfinite_weights_stop_training_naming_the_step_and_nothing_is_saved(tmp_path, tiny_model_dir, parity):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"diverged at step \d+"):
        _train(tiny_model_dir, parity, out, max_steps=4, save_steps=1, lr=1e30)
    assert not (out / "adapter").exists()
    for checkpoint in out.glob("checkpoints/checkpoint-*"):
        for name, tensor in load_file(str(checkpoint / ADAPTER_FILE)).items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)


def test_an_infinite_learning_rate_is_an_error_line(tmp_path, tiny_model_dir, parity, capsys):
    assert run_cli("train", "--model", tiny_model_dir, "--data", parity, "--output", tmp_path / "o",
                   "--lr", "inf", "--max-steps", 1, "--no-eval") == 2
    assert "--lr inf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_loss_that_ends_far_above_its_start_is_warned_about():
    from mor.train.callbacks import divergence_warning

    history = [{"step": 1, "loss": 4.14}, {"step": 10, "loss": 6.0}, {"step": 20, "loss": 10.8}]
    warning = divergence_warning(history, lr=1e6)
    assert "4.14 (step 1)" in warning and "10.8 (step 20)" in warning and "lower --lr" in warning
    assert divergence_warning([{"step": 1, "loss": 4.1}, {"step": 9, "loss": 3.0}], lr=1e-3) is None


def test_eval_and_merge_refuse_an_adapter_with_nan_weights(tmp_path, tiny_model_dir, parity, mor_adapter, capsys):
    broken = tmp_path / "nan-adapter"
    shutil.copytree(mor_adapter, broken)
    tensors = load_file(str(broken / ADAPTER_FILE))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(broken / ADAPTER_FILE))
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", broken, "--data", parity, "--limit", 2) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    assert run_cli("merge", "--model", tiny_model_dir, "--adapter", broken, "--data", parity,
                   "--output", tmp_path / "merged") == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


# 4. eval --output ------------------------------------------------------------------------------------------

def test_eval_output_never_replaces_its_input_a_folder_or_an_existing_file(tmp_path, tiny_model_dir, parity,
                                                                          capsys):
    data = tmp_path / "x.json"
    shutil.copy(parity / "test.json", data)
    original = data.read_text()
    evaluate = ("eval", "--model", tiny_model_dir, "--data", data, "--limit", 2)
    for extra in ((), ("--overwrite",)):
        assert run_cli(*evaluate, "--output", data, *extra) == 2
        assert "an input of this command" in capsys.readouterr().err
    assert data.read_text() == original

    folder = tmp_path / "outdir"
    folder.mkdir()
    assert run_cli(*evaluate, "--output", folder) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "x.json"]  # no stray outdir.tmp

    results = tmp_path / "results.json"
    results.write_text("{}")
    assert run_cli(*evaluate, "--output", results) == 2
    assert "--overwrite" in capsys.readouterr().err and results.read_text() == "{}"
    assert run_cli(*evaluate, "--output", results, "--overwrite") == 0
    assert json.loads(results.read_text())["tasks"]["x"]["n"] == 2


# 5. the built-in suite's files -------------------------------------------------------------------------------

def test_builtin_suite_reads_only_its_own_generated_tasks(tmp_path, tiny_model_dir):
    out = tmp_path / "bi"
    (out / "data" / "mytask").mkdir(parents=True)
    (out / "data" / "mytask" / "train.json").write_text(json.dumps(
        [{"instruction": "Say hi", "output": "hi"}] * 4))
    (out / "data" / "unrelated").mkdir()
    (out / "builtin-data" / "unrelated").mkdir(parents=True)  # even inside its own folder, only its tasks count
    cfg = TrainConfig(model=str(tiny_model_dir), adapter=AdapterSpec(r=2, num_experts=2), output=str(out),
                      max_steps=1, batch_size=4, evaluate=False, builtin_train_size=4, builtin_eval_size=2)
    cfg.overwrite = True
    result = run_training(cfg)
    assert set(result.data_report["tasks"]) == set(TASK_NAMES)
    assert (out / "data" / "mytask" / "train.json").is_file()  # the user's file is left alone


# 6. one validation rule for the same record -------------------------------------------------------------------

BAD_ANSWER = {"instruction": "Is 7 even or odd?\n\nAnswer format: even/odd", "input": "",
              "output": "the correct answer is maybe", "answer": "maybe"}


def test_an_answer_outside_its_labels_is_bad_in_train_and_eval_and_skip_bad_skips_it(tmp_path, tiny_model_dir,
                                                                                   parity, capsys):
    records = json.loads((parity / "test.json").read_text())[:3]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records + [BAD_ANSWER, chat]) + "\n")
    assert run_cli("train", "--model", tiny_model_dir, "--data", data, "--output", tmp_path / "run",
                   "--max-steps", 1, "--no-eval") == 2
    assert f"{data}:4" in capsys.readouterr().err
    assert run_cli("eval", "--model", tiny_model_dir, "--data", data) == 2
    assert f"{data}:4" in capsys.readouterr().err
    assert run_cli("eval", "--model", tiny_model_dir, "--data", data, "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad records" in out  # the bad answer and the chat record (not multiple choice)
    result = run_training(TrainConfig(model=str(tiny_model_dir), data=[str(data)], output=str(tmp_path / "text"),
                                      target="text", skip_bad=True, max_steps=1, batch_size=2, evaluate=False,
                                      adapter=AdapterSpec(r=2, num_experts=2)))
    assert result.data_report["skipped"] == {"mixed": 2} and result.data_report["examples"] == 3


# 7. --max-steps 0 ------------------------------------------------------------------------------------------------

def test_max_steps_zero_is_an_error_not_one_step(tmp_path, tiny_model_dir, parity, capsys):
    assert run_cli("train", "--model", tiny_model_dir, "--data", parity, "--output", tmp_path / "o",
                   "--max-steps", 0, "--no-eval") == 2
    assert "--max-steps 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# 8. tracebacks turned into error lines --------------------------------------------------------------------------

def test_grad_accum_zero_is_an_error_line(tmp_path, tiny_model_dir, parity, capsys):
    assert run_cli("train", "--model", tiny_model_dir, "--data", parity, "--output", tmp_path / "o",
                   "--grad-accum", 0, "--max-steps", 1, "--no-eval") == 2
    assert "--grad-accum 0" in capsys.readouterr().err
    for flag in ("--limit", "--batch-size"):  # 0 scored nothing, -1 all records but one
        with pytest.raises(SystemExit) as exit_:
            run_cli("eval", "--model", tiny_model_dir, "--data", parity, flag, -1)
        assert exit_.value.code == 2 and f"argument {flag}: -1: give at least 1" in capsys.readouterr().err


def test_a_corrupt_or_mismatched_peft_adapter_is_an_error_line(tmp_path, tiny_model_dir, parity, capsys):
    _train(tiny_model_dir, parity, tmp_path / "lora", method="lora")
    lora = tmp_path / "lora" / "adapter"
    other = tmp_path / "other-model"  # same vocabulary, another hidden size
    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=64).save_pretrained(other)
    tok.save_pretrained(other)
    assert run_cli("eval", "--model", other, "--adapter", lora, "--data", parity, "--limit", 2) == 2
    assert f"--adapter {lora} cannot be loaded onto --model {other}" in capsys.readouterr().err

    (lora / ADAPTER_FILE).write_bytes(b"\xff" * 64)
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", lora, "--data", parity, "--limit", 2) == 2
    assert "cannot read the adapter weights" in capsys.readouterr().err


# 9. truncation at eval --------------------------------------------------------------------------------------------

def test_eval_warns_once_per_task_with_a_count_when_questions_are_cut(tmp_path, tiny_model_dir, caplog):
    long = " ".join(["which number is larger"] * 60)  # far over the tiny model's 128 positions
    records = [{"instruction": f"{long} {k}?\n\nAnswer format: first/second", "input": "",
                "output": "the correct answer is first"} for k in range(3)]
    short = {"instruction": "Which is larger?\n\nAnswer format: first/second", "input": "",
             "output": "the correct answer is second"}
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records + [short]))
    with caplog.at_level(logging.WARNING, logger="mor"):
        assert run_cli("eval", "--model", tiny_model_dir, "--data", data) == 0
    warnings = [r.getMessage() for r in caplog.records if "cut from the left" in r.getMessage()]
    assert len(warnings) == 1 and "task long: 3 of 4 questions" in warnings[0]


# 11. cosmetic --------------------------------------------------------------------------------------------------------

def test_resuming_a_finished_run_neither_trains_nor_counts_another_step(tmp_path, tiny_model_dir, parity):
    # 32 records in batches of 4 with 3 accumulated: an epoch ends inside a step, where Trainer's
    # resume used to run one step more (8 -> "9 steps", weights changed)
    run = dict(max_steps=8, save_steps=4, grad_accum=3)
    _train(tiny_model_dir, parity, tmp_path / "run", **run)
    finished = load_file(str(tmp_path / "run" / "adapter" / ADAPTER_FILE))
    result = _train(tiny_model_dir, parity, tmp_path / "run", resume=True, **run)
    assert result.global_step == 8
    resumed = load_file(str(tmp_path / "run" / "adapter" / ADAPTER_FILE))
    for name, tensor in finished.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_a_run_that_fails_on_bad_data_leaves_no_output_folder(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": ""}\n')
    assert run_cli("train", "--model", tiny_model_dir, "--data", bad, "--output", tmp_path / "run",
                   "--max-steps", 1, "--no-eval") == 2
    assert f"{bad}:1: empty output" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
