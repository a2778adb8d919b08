"""Start-up cost of the `limaml` command: help and argument errors stay TF-free.

python bench/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import record  # noqa: E402

COMMANDS = {
    "help": ["-m", "tf_limaml.cli", "--help"],
    "train_help": ["-m", "tf_limaml.cli", "train", "--help"],
    "argument_error": ["-m", "tf_limaml.cli", "train", "--epochs", "zero"],
    "import_tensorflow": ["-c", "import tensorflow"],
}


def time_command(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            check=False,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    seconds = {
        name: round(time_command(cmd, args.repeats), 3)
        for name, cmd in COMMANDS.items()
    }
    return record(
        {
            "benchmark": "startup",
            "median_s": seconds,
            "target_help_s": 0.5,
            "help_meets_target": seconds["help"] <= 0.5,
        }
    )


if __name__ == "__main__":
    main()
