"""The wheel `pip install` builds carries what a run needs outside a source checkout."""
import glob
import os
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
