"""README.md's and docs/*.md's python blocks, and examples/*.py, run as written.

Each runs in a fresh interpreter, in an empty temporary directory, with the
repository on PYTHONPATH, as a user who pasted it would. Client snippets
(`serving.client`) run against the loopback TF Serving stand-in of
`serving_fixture.py`: the test passes the export and the server's addresses in
the environment variables the snippet reads (LIMAML_EXPORT,
LIMAML_GRPC_TARGET, LIMAML_REST_URL), whose defaults in the README are those
of a local `tensorflow_model_server`. Notebooks have their own test
(test_notebook.py).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
TIMEOUT_S = 600
# A block that trains a model spends ~50 s of its run compiling the meta-train
# step (XLA, second order) on the 2-core build machine, which would take this
# test past a minute: such blocks run with `-m slow`, the others by default.
_TRAINS = re.compile(r"\.fit\(")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a markdown text."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        i += 1
        if not fence:
            continue
        indent, start, body = fence.group("indent"), i, []
        while i < len(lines) and not _FENCE.match(lines[i]):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line)
            i += 1
        i += 1  # the closing fence
        if fence.group("lang") == "python":
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def _case(code: str, name: str):
    marks = [pytest.mark.slow] if _TRAINS.search(code) else []
    return pytest.param(code, id=name, marks=marks)


def markdown_pages() -> list[str]:
    """README.md, then every page of the docs site (docs/**/*.md), sorted."""
    pages = sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
    return [README] + pages


def _cases() -> list:
    cases = []
    for page in markdown_pages():
        with open(page, encoding="utf-8") as f:
            name = os.path.relpath(page, REPO)
            cases += [
                _case(code, f"{name}:{line}") for line, code in python_blocks(f.read())
            ]
    for path in sorted(
        glob.glob(os.path.join(REPO, "examples", "**", "*.py"), recursive=True)
    ):
        with open(path, encoding="utf-8") as f:
            cases.append(_case(f.read(), os.path.relpath(path, REPO)))
    return cases


def test_the_block_parser_finds_fenced_python_only():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n  ```python\n  y = 2\n  ```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = 2\n")]
    with open(README, encoding="utf-8") as f:
        assert len(python_blocks(f.read())) >= 2


def test_the_docs_pages_are_collected():
    pages = [os.path.relpath(p, REPO) for p in markdown_pages()]
    assert "docs/tour.md" in pages and "docs/serving.md" in pages
    ids = [case.id for case in _cases()]
    assert any(i.startswith("docs/tour.md:") for i in ids)
    assert any(i.startswith("docs/serving.md:") for i in ids)


def _warm_up(server, exported) -> None:
    """Calls each signature once, as TF Serving replays warmup requests at load.

    The snippets give each call 2 s. The session's first run of a signature
    optimizes its graph, which can take longer on a loaded 2-core machine.
    """
    import numpy as np
    from serving_fixture import entity_inputs

    from serving.client import GrpcClient
    from tf_limaml import data

    spec = exported["spec"]
    dataset = data.task_dataset(exported["tasks"]["test"], spec, batch_tasks=2)
    batch = {k: v.numpy() for k, v in next(iter(dataset)).items()}
    meta, support, labels, query = entity_inputs(batch, spec, 0)
    with GrpcClient(server.grpc_target, "limaml", timeout_s=120.0) as client:
        client.adapt_and_predict(meta, support, labels, query)
        client.score(np.zeros((len(query["item_id"]), 8), np.float32), query)


@pytest.fixture(scope="module")
def loopback(exported):
    """The shared test export behind loopback gRPC and REST endpoints."""
    from serving_fixture import LoopbackServing

    with LoopbackServing(exported["export_dir"]) as server:
        _warm_up(server, exported)
        yield {
            "LIMAML_EXPORT": exported["export_dir"],
            "LIMAML_GRPC_TARGET": server.grpc_target,
            "LIMAML_REST_URL": server.rest_url,
        }


@pytest.mark.parametrize("code", _cases())
def test_runs_as_written(code, request, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # As a user runs it: `import tf_limaml` must choose Keras 2 by itself.
    env.pop("TF_USE_LEGACY_KERAS", None)
    if "serving.client" in code:
        env.update(request.getfixturevalue("loopback"))
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- code\n{code}\n--- stderr (tail)\n"
        f"{result.stderr[-4000:]}"
    )
