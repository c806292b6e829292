"""Built-in multi-task suite: five small synthetic tasks the project generates itself.

``mor train`` with no ``--data`` trains and evaluates on it. Each task is generated
deterministically from a seed, has train and held-out eval splits with disjoint inputs, and
yields LLM-Adapters records (``{"instruction": "...Answer format: even/odd", "input": "",
"output": "the correct answer is odd", "answer": "odd", "choices": ["even", "odd"]}``) whose
labels are single SmolLM2 tokens. Tasks: ``parity``, ``compare`` (rules on unseen inputs),
``kind`` (a suffix rule on invented words), ``colour``, ``sentiment`` (invented facts).

:func:`builtin_suite` returns the records in memory; :func:`write_builtin_suite` writes
``<folder>/<task>/{train,test}.json`` for the normal loader. Why these tasks, and each one's
skill: docs/evaluation.md, section 4.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable
from ..errors import SettingsError

DEFAULT_SEED = 0
DEFAULT_TRAIN_SIZE = 320
DEFAULT_EVAL_SIZE = 60

TASK_LABELS: dict[str, tuple[str, ...]] = {
    "parity": ("even", "odd"),
    "compare": ("first", "second"),
    "kind": ("animal", "plant", "tool"),
    "colour": ("red", "blue", "green", "yellow"),
    "sentiment": ("positive", "negative"),
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_LABELS)

# Invented lexicons (checked not to be English words). Which label each word gets is drawn
# from the seed, balanced across labels.
COLOUR_OBJECTS = (
    "zorbin", "kelvap", "drumbo", "plinket", "vasquor", "tormish", "blenquin", "frazzet",
    "gropple", "hulvin", "jastrel", "mobrink", "nuvvet", "plorf", "quandle", "snibbet",
)
SENTIMENT_WORDS = (
    "glimsy", "brotty", "zanky", "plurvish", "snorfy", "quenty",
    "dribly", "fomblish", "tezzy", "wumpful", "crindy", "vorpish",
)
KIND_SUFFIXES = {"animal": "rix", "plant": "mora", "tool": "tunk"}

_NAMES = (
    "Anna", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas",
    "Kira", "Liam", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sam", "Tariq", "Vera",
)
_PLACES = (
    "kitchen", "garden", "attic", "garage", "market", "park", "office", "barn", "shop", "cellar",
)
_COLOUR_TEMPLATES = (
    "{name} found a {obj} in the {place}. What colour is the {obj}?",
    "{name} keeps a {obj} in the {place}. What colour is a {obj}?",
)
_REVIEW_NOUNS = (
    "food", "hotel", "movie", "service", "room", "book", "concert", "trip", "game", "coffee",
    "bus", "show", "class", "museum", "pizza", "song", "beach", "phone", "car", "party",
    "bakery", "lecture", "garden", "ferry", "camera", "soup", "festival", "bike", "menu", "tour",
)
_INTENSIFIERS = ("", "very ", "really ", "truly ")
_REVIEW_TEMPLATES = (
    'Review: "The {noun} was {adv}{adj}." Is this review positive or negative?',
    'Review: "What a {adv}{adj} {noun}." Is this review positive or negative?',
    'Review: "I found the {noun} {adv}{adj}." Is this review positive or negative?',
)
_ONSETS = "bdfgklmnpstvz"
_VOWELS = "aeiou"


def _record(question: str, labels: tuple[str, ...], answer: str) -> dict:
    assert answer in labels
    return {
        "instruction": f"{question}\n\nAnswer format: {'/'.join(labels)}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
        "choices": list(labels),
    }


def _balanced_labels(rng: random.Random, labels: tuple[str, ...], n: int) -> list[str]:
    """``n`` labels, as equal in count as possible, in random order."""
    out = [labels[i % len(labels)] for i in range(n)]
    rng.shuffle(out)
    return out


def _assign_lexicon(rng: random.Random, words: tuple[str, ...], labels: tuple[str, ...]) -> dict[str, str]:
    """Balanced random word -> label mapping."""
    shuffled = list(words)
    rng.shuffle(shuffled)
    return {w: labels[i % len(labels)] for i, w in enumerate(shuffled)}


def _draw_unique(
    rng: random.Random,
    labels: tuple[str, ...],
    n: int,
    draw: Callable[[random.Random, str], tuple[object, str]],
    used: set,
    max_tries: int = 200_000,
) -> list[tuple[object, str, str]]:
    """``n`` (key, question, label) triples with balanced labels and keys not in ``used``.

    ``draw(rng, label)`` returns (key, question) for an input whose gold answer is ``label``;
    ``key`` identifies the input for the train/eval disjointness (added to ``used``).
    """
    out = []
    tries = 0
    for label in _balanced_labels(rng, labels, n):
        while True:
            tries += 1
            if tries > max_tries:
                raise SettingsError(f"cannot draw {n} distinct inputs for labels {labels}; ask for fewer")
            key, question = draw(rng, label)
            if key not in used:
                used.add(key)
                out.append((key, question, label))
                break
    return out


def _disjoint_splits(rng: random.Random, labels: tuple[str, ...], train_size: int, eval_size: int,
                     draw: Callable[[random.Random, str], tuple[object, str]]) -> dict[str, list[dict]]:
    """Eval records first, then train records whose inputs (keys) never repeat an eval one."""
    used: set = set()
    return {name: [_record(q, labels, a) for _, q, a in _draw_unique(rng, labels, size, draw, used)]
            for name, size in (("eval", eval_size), ("train", train_size))}


# ---------------------------------------------------------------- the generators
# Each returns {"train": [...], "eval": [...]}; eval is drawn first, train never reuses a key.


def _parity(rng: random.Random, train_size: int, eval_size: int) -> dict[str, list[dict]]:
    labels = TASK_LABELS["parity"]

    def draw(r: random.Random, label: str):
        digits = r.choice((3, 4, 5))
        n = r.randrange(10 ** (digits - 1), 10**digits)
        if (n % 2 == 0) != (label == "even"):
            n += 1 if n + 1 < 10**digits else -1
        return n, f"Please answer with even or odd: is the number {n} even or odd?"

    return _disjoint_splits(rng, labels, train_size, eval_size, draw)


def _compare(rng: random.Random, train_size: int, eval_size: int) -> dict[str, list[dict]]:
    labels = TASK_LABELS["compare"]

    def draw(r: random.Random, label: str):
        a, b = r.sample(range(100, 1000), 2)
        if r.random() < 0.5:  # half the pairs share the leading digit: a real comparison
            b = (a // 100) * 100 + r.choice([x for x in range(100) if x != a % 100])
        lo, hi = min(a, b), max(a, b)
        first, second = (hi, lo) if label == "first" else (lo, hi)
        return (lo, hi), f"Which number is larger, the first or the second: {first} or {second}?"

    return _disjoint_splits(rng, labels, train_size, eval_size, draw)


def _kind(rng: random.Random, train_size: int, eval_size: int) -> dict[str, list[dict]]:
    labels = TASK_LABELS["kind"]

    def stem(r: random.Random) -> str:
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(2))

    def draw(r: random.Random, label: str):
        word = stem(r) + KIND_SUFFIXES[label]
        return word, f"In the Zarn language, is a {word} an animal, a plant or a tool?"

    # Disjoint by word *stem*, so no eval word shares its stem with a train word.
    used_stems: set = set()
    split = {}
    for name, size in (("eval", eval_size), ("train", train_size)):
        recs = []
        for label in _balanced_labels(rng, labels, size):
            for _ in range(100_000):
                key, q = draw(rng, label)
                s = key[: -len(KIND_SUFFIXES[label])]
                if s not in used_stems:
                    used_stems.add(s)
                    recs.append(_record(q, labels, label))
                    break
            else:
                raise SettingsError("cannot draw enough distinct Zarn words; ask for fewer")
        split[name] = recs
    return split


def _colour(rng: random.Random, train_size: int, eval_size: int) -> dict[str, list[dict]]:
    labels = TASK_LABELS["colour"]
    lexicon = _assign_lexicon(rng, COLOUR_OBJECTS, labels)
    by_label = {lab: sorted(w for w, l in lexicon.items() if l == lab) for lab in labels}

    def draw(r: random.Random, label: str):
        q = r.choice(_COLOUR_TEMPLATES).format(name=r.choice(_NAMES), obj=r.choice(by_label[label]), place=r.choice(_PLACES))
        return q, q

    return _disjoint_splits(rng, labels, train_size, eval_size, draw)


def _sentiment(rng: random.Random, train_size: int, eval_size: int) -> dict[str, list[dict]]:
    labels = TASK_LABELS["sentiment"]
    lexicon = _assign_lexicon(rng, SENTIMENT_WORDS, labels)
    by_label = {lab: sorted(w for w, l in lexicon.items() if l == lab) for lab in labels}

    def draw(r: random.Random, label: str):
        q = r.choice(_REVIEW_TEMPLATES).format(noun=r.choice(_REVIEW_NOUNS), adv=r.choice(_INTENSIFIERS), adj=r.choice(by_label[label]))
        return q, q

    return _disjoint_splits(rng, labels, train_size, eval_size, draw)


_GENERATORS = {
    "parity": _parity,
    "compare": _compare,
    "kind": _kind,
    "colour": _colour,
    "sentiment": _sentiment,
}
assert tuple(_GENERATORS) == TASK_NAMES


def builtin_suite(
    seed: int = DEFAULT_SEED,
    train_size: int = DEFAULT_TRAIN_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    tasks: list[str] | tuple[str, ...] | None = None,
) -> dict[str, dict[str, list[dict]]]:
    """Generate the suite: ``{task: {"train": [records], "eval": [records]}}``.

    Deterministic for ``seed``; each task uses its own random stream, so the records of one
    task do not depend on which other tasks are asked for. ``train_size`` and ``eval_size``
    are per task. The inputs of eval records never occur in the task's train records.
    """
    if train_size < 0 or eval_size < 0:
        raise SettingsError("train_size and eval_size must be >= 0")
    names = TASK_NAMES if tasks is None else tuple(tasks)
    unknown = [t for t in names if t not in _GENERATORS]
    if unknown:
        raise SettingsError(f"unknown built-in task(s) {unknown}; known: {', '.join(TASK_NAMES)}")
    suite = {}
    for name in names:
        rng = random.Random(f"mor-builtin:{seed}:{name}")  # str seeds are stable across runs
        suite[name] = _GENERATORS[name](rng, train_size, eval_size)
    return suite


def write_builtin_suite(
    folder: str | Path,
    seed: int = DEFAULT_SEED,
    train_size: int = DEFAULT_TRAIN_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    tasks: list[str] | tuple[str, ...] | None = None,
) -> list[Path]:
    """Write ``folder/<task>/train.json`` and ``folder/<task>/test.json`` (eval split) as JSON
    lists in the commonsense-data format; return the written paths (train, test per task)."""
    folder = Path(folder)
    written = []
    for name, splits in builtin_suite(seed, train_size, eval_size, tasks).items():
        task_dir = folder / name
        task_dir.mkdir(parents=True, exist_ok=True)
        for split, filename in (("train", "train.json"), ("eval", "test.json")):
            path = task_dir / filename
            path.write_text(json.dumps(splits[split], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written
