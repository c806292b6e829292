"""The trainer controls users reach for, each a TrainConfig field and so a flag and a --config key:
a warmup whose first step trains, --lr-scheduler, --report-to, --eval-steps, --packing, --bf16,
--attn-implementation, and --push-to-hub with a model card (the upload replaced: no network)."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_scheduler

from conftest import make_tiny_tokenizer
from mor.cli import main
from mor.data import Record, Task, tokenize_examples, training_examples
from mor.data.builtin import write_builtin_suite
from mor.train import AdapterSpec, TrainConfig, run_training
from mor.train.recipe import batch_collator, setup_model
from mor.train.trainer import training_arguments, warmup_from_the_first_step


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    write_builtin_suite(folder, seed=0, train_size=16, eval_size=4, tasks=["parity", "colour"])
    return [str(folder / "parity"), str(folder / "colour")]


def train(tmp_path, tiny_model_dir, tiny_tasks, *flags) -> tuple[int, dict]:
    out = tmp_path / "run"
    status = main([str(a) for a in ("train", "--model", tiny_model_dir, "--data", *tiny_tasks, "--output", out,
                                    "--r", 4, "--num-experts", 2, "--batch-size", 4, "--no-figures", *flags)])
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    return status, result


def test_one_step_trains_the_adapter_whatever_the_warmup(tmp_path, tiny_model_dir, tiny_tasks):
    status, result = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 1, "--no-eval",
                           "--warmup-ratio", 0.5, "--logging-steps", 1)
    assert status == 0 and result["global_step"] == 1
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    up = [t for name, t in weights.items() if "lora_B" in name]
    assert up and all(t.abs().sum() > 0 for t in up)  # B starts at 0: a step at lr 0 left it there
    (logged,) = [h for h in result["log_history"] if "learning_rate" in h]
    assert logged["learning_rate"] > 0


def test_the_warmup_starts_at_its_first_step_and_the_schedule_is_transformers_after_it():
    def lrs(steps, warmup, kind="cosine", shifted=True):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
        if shifted:
            warmup_from_the_first_step(scheduler, warmup)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out, scheduler

    ours, scheduler = lrs(140, 7)
    theirs, _ = lrs(140, 7, shifted=False)
    assert theirs[0] == 0 and min(ours) > 0
    assert ours[:7] == pytest.approx([k / 7 for k in range(1, 8)]) and ours[7:] == theirs[7:]
    assert lrs(1, 1)[0] == [1.0] and lrs(3, 2, "linear")[0] == pytest.approx([0.5, 1.0, 1.0])
    state = scheduler.state_dict()  # checkpoints keep working (resume)
    scheduler.load_state_dict(json.loads(json.dumps(state)))


def test_lr_scheduler_weight_decay_report_to_and_bf16_reach_the_training_arguments(monkeypatch):
    cfg = TrainConfig(lr_scheduler="linear", weight_decay=0.1, report_to="none", logging_steps=3, eval_steps=5)
    args = training_arguments(cfg)
    assert (args.lr_scheduler_type, args.weight_decay, args.report_to, args.logging_steps) == ("linear", 0.1, [], 3)
    assert (args.eval_strategy, args.eval_steps) == ("steps", 5)
    assert training_arguments(TrainConfig()).report_to == ["tensorboard"]
    assert training_arguments(TrainConfig()).bf16 is torch.cuda.is_available()
    if not torch.cuda.is_available():  # bf16 on CPU: torch's CPU autocast, through use_cpu
        cpu = training_arguments(TrainConfig(bf16=True))
        assert cpu.bf16 and cpu.use_cpu
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="--report-to wandb: the wandb package is not installed; pip install wandb"):
        training_arguments(TrainConfig(report_to="wandb"))


def test_bf16_runs_the_forward_in_bf16_and_attn_implementation_reaches_the_model(tmp_path, tiny_model_dir, tiny_tasks):
    from transformers import TrainerCallback

    class OutputDtypes(TrainerCallback):  # the dtype lm_head computes in during training steps
        seen: set = set()

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not self.seen:
                model.get_output_embeddings().register_forward_hook(lambda m, i, out: self.seen.add(out.dtype))

    dtypes = {}
    for bf16 in (True, False):
        probe = OutputDtypes()
        probe.seen = set()
        cfg = TrainConfig(model=str(tiny_model_dir), data=tiny_tasks, output=str(tmp_path / f"run{bf16}"), max_steps=2,
                          evaluate=False, figures=False, batch_size=4, bf16=bf16, attn_implementation="eager",
                          report_to="none", adapter=AdapterSpec(r=2, num_experts=2))
        result = run_training(cfg, callbacks=[probe])
        assert result.global_step == 2 and result.final_loss > 0
        dtypes[bf16] = probe.seen
    assert dtypes == {True: {torch.bfloat16}, False: {torch.float32}}  # on CPU too: torch's CPU autocast
    saved = json.loads((tmp_path / "runTrue" / "adapter" / "training.json").read_text())["train_config"]
    assert (saved["bf16"], saved["attn_implementation"]) == (True, "eager")
    model, _ = setup_model(TrainConfig(model=str(tiny_model_dir), attn_implementation="eager",
                                       adapter=AdapterSpec(r=2, num_experts=2)))
    assert model.base_model.model.config._attn_implementation == "eager"


def test_eval_steps_log_each_eval_tasks_loss(tmp_path, tiny_model_dir, tiny_tasks, capsys):
    status, result = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 2, "--no-eval", "--eval-steps", 1,
                           "--report-to", "none")
    assert status == 0
    evals = [h for h in result["log_history"] if any(k.startswith("eval_") for k in h)]
    assert [h["step"] for h in evals if "eval_parity_loss" in h] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["eval_colour_loss"])) for h in evals if "eval_colour_loss" in h)
    no_test = tmp_path / "alone.json"
    no_test.write_text(json.dumps([{"instruction": "say hi", "output": "hi"}] * 4))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(no_test), "--output", str(tmp_path / "o"),
                 "--eval-steps", "1", "--max-steps", "1"]) == 2
    assert "error: --eval-steps needs eval tasks" in capsys.readouterr().err


def test_packing_gives_each_example_the_logits_and_loss_it_has_alone(tiny_model_dir):
    tok = make_tiny_tokenizer()
    records = [Record({"instruction": f"Is {n} even or odd?", "output": "the correct answer is even"}, "m", k + 1,
                      "instruction") for k, n in enumerate((12, 1234567, 3))]
    features = [dict(f, example_index=k) for k, f in
                enumerate(tokenize_examples(training_examples(Task("t", records), tokenizer=tok), tok, 64).features)]
    padded, packed = batch_collator(tok.pad_token_id)(features), batch_collator(tok.pad_token_id, packing=True)(features)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert packed["example_index"].tolist() == padded["example_index"].tolist() == [0, 1, 2]
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).train()
        with torch.no_grad():
            alone = model(**{k: v for k, v in padded.items() if k != "example_index"})
            together = model(**{k: v for k, v in packed.items() if k != "example_index"})
        start = 0
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            torch.testing.assert_close(together.logits[0, start:start + n], alone.logits[row, :n])
            start += n
        torch.testing.assert_close(together.loss, alone.loss)


def test_packing_trains(tmp_path, tiny_model_dir, tiny_tasks):
    status, result = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 2, "--no-eval", "--packing",
                           "--report-to", "none")
    assert status == 0 and result["global_step"] == 2 and result["final_loss"] > 0


def test_push_to_hub_uploads_the_adapter_with_a_model_card(tmp_path, tiny_model_dir, tiny_tasks, monkeypatch,
                                                          capsys):
    calls = []

    class Url:
        repo_id = "someone/parity-mor"

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id) or Url())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append((kw["repo_id"], sorted(p.name for p in
                                                        __import__("pathlib").Path(kw["folder_path"]).iterdir()),
                                                        (__import__("pathlib").Path(kw["folder_path"]) / "README.md")
                                                        .read_text())))
    status, result = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 2, "--eval-limit", 4,
                           "--push-to-hub", "--hub-model-id", "parity-mor", "--report-to", "none")
    assert status == 0 and result["hub_repo"] == "someone/parity-mor"
    assert calls[0] == "parity-mor"
    repo, files, card = calls[1]
    assert repo == "someone/parity-mor" and {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "import mor" in card and f"base_model: {tiny_model_dir}" in card
    assert 'PeftModel.from_pretrained(base, "someone/parity-mor")' in card
    assert "mor: r=4" in card and "2 experts, softmax router" in card and "2 steps" in card
    assert "| parity | 4 |" in card and "| average |" in card and "routing at step 2: entropy_bits" in card
    assert "https://huggingface.co/someone/parity-mor" in capsys.readouterr().out


def test_push_to_hub_without_a_token_stops_before_training(tmp_path, tiny_model_dir, tiny_tasks, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    status, _ = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 1, "--push-to-hub")
    assert status == 2 and not (tmp_path / "run").exists()
    assert "error: --push-to-hub: no Hugging Face token" in capsys.readouterr().err
    assert main(["train", "--hub-model-id", "x/y"]) == 2
    assert "--hub-model-id x/y: give --push-to-hub too" in capsys.readouterr().err


def test_a_failed_upload_keeps_the_run_and_says_how_to_upload_it(tmp_path, tiny_model_dir, tiny_tasks, monkeypatch,
                                                                 capsys):
    def offline(self, repo_id, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    status, result = train(tmp_path, tiny_model_dir, tiny_tasks, "--max-steps", 1, "--no-eval", "--push-to-hub")
    assert status == 0 and result["hub_repo"] is None
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "warning: --push-to-hub failed (ConnectionError: no network)" in capsys.readouterr().out
