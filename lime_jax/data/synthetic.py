"""Deterministic evaluation generators: addition and templated reasoning with distractors.

Plain Python (no numpy/jax/tf): the same seed gives the same examples on every machine.
Each example is a dict with `prompt` (ends with "\\nA:"), `answer` (starts with a space),
`text` = prompt + answer, and fields describing it. Reasoning examples add `choices` (the
answer among distractor answers) for log-likelihood scoring.
"""
from __future__ import annotations

import random

NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Karen", "Liam", "Maria", "Nathan", "Olivia", "Peter")
OBJECTS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")
ADJECTIVES = (("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"),
              ("stronger", "strongest"))
PLACES = ("the park", "the library", "the market", "the station", "the museum")


def count_carries(a: int, b: int) -> int:
    carries, carry = 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        carries += carry
        a, b = a // 10, b // 10
    return carries


def addition_examples(n: int, seed: int = 0, max_digits: int = 3) -> list[dict]:
    """`n` problems `"Q: What is A + B?\\nA:"` -> `" A+B"`; digit counts 1..max_digits cycle.

    Operands of each digit count are drawn uniformly, so carries follow their natural rate;
    the number of carries is recorded for per-carry accuracy.
    """
    if n < 0 or max_digits < 1:
        raise ValueError(f"need n >= 0 and max_digits >= 1, got {n}, {max_digits}")
    rng = random.Random(f"addition:{seed}")
    out = []
    for i in range(n):
        digits = 1 + i % max_digits
        lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        prompt = f"Q: What is {a} + {b}?\nA:"
        answer = f" {a + b}"
        out.append({"id": f"addition-{seed}-{i}", "prompt": prompt, "answer": answer,
                    "text": prompt + answer, "digits": digits, "carries": count_carries(a, b)})
    return out


def _comparison(rng: random.Random) -> tuple[str, str, str, list[str]]:
    a, b, c, d = rng.sample(NAMES, 4)
    comparative, superlative = rng.choice(ADJECTIVES)
    facts = [f"{a} is {comparative} than {b}.", f"{b} is {comparative} than {c}."]
    rng.shuffle(facts)
    distractor = f"{d} went to {rng.choice(PLACES)}."
    facts.insert(rng.randint(0, 2), distractor)
    question = f"Who is the {superlative} of {', '.join(sorted([a, b, c]))}?"
    return " ".join(facts), question, f" {a}", [f" {a}", f" {b}", f" {c}", f" {d}"]


def _transfer(rng: random.Random) -> tuple[str, str, str, list[str]]:
    a, b, c = rng.sample(NAMES, 3)
    obj, other = rng.sample(OBJECTS, 2)
    start, given, distract = rng.randint(5, 12), rng.randint(1, 4), rng.randint(2, 9)
    facts = [f"{a} has {start} {obj}.", f"{c} has {distract} {other}.",
             f"{a} gives {given} {obj} to {b}."]
    answer = start - given
    wrong = {start, start + given, distract, given} - {answer}
    choices = [f" {answer}"] + [f" {w}" for w in sorted(wrong)]
    return " ".join(facts), f"How many {obj} does {a} have now?", f" {answer}", choices


def reasoning_examples(n: int, seed: int = 0) -> list[dict]:
    """`n` short stories with one distractor fact and a question; templates alternate."""
    if n < 0:
        raise ValueError(f"need n >= 0, got {n}")
    rng = random.Random(f"reasoning:{seed}")
    templates = (("comparison", _comparison), ("transfer", _transfer))
    out = []
    for i in range(n):
        kind, make = templates[i % len(templates)]
        story, question, answer, choices = make(rng)
        rng.shuffle(choices)
        prompt = f"Q: {story} {question}\nA:"
        out.append({"id": f"reasoning-{seed}-{i}", "prompt": prompt, "answer": answer,
                    "text": prompt + answer, "template": kind, "choices": choices})
    return out
