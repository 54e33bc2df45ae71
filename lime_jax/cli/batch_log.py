"""`lime-jax train` that also logs the order of its training data, for auditing exact resumes.

    LIME_BATCH_LOG=batches.txt python -m lime_jax.cli.batch_log --gin_file runs/lime.gin ...

Appends `batch_digest` of every training batch the loader hands the trainer (a line each,
flushed before the step uses it) to $LIME_BATCH_LOG. A killed and resumed run must log exactly
the digests an uninterrupted loader yields from the step it resumed at (tests/test_faults.py,
bench/soak.py). Held-out (eval) batches are not logged.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping

import numpy as np

ENV_VAR = "LIME_BATCH_LOG"


def batch_digest(batch: Mapping[str, np.ndarray]) -> str:
    """16 hex digits of the sha256 of a batch's arrays, in key order."""
    return hashlib.sha256(b"".join(np.asarray(batch[k]).tobytes() for k in sorted(batch))).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    from lime_jax.cli import train
    from lime_jax.data import loader

    path = os.environ[ENV_VAR]
    build = loader.build_dataset

    def logged(*args, **kwargs):
        ds = build(*args, **kwargs)
        if kwargs.get("num_epochs") is not None:  # held-out data
            return ds

        def log(batch):
            with open(path, "a") as f:
                f.write(batch_digest(batch) + "\n")
            return batch

        return ds.map(log)

    loader.build_dataset = logged
    return train.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
