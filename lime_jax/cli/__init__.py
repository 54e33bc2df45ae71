"""The `lime-jax` command: a thin dispatcher to each concern's own `main(argv)`.

Subcommand modules are imported only when chosen, so `lime-jax show` never pays for
TensorFlow or JAX start-up.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Each module defines `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "spm-train": ("lime_jax.annotation.spm", "train a SentencePiece model on text files"),
    "show": ("lime_jax.annotation.show", "print the pieces and POS/NER tags of a text"),
    "annotate": ("lime_jax.annotation.local_runner", "annotate, tokenize and align a corpus into an ArrayRecord cache"),
    "train": ("lime_jax.trainer.train", "train a model from gin configs (--gin_file, --gin.KEY=VALUE)"),
    "quickstart": ("lime_jax.quickstart", "SentencePiece, annotation, baseline and LIME runs on the bundled corpus"),
    "eval": ("lime_jax.evaluation.evaluate", "held-out perplexity/accuracy, token cohesion, cloze, addition and reasoning of a run"),
    "generate": ("lime_jax.inference.generate", "generate text with a KV cache; LIME+1 metadata guidance"),
    "report": ("lime_jax.evaluation.report", "plots and a markdown summary comparing runs (data efficiency)"),
    "aot": ("lime_jax.trainer.aot", "lower and compile a config's train step for a mesh of (fake) devices; print memory per device"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: lime-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`lime-jax COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lime-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
