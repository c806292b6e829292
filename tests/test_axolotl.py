"""MoR through real axolotl (0.19): its config validation, its model/adapter loader, its training
loop on CPU, and the adapter it saves reloading in mor exactly. Runs in axolotl's own venv
(scripts/test_axolotl.sh); skipped where axolotl is not installed."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # axolotl's telemetry: read when it is imported
axolotl = pytest.importorskip("axolotl")

from axolotl.cli.config import load_cfg  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import mor  # noqa: E402

import conftest  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

PLUGIN = "mor.integrations.axolotl.MoRPlugin"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(vocab_size=len(tok))
    base.config.pad_token_id = tok.pad_token_id
    base.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    records = [{"instruction": f"Is {i} even or odd?", "input": "", "output": "even" if i % 2 == 0 else "odd"}
               for i in range(32)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def documented_yaml() -> dict:
    return conftest.documented_yaml("adapter: mor")


def config(workdir, **changes) -> DictDefault:
    """The documented YAML on a tiny model and data file, 3 steps on CPU in fp32 (and ``changes``)."""
    cfg = documented_yaml()
    cfg["mor"].update(r=4, num_experts=3, router="balanced", init_seed=0, dropout=0.0)
    cfg.update(base_model=str(workdir / "tiny"), max_steps=3, learning_rate=0.01, output_dir=str(workdir / "out"),
               datasets=[{**cfg["datasets"][0], "path": str(workdir / "data.json")}], lr_scheduler="constant",
               save_strategy="no", bf16=False, fp16=False, tf32=False,
               dataset_prepared_path=str(workdir / "prepared"))
    cfg.update(changes)
    return DictDefault({k: v for k, v in cfg.items() if v is not None})


def test_axolotl_validation_names_an_unknown_key_of_the_mor_block(workdir):
    cfg = config(workdir)
    cfg["mor"]["num_expert"] = 4
    with pytest.raises(Exception, match=r"(?s)mor\.num_expert.*Extra inputs are not permitted"):
        load_cfg(cfg)


def test_axolotl_validation_checks_the_mor_block_with_morconfig(workdir):
    cfg = config(workdir)
    cfg["mor"]["router"] = "sofmax"
    with pytest.raises(Exception, match=r"MoRConfig\.router='sofmax' is invalid"):
        load_cfg(cfg)


def test_adapter_mor_without_the_plugin_is_axolotls_error(workdir):
    from axolotl.integrations.base import PluginManager

    PluginManager.get_instance().plugins.pop(PLUGIN, None)  # a fresh process: no plugin registered
    with pytest.raises(Exception, match="Adapter 'mor' is not built in"):
        load_cfg(config(workdir, plugins=None))


def test_load_in_8bit_is_refused_with_the_reason(workdir):
    with pytest.raises(Exception, match="adapter: mor does not support load_in_8bit"):
        load_cfg(config(workdir, load_in_8bit=True))


def test_axolotl_trains_mor_and_its_adapter_reloads_in_mor_exactly(workdir):
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    from axolotl.cli.args import TrainerCliArgs

    cfg = load_cfg(config(workdir))
    model, _, trainer = train(cfg=cfg, dataset_meta=load_datasets(cfg=cfg, cli_args=TrainerCliArgs()))
    assert mor.is_mor_model(model)
    routers = [g for g in trainer.optimizer.param_groups if g.get("router")]
    multiplier = documented_yaml()["mor"]["router_lr_multiplier"]
    assert routers and all(g["lr"] == pytest.approx(multiplier * 0.01) for g in routers)
    assert any("router_aux_loss" in entry for entry in trainer.state.log_history)  # router="balanced"

    folder = workdir / "out"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "MOR"
    loaded = mor.load_adapter(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), folder)
    state = {k: v for k, v in loaded.state_dict().items() if ".mor.default." in k}
    assert len(state) == len(saved)
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".mor.", ".mor.default.")], value), key
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("lora_B"))  # it trained
    batch = torch.randint(3, 100, (2, 12))
    peft_loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, peft_loaded(input_ids=batch).logits)

    from mor.cli import main  # the documented merge of axolotl's output folder

    assert main(["merge", "--model", str(workdir / "tiny"), "--adapter", str(folder), "--data",
                 str(workdir / "data.json"), "--output", str(workdir / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")
    assert not any(".mor." in name for name, _ in merged.named_parameters())


def test_axolotl_loader_continues_from_a_saved_adapter(workdir):
    from axolotl.loaders import ModelLoader, load_tokenizer

    first = get_peft_model_folder(workdir)
    cfg = load_cfg(config(workdir, lora_model_dir=str(first)))
    model, peft_config = ModelLoader(cfg, load_tokenizer(cfg)).load()
    assert mor.is_mor_model(model) and peft_config.peft_type == "MOR"
    assert any(p.requires_grad for n, p in model.named_parameters() if ".mor." in n)  # trainable: it continues
    expected = mor.load_adapter(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), first)
    batch = torch.randint(3, 100, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits.float(), expected(input_ids=batch).logits)


def get_peft_model_folder(workdir):
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(workdir / "tiny"),
                           mor.MoRConfig(r=4, num_experts=3, init_seed=0, target_modules=["gate_proj", "up_proj",
                                                                                           "down_proj"]))
    with torch.no_grad():
        for adapter in model.mor_adapters().values():
            adapter.lora_B.normal_(0, 0.1)
    model.save_pretrained(workdir / "first")
    return workdir / "first"
