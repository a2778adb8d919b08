"""The library holds the library: the core never imports what sits beside it.

The core modules of `tf_limaml` are read as source (nothing is imported), and
every `import` and `from ... import` in them is followed, at any depth: module
level, inside functions (the lazy imports), under `if TYPE_CHECKING:` or
`try:`. Imports of other `tf_limaml` modules are followed in turn, with the
packages above each module, so a core module cannot reach the experiments
through a helper either.
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
    "features",
    "tasks",
    "data",
    "entities",
    "layers",
    "sequence",
    "maml",
    "model",
    "optimizers",
    "distribute",
    "training",
    "evaluation",
    "export",
    "export_commands",
    "export_signatures",
    "export_versions",
    "export_warmup",
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


def _source_path(module: str, root: pathlib.Path) -> pathlib.Path | None:
    """The file of a `tf_limaml` module or package, or None if there is none."""
    path = root.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, nested ones included.

    `from a import b` yields both `a` and `a.b` (b may be a submodule);
    relative imports are resolved against `module`. A constant string given
    to `importlib.import_module` or `__import__` counts as an import too.
    """
    is_package = module == PACKAGE or module.endswith(".__init__")
    module = module.removesuffix(".__init__")
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
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
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module"
                )
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return found


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
