"""Issue #22, item 0: no data loss by construction, and no silent wrong result. One test per
case a new user met (issue 22, "Why"), each on the tiny LLaMA; every one failed on the code
before the issue (commit 30045e1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mor.cli import main
from test_safety import _train, mor_adapter, parity  # noqa: F401 (fixtures shared with the issue-13 tests)

ADAPTER_FILE = "adapter_model.safetensors"


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest): "byte-identical afterwards"."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_dir, parity):
    out = tmp_path_factory.mktemp("lora-run") / "run"
    _train(tiny_model_dir, parity, out, method="lora")
    return out / "adapter"


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


# -- export-lora ------------------------------------------------------------------------------------

def test_export_lora_never_writes_over_its_adapter_not_through_a_symlink_nor_with_overwrite(
        tmp_path, tiny_model_dir, mor_adapter, capsys):
    adapter = _copy(mor_adapter, tmp_path / "adapter")
    link = tmp_path / "link"
    link.symlink_to(adapter)
    before = snapshot(adapter)
    for output in (adapter, link, adapter / "lora"):
        for extra in ((), ("--overwrite",)):
            assert run_cli("export-lora", "--model", tiny_model_dir, "--adapter", adapter, "--routing", "uniform",
                           "--output", output, "--no-check", *extra) == 2
            assert "an input of this command" in capsys.readouterr().err
    assert snapshot(adapter) == before
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "MOR"


def test_export_lora_replaces_a_used_folder_only_with_overwrite_and_as_a_whole(tmp_path, tiny_model_dir,
                                                                               mor_adapter, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    export = ("export-lora", "--model", tiny_model_dir, "--adapter", mor_adapter, "--routing", "uniform",
              "--output", used, "--no-check")
    assert run_cli(*export) == 2
    assert f"{used} is not empty" in capsys.readouterr().err and (used / "notes.txt").read_text() == "mine"
    assert run_cli(*export, "--overwrite") == 0
    assert sorted(p.name for p in used.iterdir()) == ["adapter_config.json", ADAPTER_FILE, "routing_profile.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no temporary sibling left


def test_export_lora_into_the_model_folder_is_refused(tmp_path, tiny_model_dir, mor_adapter, capsys):
    model = _copy(tiny_model_dir, tmp_path / "model")
    before = snapshot(model)
    assert run_cli("export-lora", "--model", model, "--adapter", mor_adapter, "--routing", "uniform",
                   "--output", model, "--overwrite", "--no-check") == 2
    assert "an input of this command" in capsys.readouterr().err
    assert snapshot(model) == before


def test_export_lora_limit_below_one_is_refused(tmp_path, tiny_model_dir, mor_adapter, parity, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli("export-lora", "--model", tiny_model_dir, "--adapter", mor_adapter, "--data", parity,
                "--limit", -1, "--output", tmp_path / "x")
    assert stop.value.code == 2 and "--limit: -1: give at least 1" in capsys.readouterr().err


def test_export_lora_refuses_a_nan_routing_profile(tmp_path, tiny_model_dir, mor_adapter, capsys):
    assert run_cli("export-lora", "--model", tiny_model_dir, "--adapter", mor_adapter, "--routing", "uniform",
                   "--output", tmp_path / "good", "--no-check") == 0
    profile = json.loads((tmp_path / "good" / "routing_profile.json").read_text())
    first = sorted(profile)[0]
    profile[first] = [float("nan")] * len(profile[first])
    (tmp_path / "nan.json").write_text(json.dumps(profile))
    assert run_cli("export-lora", "--model", tiny_model_dir, "--adapter", mor_adapter, "--routing",
                   tmp_path / "nan.json", "--output", tmp_path / "bad", "--no-check") == 2
    assert "holds NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# -- eval / analyze / train outputs -------------------------------------------------------------------

def test_eval_output_inside_an_input_is_refused_even_with_overwrite(tmp_path, tiny_model_dir, mor_adapter, parity,
                                                                    capsys):
    adapter = _copy(mor_adapter, tmp_path / "adapter")
    model = _copy(tiny_model_dir, tmp_path / "model")
    data = _copy(parity, tmp_path / "parity")
    link = tmp_path / "adapter-link"
    link.symlink_to(adapter)
    before = {p: snapshot(p) for p in (adapter, model, data)}
    targets = (adapter / "adapter_config.json", adapter / ADAPTER_FILE, link / "adapter_config.json",
               data / "test.json", data / "results.json", model / "config.json")
    for output in targets:
        assert run_cli("eval", "--model", model, "--adapter", adapter, "--data", data, "--limit", 2,
                       "--output", output, "--overwrite") == 2
        assert "an input of this command" in capsys.readouterr().err, output
    assert {p: snapshot(p) for p in before} == before


def test_the_eval_writer_leaves_a_users_file_named_like_a_temporary_alone(tmp_path, tiny_model_dir, parity):
    mine = tmp_path / "results.json.tmp"
    mine.write_text("the user's own file")
    assert run_cli("eval", "--model", tiny_model_dir, "--data", parity, "--limit", 2,
                   "--output", tmp_path / "results.json") == 0
    assert mine.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.json.tmp"]


def test_train_output_may_not_be_hold_or_lie_inside_its_data_or_model(tmp_path, tiny_model_dir, parity, capsys):
    data = _copy(parity, tmp_path / "parity")
    model = _copy(tiny_model_dir, tmp_path / "model")
    before = {p: snapshot(p) for p in (data, model)}
    for output in (data, data / "run", model, model / "run", tmp_path):
        assert run_cli("train", "--model", model, "--data", data, "--output", output, "--overwrite",
                       "--max-steps", 1, "--no-eval") == 2
        assert "an input of this command" in capsys.readouterr().err, output
    assert {p: snapshot(p) for p in before} == before


def test_a_refused_train_overwrite_changes_nothing_on_disk(tmp_path, tiny_model_dir, parity, capsys):
    out = tmp_path / "run"
    _train(tiny_model_dir, parity, out, max_steps=2, save_steps=1)
    before = snapshot(out)
    assert any(name.startswith("checkpoints/checkpoint-") for name in before)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": ""}\n')
    assert run_cli("train", "--model", tiny_model_dir, "--data", bad, "--output", out, "--overwrite",
                   "--max-steps", 1, "--no-eval") == 2
    assert "empty output" in capsys.readouterr().err
    assert snapshot(out) == before  # checkpoints and mor_run.json of the old run intact


def test_train_overwrite_leaves_none_of_the_old_runs_figures_or_records(tmp_path, tiny_model_dir, parity):
    out = tmp_path / "run"
    _train(tiny_model_dir, parity, out, max_steps=2)
    (out / "figures").mkdir()
    (out / "figures" / "router_by_task.png").write_bytes(b"old figure")
    (out / "routing_stats.json").write_text(json.dumps([{"step": 99}]))
    _train(tiny_model_dir, parity, out, max_steps=1, overwrite=True)
    assert not (out / "figures").exists()
    assert all(record["step"] <= 1 for record in json.loads((out / "routing_stats.json").read_text()))


def test_analyze_never_replaces_its_routing_stats_input(tmp_path, tiny_model_dir, mor_adapter, parity, capsys):
    out = tmp_path / "figures"
    out.mkdir()
    stats = out / "routing_stats.json"
    shutil.copy(mor_adapter.parent / "routing_stats.json", stats)
    before = stats.read_bytes()
    assert run_cli("analyze", "--model", tiny_model_dir, "--adapter", mor_adapter, "--data", parity, "--limit", 2,
                   "--routing-stats", stats, "--output", out, "--overwrite") == 2
    assert "an input of this command" in capsys.readouterr().err
    assert stats.read_bytes() == before


def test_convert_adapter_output_may_not_lie_inside_its_input(tmp_path, tiny_model_dir, mor_adapter, capsys):
    adapter = _copy(mor_adapter, tmp_path / "adapter")
    before = snapshot(adapter)
    assert run_cli("convert-adapter", adapter, adapter / "new", "--model", tiny_model_dir) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert snapshot(adapter) == before


# -- loaders refuse what does not match -------------------------------------------------------------

def test_a_mor_file_whose_config_says_lora_is_refused_not_loaded_as_the_base_model(tmp_path, tiny_model_dir,
                                                                                 mor_adapter, parity, capsys):
    forged = _copy(mor_adapter, tmp_path / "forged")
    config = json.loads((forged / "adapter_config.json").read_text())
    config.update(peft_type="LORA", lora_alpha=16, target_modules=["down_proj", "gate_proj", "up_proj"])
    (forged / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", forged, "--data", parity, "--limit", 2) == 2
    err = capsys.readouterr().err
    assert "peft_type LORA" in err and "missing" in err and "not of this adapter type" in err


def test_a_lora_missing_half_its_tensors_is_refused(tmp_path, tiny_model_dir, lora_adapter, parity, capsys):
    half = _copy(lora_adapter, tmp_path / "half")
    tensors = load_file(str(half / ADAPTER_FILE))
    kept = dict(sorted(tensors.items())[: len(tensors) // 2])
    save_file(kept, str(half / ADAPTER_FILE))
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", half, "--data", parity, "--limit", 2) == 2
    assert f"{len(tensors) - len(kept)} of {len(tensors)} missing" in capsys.readouterr().err


def test_a_finite_but_absurd_weight_is_refused(tmp_path, tiny_model_dir, mor_adapter, parity, capsys):
    huge = _copy(mor_adapter, tmp_path / "huge")
    tensors = load_file(str(huge / ADAPTER_FILE))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = 3e38
    save_file(tensors, str(huge / ADAPTER_FILE))
    for command in (("eval", "--data", parity, "--limit", 2),
                    ("export-lora", "--routing", "uniform", "--output", tmp_path / "lora", "--no-check")):
        assert run_cli(command[0], "--model", tiny_model_dir, "--adapter", huge, *command[1:]) == 2
        assert "far beyond any trained adapter" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()


def test_no_accuracy_is_printed_from_nan_log_likelihoods(tmp_path, tiny_model_dir, parity, capsys):
    model = _copy(tiny_model_dir, tmp_path / "model")
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))  # a broken base
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert run_cli("eval", "--model", model, "--data", parity, "--limit", 2) == 2
    out, err = capsys.readouterr()
    assert "log-likelihoods are NaN or inf" in err and "acc" not in out


def test_adapter_config_holding_a_list_is_an_error_line(tmp_path, tiny_model_dir, mor_adapter, parity, capsys):
    broken = _copy(mor_adapter, tmp_path / "broken")
    (broken / "adapter_config.json").write_text("[1, 2]")
    assert run_cli("eval", "--model", tiny_model_dir, "--adapter", broken, "--data", parity, "--limit", 2) == 2
    assert "holds a JSON list, not an object" in capsys.readouterr().err


# -- silent wrong results ---------------------------------------------------------------------------

def test_eval_refuses_two_tasks_of_the_same_name(tmp_path, tiny_model_dir, parity, capsys):
    first, second = _copy(parity, tmp_path / "x" / "parity"), _copy(parity, tmp_path / "y" / "parity")
    assert run_cli("eval", "--model", tiny_model_dir, "--data", first, second, "--limit", 2) == 2
    assert "two tasks are both named 'parity'" in capsys.readouterr().err


def test_a_folder_with_only_a_test_split_is_not_trained_on(tmp_path, tiny_model_dir, parity, capsys):
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    shutil.copy(parity / "test.json", only_test / "test.json")
    assert run_cli("train", "--model", tiny_model_dir, "--data", only_test, "--output", tmp_path / "run",
                   "--max-steps", 1, "--no-eval") == 2
    assert "holds a test split but no train split" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_after_a_resume_routing_stats_describe_the_whole_run(tmp_path, tiny_model_dir, parity):
    out = tmp_path / "run"
    _train(tiny_model_dir, parity, out, max_steps=2, save_steps=2, logging_steps=1)
    _train(tiny_model_dir, parity, out, max_steps=4, save_steps=2, logging_steps=1, resume=True)
    steps = [record["step"] for record in json.loads((out / "routing_stats.json").read_text())]
    assert steps == [0, 1, 2, 3, 4]
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from_step"] == 2 and result["routing_stats"]["first"]["step"] == 0


# -- sizes that cannot fit --------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--r", "--num-experts"])
def test_an_absurd_rank_or_expert_count_is_refused_with_an_estimate_before_allocation(tmp_path, tiny_model_dir,
                                                                                      parity, capsys, flag):
    assert run_cli("train", "--model", tiny_model_dir, "--data", parity, "--output", tmp_path / "run",
                   flag, 100000, "--max-steps", 1, "--no-eval") == 2
    err = capsys.readouterr().err
    assert "GiB to train" in err and "of memory is available" in err and "Lower --r or --num-experts" in err
    assert not (tmp_path / "run").exists()


def test_a_record_too_long_for_any_model_is_refused_with_its_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "big.jsonl"
    short = {"question": "Which?", "choices": ["a", "b"], "label": 0}
    data.write_text(json.dumps(short) + "\n" + json.dumps({**short, "question": "x" * 2_000_000}) + "\n")
    assert run_cli("eval", "--model", tiny_model_dir, "--data", data) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and "2.0 million characters" in err


def test_the_memory_check_counts_the_trainable_copies_of_modules_to_save(tiny_model_dir, monkeypatch):
    """--modules-to-save lm_head trains a copy of a vocabulary-sized head: the estimate before allocation
    counts it, so an adapter that fits alone is refused with it when the head does not fit."""
    from transformers import AutoModelForCausalLM

    import mor.safety
    from mor.errors import SettingsError
    from mor.train.adapters import AdapterSpec, apply_adapter, training_size

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = model.get_output_embeddings().weight.numel()
    plain, with_head = AdapterSpec(r=2, num_experts=2), AdapterSpec(r=2, num_experts=2, modules_to_save=["lm_head"])
    assert training_size(model, with_head)[0] == training_size(model, plain)[0] + head
    assert "lm_head" in training_size(model, with_head)[1] and "--modules-to-save" in training_size(model, with_head)[1]
    enough_for_the_adapter = (training_size(model, plain)[0] + head // 2) * mor.safety.TRAINING_BYTES_PER_PARAMETER
    monkeypatch.setattr(mor.safety, "available_memory", lambda: enough_for_the_adapter)
    apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), plain)
    with pytest.raises(SettingsError, match="trainable copies of lm_head"):
        apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), with_head)
