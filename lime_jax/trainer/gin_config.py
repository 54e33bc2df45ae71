"""Parsing a run's gin configs and command-line bindings, and refusing bindings that do nothing.

Gin accepts a binding of a new macro that nothing reads (`--gin.TRAN_STEPS=3` trains the
configured number of steps) and a parameter of a configurable the run never calls. Both are
errors here, naming the closest known name: macros right after parsing (`parse_gin`), parameters
once the run has built everything it configures (`check_bindings_used`), before its first step.
Only the caller's bindings are checked: config files may set what some runs do not use.
"""
from __future__ import annotations

import ast
import difflib
import logging
import os
import re
from collections.abc import Iterator, Sequence

import gin
from gin import config_parser

from lime_jax.trainer.config import ConfigError

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A source checkout has the configs in gin/ beside the package; a wheel ships them as lime_jax/gin.
GIN_DIR = next((d for d in (os.path.join(os.path.dirname(_PACKAGE_DIR), "gin"), os.path.join(_PACKAGE_DIR, "gin"))
                if os.path.isdir(d)), os.path.join(_PACKAGE_DIR, "gin"))
_REQUIRED_MACRO_RE = re.compile(r"^([A-Za-z_][\w.]*)\s*=\s*%gin\.REQUIRED\s*$", re.MULTILINE)


def parse_gin(config_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses run configs + bindings; raises on unknown configurables/parameters (gin's
    ValueError), unset REQUIRED macros and bound macros that no config references (ConfigError).

    Relative config paths are looked up in the current directory, then in the repo's `gin/`.
    """
    gin.clear_config()
    # The repo's gin/ first: gin tries the bare path before the search path, and for
    # `include 'runs/x.gin'` that imports any `runs` directory in the working directory as a
    # Python package (a quickstart's output, say), which fails.
    if GIN_DIR not in gin.config._LOCATION_PREFIXES:
        gin.config._LOCATION_PREFIXES.insert(0, GIN_DIR)
    files = [_find_gin_file(f) for f in config_files]
    root = logging.getLogger()
    root.addFilter(_quiet_gin_path_probe)
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False, skip_unknown=False)
    finally:
        root.removeFilter(_quiet_gin_path_probe)
    missing = _REQUIRED_MACRO_RE.findall(gin.config_str())
    if missing:
        raise ConfigError(
            "required gin macro(s) not set: " + ", ".join(missing) +
            "; set each with --gin.NAME=VALUE (e.g. --gin." + missing[0] + "=...) or in a --gin_file")
    _check_macros_referenced(bindings)
    gin.finalize()


def _quiet_gin_path_probe(record: logging.LogRecord) -> bool:
    # gin probes each include as a Python-package resource first and logs an ERROR for every
    # miss before finding the file in the search path; those are not errors.
    return not record.getMessage().startswith("Path not found:")


def _find_gin_file(path: str) -> str:
    for candidate in (path, os.path.join(GIN_DIR, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"gin file {path!r} not found (looked in . and {GIN_DIR})")


def binding_from_flag(key: str, value: str) -> str:
    """`--gin.KEY=VALUE` -> a gin binding; a bare word or path becomes a string literal."""
    if not value.startswith(("%", "@")):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = repr(value)
    return f"{key} = {value}"


def bindings_from_flags(args: Sequence[str]) -> list[str]:
    """`["--gin.KEY=VALUE", ...]` -> gin bindings; anything else raises ValueError naming it."""
    out = []
    for arg in args:
        if not arg.startswith("--gin.") or "=" not in arg:
            raise ValueError(f"unrecognized argument {arg!r} (expected --gin.KEY=VALUE)")
        key, value = arg[len("--gin."):].split("=", 1)
        out.append(binding_from_flag(key, value))
    return out


def _statements(bindings: Sequence[str]) -> Iterator[tuple[str, config_parser.BindingStatement]]:
    """(binding text, statement) for every binding statement in `bindings`."""
    for text in bindings:
        for stmt in config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)):
            if isinstance(stmt, config_parser.BindingStatement):
                yield text, stmt


def _closest(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not match and "." in name:  # else the most similar configurable with that parameter
        arg = name.rsplit(".", 1)[1]
        match = difflib.get_close_matches(name, [k for k in known if k.rsplit(".", 1)[-1] == arg], n=1, cutoff=0)
    return f"; did you mean {match[0]}?" if match else ""


def _check_macros_referenced(bindings: Sequence[str]) -> None:
    macro_fn = gin.get_configurable(gin.config.macro)
    referenced = sorted({ref.config_key[0] for ref in gin.config.iterate_references(gin.config._CONFIG, to=macro_fn)})
    for text, stmt in _statements(bindings):
        if stmt.arg_name:  # a parameter: checked once the run has called its configurables
            continue
        name = f"{stmt.scope}/{stmt.selector}" if stmt.scope else stmt.selector
        if name not in referenced:
            raise ConfigError(f"binding {text!r} sets macro {name}, which no config references, so it "
                              f"would do nothing{_closest(name, referenced)}")


def check_bindings_used(bindings: Sequence[str]) -> None:
    """Raises ConfigError for a parameter binding in `bindings` that the run did not use: its
    configurable was never called, or always called with that argument passed by the code.

    Call once everything the run configures has been built (gin's operative config is complete).
    """
    with gin.config._OPERATIVE_CONFIG_LOCK:
        operative = {key: set(params) for key, params in gin.config._OPERATIVE_CONFIG.items()}
    registry = gin.config._REGISTRY
    known = sorted(f"{registry.minimal_selector(sel)}.{arg}" for (_, sel), params in operative.items()
                   if sel != "gin.macro" for arg in params)
    for text, stmt in _statements(bindings):
        if not stmt.arg_name:
            continue
        selector = registry.get_match(stmt.selector).selector
        calls = [params for (scope, sel), params in operative.items()
                 if sel == selector and (not stmt.scope or stmt.scope in scope.split("/"))]
        if any(stmt.arg_name in params for params in calls):
            continue
        name = f"{registry.minimal_selector(selector)}.{stmt.arg_name}"
        why = (f"{registry.minimal_selector(selector)} is called with {stmt.arg_name} passed by the code"
               if calls else f"this run never calls {registry.minimal_selector(selector)}")
        raise ConfigError(f"binding {text!r} does nothing: {why}{_closest(name, known)}")
