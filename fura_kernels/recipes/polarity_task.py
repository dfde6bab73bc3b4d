"""A sentence-polarity task written for this project: negation, contrast, and unseen words.

Each sentence is one or two clauses about a thing ("the battery was not reliable"); a clause's
polarity is its adjective's, flipped by a negation ("not", "never", "far from", "hardly", ...).
In a two-clause sentence the main clause decides: the one after "but", the one after
"although ...,", the one before "even though"; "it is not true that" flips a clause. The label
is the sentence's polarity (1 positive, 0 negative).

The adjectives are split three ways: training sentences use one set, validation sentences a
second and test sentences a third, so the held-out splits ask a model to carry the rules over to
words it has only seen in pretraining. Off-the-shelf sentence embeddings with a trained linear
head get about 60% of them.

Everything is drawn from a fixed seed (`DATA_SEED`) on every call, so every method, seed and
machine sees the same sentences; `task_fingerprint` hashes them for the results file.
"""

from __future__ import annotations

import hashlib
import json
import random

DATA_SEED = 20261127

SUBJECTS = (
    "the food", "the service", "the staff", "the room", "the movie", "the plot", "the acting", "the battery",
    "the screen", "the camera", "the delivery", "the coffee", "the music", "the hotel", "the seats", "the app",
    "the book", "the ending", "the support team", "the instructions", "the keyboard", "the design", "the view",
    "the soup", "the flight", "the driver", "the lecture", "the game", "the concert", "the bakery",
)  # fmt: skip
POSITIVE = (
    "good", "great", "excellent", "wonderful", "fantastic", "delightful", "pleasant", "superb", "lovely",
    "impressive", "brilliant", "enjoyable", "outstanding", "marvelous", "terrific", "charming", "splendid",
    "remarkable", "satisfying", "amazing", "admirable", "fabulous", "exceptional", "magnificent",
)  # fmt: skip
NEGATIVE = (
    "bad", "terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "mediocre", "unpleasant",
    "lousy", "atrocious", "dismal", "pathetic", "miserable", "abysmal", "subpar", "frustrating", "annoying",
    "boring", "appalling", "inferior", "unbearable", "shoddy", "horrendous",
)  # fmt: skip
# Adjectives per split and polarity: train, validation, test (disjoint; 14 + 4 + 6 = 24).
SPLIT_SIZES = {"train": 14, "validation": 4, "test": 6}
AFFIRMED = ("{s} was {a}", "{s} was really {a}", "{s} was truly {a}", "I found {s} {a}", "everyone agreed {s} was {a}")
NEGATED = (
    "{s} was not {a}", "{s} was never {a}", "{s} was far from {a}", "{s} was hardly {a}", "{s} wasn't {a}",
    "nobody would call {s} {a}", "I would not say {s} was {a}",
)  # fmt: skip


def adjective_splits() -> dict[str, dict[int, tuple[str, ...]]]:
    """`{split: {1: positive adjectives, 0: negative adjectives}}`, disjoint across splits."""
    rng = random.Random(DATA_SEED)
    pos, neg = list(POSITIVE), list(NEGATIVE)
    rng.shuffle(pos)
    rng.shuffle(neg)
    out, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        out[split] = {1: tuple(pos[start : start + size]), 0: tuple(neg[start : start + size])}
        start += size
    return out


def _clause(rng: random.Random, adjectives: dict[int, tuple[str, ...]]) -> tuple[str, int]:
    polarity = rng.randint(0, 1)
    negated = rng.random() < 0.5
    template = rng.choice(NEGATED if negated else AFFIRMED)
    text = template.format(s=rng.choice(SUBJECTS), a=rng.choice(adjectives[polarity]))
    return text, polarity ^ int(negated)


def _sentence(rng: random.Random, adjectives: dict[int, tuple[str, ...]]) -> dict:
    main, label = _clause(rng, adjectives)
    other, _ = _clause(rng, adjectives)
    form = rng.random()
    if form < 0.25:
        text = main
    elif form < 0.45:
        text = f"{other}, but {main}"
    elif form < 0.65:
        text = f"although {other}, {main}"
    elif form < 0.85:  # the main clause first: "the last clause decides" does not hold
        text = f"{main}, even though {other}"
    else:
        text, label = f"it is not true that {main}", 1 - label
    return {"text": text[0].upper() + text[1:] + ".", "label": label}


def make_splits(sizes: dict[str, int]) -> dict[str, list[dict]]:
    """`{split: [{"text", "label"}, ...]}` with `sizes[split]` sentences each, classes balanced
    (each split is drawn until it holds `size // 2` of each label)."""
    adjectives = adjective_splits()
    out = {}
    for index, (split, size) in enumerate(sizes.items()):
        rng = random.Random(DATA_SEED * 10 + index)
        want = {0: size // 2, 1: size - size // 2}
        items: list[dict] = []
        seen: set[str] = set()
        while len(items) < size:
            item = _sentence(rng, adjectives[split])
            if want[item["label"]] and item["text"] not in seen:
                want[item["label"]] -= 1
                seen.add(item["text"])
                items.append(item)
        out[split] = items
    return out


def task_fingerprint(splits: dict[str, list[dict]]) -> str:
    """sha256 of the splits' sentences and labels."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
