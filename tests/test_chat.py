"""Multi-turn chat records train every assistant turn (assistant-only loss): each assistant turn's
tokens are labelled, system and user tokens are masked, through the tokenizer's chat template, a
``--chat-template`` of the user's, or plain role-prefixed text (``--no-chat-template``)."""

from __future__ import annotations

import pytest

from conftest import make_tiny_tokenizer
from mor.data import IGNORE_INDEX, DataError, Record, Task, tokenize_example, training_examples
from mor.data.prompts import read_chat_template
from mor.train import TrainConfig
from mor.train.setup import choose_chat_template

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is 1234 even?"},
    {"role": "assistant", "content": "even"},
    {"role": "user", "content": "Is it odd?"},
    {"role": "assistant", "content": "false"},
    {"role": "user", "content": "red or blue?"},
    {"role": "assistant", "content": "blue"},
]}


def _labelled_runs(tokenizer, features) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(features["input_ids"], features["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def _features(tokenizer, record=CONVERSATION, max_length=512):
    task = Task("chat", [Record(record, "chat.jsonl", 1, "chat")])
    (example,) = training_examples(task, target="output", tokenizer=tokenizer)
    return example, tokenize_example(example, tokenizer, max_length)


def test_every_assistant_turn_is_labelled_and_nothing_else_with_the_chat_template():
    tok = make_tiny_tokenizer(chat=True)
    example, features = _features(tok)
    assert _labelled_runs(tok, features) == ["even<|im_end|>\n", "false<|im_end|>\n", "blue<|im_end|>"]
    text = tok.decode(features["input_ids"])
    assert text == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)[: len(text)]
    assert example.prompt.endswith("<|im_start|>user\nred or blue?<|im_end|>\n<|im_start|>assistant\n")


def test_every_assistant_turn_is_labelled_in_plain_role_prefixed_text():
    tok = make_tiny_tokenizer(chat=False)
    example, features = _features(tok)
    assert example.prompt == ("System: Be brief.\n\nUser: Is 1234 even?\n\nAssistant: even\n\nUser: Is it odd?\n\n"
                              "Assistant: false\n\nUser: red or blue?\n\nAssistant: ")
    runs = _labelled_runs(tok, features)
    assert [r.strip() for r in runs] == ["even", "false", "blue<|im_end|>"]
    assert "User" not in "".join(runs) and "System" not in "".join(runs)


def test_truncation_keeps_the_labels_of_the_turns_it_keeps():
    tok = make_tiny_tokenizer(chat=True)
    _, full = _features(tok)
    _, cut = _features(tok, max_length=len(full["input_ids"]) - 3)
    assert cut["labels"] == full["labels"][3:] and cut["input_ids"] == full["input_ids"][3:]


def test_a_template_that_rerenders_earlier_turns_is_refused_naming_the_fix():
    tok = make_tiny_tokenizer(chat=True)
    # drops earlier assistant turns from the rendering (as templates that strip reasoning do)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>{{ m['role'] }}"
                         "\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="assistant turn 2 cannot be located.*--chat-template.*--no-chat-template"):
        _features(tok)


def test_chat_template_and_no_chat_template_choose_the_rendering(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    path = tmp_path / "chat.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == read_chat_template(template) == template
    with pytest.raises(ValueError, match="--chat-template chat.jinja: no such file, and not a Jinja template"):
        read_chat_template("chat.jinja")

    tok = make_tiny_tokenizer(chat=True)
    choose_chat_template(tok, TrainConfig(chat_template=str(path)))
    example, features = _features(tok)
    assert example.prompt.startswith("[system] Be brief.\n[user] Is 1234 even?\n[assistant] even\n")
    assert [r.strip() for r in _labelled_runs(tok, features)] == ["even", "false", "blue<|im_end|>"]
    choose_chat_template(tok, TrainConfig(use_chat_template=False))
    assert tok.chat_template is None and _features(tok)[0].prompt.startswith("System: Be brief.\n\nUser: ")
    with pytest.raises(ValueError, match="(?s)--chat-template .*: give --chat-template or --no-chat-template, not both"):
        TrainConfig(chat_template=template, use_chat_template=False).validate()
