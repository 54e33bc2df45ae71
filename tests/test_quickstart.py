"""The README's quickstart table is the quickstart's own output, checked against a real run.

The fast tests pin the README table to `format_table`'s layout and the comparison CI makes;
the slow one runs a small quickstart end to end (CI runs the full one: `.ci/run`)."""
import os
import shutil

import pytest

from lime_jax import quickstart as qs
from lime_jax.cli import quickstart as qs_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def _summaries(table: str) -> dict[str, dict]:
    """Table rows back into the `train` summaries `format_table` reads."""
    return {arm: {"eval_loss": r["val loss"], "eval_accuracy": r["val acc"], "eval_perplexity": r["val ppl"],
                  "step": int(r["steps"]), "tokens_per_s": 4321.0}
            for arm, r in qs.parse_table(table, "table").items()}


@pytest.fixture(scope="module")
def readme_table():
    with open(README, encoding="utf-8") as f:
        return qs.readme_table(f.read(), README)


def test_readme_table_is_the_quickstart_layout(readme_table):
    # Hand edits that drift from what `--update-readme` writes (columns, digits, rows) fail here.
    assert list(qs.parse_table(readme_table, README)) == list(qs.ARMS)
    assert qs.format_table(_summaries(readme_table)) == readme_table
    assert "tokens/s" not in readme_table  # machine-dependent: console only
    assert "4321" in qs.format_table(_summaries(readme_table), speed=True)


def test_table_comparison_flags_stale_figures(readme_table):
    results = _summaries(readme_table)
    assert qs.table_differences(readme_table, qs.format_table(results), "README", "run") == []
    results["lime"]["eval_loss"] += 0.001  # float noise from another CPU: within tolerance
    results["lime"]["eval_perplexity"] *= 1.001
    assert qs.table_differences(readme_table, qs.format_table(results), "README", "run") == []
    results["lime"]["eval_accuracy"] += 0.01
    results["baseline"]["step"] = 300
    diffs = qs.table_differences(readme_table, qs.format_table(results), "README", "run")
    assert len(diffs) == 2 and diffs[0].startswith("baseline steps: 400 in README, 300 in run")
    assert diffs[1].startswith("lime val acc: ")
    del results["baseline"]
    assert qs.table_differences(readme_table, qs.format_table(results), "README", "run") == [
        "runs ['baseline', 'lime'] in README, ['lime'] in run"]


def test_replace_readme_table_touches_only_the_table(readme_table):
    with open(README, encoding="utf-8") as f:
        text = f.read()
    new_table = qs.format_table({"lime": {"eval_loss": 1.0, "eval_accuracy": 0.5, "eval_perplexity": 2.72,
                                          "step": 7, "tokens_per_s": None}})
    updated = qs.replace_readme_table(text, new_table, "README")
    assert qs.readme_table(updated, "README") == new_table
    assert updated.replace(new_table, readme_table) == text
    with pytest.raises(ValueError, match="notes.md: no '<!-- quickstart table' line"):
        qs.readme_table("# notes\n", "notes.md")


@pytest.mark.slow
def test_small_quickstart_writes_its_table_and_checks_a_readme(tmp_path, capsys):
    out = str(tmp_path / "qs")
    small = ["--out", out, "--train-docs", "40", "--heldout-docs", "8", "--spm-docs", "800", "--steps", "4",
             "--workers", "1"]
    readme = str(tmp_path / "README.md")
    shutil.copy(README, readme)
    assert qs_cli.main([*small, "--check-readme", readme]) == 1  # 4 steps, not the README's 400
    assert "the table in " + readme + " is stale" in capsys.readouterr().err
    with open(os.path.join(out, qs.TABLE_NAME), encoding="utf-8") as f:
        table = f.read().rstrip("\n")
    assert [r["steps"] for r in qs.parse_table(table, "table.txt").values()] == [4.0, 4.0]
    # A second run reuses the caches and checkpoints; --update-readme then --check-readme agree.
    assert qs_cli.main([*small, "--update-readme", readme]) == 0
    assert qs_cli.main([*small, "--check-readme", readme]) == 0
    with open(readme, encoding="utf-8") as f:
        assert qs.readme_table(f.read(), readme) == table
