"""The wheel `pip install` builds carries what a run needs outside a source checkout, and the
sources cite no document outside the repo."""
import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_ships_gin_configs_and_bundled_corpus(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
                   check=True, capture_output=True)
    (wheel,) = glob.glob(str(tmp_path / "lime_jax-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    gin_files = {os.path.relpath(p, os.path.join(REPO, "gin"))
                 for p in glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True)}
    assert gin_files and {f"lime_jax/gin/{f}" for f in gin_files} <= names  # train.GIN_DIR in a wheel
    assert {"lime_jax/corpus/sotu_train.jsonl.xz", "lime_jax/corpus/sotu_heldout.jsonl.xz",
            "tasks/synthetic.py", "lime_jax/model/embed.py"} <= names
    sources = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "lime_jax", "**", "*.py"),
                                                               recursive=True)}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"


# Text the repo's code and docs are written in; run outputs and environments are skipped.
_TEXT_SUFFIXES = (".py", ".md", ".toml", ".gin", ".cfg", ".txt", ".sh")
_NOT_SOURCES = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
                "work_dir", "out", ".gl"}  # as .gitignore
# A cited document (.md): a path that climbs with ../, one under docs/, or a bare capitalised name.
_DOC_REF = re.compile(r"(?<![\w/.-])((?:\.\./)+(?:[\w.-]+/)*[\w.-]+\.md|docs/[\w-]+\.md|[A-Z][A-Z0-9_]*\.md)\b")
_CLIMBING_REF = re.compile(r"(?<![\w/.])((?:\.\./)+[\w./-]*)")  # a path that starts with ../


def _repo_text_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _NOT_SOURCES and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(_TEXT_SUFFIXES) or name == "Dockerfile" or os.path.basename(root) in ("scripts", ".ci"):
                yield os.path.join(root, name)


def _in_repo(path: str) -> bool:
    return os.path.commonpath([os.path.normpath(path), REPO]) == REPO


def test_code_and_docs_cite_only_documents_in_the_repo():
    """Code and docs cite documents of this repo only (docs/design.md holds the design), never
    one beside the checkout: a reader of a clone could not follow the citation."""
    bad = []
    for path in _repo_text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        here = os.path.dirname(path)
        for ref in _DOC_REF.findall(text):
            if not any(_in_repo(os.path.join(base, ref)) and os.path.isfile(os.path.join(base, ref))
                       for base in (here, REPO)):
                bad.append(f"{os.path.relpath(path, REPO)}: {ref} (no such file in the repo)")
        for ref in _CLIMBING_REF.findall(text):
            if not _in_repo(os.path.join(here, ref)):
                bad.append(f"{os.path.relpath(path, REPO)}: {ref} (outside the repo)")
    assert not bad, "\n".join(bad)
