"""The whole method on the bundled corpus, in minutes on a laptop CPU (`lime-jax quickstart`).

Trains a SentencePiece model, annotates and caches a slice of the bundled corpus (and its
held-out split), trains a baseline and a LIME model of the quickstart size on the same token
stream, evaluates both on held-out text and prints a table. Every stage reuses what an
earlier run left in the output directory, so a second run only re-trains what is missing.

The table's deterministic columns (no tokens/s, which depends on the machine) go to
`<out>/table.txt`; the README holds the same table between `README_MARK` and the end of its
code block, and CI compares the two (`--check-readme`).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

QUICKSTART_VOCAB = 4096  # ModelConfig.vocab_size in gin/models/quickstart.gin
ARMS = {
    # arm name -> extra gin bindings on top of gin/runs/quickstart.gin (a LIME run)
    "baseline": ["ModelConfig.metadata = ()"],
    "lime": [],
}
TABLE_NAME = "table.txt"
README_MARK = "<!-- quickstart table"
# How far a fresh run may stray from the README's figures. On one machine a rerun reproduces
# them digit for digit; the slack is for float sums that another CPU rounds differently.
TOLERANCE = {"val loss": 0.002, "val acc": 0.002}
PPL_REL_TOLERANCE = 0.003


def _build_caches(out: str, *, train_docs: int, heldout_docs: int, spm_docs: int, workers: int) -> dict[str, str]:
    from lime_jax import corpus
    from lime_jax.annotation import local_runner as annotate
    from lime_jax.annotation import spm
    from lime_jax.annotation.worker import ProcessorSpec

    os.makedirs(out, exist_ok=True)
    spm_model = os.path.join(out, "spm.model")
    if not os.path.exists(spm_model):
        print(f"[1/4] training SentencePiece ({QUICKSTART_VOCAB} pieces) on the bundled corpus", flush=True)
        texts = (t for i, (_, t) in zip(range(spm_docs), corpus.iter_documents(corpus.BUNDLED["train"])))
        spm.train_spm(texts, spm_model[: -len(".model")], QUICKSTART_VOCAB)
    caches = {}
    for split, max_docs in (("train", train_docs), ("heldout", heldout_docs)):
        cache = os.path.join(out, "cache", f"sotu_{split}")
        print(f"[2/4] annotating {max_docs} documents of bundled:{split} -> {cache}", flush=True)
        manifest = annotate.annotate_corpus([f"bundled:{split}"], cache, ProcessorSpec(spm_model), workers=workers,
                                            max_docs=max_docs)
        print(f"      {manifest['counts']['records']} documents, {manifest['counts']['pieces']} pieces", flush=True)
        # Absolute: each run's config.gin names its caches, and eval/generate run from anywhere.
        caches[split] = os.path.abspath(cache)
    return caches


def _train_arms(out: str, caches: dict[str, str], arms: Sequence[str], steps: int | None) -> dict[str, dict]:
    from lime_jax.trainer import train

    results = {}
    for arm in arms:
        model_dir = os.path.join(out, arm)
        print(f"[3/4] training {arm} -> {model_dir}", flush=True)
        bindings = [
            f"MODEL_DIR = '{model_dir}'",
            f"CACHE_DIR = '{caches['train']}'",
            f"EVAL_CACHE_DIR = '{caches['heldout']}'",
            *ARMS[arm],
            *([f"TRAIN_STEPS = {steps}"] if steps else []),
        ]
        results[arm] = train.train(["runs/quickstart.gin"], bindings)
    return results


def quickstart(out: str, *, train_docs: int = 3000, heldout_docs: int = 200, spm_docs: int = 6000,
               workers: int = 2, steps: int | None = None, arms: Sequence[str] = tuple(ARMS)) -> dict[str, dict]:
    """Runs every stage into `out`; returns each arm's training summary (`train.run`).

    Writes `<out>/summary.json` and the deterministic table to `<out>/table.txt`.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    caches = _build_caches(out, train_docs=train_docs, heldout_docs=heldout_docs, spm_docs=spm_docs,
                           workers=workers)
    results = _train_arms(out, caches, arms, steps)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, TABLE_NAME), "w", encoding="utf-8") as f:
        f.write(format_table(results) + "\n")
    return results


# ----------------------------------------------------------------------------- the table


def format_table(results: dict[str, dict], speed: bool = False) -> str:
    """The held-out table; `speed` adds the machine-dependent tokens/s column."""
    header = f"{'run':<10} {'val loss':>9} {'val acc':>8} {'val ppl':>9}" + (f" {'tokens/s':>9}" if speed else "") \
        + f" {'steps':>6}"
    lines = [header, "-" * len(header)]
    for arm, s in results.items():
        lines.append(f"{arm:<10} {s['eval_loss']:>9.4f} {s['eval_accuracy']:>8.4f} {s['eval_perplexity']:>9.2f}"
                     + (f" {s['tokens_per_s'] or 0:>9.0f}" if speed else "") + f" {s['step']:>6d}")
    return "\n".join(lines)


def parse_table(text: str, source: str) -> dict[str, dict[str, float]]:
    """`format_table` text (without tokens/s) -> {run: {column: value}}; `source` names it in errors."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    columns = re.split(r"\s{2,}", lines[0].strip()) if lines else []
    if columns != ["run", "val loss", "val acc", "val ppl", "steps"] or len(lines) < 3:
        raise ValueError(f"{source}: not a quickstart table (header {columns}, {len(lines)} lines)")
    rows = {}
    for ln in lines[2:]:
        arm, *values = ln.split()
        try:
            rows[arm] = dict(zip(columns[1:], map(float, values), strict=True))
        except ValueError:
            raise ValueError(f"{source}: bad table row {ln!r}") from None
    return rows


def readme_table(readme: str, source: str) -> str:
    """The table in the code block that follows `README_MARK` in the README's text."""
    start = readme.find(README_MARK)
    fence = readme.find("```", start)
    end = readme.find("```", fence + 3)
    if start < 0 or fence < 0 or end < 0:
        raise ValueError(f"{source}: no {README_MARK!r} line followed by a ``` code block")
    return readme[readme.index("\n", fence) + 1:end].rstrip("\n")


def replace_readme_table(readme: str, table: str, source: str) -> str:
    old = readme_table(readme, source)
    start = readme.index(old, readme.find(README_MARK))
    return readme[:start] + table + readme[start + len(old):]


def table_differences(expected: str, actual: str, expected_source: str, actual_source: str) -> list[str]:
    """Where `actual` strays from `expected` past `TOLERANCE`; empty when they agree."""
    want, got = parse_table(expected, expected_source), parse_table(actual, actual_source)
    if list(want) != list(got):
        return [f"runs {list(want)} in {expected_source}, {list(got)} in {actual_source}"]
    out = []
    for arm, row in want.items():
        for col, w in row.items():
            g = got[arm][col]
            ok = (math.isclose(g, w, rel_tol=PPL_REL_TOLERANCE) if col == "val ppl" else
                  abs(g - w) <= TOLERANCE[col] if col in TOLERANCE else g == w)
            if not ok:
                out.append(f"{arm} {col}: {w:g} in {expected_source}, {g:g} in {actual_source}")
    return out
