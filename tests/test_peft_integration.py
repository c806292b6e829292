"""MoR as a peft method: peft's loaders, named adapters, TRL's SFTTrainer, 4-bit bases, the legacy format."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import mor
from mor import MoRConfig, _compat
from mor.config import WEIGHTS_NAME

from conftest import make_tiny_llama, make_tiny_tokenizer

BATCH = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def train_steps(model, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def logits(model, batch=BATCH):
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_get_peft_model_and_peft_loaders_take_mor(tmp_path, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = train_steps(get_peft_model(base, MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0)))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model.base_model, mor.MoRModel)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOR" and config["base_model_name_or_path"] == str(tiny_model_dir)

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)  # finds the base from the adapter's config
    assert torch.equal(logits(auto), expected)

    trainable = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path,
                                          is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".mor." in n for n in names)
    train_steps(trainable, steps=1)
    assert not torch.equal(logits(trainable), expected)


@pytest.mark.parametrize("imports", ["import mor\nimport peft", "import peft\nimport mor",
                                     "import mor.config\nimport peft",  # a mor module brings peft in: registered
                                     "import mor.layer\nimport peft"])   # when its import has ended
def test_mor_is_a_peft_method_whichever_is_imported_first(imports, tmp_path, tiny_model_dir):
    # `import mor` imports neither peft nor torch (`mor --help` stays fast) yet peft's loaders know MoR
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, MoRConfig(r=4, num_experts=3)).save_pretrained(tmp_path)
    code = (f"import sys\n{imports}\nmodel = peft.AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "print(type(model.base_model).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MoRModel"]


def test_a_failed_import_does_not_keep_mor_from_registering(tmp_path):
    (tmp_path / "broken.py").write_text("import peft\nraise RuntimeError('broken on purpose')\n")
    code = ("import sys\nimport mor\nmor.__path__.append(sys.argv[1])\ntry:\n    import mor.broken\n"
            "except RuntimeError:\n    pass\nimport mor.routing\nfrom peft import mapping\n"
            "print(mapping.PEFT_TYPE_TO_TUNER_MAPPING['MOR'].__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MoRModel"]


def test_every_public_name_of_mor_is_there():
    assert mor.__all__ and all(getattr(mor, name).__name__ == name for name in mor.__all__)
    assert set(mor.__all__) <= set(dir(mor))
    with pytest.raises(AttributeError, match="no attribute 'MoRConfg'"):
        mor.MoRConfg


def test_named_adapters_switch_and_save_side_by_side(tmp_path):
    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, init_seed=0))
    model.add_adapter("second", MoRConfig(r=2, num_experts=2, init_seed=1))
    for name in ("default", "second"):
        model.set_adapter(name)
        with torch.no_grad():
            for adapter in model.mor_adapters().values():
                adapter.lora_B.normal_(0, 0.1)
    model.eval()
    model.set_adapter("default")
    first = logits(model)
    model.set_adapter("second")
    second = logits(model)
    assert not torch.allclose(first, second)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(logits(reloaded), first)
    reloaded.set_adapter("second")
    assert torch.equal(logits(reloaded), second)


def test_trl_sft_trainer_trains_mor_from_peft_config_and_saves_a_reloadable_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = make_tiny_tokenizer()
    base = make_tiny_llama(vocab_size=len(tok))
    base.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_dict({"text": ["Question: which number is larger? Answer: the correct answer is first",
                                       "Is 1234 even or odd? the correct answer is even"] * 8})
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1, max_length=32,
                         use_cpu=True, bf16=False)  # bf16=False: compare the reload in fp32, bit for bit
    trainer = trl.SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tok,
                             peft_config=MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".mor." in n for n in moved), "training did not change the MoR adapter"
    trainer.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOR"
    batch = torch.randint(3, len(tok), (2, 10))
    trainer.model.eval()
    reloaded = PeftModel.from_pretrained(make_tiny_llama(vocab_size=len(tok)), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, batch), logits(trainer.model, batch))


@pytest.fixture
def four_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "base"
    make_tiny_llama(hidden=64).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return lambda: AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                        **_compat.dtype_kwargs(torch.float32))  # 4.55: torch_dtype


def test_four_bit_base_trains_saves_loads_and_merges_into_a_plain_model(four_bit, tmp_path):
    import bitsandbytes as bnb

    base = four_bit()
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    model = get_peft_model(base, MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0))
    assert mor.count_trainable_parameters(model) == mor.parameter_count(make_tiny_llama(hidden=64), "mor", 4, 3)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the compute dtype
    expected = logits(train_steps(model))
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(four_bit(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), expected)

    profile = loaded.measure_routing([{"input_ids": BATCH}])
    with loaded.fixed_routing(profile):
        fixed = logits(loaded)
    merged = loaded.merge_and_unload(profile)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    # bitsandbytes' CPU kernel rounds internally (measured 2e-3 on a layer's output in fp32), so the merge
    # equals the un-merged model to that rounding, not bit for bit; dequantize_4bit alone was off by 0.86
    assert (logits(merged) - fixed).abs().max() < 1e-2
    merged.save_pretrained(tmp_path / "merged")
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - fixed).abs().max() < 1e-2


def test_legacy_adapter_folder_loads_with_a_warning_and_converts(tmp_path):
    model = train_steps(get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0)))
    expected = logits(model)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    tensors = {}
    for name, adapter in model.mor_adapters().items():  # the mor 0.1 layout: "<layer>.<parameter>"
        for pname, p in adapter.named_parameters():
            tensors[f"{name}.{pname}"] = p.detach().contiguous()
    save_file(tensors, str(legacy / WEIGHTS_NAME))
    fields = {"adapter_type": "mor", "method": "mor", "r": 4, "num_experts": 3, "alpha": 8.0, "dropout": 0.0,
              "target_modules": ["gate_proj", "up_proj", "down_proj"], "router": "softmax", "top_k": 2,
              "balance_coef": 0.01, "init": "ones_noise", "init_scale_std": 0.1, "init_seed": 0,
              "base_model_name_or_path": None}
    (legacy / "adapter_config.json").write_text(json.dumps(fields))
    with pytest.warns(UserWarning, match="mor convert-adapter"):
        loaded = mor.load_adapter(make_tiny_llama(), legacy)
    assert torch.equal(logits(loaded), expected)
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    from mor.cli import main

    assert main(["convert-adapter", str(legacy), str(tmp_path / "new"), "--model", str(base_dir)]) == 0
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOR" and "adapter_type" not in config
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "new")), expected)


def test_an_unsupported_peft_version_fails_at_registration_with_the_range(monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with pytest.raises(ImportError, match=r"peft>=0\.18,<0\.22 .*peft 0\.99\.0 is installed"):
        mor.model.register()


def test_an_adapter_on_a_different_base_warns(tmp_path):
    model = get_peft_model(make_tiny_llama(), MoRConfig(r=4, num_experts=3))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="different base model"):
        mor.load_adapter(make_tiny_llama(seed=1), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mor.load_adapter(make_tiny_llama(), tmp_path)  # the same base: no warning


def test_train_flags_come_from_the_config():
    from dataclasses import fields

    from mor.cli import build_parser

    args = build_parser().parse_args(["train"])
    meta = {f.name: f for f in fields(MoRConfig)}
    for name in ("r", "num_experts", "alpha", "dropout", "router", "top_k", "balance_coef", "init", "init_scale_std"):
        assert getattr(args, name) == meta[name].default, name
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert meta["router"].metadata["help"] in helps["router"]
    spec = mor.train.adapters.AdapterSpec(method="lora", r=16)
    assert spec.alpha == 32.0 and MoRConfig(r=16).alpha == 32.0  # one default: alpha = 2r everywhere


def test_cli_trains_on_a_four_bit_base_and_converts_legacy_folders(tmp_path):
    pytest.importorskip("bitsandbytes")
    from mor.cli import main
    from mor.runtime.loading import load_model

    # hidden 64: bitsandbytes' CPU kernel repacks nf4 weights in blocks of 64 inputs, so a layer
    # with fewer inputs (the 32-wide tiny model) fails inside bitsandbytes on a no-grad forward
    tiny_model_dir = tmp_path / "base64"
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(vocab_size=len(tok), hidden=64)
    base.config.pad_token_id = tok.pad_token_id
    base.save_pretrained(tiny_model_dir)
    tok.save_pretrained(tiny_model_dir)

    data = tmp_path / "task.json"
    data.write_text(json.dumps([{"instruction": f"Is {i} even or odd?", "input": "", "output": "even" if i % 2 == 0
                                 else "odd", "answer": "even" if i % 2 == 0 else "odd"} for i in range(16)]))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--r", "4", "--num-experts", "2", "--no-eval", "--load-in-4bit"]) == 0
    import bitsandbytes as bnb

    base = load_model(str(tiny_model_dir), load_in_4bit=True)
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    loaded = mor.load_adapter(base, out / "adapter")
    assert any(float(a.lora_B.abs().sum()) > 0 for a in loaded.mor_adapters().values())  # it trained
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "MOR"
    # convert-adapter never writes over an existing folder
    assert main(["convert-adapter", str(out / "adapter"), str(out / "adapter"), "--model", str(tiny_model_dir)]) == 2
