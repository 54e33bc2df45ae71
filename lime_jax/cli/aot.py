"""`lime-jax aot`: lower and compile the train step of a config for a mesh of the intended size,
on a machine that has none of those devices, and print its memory per device.

    lime-jax aot --gin_file runs/gpu.gin --gin_file models/1b.gin --mesh 1,16,1
    lime-jax aot --gin_file runs/tpu_pod.gin --gin_file models/2b.gin --mesh 1,32,1 --gin.BATCH_SIZE=256
    lime-jax aot --table docs/scaling.md   # regenerate the memory table of runs/gpu.gin there

lime_jax.trainer.aot describes how and what the figures mean.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR positive ints, e.g. 1,16,1")
    return shape  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lime-jax aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin config file (repeatable), e.g. runs/gpu.gin then models/1b.gin")
    p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding line (repeatable)")
    p.add_argument("--mesh", type=_parse_mesh, help="DATA,FSDP,TENSOR mesh, e.g. 1,16,1")
    p.add_argument("--table", metavar="FILE",
                   help="compile runs/gpu.gin with each model size, remat on and off, on 8 fake devices, and "
                        "write their memory table into FILE between its marker lines (takes minutes)")
    p.add_argument("--lower_only", action="store_true", help="lower against an AbstractMesh; skip compile")
    p.add_argument("--platform", choices=["cpu", "cuda", "tpu"], default="cpu",
                   help="target of --lower_only lowering")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    from lime_jax.trainer import aot
    from lime_jax.trainer.gin_config import bindings_from_flags

    if args.table:
        if args.gin_file or args.gin_bindings or args.mesh or args.lower_only or rest:
            parser.error("--table compiles its own configs: give no --gin_file, --mesh or bindings")
        try:
            print(aot.write_table(args.table))
        except (aot.AotError, ValueError, OSError) as e:
            print(f"lime-jax aot: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.gin_file or args.mesh is None:
        parser.error("--gin_file and --mesh are required (or --table FILE)")
    try:
        flag_bindings = bindings_from_flags(rest)
    except ValueError as e:
        parser.error(str(e))
    try:
        result = aot.compile_config(args.gin_file, [*args.gin_bindings, *flag_bindings], args.mesh,
                                    compile_=not args.lower_only, platform=args.platform)
    except (aot.AotError, ValueError, FileNotFoundError) as e:
        print(f"lime-jax aot: {e}", file=sys.stderr)
        return 1
    name = " + ".join(os.path.basename(f) for f in args.gin_file)
    print(json.dumps(result) if args.json else aot.format_report(name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
