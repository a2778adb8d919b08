"""The library holds the library: the core never imports what sits beside it.

The core modules of `tf_limaml` are read as source (nothing is imported), and
every `import` and `from ... import` in them is followed, at any depth: module
level, inside functions (the lazy imports), under `if TYPE_CHECKING:` or
`try:`. A constant module name given to `importlib.import_module`,
`__import__` or `importlib.util.find_spec` counts as an import too. Imports
of other `tf_limaml` modules are followed in turn, with the packages above
each module, so a core module cannot reach the experiments through a helper
either.

No modules of the three packages (`tf_limaml`, `beam_pipelines`, `serving`)
import each other in a circle, counting the imports inside functions but not
those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import tf_limaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "tf_limaml"
# The core: the library users build on. Everything they import is core too.
CORE = (
    "config",
    "intervals",
    "blocks",
    "step",
    "saving",
    "features",
    "tasks",
    "data",
    "entities",
    "layers",
    "sequence",
    "maml",
    "newton",
    "model",
    "optimizers",
    "distribute",
    "training",
    "evaluation",
    "export",
    "export.commands",
    "export.consistency",
    "export.saved_model",
    "export.serving_module",
    "export.versions",
    "export.warmup",
    "statistics",
    "signatures",
    "datasets",
    "datasets.movielens",
    "datasets.synthetic",
)
# What the core must never reach: the experiments beside it, and the
# dependencies of the pipelines and the serving clients (optional extras).
FORBIDDEN = (
    "tf_limaml.experiments",
    "tf_limaml.experimental",
    "apache_beam",
    "grpc",
    "requests",
    "beam_pipelines",
    "serving",
)


# The packages whose modules must not import each other in a circle.
PACKAGES = (PACKAGE, "beam_pipelines", "serving")
# Circles that run through the modules the model rewrite owns (model, layers,
# sequence, maml, evaluation, training, cli, experiments/), left to that
# rewrite: each entry is the sorted tuple of a circle's modules. Empty when
# this was written (no such circle existed); an entry is a debt to pay, and
# the list should end empty again.
ALLOWED_CYCLES: frozenset[tuple[str, ...]] = frozenset()
# Functions that import the module named by their first argument (or `name=`).
_IMPORTING_CALLS = ("__import__", "import_module", "find_spec")


def _source_path(module: str, root: pathlib.Path) -> pathlib.Path | None:
    """The file of a `tf_limaml` module or package, or None if there is none."""
    path = root.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _is_type_checking(node: ast.AST) -> bool:
    """Whether `node` is `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST, type_checking: bool) -> list[ast.AST]:
    """Every node of `tree`; without the bodies of `if TYPE_CHECKING:` blocks
    unless `type_checking` (their `else:` branches run, so they stay)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if not type_checking and _is_type_checking(node):
            stack += [node.test, *node.orelse]
        else:
            stack += list(ast.iter_child_nodes(node))
    return found


def _imported_by_call(node: ast.Call) -> str | None:
    """The constant module name of `__import__(...)`, `importlib.import_module(...)`
    or `importlib.util.find_spec(...)` (however the function was imported)."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name not in _IMPORTING_CALLS:
        return None
    args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "name"]
    for arg in args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def imported_names(
    source: str, module: str, type_checking: bool = True
) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, nested ones included.

    `from a import b` yields both `a` and `a.b` (b may be a submodule);
    relative imports are resolved against `module`. A constant string given
    to `importlib.import_module`, `__import__` or `importlib.util.find_spec`
    counts as an import too. Imports under `if TYPE_CHECKING:` count unless
    `type_checking` is False.
    """
    is_package = module in PACKAGES or module.endswith(".__init__")
    module = module.removesuffix(".__init__")
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in _nodes(ast.parse(source), type_checking):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((node.lineno, base))
            found += [
                (node.lineno, f"{base}.{alias.name}")
                for alias in node.names
                if alias.name != "*"
            ]
        elif isinstance(node, ast.Call) and _imported_by_call(node) is not None:
            found.append((node.lineno, _imported_by_call(node)))
    return sorted(found)


def _forbidden(name: str) -> str | None:
    for prefix in FORBIDDEN:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def _module_of(name: str, root: pathlib.Path) -> str | None:
    """The longest `tf_limaml` module that `name` names (`a.b.Class` -> `a.b`)."""
    parts = name.split(".")
    while parts:
        if _source_path(".".join(parts), root) is not None:
            return ".".join(parts)
        parts.pop()
    return None


def walk(roots, root: pathlib.Path = ROOT) -> tuple[dict[str, str | None], list[str]]:
    """Every `tf_limaml` module the roots reach, and each forbidden import.

    Args:
        roots: Modules to start from, relative to the package (`"model"`).
        root: The directory that holds the `tf_limaml` package.

    Returns:
        ({module: the module that first imported it (None for a root)},
         ["path:line imports NAME (via A <- B ...)"]).
    """
    reached: dict[str, str | None] = {}
    queue = [(f"{PACKAGE}.{name}", None) for name in roots]
    violations = {}
    while queue:
        module, parent = queue.pop(0)
        if module in reached:
            continue
        reached[module] = parent
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parts = module.split(".")
        queue += [(".".join(parts[:i]), module) for i in range(1, len(parts))]
        path = _source_path(module, root)
        if path is None:
            raise FileNotFoundError(f"{module} has no source under {root}")
        source = path.read_text(encoding="utf-8")
        module_name = module + (".__init__" if path.name == "__init__.py" else "")
        for line, name in imported_names(source, module_name):
            prefix = _forbidden(name)
            if prefix:
                chain, up = [], reached[module]
                while up is not None:
                    chain.append(up)
                    up = reached[up]
                via = f" (via {' <- '.join(chain)})" if chain else ""
                # `from a.b import c` names a.b and a.b.c: one report a line.
                violations.setdefault(
                    (module, line, prefix),
                    f"{path.relative_to(root).as_posix()}:{line} imports {name}{via}",
                )
            elif name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _module_of(name, root)
                if target is not None and target not in reached:
                    queue.append((target, module))
    return reached, list(violations.values())


def import_graph(
    packages=PACKAGES, root: pathlib.Path = ROOT
) -> dict[str, dict[str, int]]:
    """{module: {module of `packages` it imports: first line}} for every module.

    Imports inside functions count (they run when the function is called);
    those under `if TYPE_CHECKING:` do not (they never run). Importing a.b.c
    runs the packages above it first, but that is not an edge: a package's
    `__init__` importing its own submodules is no circle.
    """
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if path.name == "__init__.py" else parts)] = (
                path
            )
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        module_name = module + (".__init__" if path.name == "__init__.py" else "")
        edges = graph.setdefault(module, {})
        source = path.read_text(encoding="utf-8")
        for line, name in imported_names(source, module_name, type_checking=False):
            target = _module_of(name, root)
            if target in modules and target != module:
                edges.setdefault(target, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[tuple[str, ...]]:
    """The circles of `graph`: each strongly connected set of 2+ modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            members = []
            while not members or members[-1] != module:
                members.append(stack.pop())
            if len(members) > 1:
                cycles.append(tuple(sorted(members)))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def _describe(cycle: tuple[str, ...], graph: dict[str, dict[str, int]]) -> str:
    edges = [
        f"{module}:{line} -> {target}"
        for module in cycle
        for target, line in sorted(graph[module].items())
        if target in cycle
    ]
    return "\n    ".join([" <-> ".join(cycle), *edges])


def test_core_never_imports_experiments_beam_grpc_or_requests():
    reached, violations = walk(CORE)
    assert len(reached) >= len(CORE)
    assert not violations, (
        "The core modules must not import "
        f"{', '.join(FORBIDDEN)}; found:\n  " + "\n  ".join(violations)
    )


def test_the_public_api_is_all_core():
    reached, _ = walk(CORE)
    public = {f"{PACKAGE}.{name}" for name in tf_limaml._SUBMODULES}
    public |= set(tf_limaml._PUBLIC.values())
    assert public <= set(reached), sorted(public - set(reached))
    assert not [name for name in tf_limaml.__all__ if _forbidden(f"{PACKAGE}.{name}")]


def test_the_export_package_reexports_only_core_names():
    from tf_limaml import export

    reached, _ = walk(CORE)
    assert set(export._PUBLIC.values()) <= set(reached)
    assert export.__all__ == sorted(export._PUBLIC)


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100
    cycles = import_cycles(graph)
    found = [_describe(c, graph) for c in cycles if c not in ALLOWED_CYCLES]
    assert not found, (
        "Modules import each other in a circle; move the shared piece where it "
        "belongs:\n  " + "\n  ".join(found)
    )
    # An allowed circle that is gone leaves the list.
    assert ALLOWED_CYCLES <= set(cycles), sorted(ALLOWED_CYCLES - set(cycles))


def test_a_circle_through_a_lazy_import_is_caught(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    files = {
        # a -> b at module level, b -> a inside a function: a circle.
        "tf_limaml/a.py": "from tf_limaml import b\n",
        "tf_limaml/b.py": "def f():\n    from tf_limaml.a import x  # noqa\n",
        # c <-> d only through TYPE_CHECKING: no circle (it never runs).
        "tf_limaml/c.py": "import tf_limaml.d\n",
        "tf_limaml/d.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from tf_limaml.c import C\n"
        ),
        # Across packages, through importlib: a circle.
        "beam_pipelines/p.py": "import importlib\nimportlib.import_module('serving.q')\n",
        "serving/q.py": "from beam_pipelines.p import run\n",
    }
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    graph = import_graph(root=tmp_path)
    assert graph["tf_limaml.b"] == {"tf_limaml.a": 2}
    assert graph["tf_limaml.d"] == {}
    assert import_cycles(graph) == [
        ("beam_pipelines.p", "serving.q"),
        ("tf_limaml.a", "tf_limaml.b"),
    ]


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("import apache_beam as beam", "tf_limaml.data", "apache_beam"),
        (
            "def f():\n    if True:\n        from grpc import aio\n",
            "tf_limaml.model",
            "grpc",
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from tf_limaml.experiments import baselines\n",
            "tf_limaml.model",
            "tf_limaml.experiments",
        ),
        (
            "from tf_limaml import experimental",
            "tf_limaml.layers",
            "tf_limaml.experimental",
        ),
        (
            "from .experiments import tune",
            "tf_limaml.training",
            "tf_limaml.experiments",
        ),
        (
            "from .. import experiments",
            "tf_limaml.datasets.movielens",
            "tf_limaml.experiments",
        ),
        (
            "class A:\n    def f(self):\n        try:\n            import requests\n"
            "        except ImportError:\n            pass\n",
            "tf_limaml.export",
            "requests",
        ),
        (
            "import importlib\nm = importlib.import_module('tf_limaml.experiments.demo')",
            "tf_limaml.features",
            "tf_limaml.experiments",
        ),
        (
            "import importlib\nm = importlib.import_module('serving.client')",
            "tf_limaml.export.commands",
            "serving",
        ),
        (
            "def f():\n    import importlib.util\n"
            "    return importlib.util.find_spec('serving')\n",
            "tf_limaml.export.commands",
            "serving",
        ),
        (
            "from importlib.util import find_spec\nfind_spec('beam_pipelines.shards')",
            "tf_limaml.data",
            "beam_pipelines",
        ),
        ("pipelines = __import__('beam_pipelines')", "tf_limaml.cli", "beam_pipelines"),
        (
            "from importlib import import_module\nimport_module(name='apache_beam')",
            "tf_limaml.export",
            "apache_beam",
        ),
    ],
)
def test_every_kind_of_import_is_seen(source, module, expected):
    names = [name for _, name in imported_names(source, module)]
    assert expected in {_forbidden(name) for name in names}, names


def test_a_core_module_reaching_the_experiments_through_a_helper_is_caught(tmp_path):
    package = tmp_path / PACKAGE
    (package / "experiments").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "experiments" / "__init__.py").write_text("")
    (package / "core.py").write_text(
        "def f():\n    from tf_limaml import _helper  # noqa\n"
    )
    (package / "_helper.py").write_text("from tf_limaml.experiments import x\n")
    reached, violations = walk(["core"], root=tmp_path)
    assert set(reached) == {"tf_limaml.core", "tf_limaml", "tf_limaml._helper"}
    assert violations == [
        "tf_limaml/_helper.py:1 imports tf_limaml.experiments (via tf_limaml.core)"
    ]


def test_the_movielens_demo_finds_its_tuning_record():
    # A missing record is not an error for the demo (it only drops the
    # report's "what was tried"), so a move that loses it must fail here.
    from tf_limaml.experiments import movielens_demo

    assert pathlib.Path(movielens_demo.TUNING_FILE).is_file()
