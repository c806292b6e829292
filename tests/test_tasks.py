"""Tests of the built-in synthetic task suite (no model needed)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mor.data.builtin import (
    SENTIMENT_WORDS,
    TASK_LABELS,
    TASK_NAMES,
    builtin_suite,
    write_builtin_suite,
)

REQUIRED = {"instruction", "input", "output", "answer", "choices"}


@pytest.fixture(scope="module")
def suite():
    return builtin_suite(seed=0, train_size=120, eval_size=40)


def _format_labels(instruction: str) -> list[str]:
    m = re.search(r"Answer format:\s*(\S+)\s*$", instruction)
    assert m, f"no 'Answer format:' line at the end of {instruction!r}"
    return m.group(1).split("/")


def test_at_least_four_tasks_with_distinct_answer_formats(suite):
    assert len(TASK_NAMES) >= 4
    assert set(suite) == set(TASK_NAMES)
    formats = {tuple(_format_labels(s["train"][0]["instruction"])) for s in suite.values()}
    assert len(formats) == len(TASK_NAMES)


def test_sizes(suite):
    for task, splits in suite.items():
        assert len(splits["train"]) == 120, task
        assert len(splits["eval"]) == 40, task


def test_records_are_well_formed(suite):
    for task, splits in suite.items():
        for split, records in splits.items():
            for r in records:
                assert set(r) >= REQUIRED, (task, split, r)
                assert r["input"] == ""
                assert isinstance(r["choices"], list) and len(r["choices"]) >= 2
                assert len(set(r["choices"])) == len(r["choices"])
                assert r["answer"] in r["choices"]
                assert _format_labels(r["instruction"]) == r["choices"]
                assert r["output"] == f"the correct answer is {r['answer']}"
                assert list(r["choices"]) == list(TASK_LABELS[task])
                assert "\n\nAnswer format: " in r["instruction"]


def test_records_are_short(suite):
    # Records must stay short so a default run fits in minutes on a CPU.
    for splits in suite.values():
        for r in splits["train"] + splits["eval"]:
            assert len(r["instruction"].split()) <= 30, r["instruction"]


def test_deterministic_for_a_seed():
    a = builtin_suite(seed=3, train_size=50, eval_size=20)
    b = builtin_suite(seed=3, train_size=50, eval_size=20)
    assert a == b


def test_different_seeds_differ():
    a = builtin_suite(seed=0, train_size=50, eval_size=20)
    b = builtin_suite(seed=1, train_size=50, eval_size=20)
    for task in TASK_NAMES:
        assert a[task] != b[task], task


def test_task_subset_does_not_change_records():
    full = builtin_suite(seed=5, train_size=30, eval_size=10)
    one = builtin_suite(seed=5, train_size=30, eval_size=10, tasks=["compare"])
    assert list(one) == ["compare"]
    assert one["compare"] == full["compare"]


def test_unknown_task_rejected():
    with pytest.raises(ValueError, match="unknown"):
        builtin_suite(tasks=["nope"])


def test_train_and_eval_inputs_are_disjoint(suite):
    for task, splits in suite.items():
        train = {r["instruction"] for r in splits["train"]}
        evals = [r["instruction"] for r in splits["eval"]]
        assert len(set(evals)) == len(evals), f"{task}: duplicate eval inputs"
        assert len(train) == len(splits["train"]), f"{task}: duplicate train inputs"
        assert not train & set(evals), f"{task}: eval inputs leak into train"


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("\n\n")[0]))


def test_rule_tasks_hold_out_their_inputs(suite):
    # parity: no eval number in train; compare: no eval pair in train, in either order.
    train_n = {_numbers(r["instruction"]) for r in suite["parity"]["train"]}
    assert not {_numbers(r["instruction"]) for r in suite["parity"]["eval"]} & train_n
    pairs = lambda rs: {frozenset(_numbers(r["instruction"])) for r in rs}  # noqa: E731
    assert not pairs(suite["compare"]["train"]) & pairs(suite["compare"]["eval"])
    # kind: eval words are new words (not only new sentences).
    word = lambda r: re.search(r"is a (\w+) an animal", r["instruction"]).group(1)  # noqa: E731
    assert not {word(r) for r in suite["kind"]["train"]} & {word(r) for r in suite["kind"]["eval"]}


def test_answers_are_correct_for_rule_tasks(suite):
    for r in suite["parity"]["train"] + suite["parity"]["eval"]:
        (n,) = _numbers(r["instruction"])
        assert r["answer"] == ("even" if n % 2 == 0 else "odd")
    for r in suite["compare"]["train"] + suite["compare"]["eval"]:
        a, b = _numbers(r["instruction"])
        assert a != b
        assert r["answer"] == ("first" if a > b else "second")
    suffix = {"rix": "animal", "mora": "plant", "tunk": "tool"}
    for r in suite["kind"]["train"] + suite["kind"]["eval"]:
        w = re.search(r"is a (\w+) an animal", r["instruction"]).group(1)
        assert r["answer"] == next(v for k, v in suffix.items() if w.endswith(k))


def test_invented_lexicons_are_consistent(suite):
    # Each made-up word always gets the same label, across train and eval.
    seen: dict[str, str] = {}
    for r in suite["colour"]["train"] + suite["colour"]["eval"]:
        obj = re.search(r"What colour is (?:a|the) (\w+)\?", r["instruction"]).group(1)
        assert seen.setdefault(obj, r["answer"]) == r["answer"]
    seen = {}
    for r in suite["sentiment"]["train"] + suite["sentiment"]["eval"]:
        words = [w for w in SENTIMENT_WORDS if re.search(rf"\b{w}\b", r["instruction"])]
        assert len(words) == 1
        assert seen.setdefault(words[0], r["answer"]) == r["answer"]


def test_labels_not_degenerate(suite):
    for task, splits in suite.items():
        for split, records in splits.items():
            counts = Counter(r["answer"] for r in records)
            assert set(counts) == set(TASK_LABELS[task]), (task, split, counts)
            # balanced to within one
            assert max(counts.values()) - min(counts.values()) <= 1, (task, split, counts)


def test_write_builtin_suite_round_trip(tmp_path):
    paths = write_builtin_suite(tmp_path, seed=2, train_size=30, eval_size=12)
    assert len(paths) == 2 * len(TASK_NAMES)
    expected = builtin_suite(seed=2, train_size=30, eval_size=12)
    for task in TASK_NAMES:
        train = json.loads((tmp_path / task / "train.json").read_text(encoding="utf-8"))
        test = json.loads((tmp_path / task / "test.json").read_text(encoding="utf-8"))
        assert isinstance(train, list) and isinstance(test, list)
        assert train == expected[task]["train"]
        assert test == expected[task]["eval"]
        assert tmp_path / task / "train.json" in paths
        assert tmp_path / task / "test.json" in paths


def test_too_many_records_is_a_clear_error():
    with pytest.raises(ValueError):
        builtin_suite(train_size=10**6, eval_size=10, tasks=["colour"])
