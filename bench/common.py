"""Shared benchmark helpers: the machine description and the results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.jsonl")


def machine() -> dict[str, Any]:
    """CPU model, cores, load and library versions, recorded with every result."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    for module in ("tensorflow", "apache_beam", "pandas"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def git_commit() -> str | None:
    """The checked-out commit (with "+dirty" for local changes), if git is there."""
    import subprocess  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--",
                "tf_limaml",
                "beam_pipelines",
                "serving",
                "bench",
                ":(exclude)bench/results.jsonl",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def record(
    result: dict[str, Any], path: str = RESULTS, save: bool = True
) -> dict[str, Any]:
    """Adds the machine and a timestamp, prints the JSON line and, with `save`
    (a bench's `--no-record` clears it), appends it to `path`."""
    result = {
        **result,
        "git_commit": result.get("git_commit") or git_commit(),
        "machine": machine(),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if save:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return result


def median_seconds(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 2, number: int = 1
) -> float:
    """Median wall time of `number` calls of fn, over `repeats` timed runs after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)
