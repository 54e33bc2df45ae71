#!/usr/bin/env bash
# Creates or reuses .venv in the repo root and installs the project with its test and hf extras.
# Re-installs only when pyproject.toml or this script changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lime_jax_installed
want="$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # `hf`: transformers and PyTorch's CPU build for `lime-jax export` / INIT_FROM_HF and tests/test_hf.py.
  .venv/bin/python -m pip install --quiet -e ".[test,hf]"
  # The `beam` extra on top: apache-beam 2.77 asks for protobuf < 7, but sentencepiece
  # 0.2.3's generated code (imported by seqio) needs >= 7.36.1, and Beam runs on the newer
  # runtime (tests/test_beam.py checks it). pip warns about the mismatch; that is expected.
  .venv/bin/python -m pip install --quiet "apache-beam==2.77.0"
  .venv/bin/python -m pip install --quiet "protobuf==7.36.2"
  echo "$want" > "$stamp"
fi
