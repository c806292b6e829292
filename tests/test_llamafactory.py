"""MoR through real LLaMA-Factory (0.9.5): its v1 trainer builds the adapter through
``PeftPlugin("mor")`` from the documented YAML, trains a few steps on CPU, and the folder it saves
reloads in mor exactly. Runs in LLaMA-Factory's own venv (scripts/test_llamafactory.sh); where
llamafactory is not installed, only the entry script's one-line errors run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mor
from mor.errors import SettingsError
from mor.integrations import llamafactory as lf

import conftest
from conftest import make_tiny_llama, make_tiny_tokenizer

HAVE_LLAMAFACTORY = importlib.util.find_spec("llamafactory") is not None
needs_llamafactory = pytest.mark.skipif(not HAVE_LLAMAFACTORY,
                                        reason="llamafactory is not installed (scripts/test_llamafactory.sh)")


def documented_yaml() -> dict:
    return conftest.documented_yaml("name: mor")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llamafactory")
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(vocab_size=len(tok))
    base.config.pad_token_id = tok.pad_token_id
    base.save_pretrained(folder / "tiny")
    tok.save_pretrained(folder / "tiny")
    text = lambda value: [{"type": "text", "value": value}]  # noqa: E731
    records = [{"messages": [{"role": "user", "content": text(f"Is {i} even or odd?")},
                             {"role": "assistant", "content": text("even" if i % 2 == 0 else "odd")}]}
               for i in range(32)]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return folder


def write_config(workdir: Path, name: str, **peft_changes) -> Path:
    """The documented YAML on the tiny model and data, 3 steps on CPU in fp32."""
    cfg = documented_yaml()
    cfg["peft_config"].update(r=4, num_experts=3, init_seed=0, dropout=0.0, **peft_changes)
    cfg["peft_config"] = {k: v for k, v in cfg["peft_config"].items() if v is not None}
    cfg.update(model=str(workdir / "tiny"), train_dataset=str(workdir / "data.jsonl"), max_steps=3,
               learning_rate=0.01, output_dir=str(workdir / name), bf16=False, batching_workers=0)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(workdir):
    assert lf.main(["sft", str(write_config(workdir, "out"))]) == 0
    return workdir / "out"


@needs_llamafactory
def test_llamafactory_trains_mor_and_its_adapter_reloads_in_mor_exactly(workdir, trained):
    assert json.loads((trained / "adapter_config.json").read_text())["peft_type"] == "MOR"
    saved = load_file(str(trained / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("lora_B"))  # it trained
    loaded = mor.load_adapter(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), trained)
    state = {k: v for k, v in loaded.state_dict().items() if ".mor.default." in k}
    assert len(state) == len(saved) and state
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".mor.", ".mor.default.")], value), key
    batch = torch.randint(3, 100, (2, 12))
    peft_loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), trained).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, peft_loaded(input_ids=batch).logits)

    from mor.cli import main  # the documented merge of LLaMA-Factory's output folder, on mor-format records

    records = [{"instruction": f"Is {i} even or odd?", "input": "", "output": "even" if i % 2 == 0 else "odd"}
               for i in range(8)]
    (workdir / "records.json").write_text(json.dumps(records))
    assert main(["merge", "--model", str(workdir / "tiny"), "--adapter", str(trained), "--data",
                 str(workdir / "records.json"), "--output", str(workdir / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")
    assert not any(".mor." in name for name, _ in merged.named_parameters())


@needs_llamafactory
def test_the_plugin_runs_a_saved_adapter_unmerged_and_continues_it(workdir, trained):
    base = lambda: AutoModelForCausalLM.from_pretrained(workdir / "tiny")  # noqa: E731
    expected = mor.load_adapter(base(), trained)
    batch = torch.randint(3, 100, (2, 12))
    running = lf.get_mor_model(base(), {"name": "mor", "adapter_name_or_path": str(trained)}, is_train=False)
    assert mor.is_mor_model(running)  # LLaMA-Factory's LoRA path would have merged it
    with torch.no_grad():
        assert torch.equal(running(input_ids=batch).logits, expected(input_ids=batch).logits)
    training = lf.get_mor_model(base(), {"name": "mor", "adapter_name_or_path": [str(trained)]}, is_train=True)
    assert any(p.requires_grad for n, p in training.named_parameters() if ".mor." in n)
    with pytest.raises(SettingsError, match="names 2 folders; MoR takes one"):
        lf.get_mor_model(base(), {"name": "mor", "adapter_name_or_path": [str(trained)] * 2})


@needs_llamafactory
def test_an_unknown_key_of_the_peft_block_is_an_error_naming_it(workdir, capsys):
    assert lf.main(["sft", str(write_config(workdir, "bad", num_expert=4))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: peft_config.num_expert is not a MoR setting"), err
    assert not (workdir / "bad").exists()


@needs_llamafactory
def test_a_bad_value_and_the_balanced_router_are_refused_in_one_line(workdir, capsys):
    assert lf.main(["sft", str(write_config(workdir, "bad2", router="sofmax"))]) == 2
    assert "MoRConfig.router='sofmax' is invalid" in capsys.readouterr().err
    assert lf.main(["sft", str(write_config(workdir, "bad3", router="balanced"))]) == 2
    assert "load-balancing loss would never be trained" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_LLAMAFACTORY, reason="llamafactory is installed")
def test_without_llamafactory_the_entry_script_says_how_to_install_it(capsys):
    assert lf.main(["sft", "run.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("error: mor.integrations.llamafactory needs LLaMA-Factory: pip install "
                                               "llamafactory==0.9.5 (docs/trainers.md says which of its dependencies "
                                               "a CPU needs)")


def test_usage_and_version_errors_are_one_line(capsys):
    assert lf.main(["chat", "x.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: usage: python -m mor.integrations.llamafactory sft")
    with pytest.raises(ImportError, match=r"supports llamafactory>=0\.9,<0\.10 .*llamafactory 0\.8\.3 is installed"):
        lf.check_llamafactory_version("0.8.3")
