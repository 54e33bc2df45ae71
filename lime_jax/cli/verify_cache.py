"""`lime-jax verify-cache CACHE_DIR ...`: hash every shard of a cache against its manifest.

Annotation records each shard's size and sha256 when it writes the shard. Training checks the
manifest and each shard's size and record count at start, on every process, but hashes nothing:
this command is where the hashes are checked again (after copying a cache, or when a run
misbehaves). Prints one line per shard, `OK` or `MISMATCH` with what differs; exits 1 when any
shard (or the manifest) does not match.
"""
from __future__ import annotations

import argparse
import sys

from lime_jax.data import cache


def verify(cache_dir: str) -> list[str]:
    """Prints each shard's verdict; returns the problems found."""
    try:
        manifest = cache.load_manifest(cache_dir)
    except cache.CacheError as e:
        print(f"MISMATCH {e}")
        return [str(e)]
    problems = []
    for i, path in enumerate(cache.shard_paths(cache_dir, manifest)):
        problem = cache.check_shard(cache_dir, manifest, i)
        print(f"OK       {path}" if problem is None else f"MISMATCH {problem}")
        if problem is not None:
            problems.append(problem)
    for name in cache.stray_shards(cache_dir, manifest):
        problems.append(f"{cache_dir}: {name} is not listed in its {cache.MANIFEST_NAME}")
        print(f"MISMATCH {problems[-1]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax verify-cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("cache_dirs", nargs="+", metavar="CACHE_DIR")
    args = p.parse_args(argv)
    failed = 0
    for cache_dir in args.cache_dirs:
        problems = verify(cache_dir)
        failed += bool(problems)
        if problems:
            print(f"lime-jax verify-cache: {cache_dir}: {len(problems)} mismatch(es): "
                  + "; ".join(problems), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
