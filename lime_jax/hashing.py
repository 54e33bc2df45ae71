"""The sha256 of a file, streamed: cache shards, input corpora and checkpoints can exceed memory.

Standard library only, so annotation workers, the trainer and scripts share it without
pulling in anything heavier.
"""
from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at `path`, read in 1 MiB chunks. A path object is read through its
    own `open`, so an `etils.epath.Path` on gs:// works too."""
    digest = hashlib.sha256()
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
