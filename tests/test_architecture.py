"""The dependency directions of docs/architecture.md, checked on the source.

The import graph of lime_jax/ and tasks/ is read with `ast` (nothing is imported): every
`import` / `from ... import` with its place, module level (runs on import, `try`/`if` blocks
included) or inside a function (lazy). Importing `a.b.c` also runs the `__init__` of `a` and
`a.b`, so reachability follows those too. One subprocess then imports and runs the annotation
path for real and looks at `sys.modules`.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lime_jax", "tasks")
# Entry points may import the command line; library modules may not.
ENTRY_POINTS = ("lime_jax.__main__",)


@dataclasses.dataclass(frozen=True)
class Import:
    target: str  # absolute module name as written ("from a import b" -> "a.b" if a.b is a module)
    lazy: bool  # inside a function
    where: str  # file:line


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_of(name: str, path: Path, root: Path, modules: Iterable[str]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = path.relative_to(root)
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never runs
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, lazy, f"{rel}:{child.lineno}") for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(sub if sub in modules else base, lazy, f"{rel}:{child.lineno}"))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, list[Import]]:
    """Module name -> its imports, for every module of the `packages` under `root`."""
    sources = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    return {name: _imports_of(name, path, root, sources) for name, path in sources.items()}


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of `edges` as [a, b, ..., a], or None for an acyclic graph."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def forbidden_imports(graph: Mapping[str, list[Import]], sources: Iterable[str], forbidden: Iterable[str],
                      direct_lazy: bool) -> list[str]:
    """Paths by which modules of `sources` import a module under a `forbidden` prefix, through
    module-level imports of lime_jax/tasks modules and their parent packages; with
    `direct_lazy`, a path may start with an import inside a function of the source module.
    Each as 'a -> b -> forbidden (file:line)', one per import statement."""
    forbidden = tuple(forbidden)
    found = []
    for source in sorted(sources):
        # Importing `source` first runs the __init__ of each package above it.
        seen = {m: [source, m] for m in _parents(source) if m in graph}
        seen[source] = [source]
        frontier = list(seen)
        while frontier:
            module = frontier.pop()
            for imp in graph.get(module, ()):
                if imp.lazy and not (direct_lazy and module == source):
                    continue
                via = [*seen[module], f"{imp.target} ({imp.where}{', in a function' if imp.lazy else ''})"]
                if _in(imp.target, forbidden):
                    found.append(" -> ".join(via))
                for nxt in [*_parents(imp.target), imp.target]:
                    if nxt in graph and nxt not in seen:
                        seen[nxt] = via if nxt == imp.target else [*via, nxt]
                        frontier.append(nxt)
    return list(dict.fromkeys(found))


def _package(graph, prefix: str) -> list[str]:
    return [m for m in graph if _in(m, [prefix])]


# --- the cycle finder can fail ------------------------------------------------------------------

def test_find_cycle_reports_a_planted_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": ["x"]}) == ["x", "x"]


def test_forbidden_imports_follow_module_level_paths_only():
    graph = {
        "pkg.a": [Import("pkg.b", False, "a.py:1"), Import("pkg.c", True, "a.py:9")],
        "pkg.b": [Import("heavy.sub", False, "b.py:3")],
        "pkg.c": [Import("pkg.d", True, "c.py:5"), Import("heavy", False, "c.py:1")],
        "pkg.d": [Import("heavy", False, "d.py:2")],
    }
    assert forbidden_imports(graph, ["pkg.a"], ["heavy"], direct_lazy=False) == [
        "pkg.a -> pkg.b (a.py:1) -> heavy.sub (b.py:3)"]
    # A function of pkg.a imports pkg.c, which imports heavy on import; pkg.c's own lazy
    # import of pkg.d only runs if that function of pkg.c is called.
    assert forbidden_imports(graph, ["pkg.a"], ["heavy"], direct_lazy=True) == [
        "pkg.a -> pkg.c (a.py:9, in a function) -> heavy (c.py:1)",
        "pkg.a -> pkg.b (a.py:1) -> heavy.sub (b.py:3)"]
    assert forbidden_imports(graph, ["pkg.d"], ["pkg.a", "pkg.b"], direct_lazy=True) == []


def test_the_graph_reads_relative_lazy_and_package_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import heavy.core\n")
    (pkg / "m.py").write_text("from . import n\n\ndef f():\n    from .n import g\n    import light\n")
    (pkg / "n.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import heavy\n")
    graph = import_graph(tmp_path, ["p"])
    assert graph["p.m"] == [Import("p.n", False, "p/m.py:1"), Import("p.n", True, "p/m.py:4"),
                            Import("light", True, "p/m.py:5")]
    assert graph["p.n"] == [Import("typing", False, "p/n.py:1")]
    # Importing p.n runs p/__init__.py first.
    assert forbidden_imports(graph, ["p.n"], ["heavy"], direct_lazy=False) == [
        "p.n -> p -> heavy.core (p/__init__.py:1)"]
    assert forbidden_imports(graph, ["p.m"], ["light"], direct_lazy=True) == ["p.m -> light (p/m.py:5, in a function)"]
    assert forbidden_imports(graph, ["p.m"], ["light"], direct_lazy=False) == []


# --- the rules --------------------------------------------------------------------------------

def _module_level_edges(graph) -> dict[str, set[str]]:
    return {m: {i.target for i in imps if not i.lazy and i.target in graph and i.target != m}
            for m, imps in graph.items()}


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(_module_level_edges(graph))
    if cycle:
        where = [next(i.where for i in graph[a] if i.target == b and not i.lazy) for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("module-level import cycle: " + cycle[0] + "".join(
            f" -> {b} ({w})" for b, w in zip(cycle[1:], where)))


def test_annotation_needs_no_accelerator_stack():
    graph = import_graph()
    found = forbidden_imports(graph, _package(graph, "lime_jax.annotation"),
                              ["jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "seqio"], direct_lazy=True)
    assert not found, "lime_jax.annotation must run without jax/TensorFlow:\n" + "\n".join(found)


def test_model_knows_no_data_pipeline():
    graph = import_graph()
    found = forbidden_imports(graph, _package(graph, "lime_jax.model"),
                              ["lime_jax.data", "lime_jax.annotation", "lime_jax.trainer", "tasks", "seqio",
                               "tensorflow", "spacy"], direct_lazy=True)
    assert not found, "lime_jax.model imports the data side:\n" + "\n".join(found)


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    library = [m for m in graph if not _in(m, ["lime_jax.cli", *ENTRY_POINTS])]
    found = forbidden_imports(graph, library, ["lime_jax.cli"], direct_lazy=True)
    assert not found, "library modules importing lime_jax.cli:\n" + "\n".join(found)


def test_trainer_loads_seqio_lazily_if_at_all():
    graph = import_graph()
    found = forbidden_imports(graph, _package(graph, "lime_jax.trainer"), ["tasks", "seqio", "tensorflow"],
                              direct_lazy=False)
    assert not found, "lime_jax.trainer imports SeqIO/TensorFlow on import:\n" + "\n".join(found)


def test_annotation_runs_without_jax_or_tensorflow(tmp_path, spm_model):
    """The real thing: annotate a corpus in a fresh interpreter, then look at sys.modules."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Congress shall assemble at least once in every year.\n", encoding="utf-8")
    script = (
        "import json, sys\n"
        "from lime_jax.annotation import local_runner, worker\n"
        f"m = local_runner.annotate_corpus([{str(corpus)!r}], {str(tmp_path / 'cache')!r}, "
        f"worker.ProcessorSpec({spm_model!r}))\n"
        "heavy = ('jax', 'jaxlib', 'flax', 'optax', 'tensorflow', 'seqio')\n"
        "print(json.dumps([m['counts']['records'], sorted({n.split('.')[0] for n in sys.modules} & set(heavy))]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert records == 1 and loaded == [], f"annotation loaded {loaded}"
