"""The docs site's sources: generated tables, API pages, the README's size.

`make docs` (CI) runs the strict build itself; these checks need neither MkDocs
nor TensorFlow, so they stay in the fast suite and name what broke.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
PUBLIC_MODULES = (
    "blocks",
    "step",
    "adaptation",
    "saving",
    "config",
    "errors",
    "model",
    "layers",
    "sequence",
    "maml",
    "features",
    "data",
    "training",
    "evaluation",
    "export",
)


def _hooks():
    spec = importlib.util.spec_from_file_location(
        "docs_hooks", os.path.join(DOCS, "hooks.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> dict[str, str]:
    pages = {}
    for path in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True):
        with open(path, encoding="utf-8") as f:
            pages[os.path.relpath(path, DOCS)] = f.read()
    return pages


def test_every_marker_names_a_table_and_every_table_is_used():
    hooks = _hooks()
    used = set()
    for text in _pages().values():
        used |= {m.group("name") for m in hooks.MARKER.finditer(text)}
    assert used == set(hooks.TABLES)


@pytest.mark.parametrize("name", sorted(_hooks().TABLES))
def test_each_table_renders_with_its_source(name):
    hooks = _hooks()
    text = hooks.render(name)
    assert re.search(r"^\| .* \|$", text, re.MULTILINE), text
    # Each table says where its numbers came from: a commit, or the demo's file.
    assert "bench/results.jsonl" in text or "README_table.md" in text
    assert "commit" in text


def test_a_table_follows_the_latest_record():
    hooks = _hooks()
    records = hooks.load_records()
    newer = json.loads(json.dumps(hooks.latest(records, "large_ids")))
    newer.update(git_commit="abc1234", _line=len(records) + 1)
    newer["step_ms"] = {**newer["step_ms"], "lazy": 1.25}
    text = hooks.render("large_ids", records + [newer])
    assert "`abc1234`" in text and "1.2 ms" in text


def test_an_unknown_table_fails():
    hooks = _hooks()
    with pytest.raises(hooks.TableError, match="unknown table 'nope'"):
        hooks.expand("<!-- table: nope -->\n", records=[])


def test_the_api_reference_covers_the_public_modules():
    pages = _pages()
    directives = set()
    for text in pages.values():
        directives |= set(re.findall(r"^::: (tf_limaml[\w.]*)$", text, re.MULTILINE))
    assert {f"tf_limaml.{m}" for m in PUBLIC_MODULES} <= directives


def test_the_readme_is_a_front_door():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for page in re.findall(r"\]\((docs/[\w/.-]+\.md)", text):
        assert os.path.exists(os.path.join(REPO, page)), page


def _args_entries(docstring: str):
    """Yields the first line of each entry under a Google-style `Args:`."""
    lines = docstring.expandtabs().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        section_indent = len(line) - len(line.lstrip())
        entry_indent = None
        for entry in lines[i + 1 :]:
            if not entry.strip():
                continue
            indent = len(entry) - len(entry.lstrip())
            if indent <= section_indent:
                break
            entry_indent = entry_indent or indent
            if indent == entry_indent:
                yield entry.strip()


def test_every_args_entry_names_one_argument():
    # The API pages' strict build refuses an entry griffe cannot split into
    # "name: description" ("a, b: ..."); this names the docstring in the fast suite.
    import ast

    bad, entries = [], 0
    paths = glob.glob(os.path.join(REPO, "tf_limaml", "**", "*.py"), recursive=True)
    assert len(paths) > len(PUBLIC_MODULES)
    for path in paths:
        module = os.path.relpath(path, REPO)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                continue
            for entry in _args_entries(ast.get_docstring(node) or ""):
                entries += 1
                if not re.match(r"^\*{0,2}\w+( \([^)]*\))?: ", entry + " "):
                    bad.append(f"{module}.{node.name}: {entry}")
    assert entries > 200  # the walk reaches the library's Args sections
    assert not bad, bad
