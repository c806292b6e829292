"""Tests for mor.data: loading, validation errors, multiple-choice parsing, items, examples,
tokenising, collating, mixing and splitting. Fast and offline: the tokenizer is a tiny
byte-level BPE trained here; the real commonsense files are read from ../shared when present."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_tiny_tokenizer

from mor.eval.scoring import encode_pair  # lm-eval's split; training drops only the BOS
from mor.data import (
    DEFAULT_TEMPLATE,
    DataError,
    MultipleChoiceItem,
    Task,
    TrainingExample,
    collate,
    load_task_records,
    load_tasks,
    mix_tasks,
    multiple_choice_items,
    parse_multiple_choice,
    split_records,
    task_name,
    text_prompt,
    tokenize_example,
    tokenize_examples,
    training_examples,
)

SHARED = Path(__file__).parents[2] / "shared" / "data" / "commonsense"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


ARC = {
    "instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
    "Answer1: oxygen Answer2: carbon dioxide Answer3: helium\n\nAnswer format: answer1/answer2/answer3",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}
BOOLQ = {
    "instruction": "Please answer the following question with true or false, question: is the sky blue?"
    "\n\nAnswer format: true/false",
    "input": "",
    "output": "the correct answer is true",
    "answer": "true",
}
PIQA = {
    "instruction": "Please choose the correct solution to the question: How to open a jar?\n\n"
    "Solution1: Twist the lid.\n\nSolution2: Paint the lid.\n\nAnswer format: solution1/solution2",
    "input": "",
    "output": "the correct answer is solution1",
    "answer": "solution1",
}
WINO = {
    "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
    "Sarah was a better surgeon than Maria so _ always got the harder cases.\n\n"
    "Option1: Sarah\n\nOption2: Maria\n\nAnswer format: option1/option2",
    "input": "",
    "output": "the correct answer is option1",
    "answer": "option1",
}
EXPLICIT = {"question": "What color is grass?", "choices": ["red", "green"], "label": 1}


# ---- helpers ------------------------------------------------------------------------------


def write_json(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def task_of(*records, name="t") -> Task:
    from mor.data import Record, validate_record

    return Task(name, [Record(r, "mem.json", k + 1, validate_record(r)) for k, r in enumerate(records)])


@pytest.fixture(scope="module")
def chat_tok():
    return make_tiny_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tiny_tokenizer(chat=False)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- loading ------------------------------------------------------------------------------


def test_json_list_records_remember_their_start_line(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n\n  {\n    "instruction": "c",\n    "output": "d"\n  }, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n]\n'
    path = tmp_path / "mine.json"
    path.write_text(text)
    task = load_task_records(path)
    assert task.name == "mine"
    assert [r.line for r in task.records] == [2, 4, 7]
    assert [r.kind for r in task.records] == ["instruction", "instruction", "chat"]
    assert task.records[1].source == f"{path}:4"
    assert task.skipped == []


def test_jsonl_records_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [ARC, "", EXPLICIT, "   ", BOOLQ])
    task = load_task_records(path)
    assert [r.line for r in task.records] == [1, 3, 5]
    assert [r.kind for r in task.records] == ["instruction", "choice", "instruction"]


def test_json_suffix_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "q.json", [ARC, BOOLQ])
    assert [r.line for r in load_task_records(path).records] == [1, 2]


def test_task_naming(tmp_path):
    folder = tmp_path / "boolq"
    write_json(folder / "train.json", [BOOLQ])
    write_json(folder / "test.json", [BOOLQ, BOOLQ])
    assert task_name(folder) == "boolq"
    assert task_name(folder / "train.json") == "boolq"
    assert load_task_records(folder / "test.json").name == "boolq"
    assert load_task_records(write_json(tmp_path / "arc_easy.json", [ARC])).name == "arc_easy"
    assert load_task_records(write_jsonl(tmp_path / "x" / "dev.jsonl", [ARC])).name == "x"


def test_folder_split_selection(tmp_path):
    folder = tmp_path / "boolq"
    write_json(folder / "train.json", [BOOLQ])
    write_json(folder / "test.json", [BOOLQ, BOOLQ])
    assert len(load_task_records(folder, split="train")) == 1
    assert len(load_task_records(folder, split="test")) == 2
    with pytest.raises(DataError, match="split='train'"):
        load_task_records(folder)  # never silently mixes train and test
    with pytest.raises(FileNotFoundError, match="validation.json"):
        load_task_records(folder, split="validation")


def test_folder_with_one_file_or_several_plain_files(tmp_path):
    only_test = tmp_path / "piqa"
    write_json(only_test / "test.json", [PIQA])
    assert load_task_records(only_test).name == "piqa"
    with pytest.raises(FileNotFoundError, match="split_records"):
        load_task_records(only_test, split="train")
    multi = tmp_path / "mixed"
    write_json(multi / "a.json", [ARC])
    write_jsonl(multi / "b.jsonl", [BOOLQ, PIQA])
    task = load_task_records(multi)
    assert task.name == "mixed" and len(task) == 3 and len(task.files) == 2


def test_load_tasks_and_duplicate_names(tmp_path):
    a = write_json(tmp_path / "a.json", [ARC])
    b = write_jsonl(tmp_path / "b.jsonl", [BOOLQ])
    assert [t.name for t in load_tasks([a, b])] == ["a", "b"]
    c = write_json(tmp_path / "other" / "a.json", [ARC])
    with pytest.raises(DataError, match="both named 'a'"):
        load_tasks([a, c])


def test_missing_file_and_empty_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_task_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no records"):
        load_task_records(write_json(tmp_path / "empty.json", []))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_task_records(tmp_path / "blank.jsonl")


GOOD = '{"instruction": "a", "output": "b"}'
MALFORMED = [
    # (file name, content, line, expected words)
    ("syntax.json", '[\n  {"instruction": "a",\n   "output": "b"\n   "answer": "c"}\n]', 4, "invalid JSON"),
    ("nocomma.json", f"[\n{GOOD}\n{GOOD}\n]", 3, "expected ',' or ']'"),
    ("trailing.json", f"[\n{GOOD},\n]", 3, "trailing comma"),
    ("unclosed.json", f"[\n{GOOD},\n{GOOD}\n", 4, "not closed"),
    ("extra.json", f"[{GOOD}]\n]", 2, "extra content"),
    ("scalar.json", '"hello"', 1, "expected '['"),
    ("single.json", '{\n "instruction": "a",\n "output": "b"\n}', 1, "one JSON object"),
    ("notobject.json", f'[\n{GOOD},\n"just text"\n]', 3, "not an object"),
    ("nooutput.json", '[\n{"instruction": "a"}\n]', 2, 'missing field "output"'),
    ("emptyoutput.json", '[\n{"instruction": "a", "output": "  "}\n]', 2, "empty output"),
    ("unknown.json", '[\n{"prompt": "a", "completion": "b"}\n]', 2, "none of the fields"),
    ("msgnotlist.jsonl", '{"messages": "hi"}', 1, '"messages" must be a list'),
    ("msglast.jsonl", f'{GOOD}\n{{"messages": [{{"role": "assistant", "content": "x"}}, {{"role": "user", "content": "y"}}]}}', 2, "last message has role 'user'"),
    ("msgbad.jsonl", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', 1, "message 0"),
    ("msgempty.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}', 1, "assistant) message is empty"),
    ("labelrange.jsonl", '{"question": "q", "choices": ["a", "b"], "label": 2}', 1, '"label" is 2 but there are 2 choices'),
    ("labeltype.jsonl", '{"question": "q", "choices": ["a", "b"], "label": "b"}', 1, "0-based index"),
    ("onechoice.jsonl", '{"question": "q", "choices": ["a"], "label": 0}', 1, "at least two"),
    ("nolabel.jsonl", '{"question": "q", "choices": ["a", "b"]}', 1, 'missing field "label"'),
    ("latin1.jsonl", None, 2, "not UTF-8"),
    ("badline.jsonl", f'{GOOD}\n{GOOD}\n{{"instruction": "a", "output": }}', 3, "invalid JSON"),
]


@pytest.mark.parametrize("name,content,line,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_names_file_line_and_problem(tmp_path, name, content, line, words):
    path = tmp_path / name
    if content is None:  # a Latin-1 byte on line 2
        path.write_bytes(GOOD.encode() + b'\n{"instruction": "caf\xe9", "output": "b"}\n')
    else:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        load_task_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message


def test_skip_bad_counts_and_reports(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [ARC, '{"instruction": "a", "output": ', {"instruction": "x"}, BOOLQ, '"text"', EXPLICIT],
    )
    with pytest.raises(DataError):
        load_task_records(path)
    task = load_task_records(path, skip_bad=True)
    assert [r.line for r in task.records] == [1, 4, 6]
    assert len(task.skipped) == 3
    assert [s.split(": ")[0] for s in task.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    listed = write_json(tmp_path / "l.json", [ARC, 7, {"instruction": "x", "output": ""}])
    task = load_task_records(listed, skip_bad=True)
    assert len(task) == 1 and len(task.skipped) == 2 and task.skipped[0].startswith(f"{listed}:")


def test_skip_bad_all_bad_is_an_empty_task_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ['{"instruction": "x"}'])
    with pytest.raises(DataError, match="1 skipped"):
        load_task_records(path, skip_bad=True)


# ---- multiple-choice parsing ---------------------------------------------------------------


def test_parse_answer_markers():
    parsed = parse_multiple_choice(ARC)
    assert parsed.question == "Which gas do plants take in?"
    assert parsed.options == ["oxygen", "carbon dioxide", "helium"]
    assert parsed.labels == ["answer1", "answer2", "answer3"]
    assert parsed.gold == 1 and not parsed.blank


def test_parse_solutions_boolq_and_blank():
    piqa = parse_multiple_choice(PIQA)
    assert (piqa.question, piqa.options, piqa.gold) == ("How to open a jar?", ["Twist the lid.", "Paint the lid."], 0)
    boolq = parse_multiple_choice(BOOLQ)
    assert (boolq.question, boolq.options, boolq.labels, boolq.gold) == ("is the sky blue?", ["true", "false"], ["true", "false"], 0)
    wino = parse_multiple_choice(WINO)
    assert wino.blank and wino.options == ["Sarah", "Maria"] and wino.gold == 0
    assert wino.question == "Sarah was a better surgeon than Maria so _ always got the harder cases."


def test_parse_gold_from_output_only_and_explicit_records():
    record = {k: v for k, v in ARC.items() if k != "answer"}
    assert parse_multiple_choice(record).gold == 1
    explicit = parse_multiple_choice(EXPLICIT)
    assert (explicit.question, explicit.options, explicit.labels, explicit.gold) == ("What color is grass?", ["red", "green"], [], 1)
    assert parse_multiple_choice({"question": "q", "choices": ["a", "b"], "answer": "b"}).gold == 1
    with_choices = dict(ARC, choices=["O2", "CO2", "He"])
    assert parse_multiple_choice(with_choices).options == ["O2", "CO2", "He"]


def test_format_line_need_not_be_last_and_labels_may_be_any_words():
    record = {
        "instruction": "Is water wet?\n\nAnswer format: yes/no\nThink first.",
        "output": "the correct answer is yes",
    }
    parsed = parse_multiple_choice(record)
    assert (parsed.question, parsed.options, parsed.gold) == ("Is water wet?", ["yes", "no"], 0)
    hellaswag = {
        "instruction": "Please choose the correct ending to complete the given sentence: Ice: Then, he\n\n"
        "Ending1: scrapes. Ending2: sings.\n\nAnswer format: ending1/ending2",
        "output": "the correct answer is ending1",
    }
    parsed = parse_multiple_choice(hellaswag)
    assert (parsed.question, parsed.options, parsed.gold) == ("Ice: Then, he", ["scrapes.", "sings."], 0)


def test_underscore_in_arc_question_is_not_a_blank():
    record = dict(ARC, instruction=ARC["instruction"].replace("take in?", "take in ___?"))
    assert not parse_multiple_choice(record).blank


BAD_CHOICES = [
    (dict(ARC, instruction=ARC["instruction"].replace("Answer3: helium", "helium")), 'no "Answer3:" option text'),
    (dict(ARC, answer="answer7"), "none of the choices"),
    (dict(ARC, output="the correct answer is answer1"), "disagree"),
    ({"instruction": "Pick.\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2", "output": "no idea"}, "no gold answer"),
    ({"instruction": "What is 2+2?", "output": "4"}, 'no "Answer format'),
    (dict(ARC, instruction=ARC["instruction"].replace("helium", "")), "has no text"),
    (dict(ARC, choices=["a", "b"]), "lists 3 labels but \"choices\" has 2"),
    (dict(ARC, instruction=ARC["instruction"].replace("answer1/answer2/answer3", "answer1")), "at least two labels"),
    ({"question": "q", "choices": ["a", "b"], "label": 0, "answer": "b"}, "disagree"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "chat records"),
]


@pytest.mark.parametrize("record,words", BAD_CHOICES)
def test_parse_errors_name_the_problem(record, words):
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace("+", r"\+")):
        parse_multiple_choice(record)


def test_item_errors_carry_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [ARC, {"instruction": "What is 2+2?", "output": "4"}])
    task = load_task_records(path)
    with pytest.raises(DataError, match=f"^{path}:2: "):
        multiple_choice_items(task)
    with pytest.raises(DataError, match=f"^{path}:2: "):
        training_examples(task, target="text")
    assert len(training_examples(task, target="output")) == 2  # plain instruction data is fine


@needs_shared
def test_every_commonsense_record_parses_with_the_right_gold():
    files = sorted(SHARED.glob("*/*.json"))
    assert files
    for path in files:
        task = load_task_records(path)
        assert task.name == path.parent.name
        raw = json.loads(path.read_text())
        assert len(task) == len(raw)
        for record in task.records:
            parsed = parse_multiple_choice(record.data)
            assert 0 <= parsed.gold < len(parsed.options) == len(parsed.labels), record.source
            assert parsed.labels[parsed.gold] == record.data["answer"], record.source
            assert parsed.question and all(parsed.options), record.source
            assert "Answer format" not in parsed.question and "Please" not in parsed.question[:7]
        items = multiple_choice_items(task)
        assert len(items) == len(task)


@needs_shared
def test_commonsense_line_numbers_point_at_records():
    path = SHARED / "piqa" / "test.json"
    lines = path.read_text().split("\n")
    for record in load_task_records(path).records[:50]:
        assert lines[record.line - 1].strip() == "{", record.source


@needs_shared
def test_commonsense_folder_split_and_carving():
    assert len(load_task_records(SHARED / "boolq", split="train")) == 9427
    piqa = load_task_records(SHARED / "piqa")
    train, evals = split_records(piqa, eval_size=300, seed=0)
    assert len(train) == 1838 - 300 and len(evals) == 300


# ---- items and examples -------------------------------------------------------------------


def test_text_items_exact_strings():
    (item,) = multiple_choice_items(task_of(ARC, name="arc"), scoring="text")
    context = "Question: Which gas do plants take in?\nAnswer:"
    assert item == MultipleChoiceItem("arc", [context] * 3, [" oxygen", " carbon dioxide", " helium"], 1, "mem.json:1")
    (boolq,) = multiple_choice_items(task_of(BOOLQ), scoring="text")
    assert boolq.continuations == [" true", " false"] and boolq.gold == 0
    (custom,) = multiple_choice_items(task_of(PIQA), template="Q: {question}\nA:")
    assert custom.contexts == ["Q: How to open a jar?\nA:"] * 2
    assert custom.continuations == [" Twist the lid.", " Paint the lid."]


def test_text_items_blank_mirror_lm_eval_winogrande():
    (item,) = multiple_choice_items(task_of(WINO), scoring="text")
    assert item.contexts == [
        "Sarah was a better surgeon than Maria so Sarah",
        "Sarah was a better surgeon than Maria so Maria",
    ]
    assert item.continuations == [" always got the harder cases."] * 2
    assert item.gold == 0
    # the same as lm_eval's own winogrande functions
    lm_eval_wino = pytest.importorskip("lm_eval.tasks.winogrande.preprocess_winogrande")
    doc = {"sentence": parse_multiple_choice(WINO).question, "option1": "Sarah", "option2": "Maria", "answer": "1"}
    assert item.contexts == lm_eval_wino.doc_to_choice(doc)
    assert item.continuations[0] == " " + lm_eval_wino.doc_to_target(doc)
    assert item.gold == lm_eval_wino.doc_to_text(doc)


def test_text_items_explicit_choices():
    (item,) = multiple_choice_items(task_of(EXPLICIT), scoring="text")
    assert item.contexts == ["Question: What color is grass?\nAnswer:"] * 2
    assert item.continuations == [" red", " green"] and item.gold == 1


def test_label_items_plain(plain_tok):
    for tok in (None, plain_tok):
        (item,) = multiple_choice_items(task_of(ARC), scoring="label", tokenizer=tok)
        assert item.contexts == [ARC["instruction"] + "\n\n"] * 3
        assert item.continuations == [f"the correct answer is answer{k}" for k in (1, 2, 3)]
        assert item.gold == 1
    with_input = dict(BOOLQ, input="Passage: the sky is blue.")
    (item,) = multiple_choice_items(task_of(with_input), scoring="label")
    assert item.contexts[0] == BOOLQ["instruction"] + "\n\nPassage: the sky is blue.\n\n"
    assert item.continuations == ["the correct answer is true", "the correct answer is false"]
    (explicit,) = multiple_choice_items(task_of(EXPLICIT), scoring="label")
    assert explicit.contexts == ["What color is grass?\n\n"] * 2 and explicit.continuations == ["red", "green"]


def test_label_items_chat_template(chat_tok):
    (item,) = multiple_choice_items(task_of(PIQA), scoring="label", tokenizer=chat_tok)
    expected = f"<|im_start|>user\n{PIQA['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    assert item.contexts == [expected, expected]
    assert item.continuations == ["the correct answer is solution1", "the correct answer is solution2"]


def test_scoring_and_target_names_are_checked():
    with pytest.raises(ValueError, match="scoring"):
        multiple_choice_items(task_of(ARC), scoring="labels")
    with pytest.raises(ValueError, match="target"):
        training_examples(task_of(ARC), target="answer")
    with pytest.raises(ValueError, match="placeholder"):
        text_prompt("q", template="Q:")
    assert text_prompt("a {b}", "Q: {question} {x}") == "Q: a {b} {x}"


def test_training_examples_output(chat_tok):
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]}
    task = task_of(ARC, chat, EXPLICIT, name="mix")
    plain = training_examples(task, target="output")
    assert plain[0] == TrainingExample("mix", ARC["instruction"] + "\n\n", ARC["output"], "mem.json:1")
    assert (plain[1].prompt, plain[1].target) == ("System: Be brief.\n\nUser: Hi?\n\nAssistant: ", "Hello.")
    assert (plain[2].prompt, plain[2].target) == ("What color is grass?\n\n", "green")
    templated = training_examples(task, target="output", tokenizer=chat_tok)
    assert templated[0].prompt == f"<|im_start|>user\n{ARC['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    assert templated[1].prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert templated[1].target == "Hello."


def test_text_targets_match_text_scoring_exactly(chat_tok):
    task = task_of(ARC, BOOLQ, PIQA, WINO, EXPLICIT)
    examples = training_examples(task, target="text", tokenizer=chat_tok)  # tokenizer unused here
    items = multiple_choice_items(task, scoring="text")
    for example, item in zip(examples, items):
        assert example.prompt == item.contexts[item.gold]
        assert example.target == item.continuations[item.gold]
    assert examples[0].target == " carbon dioxide"
    assert (examples[3].prompt, examples[3].target) == (
        "Sarah was a better surgeon than Maria so Sarah", " always got the harder cases.",
    )
    assert examples[0].prompt == text_prompt("Which gas do plants take in?", DEFAULT_TEMPLATE)


# ---- tokenising and collating -------------------------------------------------------------


def test_tokenize_masks_exactly_the_prompt(chat_tok):
    example = TrainingExample("t", "Question: Which gas do plants take in?\nAnswer:", " carbon dioxide")
    out = tokenize_example(example, chat_tok, max_length=512)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    prompt_ids = ids(chat_tok, example.prompt)
    whole = ids(chat_tok, example.prompt + example.target)
    eos = chat_tok.eos_token_id
    assert out["input_ids"] == whole + [eos]
    assert out["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    supervised = out["labels"][len(prompt_ids):]
    assert -100 not in supervised and supervised == whole[len(prompt_ids):] + [eos]
    assert chat_tok.decode(supervised) == " carbon dioxide<|im_end|>"
    assert out["attention_mask"] == [1] * len(whole + [eos])
    assert not out.truncated and out.task == "t"


def test_tokenize_agrees_with_scoring_encode_pair(chat_tok):
    for example in training_examples(task_of(ARC, PIQA, WINO), target="text"):
        context_ids, continuation_ids = encode_pair(chat_tok, example.prompt, example.target, add_bos_token=False)
        out = tokenize_example(example, chat_tok, max_length=512)
        assert out["input_ids"] == context_ids + continuation_ids + [chat_tok.eos_token_id]
        assert out["labels"].count(-100) == len(context_ids)


def test_tokenize_chat_prompt(chat_tok):
    (example,) = training_examples(task_of(BOOLQ), target="output", tokenizer=chat_tok)
    out = tokenize_example(example, chat_tok, max_length=512)
    n_prompt = out["labels"].count(-100)
    assert chat_tok.decode(out["input_ids"][:n_prompt]) == example.prompt
    assert chat_tok.decode(out["input_ids"][n_prompt:]) == "the correct answer is true<|im_end|>"


def test_tokenize_truncates_prompt_from_the_left_then_target(chat_tok):
    example = TrainingExample("t", "Please choose the correct answer to the question: " * 4, " carbon dioxide", "f:1")
    full = tokenize_example(example, chat_tok, max_length=10_000)
    n_target = len(full["labels"]) - full["labels"].count(-100)  # target + EOS
    cut = tokenize_example(example, chat_tok, max_length=n_target + 3)
    assert cut.truncated and len(cut["input_ids"]) == n_target + 3
    assert cut["input_ids"] == full["input_ids"][-(n_target + 3):]  # the prompt's end is kept
    assert cut["labels"] == [-100] * 3 + full["labels"][-n_target:]
    tiny = tokenize_example(example, chat_tok, max_length=2)
    assert tiny.truncated and tiny["labels"] == full["labels"][-n_target:][:2]
    assert tiny["input_ids"] == tiny["labels"]
    batch = tokenize_examples([example, TrainingExample("t", "Q:", " a")], chat_tok, max_length=n_target + 3)
    assert batch.truncated == 1 and len(batch) == 2 and batch.truncated_sources == ["f:1"]
    assert batch.summary() == "1 of 2 examples truncated to fit max_length"


def test_tokenizer_without_eos_is_refused(chat_tok):
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_example(TrainingExample("t", "a", "b"), tok, 16)


def test_collate_right_pads():
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="pad_token"):
        collate(batch, pad_token_id=None)


# ---- mixing and splitting -----------------------------------------------------------------


PER_TASK = {"big": list(range(10)), "small": ["a", "b"], "mid": [1.5, 2.5, 3.5, 4.5]}


def test_mix_proportional_uses_every_example_once_and_is_seeded():
    stream = mix_tasks(PER_TASK, mode="proportional", seed=3)
    assert sorted(stream, key=repr) == sorted([(n, e) for n, xs in PER_TASK.items() for e in xs], key=repr)
    assert stream == mix_tasks(dict(reversed(PER_TASK.items())), mode="proportional", seed=3)
    assert stream != mix_tasks(PER_TASK, mode="proportional", seed=4)
    sized = mix_tasks(PER_TASK, mode="proportional", seed=0, size=32)
    assert len(sized) == 32 and Counter(n for n, _ in sized) == {"big": 20, "mid": 8, "small": 4}  # two passes


def test_mix_uniform_balances_tasks():
    stream = mix_tasks(PER_TASK, mode="uniform", seed=1)
    counts = Counter(n for n, _ in stream)
    assert counts == {"big": 10, "small": 10, "mid": 10}
    assert Counter(e for n, e in stream if n == "small") == {"a": 5, "b": 5}
    assert set(e for n, e in stream if n == "big") == set(range(10))
    assert stream == mix_tasks(PER_TASK, mode="uniform", seed=1)
    sized = mix_tasks(PER_TASK, mode="uniform", seed=1, size=7)
    assert Counter(n for n, _ in sized) == {"big": 3, "mid": 2, "small": 2}
    with pytest.raises(ValueError, match="mode"):
        mix_tasks(PER_TASK, mode="temperature")
    with pytest.raises(ValueError, match="empty"):
        mix_tasks({"x": []})


def test_split_records_is_seeded_and_disjoint():
    task = task_of(*[dict(ARC, answer="answer2", output="the correct answer is answer2", id=k) for k in range(20)])
    train, evals = split_records(task, eval_fraction=0.25, seed=7)
    assert len(train) == 15 and len(evals) == 5
    assert train.name == evals.name == task.name
    train_ids = {r.data["id"] for r in train}
    eval_ids = {r.data["id"] for r in evals}
    assert not train_ids & eval_ids and train_ids | eval_ids == set(range(20))
    assert [r.line for r in train.records] == sorted(r.line for r in train.records)
    again = split_records(task, eval_fraction=0.25, seed=7)[1]
    assert [r.data["id"] for r in again] == [r.data["id"] for r in evals]
    other = split_records(task, eval_fraction=0.25, seed=8)[1]
    assert {r.data["id"] for r in other} != eval_ids
    assert len(split_records(task, eval_size=3)[1]) == 3
    with pytest.raises(ValueError, match="exactly one"):
        split_records(task)
    with pytest.raises(ValueError, match="eval_size"):
        split_records(task, eval_size=20)


# ---- the real SmolLM2 tokenizer, when a converted model is cached -------------------------


def _cached_tokenizer_folder() -> Path | None:
    cache = Path(os.environ.get("MOR_CACHE", Path.home() / ".cache" / "mor"))
    found = sorted(cache.glob("*/tokenizer.json")) if cache.is_dir() else []
    return found[0].parent if found else None


@pytest.mark.skipif(_cached_tokenizer_folder() is None, reason="no converted model in the mor cache")
def test_real_tokenizer_boundaries():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_cached_tokenizer_folder())
    task = task_of(ARC, BOOLQ, PIQA, WINO)
    for example in training_examples(task, target="text") + training_examples(task, target="output", tokenizer=tok):
        out = tokenize_example(example, tok, max_length=512)
        n_prompt = out["labels"].count(-100)
        assert tok.decode(out["input_ids"][:n_prompt]) == example.prompt
        assert tok.decode(out["input_ids"][n_prompt:-1]) == example.target
        assert out["input_ids"][-1] == tok.eos_token_id


class MergingTokenizer:
    """A fake tokenizer whose encoding of "ab" is one token, unlike "a" + "b"."""

    eos_token_id = 0
    vocab = {"ab": 9, "a": 1, "b": 2, "c": 3}

    bos_token_id = None

    def decode(self, token_id):
        return "<eos>"

    def encode(self, text, add_special_tokens=False):
        return self(text, add_special_tokens)["input_ids"]

    def __call__(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            piece = text[i : i + 2] if text[i : i + 2] in self.vocab else text[i]
            out.append(self.vocab[piece])
            i += len(piece)
        return {"input_ids": out}


def test_tokenize_boundary_merge_never_supervises_prompt_text():
    out = tokenize_example(TrainingExample("t", "ca", "bc"), MergingTokenizer(), max_length=16)
    # "cabc" would be [c, ab, c]: the prompt's own ids [c, a] are kept whole and the target
    # is encoded alone, so the loss covers exactly "bc" + EOS
    assert out["input_ids"] == [3, 1, 2, 3, 0]
    assert out["labels"] == [-100, -100, 2, 3, 0]
    assert encode_pair(MergingTokenizer(), "ca", "bc", add_bos_token=False) == ([3, 1], [3])  # lm-eval's split
