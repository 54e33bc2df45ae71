"""The `lime-jax` command: a thin dispatcher to each concern's own `main(argv)`.

Subcommand modules are imported only when chosen, so `lime-jax show` never pays for
TensorFlow or JAX start-up.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from lime_jax import host_memory

# name -> (module, one-line help). Each module defines `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "spm-train": ("lime_jax.cli.spm_train", "train a SentencePiece model on text files"),
    "show": ("lime_jax.cli.show", "print the pieces and POS/NER tags of a text"),
    "annotate": ("lime_jax.cli.annotate", "annotate, tokenize and align a corpus into an ArrayRecord cache"),
    "verify-cache": ("lime_jax.cli.verify_cache", "hash every shard of a cache against its manifest (OK/MISMATCH per shard)"),
    "train": ("lime_jax.cli.train", "train a model from gin configs (--gin_file, --gin.KEY=VALUE)"),
    "quickstart": ("lime_jax.cli.quickstart", "SentencePiece, annotation, baseline and LIME runs on the bundled corpus"),
    "eval": ("lime_jax.cli.eval", "held-out perplexity/accuracy, token cohesion, cloze, addition and reasoning of a run"),
    "generate": ("lime_jax.cli.generate", "generate text with a KV cache; LIME+1 metadata guidance"),
    "report": ("lime_jax.cli.report", "plots and a markdown summary comparing runs (data efficiency)"),
    "aot": ("lime_jax.cli.aot", "lower and compile a config's train step for a mesh of (fake) devices; print memory per device"),
    "tagger": ("lime_jax.cli.tagger", "train or score the causal POS/NER tagger distilled from spaCy (honest tags for LIME runs)"),
    "export": ("lime_jax.cli.export", "write a run as a Hugging Face directory (transformers' Gemma; LIME with tag tables)"),
}

# The subcommands that compute with JAX: they get the host allocator policy (host_memory.py);
# the others (SentencePiece, spaCy workers) keep glibc's defaults.
JAX_COMMANDS = frozenset({"train", "quickstart", "eval", "generate", "aot", "tagger", "export"})


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: lime-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lime-jax COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(list(sys.argv[1:] if argv is None else argv))
        finally:  # also after argparse's --help exit: a reader that went away shows up here
            sys.stdout.flush()
    except BrokenPipeError:
        # `lime-jax show ... | head`: the reader stopped reading. Exit as a process killed by
        # SIGPIPE would, without a traceback; stdout goes to devnull so the flush at interpreter
        # exit cannot fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lime-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in JAX_COMMANDS:
        host_memory.keep_freed_memory()  # before the subcommand starts JAX's CPU client
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
