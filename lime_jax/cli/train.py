"""`lime-jax train`: T5X-style flags -> gin configs -> `lime_jax.trainer.train`.

    lime-jax train --gin_file runs/lime.gin --gin.MODEL_DIR=/tmp/run --gin.CACHE_DIR=...
    python -m lime_jax.cli.train --gin_file runs/lime.gin --gin_bindings "TRAIN_STEPS = 100"

Exit status: 0 done (or preempted with a checkpoint), 1 training failed (bad config value, bad
state, cache or checkpoint), 2 bad flags or gin config.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(gin files, gin bindings)`; `--gin.KEY=VALUE` and the multi-process flags become bindings."""
    from lime_jax.trainer import distributed
    from lime_jax.trainer.gin_config import bindings_from_flags

    parser = argparse.ArgumentParser(
        prog="lime-jax train",
        description="Train a lime_jax model from gin configs (T5X-style flags). "
                    "Extra flags --gin.KEY=VALUE bind a macro or parameter, e.g. --gin.MODEL_DIR=/tmp/run.")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; relative paths also searched in the repo's gin/)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="a gin binding line such as 'TRAIN_STEPS = 100' (repeatable)")
    distributed.add_flags(parser)
    args, rest = parser.parse_known_args(list(argv))
    try:
        flag_bindings = bindings_from_flags(rest)
    except ValueError as e:
        parser.error(str(e))
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. --gin_file runs/lime.gin)")
    return args.gin_file, list(args.gin_bindings) + distributed.flag_bindings(args) + flag_bindings


def _setup_logging() -> None:
    pkg = logging.getLogger("lime_jax")
    if not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    files, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    from lime_jax.data.cache import CacheError
    from lime_jax.trainer import checkpoint, train
    from lime_jax.trainer.config import ConfigError
    from lime_jax.trainer.gin_config import parse_gin
    from lime_jax.trainer.loop import TrainingError

    try:
        parse_gin(files, bindings)
    except (ValueError, FileNotFoundError) as e:  # gin reports unknown bindings as ValueError
        log.error("bad gin config: %s", e)
        return 2
    try:
        summary = train.run_from_gin(bindings)
    except (ConfigError, TrainingError, CacheError, checkpoint.CheckpointError) as e:
        log.error("%s", e)
        return 1
    log.info("done: %s", {k: v for k, v in summary.items() if v is not None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
