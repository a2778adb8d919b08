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

import csv
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
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


# ------------------------------------------- "Your own data, in three commands"
_OWN_DATA = "## Your own data, in three commands"


def _own_data_section() -> tuple[dict, list[str]]:
    """The README's spec (its ```json block) and commands (its ```bash block)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(_OWN_DATA) :]
    section = section[: section.index("\n## ", len(_OWN_DATA))]
    spec = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines()]
    return spec, [c for c in commands if c]


def _write_own_csv(path: str, spec: dict) -> None:
    """A ratings table with the README spec's columns: 120 members, 16 rows each."""
    rng = np.random.default_rng(0)
    genres = ["Drama", "Comedy", "Action", "Horror"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(spec_columns(spec)))
        for member in range(120):
            taste = member % 4
            for k in range(16):
                item = int(rng.integers(0, 40))
                liked = (item % 4 == taste) or rng.random() < 0.2
                writer.writerow(
                    [
                        f"m{member}",
                        1_700_000_000 + 3600 * (member + 100 * k),
                        5 if liked else 2,
                        20 + member % 50,
                        f"job{member % 5}",
                        f"i{item}",
                        "|".join(genres[: 1 + item % 3]),
                        1980 + item % 30,
                    ]
                )


def spec_columns(spec: dict) -> list[str]:
    return [spec["entity"], spec["time"], spec["label"]["column"]] + [
        f["name"] for f in spec["meta_features"] + spec["request_features"]
    ]


def test_the_own_data_section_is_three_limaml_commands():
    spec, commands = _own_data_section()
    assert [c.split()[:2] for c in commands] == [
        ["limaml", "make-tasks"],
        ["limaml", "tune"],
        ["limaml", "demo"],
    ]
    assert spec_columns(spec)[:3] == ["member_id", "timestamp", "rating"]


@pytest.mark.slow
def test_the_own_data_commands_run_as_written(tmp_path):
    """The README's spec and its three commands, as a user would paste them."""
    spec, commands = _own_data_section()
    os.makedirs(tmp_path / "my")
    _write_own_csv(str(tmp_path / "my" / "ratings.csv"), spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=REPO, TF_USE_LEGACY_KERAS="1")
    for command in commands:
        argv = [sys.executable, "-m", "tf_limaml.cli", *shlex.split(command)[1:]]
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
        )
        assert done.returncode == 0, (command, done.stderr[-3000:])
    assert (tmp_path / "tasks" / "stats.json").exists()
    assert (tmp_path / "tune" / "tune_config.json").exists()
    assert (tmp_path / "runs" / "mine" / "report.md").exists()
