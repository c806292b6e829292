"""`mor generate` and mor.runtime.generate: chat template, streaming, greedy determinism, sampling flags,
prompts from --prompt or stdin, with no adapter, a MoR adapter (dynamic, fixed or merged
routing) and a peft LoRA."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from mor import MoRConfig, get_mor_model
from mor.cli import main
from mor.runtime.generate import GenerationSettings, generate, prompt_inputs, read_prompts
from mor.runtime.loading import load_model, load_tokenizer

from conftest import make_tiny_tokenizer

PROMPT = "Is 1234 even or odd?"


@pytest.fixture
def fed_inputs(monkeypatch) -> list[torch.Tensor]:
    """The input_ids of every forward of the LLaMA (the first one is the whole prompt)."""
    seen = []
    original = LlamaForCausalLM.forward

    def recording(self, input_ids=None, *args, **kwargs):
        seen.append(input_ids)
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", recording)
    return seen


def test_prompt_goes_through_the_chat_template_unless_turned_off():
    tok = make_tiny_tokenizer()
    ids = prompt_inputs(tok, PROMPT)["input_ids"][0]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\n" + PROMPT) and text.endswith("<|im_start|>assistant\n")
    assert ids.tolist().count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # no extra special tokens
    assert "<|im_start|>" not in tok.decode(prompt_inputs(tok, PROMPT, chat_template=False)["input_ids"][0])
    plain = make_tiny_tokenizer(chat=False)
    assert tok.decode(prompt_inputs(plain, PROMPT)["input_ids"][0]) == PROMPT


def test_cli_generate_feeds_the_templated_prompt_and_streams_the_greedy_reply(tiny_model_dir, fed_inputs, capsys):
    tok = load_tokenizer(str(tiny_model_dir))
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max-new-tokens", "6"]) == 0
    first = tok.decode(fed_inputs[0][0])
    assert "<|im_start|>user\n" + PROMPT in first and first.endswith("<|im_start|>assistant\n")
    streamed = capsys.readouterr().out

    model = load_model(str(tiny_model_dir)).eval()
    reply = generate(model, tok, PROMPT, GenerationSettings(max_new_tokens=6), stream=False)
    assert streamed == reply + "\n"  # the streamer printed exactly the greedy reply
    inputs = prompt_inputs(tok, PROMPT)
    with torch.no_grad():
        direct = model.generate(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert reply == tok.decode(direct[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    fed_inputs.clear()
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max-new-tokens", "2",
                 "--no-chat-template"]) == 0
    assert "<|im_start|>" not in tok.decode(fed_inputs[0][0])


def test_greedy_is_deterministic_and_sampling_follows_the_seed(tiny_model_dir, capsys):
    def run(*extra):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                     *extra]) == 0
        return capsys.readouterr().out

    assert run() == run()
    sampled = run("--temperature", "5", "--top-p", "0.95", "--seed", "1")
    assert sampled == run("--temperature", "5", "--top-p", "0.95", "--seed", "1")
    assert {sampled} != {run("--temperature", "5", "--top-p", "0.95", "--seed", s) for s in ("2", "3", "4")}


def test_cli_generate_reads_one_prompt_per_stdin_line(tiny_model_dir, fed_inputs, monkeypatch, capsys):
    tok = load_tokenizer(str(tiny_model_dir))
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\n  \nsecond prompt\n"))
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("> ") == 2 and "> first prompt" in captured.err and "> second prompt" in captured.err
    prompts = [tok.decode(ids[0]) for ids in fed_inputs if ids.shape[1] > 1]  # prefill steps only
    assert len(prompts) == 2 and "first prompt" in prompts[0] and "second prompt" in prompts[1]
    assert read_prompts(io.StringIO("a\r\n\nb")) == ["a", "b"]


def test_cli_generate_with_mor_lora_and_merged_adapters(tmp_path, tiny_model_dir, capsys):
    mor_dir, lora_dir = tmp_path / "mor", tmp_path / "lora"
    model = get_mor_model(load_model(str(tiny_model_dir)), MoRConfig(r=4, num_experts=3, dropout=0.0, init_seed=0))
    with torch.no_grad():  # a visible adapter: B = 0 at init would leave the base model
        for layer in model.mor_adapters().values():
            layer.lora_B.normal_(0, 0.5)
    model.save_pretrained(mor_dir)
    lora = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(lora_dir)

    def run(*extra):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
                     *extra]) == 0
        return capsys.readouterr().out

    base = run()
    assert run("--adapter", str(lora_dir)) == base  # peft's LoRA starts as the base model (B = 0)
    run("--adapter", str(mor_dir))  # the per-token router
    fixed = run("--adapter", str(mor_dir), "--routing", "uniform")
    assert fixed == run("--adapter", str(mor_dir), "--merged", "--routing", "uniform") != base
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(mor_dir), "--merged", "--prompt", "x"]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "--routing" in err  # a learned router needs one
    assert main(["generate", "--model", str(tiny_model_dir), "--merged", "--routing", "uniform", "--prompt", "x"]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "MoR or MoE-LoRA" in err


def test_cli_generate_without_prompts_is_an_error_line(tiny_model_dir, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    assert main(["generate", "--model", str(tiny_model_dir)]) == 2  # was SystemExit: exit 1, no "error:" line
    assert capsys.readouterr().err == "error: give --prompt TEXT, or pipe prompts on stdin (one per line)\n"


def test_generation_settings_validate():
    assert GenerationSettings().generate_kwargs() == {"do_sample": False, "max_new_tokens": 128}
    assert GenerationSettings(temperature=0.7, top_p=0.9).generate_kwargs()["do_sample"] is True
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
