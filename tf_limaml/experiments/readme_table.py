"""The README's MovieLens results table, rendered from a demo's report.json.

`make demo` writes it to `runs/demo/README_table.md`, so the table in the
README section "What `make demo` measures" is pasted from a run, never typed,
and names the commit and machine it came from.

Example:

    with open("runs/demo/report.json") as f:
        print(render(json.load(f), commit="e4cfa86", machine="AMD EPYC, 2 cores"))
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

FILENAME = "README_table.md"
# Rows of the README table: report.json model name -> label.
ROWS = (
    ("global", "global"),
    ("id_embedding", "global + member-ID embedding"),
    ("finetune", "global + fine-tuning"),
    ("maml", "full-network MAML"),
    ("limaml", "**LiMAML** (in-graph)"),
    ("limaml_offline", "LiMAML, offline embeddings + `serving_default`"),
    ("limaml_sequence", "LiMAML, sequence meta block"),
    ("limaml_multi_entity", "LiMAML, member + movie meta blocks"),
)
KS = ("1", "3", "5", "10")


def git_commit(directory: str | None = None) -> str:
    """`git rev-parse --short HEAD` of the checkout holding `directory`, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=directory or os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (
        out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    )


def machine_description() -> str:
    """The CPU model (from /proc/cpuinfo, else `platform`) and the core count."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def _number(value: Any, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{value:.4f}"
    return f"{value:.4f} ± {std:.4f}"


def render(report: Mapping[str, Any], commit: str, machine: str) -> str:
    """The markdown fragment: a line naming commit and machine, then the table.

    Args:
        report: The demo's report.json, as a dict ("models": name -> means).
        commit: The git commit the demo ran at.
        machine: What it ran on (`machine_description()`).

    Returns:
        Markdown text; models missing from the report are left out.
    """
    models = report.get("models", {})
    lines = [
        f"`runs/demo/{FILENAME}`, written by `make demo` at commit `{commit}` "
        f"on {machine}:",
        "",
        "| model | overall AUC | log loss | mean member AUC | AUC, k=1 | k=3 | k=5 "
        "| k=10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in ROWS:
        if name not in models:
            continue
        m = models[name]
        by_k = m.get("support_k", {})
        cells = [
            _number(m.get("overall_auc"), m.get("overall_auc_std")),
            _number(m.get("logloss")),
            _number(m.get("mean_member_auc")),
        ] + [_number(by_k.get(k, {}).get("overall_auc")) for k in KS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    run = report.get("run", {})
    if run.get("wall_s_before_report") is not None:
        lines += [
            "",
            f"{report.get('seeds', run.get('seeds'))} seeds, mean ± std; "
            f"{run['wall_s_before_report']:.0f} s wall before the report "
            f"(load average {run.get('load_average_1m', 'n/a')} at the end).",
        ]
    from tf_limaml.experiments.report import (  # noqa: PLC0415
        BUCKET_LABELS,
        bucket_names,
        bucket_table,
    )

    for name in bucket_names(report) if "models" in report else []:
        lines += ["", f"Overall AUC by {BUCKET_LABELS.get(name, name)}:", ""]
        lines.append(bucket_table(report, name))
    return "\n".join(lines) + "\n"


def write_table(
    report: Mapping[str, Any],
    workdir: str | os.PathLike,
    commit: str | None = None,
    machine: str | None = None,
) -> str:
    """Writes `render(...)` to WORKDIR/README_table.md and returns its path."""
    path = os.path.join(str(workdir), FILENAME)
    # The commit the numbers came from (the demo records it), else this checkout's.
    commit = commit or report.get("run", {}).get("commit") or git_commit()
    text = render(report, commit, machine or machine_description())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
