"""``--data`` takes what ``datasets`` users have: parquet / arrow / CSV files, ``save_to_disk``
folders (a Dataset, a DatasetDict and its splits), hub datasets with a config, and a column
mapping onto the record fields; bad input is one error naming what exists. All offline: the hub
path is tested with only the download replaced."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, DatasetDict

from mor.cli import main
from mor.data import DataError, DataSource, load_eval_tasks, parse_columns
from mor.train import TrainConfig
from mor.train.setup import load_train_and_eval_tasks

ROWS = {"question": ["Is water wet?", "Is fire cold?", "Is ice cold?"], "reply": ["yes", "no", "yes"]}
MAPPING = "instruction=question,output=reply"


def _table(tmp_path, suffix: str):
    ds = Dataset.from_dict(ROWS)
    path = tmp_path / f"quiz.{suffix}"
    if suffix == "parquet":
        ds.to_parquet(path)
    elif suffix == "csv":
        ds.to_csv(path, index=False)
    else:  # an arrow file as save_to_disk writes it
        ds.save_to_disk(tmp_path / "saved")
        (tmp_path / "saved" / "data-00000-of-00001.arrow").rename(path)
    return path


@pytest.mark.parametrize("suffix", ["parquet", "arrow", "csv"])
def test_table_files_give_records_through_the_column_mapping(tmp_path, suffix):
    path = _table(tmp_path, suffix)
    (train,), evals = load_train_and_eval_tasks(TrainConfig(data=[str(path)], columns=MAPPING))
    assert evals == [] and train.name == "quiz"
    assert [r.data for r in train.records] == [{"instruction": q, "output": a} for q, a in zip(*ROWS.values())]
    assert [r.kind for r in train.records] == ["instruction"] * 3
    assert train.records[1].source == f"{path}:2"  # rows are located like lines


def test_a_table_file_without_mapping_names_the_record_fields(tmp_path):
    path = _table(tmp_path, "parquet")
    with pytest.raises(DataError, match=rf"{path}:1: missing field \"choices\".*\(the columns are: question, reply; "
                                        "map them onto record fields with --columns FIELD=COLUMN"):
        DataSource(path).load()


def test_an_unknown_column_or_field_names_what_exists(tmp_path):
    path = _table(tmp_path, "csv")
    with pytest.raises(DataError, match="has no column 'answer'; its columns are: question, reply"):
        DataSource(path, parse_columns("instruction=question,output=answer")).load()
    with pytest.raises(ValueError, match="'prompt' is not a record field; map columns onto instruction, input"):
        parse_columns("prompt=question")
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_columns("instruction")
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps([{"q": "a?", "output": "b"}]))
    with pytest.raises(DataError, match="has no column 'question'; its columns are: q, output"):
        DataSource(json_file, {"instruction": "question"}).load()
    assert DataSource(json_file, {"instruction": "q"}).load().records[0].data == {"instruction": "a?", "output": "b"}


def test_save_to_disk_dataset_and_datasetdict_folders(tmp_path):
    chat = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]})
    chat.save_to_disk(tmp_path / "greet")
    (task,), evals = load_train_and_eval_tasks(TrainConfig(data=[str(tmp_path / "greet")]))
    assert task.name == "greet" and task.records[0].kind == "chat" and evals == []

    quiz = Dataset.from_dict(ROWS)
    DatasetDict(train=quiz, validation=quiz.select([0]), test=quiz.select([1, 2])).save_to_disk(tmp_path / "quiz")
    cfg = TrainConfig(data=[str(tmp_path / "quiz")], columns=MAPPING)
    (train,), (test,) = load_train_and_eval_tasks(cfg)
    assert (train.name, len(train), test.name, len(test)) == ("quiz", 3, "quiz", 2)
    assert test.records[0].source == f"{tmp_path / 'quiz'}[test]:1"
    cfg.eval_split = "validation"
    assert len(load_train_and_eval_tasks(cfg)[1][0]) == 1
    assert len(load_eval_tasks([str(tmp_path / "quiz")], columns=cfg.columns)[0]) == 2  # its test split
    cfg.data_split = "dev"
    with pytest.raises(DataError, match="has no split 'dev'; its splits are: train, validation, test. Choose one "
                                        "with --data-split"):
        load_train_and_eval_tasks(cfg)
    cfg.data_split, cfg.eval_split = "train", "valid"
    with pytest.raises(DataError, match="has no split 'valid'.*--eval-split"):
        load_train_and_eval_tasks(cfg)
    DatasetDict(test=quiz).save_to_disk(tmp_path / "only_test")
    with pytest.raises(DataError, match="holds a test split but no train split"):
        load_train_and_eval_tasks(TrainConfig(data=[str(tmp_path / "only_test")], columns=MAPPING))


def test_a_folder_of_split_files_in_any_format(tmp_path):
    folder = tmp_path / "quiz"
    folder.mkdir()
    Dataset.from_dict(ROWS).to_parquet(folder / "train.parquet")
    Dataset.from_dict(ROWS).select([0]).to_csv(folder / "validation.csv", index=False)
    cfg = TrainConfig(data=[str(folder)], columns=MAPPING, eval_split="validation")
    (train,), (held,) = load_train_and_eval_tasks(cfg)
    assert (len(train), len(held)) == (3, 1)


def test_hub_datasets_with_a_config_and_split_load_through_datasets(tmp_path, monkeypatch):
    calls = []
    splits = DatasetDict(train=Dataset.from_dict(ROWS), test=Dataset.from_dict(ROWS).select([2]))

    def load_dataset(name, config=None, **kwargs):  # only the download is replaced
        calls.append((name, config, kwargs))
        return splits

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = TrainConfig(data=["hub:acme/quiz:easy"], columns=MAPPING)
    (train,), (test,) = load_train_and_eval_tasks(cfg)
    assert calls == [("acme/quiz", "easy", {})]  # one load: every split at once
    assert (train.name, len(train), len(test)) == ("quiz_easy", 3, 1)
    assert train.records[0].source == "hub:acme/quiz:easy[train]:1"
    cfg.data_split = "training"
    with pytest.raises(DataError, match="no split 'training'; its splits are: train, test"):
        load_train_and_eval_tasks(cfg)
    calls.clear()
    load_train_and_eval_tasks(TrainConfig(data=["acme/quiz"], columns=MAPPING))  # a bare owner/name too
    assert calls == [("acme/quiz", None, {})]


def test_the_cli_takes_a_parquet_file_and_refuses_a_bad_column_in_one_line(tmp_path, capsys, tiny_model_dir):
    path = _table(tmp_path, "parquet")
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(path), "--output", str(out), "--no-eval",
            "--no-figures", "--max-steps", "1", "--batch-size", "2", "--method", "lora", "--r", "2"]
    assert main([*argv, "--columns", "instruction=question,output=answr"]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert error.startswith("error: --columns: ") and error.endswith("has no column 'answr'; its columns are: question, reply")
    assert not out.exists()
    assert main([*argv, "--columns", MAPPING]) == 0
    assert json.loads((out / "result.json").read_text())["data_report"]["tasks"] == {"quiz": 3}


def test_columns_and_splits_come_from_a_config_file_too(tmp_path, monkeypatch):
    import yaml

    import mor.train

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": ["hub:acme/quiz"], "columns": {"instruction": "question"},
                                    "data_split": "validation"}))
    ran = []
    monkeypatch.setattr(mor.train, "run_training", lambda cfg: ran.append(cfg) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(path)])
    assert (ran[0].columns, ran[0].data_split, ran[0].data) == ({"instruction": "question"}, "validation", ["hub:acme/quiz"])
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(path), "--columns", "output=reply"])  # the flag wins
    assert ran[1].columns == {"output": "reply"}
    path.write_text(yaml.safe_dump({"columns": {"prompt": "question"}}))
    assert main(["train", "--config", str(path)]) == 2
