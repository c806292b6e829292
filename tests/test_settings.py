"""Every training setting has one source, ``TrainConfig`` (and the adapter's, ``AdapterSpec`` from
``MoRConfig``): the ``mor train`` flags, their help, the ``--config`` file, validation and the
resume check all come from its fields."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

import mor
import mor.train
from mor.cli import build_parser, main
from mor.config import MoRConfig
from mor.train import AdapterSpec, TrainConfig
from mor.train.config import BUILTIN_STEPS, flag_name


def _train_actions() -> dict:
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return {action.dest: action for action in train._actions}


def test_every_setting_is_a_flag_with_help():
    actions = _train_actions()
    for cls, skip in ((TrainConfig, {"adapter"}), (AdapterSpec, {"init_seed"})):
        for item in fields(cls):
            if item.name in skip:
                continue
            assert item.name in actions, f"{cls.__name__}.{item.name} has no flag"
            action = actions[item.name]
            assert flag_name(cls, item.name) in action.option_strings
            assert action.help and item.metadata["help"] in action.help
    assert all(action.help for action in actions.values()), [d for d, a in actions.items() if not a.help]
    assert "init_seed" not in actions  # --seed seeds the adapter too


def test_morconfig_is_the_options_fields_on_peft_config_field_for_field():
    # the flags' schema (MoROptions, no peft) and the peft config cannot drift apart: MoRConfig is made of it
    from peft import PeftConfig

    from mor.options import MoROptions

    ours = {f.name: f for f in fields(MoROptions)}
    config = {f.name: f for f in fields(MoRConfig)}
    assert set(config) - {f.name for f in fields(PeftConfig)} == set(ours)
    for name, item in ours.items():
        assert (config[name].default, config[name].metadata) == (item.default, item.metadata), name
    for item in fields(AdapterSpec):  # the adapter flags take MoRConfig's defaults and help
        if item.name != "method":
            assert item.default == config[item.name].default, item.name
            assert item.metadata["help"] == config[item.name].metadata["help"], item.name
    assert MoROptions(r=4).alpha == MoRConfig(r=4).alpha == 8.0  # the same resolution and validation
    with pytest.raises(ValueError, match="MoRConfig.router"):
        MoROptions(router="nope")


def test_the_cli_default_run_is_the_library_default_run(monkeypatch):
    ran = []
    monkeypatch.setattr(mor.train, "run_training", lambda cfg: ran.append(cfg) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(["train"])
    assert ran == [TrainConfig()]
    assert TrainConfig().steps == BUILTIN_STEPS and TrainConfig(data=["x"]).steps == -1
    defaults = {f.name: f.default for f in fields(MoRConfig)}
    assert all(getattr(AdapterSpec(), name) == defaults[name] for name in ("r", "num_experts", "dropout", "router"))
    assert AdapterSpec(r=16).alpha == MoRConfig(r=16).alpha == 32.0


def _captured_config(monkeypatch, argv: list[str]) -> TrainConfig:
    ran = []
    monkeypatch.setattr(mor.train, "run_training", lambda cfg: ran.append(cfg) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    return ran[0]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_gives_settings_and_flags_override_it(tmp_path, monkeypatch, suffix):
    values = {"lr": 3e-4, "batch_size": 4, "evaluate": False, "method": "lora", "adapter": {"r": 16},
              "data": ["a.json", "b.json"], "weight_decay": 0.1}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    cfg = _captured_config(monkeypatch, ["train", "--config", str(path), "--batch-size", "2", "--r", "4"])
    assert (cfg.lr, cfg.evaluate, cfg.weight_decay, cfg.data) == (3e-4, False, 0.1, ["a.json", "b.json"])
    assert cfg.batch_size == 2 and cfg.adapter.r == 4  # the flags win
    assert cfg.adapter.method == "lora" and cfg.adapter.alpha == 8.0  # alpha = 2r of the flag's r
    assert cfg.epochs == TrainConfig().epochs  # what neither gives keeps its default


def test_a_bad_config_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    for text, says in (("lr: 1e-3\nlearning_rate: 2\n", "learning_rate"), ("- a\n- b\n", "mapping"),
                       ("lr: [1\n", "not valid YAML"), ("router: sigmoid\n", "router")):
        bad.write_text(text)
        assert main(["train", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err, err
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.parametrize("name,value", [("max_steps", 0), ("grad_accum", 0), ("logging_steps", 0), ("lr", float("inf")),
                                        ("warmup_ratio", 1.5), ("eval_batch_size", 0), ("lr_scheduler", "cosine"),
                                        ("base_dtype", "fp16")])
def test_validation_names_the_flag_of_the_field(name, value):
    cfg = TrainConfig(**{name: value})
    if name == "lr_scheduler":  # any transformers schedule name: not a closed list here
        cfg.validate()
        return
    with pytest.raises(ValueError, match=f"^{flag_name(TrainConfig, name)} "):
        cfg.validate()
    assert flag_name(TrainConfig, name) in {s for a in _train_actions().values() for s in a.option_strings}


def test_resume_free_settings_are_marked_on_the_fields():
    a, b = TrainConfig(data=["x"]), TrainConfig(data=["x"], max_steps=10, epochs=3.0, evaluate=False, save_steps=7,
                                                 logging_steps=3, eval_limit=5, figures=False, builtin_eval_size=9)
    assert a.resume_settings() == b.resume_settings()
    assert TrainConfig(lr=2e-3).resume_settings() != TrainConfig().resume_settings()
    assert AdapterSpec(r=4).to_dict() != AdapterSpec().to_dict()
    assert TrainConfig(adapter=AdapterSpec(r=4)).resume_settings() != TrainConfig().resume_settings()


def test_method_names_and_presets_have_one_source():
    from mor.config import ALL_METHODS, TARGET_PRESETS
    from mor.train.adapters import parse_targets

    assert _train_actions()["method"].choices == ALL_METHODS
    for preset in TARGET_PRESETS:
        assert parse_targets(preset) == preset
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="method"):
        AdapterSpec(method="ia3")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mor {mor.__version__}"


def test_a_run_recorded_before_a_switch_existed_resumes_with_it_off(tmp_path):
    from mor.errors import OutputError
    from mor.train.run_folder import RUN_RECORD, claim_run_folder

    (tmp_path / RUN_RECORD).write_text(json.dumps({"settings": {"adapter": {"r": 8}, "lr": 0.001}}))
    now = {"adapter": {"r": 8, "use_rslora": False, "modules_to_save": None}, "lr": 0.001}
    claim_run_folder(tmp_path, now, resume=True)  # mor train --resume of a run from before --use-rslora
    with pytest.raises(OutputError, match="use_rslora: None in the run, True now"):
        claim_run_folder(tmp_path, {**now, "adapter": {**now["adapter"], "use_rslora": True}}, resume=True)
    with pytest.raises(OutputError, match="packing: None in the run, True now"):
        claim_run_folder(tmp_path, {**now, "packing": True}, resume=True)
    # a run recorded with the switches written out at their defaults is the same run as one without them
    (tmp_path / RUN_RECORD).write_text(json.dumps({"settings": {**now, "packing": False}}))
    claim_run_folder(tmp_path, {"adapter": {"r": 8}, "lr": 0.001}, resume=True)
    with pytest.raises(OutputError, match="lr: 0.001 in the run, 0.002 now"):  # other settings still count
        claim_run_folder(tmp_path, {"adapter": {"r": 8}, "lr": 0.002}, resume=True)


def test_one_rule_for_settings_added_since_in_run_records_and_result_keys():
    from dataclasses import fields

    from mor.train.adapters import AdapterSpec, without_added_defaults
    from mor.train.config import TrainConfig

    added = {f.name for cls in (TrainConfig, AdapterSpec) for f in fields(cls) if f.metadata.get("added")}
    assert added == {"use_rslora", "modules_to_save", "packing", "load_in_4bit", "group_by_length"}
    spec = AdapterSpec(use_rslora=True)
    assert spec.key() == without_added_defaults(spec.to_dict(), AdapterSpec) and spec.key()["use_rslora"] is True
    settings = TrainConfig().resume_settings()
    key = TrainConfig.resume_key(settings)
    assert "packing" in settings and "packing" not in key and "use_rslora" not in key["adapter"]
    assert TrainConfig.resume_key({**settings, "packing": True})["packing"] is True

