"""Bounded soak: concurrent callers on one loaded export, zero errors, p50/p99.

Two phases, each `--seconds` long, with `--callers` concurrent callers:

* `in_process`: threads calling `session.run` on the export loaded as TF
  Serving loads it (TF1 loader, tag "serve"; `tests/serving_fixture.py`);
* `grpc`: threads, each with its own `serving.client.GrpcClient`, calling the
  loopback PredictionService of `tests/serving_fixture.py` on 127.0.0.1,
  backed by the same loaded export.

Each caller cycles through its own requests, alternately `serving_default`
(a batch of rows with stored embeddings) and `adapt_and_predict` (one entity's
support and query rows), and every answer is compared with the one computed
single-threaded before the phase: a wrong answer counts as an error, like an
exception. The run is bounded: a caller stops at the deadline or after
`--max-calls` calls, and a caller still running 60 s after the deadline counts
as an error. Latency is per call, as the caller sees it.

Prints one JSON object and appends it to bench/results.jsonl with the machine.

    python bench/soak.py                         # 2 x 60 s, default architecture
    python bench/soak.py --seconds 5 --no-append # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the loopback serving fixture

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from serving_fixture import LoopbackServing, SessionSignatures  # noqa: E402

from bench.common import RESULTS, record  # noqa: E402
from tf_limaml import data, export, training  # noqa: E402
from tf_limaml.datasets import synthetic  # noqa: E402
from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: E402

SERVING_ROWS = 32
MAX_SUPPORT = 32
TOLERANCE = 1e-5
# A caller still running this long after the deadline is counted as stuck.
STUCK_AFTER_S = 60.0
TINY = {"meta_units": [16, 8], "global_units": [32, 16], "cross_layers": 1}

Request = tuple[str, dict[str, np.ndarray]]


def build_export(workdir: str, architecture: str = "default") -> tuple[str, str]:
    """Synthetic tasks and an untrained, seeded export of them.

    Latency does not depend on the weights' values, and correctness is judged
    against the same export's single-threaded answers.

    Returns:
        (export version directory, task file pattern).
    """
    paths = synthetic.write_tasks(
        os.path.join(workdir, "tasks"), num_entities=80, seed=0
    )
    spec = synthetic.synthetic_spec()
    kwargs = (
        training.default_model_kwargs() if architecture == "default" else dict(TINY)
    )
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(spec, MetaConfig(jit_compile=False, inner_lr=0.5), **kwargs)
    export_dir = export.export_model(
        model, os.path.join(workdir, "export"), max_support=MAX_SUPPORT
    )
    return export_dir, paths["test"]


def make_requests(export_dir: str, tasks: str, callers: int) -> list[list[Request]]:
    """Per caller: one `serving_default` and one `adapt_and_predict` request, its own."""
    metadata = export.read_metadata(export_dir)
    spec, meta_dim = metadata["spec"], metadata["meta_dim"]
    batches = data.task_dataset(
        tasks, spec, batch_tasks=1000, max_support=metadata["max_support"], max_query=32
    )
    batch = {k: v.numpy() for k, v in next(iter(batches)).items()}
    n_support = batch["support_mask"].sum(axis=1).astype(int)
    n_query = batch["query_mask"].sum(axis=1).astype(int)
    usable = np.flatnonzero((n_support > 0) & (n_query > 0))
    if len(usable) < callers:
        raise ValueError(
            f"{tasks} has {len(usable)} entities with support and query "
            f"rows; {callers} callers need as many"
        )
    query_mask = batch["query_mask"] > 0
    all_rows = {
        f.name: batch[f"query_{f.name}"][query_mask] for f in spec.request_features
    }
    requests = []
    for caller in range(callers):
        rng = np.random.default_rng(caller)
        rows = rng.choice(len(all_rows[spec.request_features[0].name]), SERVING_ROWS)
        serving = {name: values[rows] for name, values in all_rows.items()}
        serving[export.EMBEDDING_KEY] = rng.normal(
            size=(SERVING_ROWS, meta_dim)
        ).astype(np.float32)
        i = int(usable[caller])
        adapt = {f.name: batch[f.name][i] for f in spec.meta_features}
        adapt[export.SUPPORT_LABEL_KEY] = batch[export.SUPPORT_LABEL_KEY][
            i, : n_support[i]
        ]
        for f in spec.request_features:
            adapt[f"support_{f.name}"] = batch[f"support_{f.name}"][i, : n_support[i]]
            adapt[f"query_{f.name}"] = batch[f"query_{f.name}"][i, : n_query[i]]
        requests.append(
            [(export.SERVING_DEFAULT, serving), (export.ADAPT_AND_PREDICT, adapt)]
        )
    return requests


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _percentiles(seconds: Sequence[float]) -> dict[str, Any]:
    if not seconds:
        return {"calls": 0}
    ms = np.asarray(seconds) * 1e3
    return {
        "calls": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def soak(
    make_caller: Callable[[int], tuple[Callable, Callable]],
    requests: list[list[Request]],
    expected: list[list[dict[str, np.ndarray]]],
    seconds: float,
    max_calls: int,
) -> dict[str, Any]:
    """Runs one caller thread per request list until the deadline or `max_calls`.

    Args:
        make_caller: caller index -> (call(signature, inputs) -> outputs, close).
            Called in the caller's own thread.
        requests: Per caller, the requests it cycles through.
        expected: Per caller and request, the right outputs.
        seconds: How long the callers call.
        max_calls: Most calls per caller.

    Returns:
        Calls, errors (exceptions, wrong answers, stuck callers) with samples,
        latency percentiles overall and per signature, calls/s, RSS before/after.
    """
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    wrong = [0]
    rss_before = _rss_mb()
    start = time.monotonic()
    deadline = start + seconds

    def caller(index: int) -> None:
        try:
            call, close = make_caller(index)
        except Exception as err:  # noqa: BLE001 - counted, the soak goes on
            with lock:
                errors.append(f"caller {index} set-up: {type(err).__name__}: {err}")
            return
        mine: dict[str, list[float]] = {}
        try:
            n = 0
            while n < max_calls and time.monotonic() < deadline:
                k = n % len(requests[index])
                signature, inputs = requests[index][k]
                began = time.perf_counter()
                try:
                    outputs = call(signature, inputs)
                except (
                    Exception
                ) as err:  # noqa: BLE001 - an error to count, not to stop on
                    with lock:
                        errors.append(
                            f"caller {index} {signature}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}"
                        )
                    n += 1
                    continue
                mine.setdefault(signature, []).append(time.perf_counter() - began)
                for name, value in expected[index][k].items():
                    got = np.asarray(outputs.get(name))
                    if got.shape != value.shape or not np.allclose(
                        got, value, atol=TOLERANCE
                    ):
                        with lock:
                            wrong[0] += 1
                            errors.append(f"caller {index} {signature}: wrong `{name}`")
                        break
                n += 1
        finally:
            close()
            with lock:
                for signature, values in mine.items():
                    latencies.setdefault(signature, []).extend(values)

    threads = [
        threading.Thread(target=caller, args=(i,), daemon=True)
        for i in range(len(requests))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline + STUCK_AFTER_S - time.monotonic(), 0.0))
    stuck = sum(thread.is_alive() for thread in threads)
    elapsed = time.monotonic() - start
    with lock:
        everything = [t for values in latencies.values() for t in values]
        result = {
            "callers": len(requests),
            "seconds": round(elapsed, 1),
            **_percentiles(everything),
            "calls_per_s": round(len(everything) / elapsed, 1),
            "errors": len(errors) + stuck,
            "wrong_answers": wrong[0],
            "stuck_callers": stuck,
            "error_samples": errors[:5],
            "by_signature": {
                name: _percentiles(values) for name, values in sorted(latencies.items())
            },
            "rss_mb_before": rss_before,
            "rss_mb_after": _rss_mb(),
        }
    return result


def run_soak(
    export_dir: str,
    tasks: str,
    seconds: float = 60.0,
    callers: int = 4,
    max_calls: int = 1_000_000,
) -> dict[str, Any]:
    """Both phases on one loaded export (see the module doc).

    Returns:
        {"in_process": ..., "grpc": ..., "errors": total, "zero_errors": bool, ...}.
    """
    if not seconds > 0 or callers <= 0 or max_calls <= 0:
        raise ValueError(
            f"seconds, callers and max_calls must be positive; got "
            f"{seconds!r}, {callers!r}, {max_calls!r}"
        )
    from serving.client import GrpcClient  # noqa: PLC0415 - needs grpc

    requests = make_requests(export_dir, tasks, callers)
    model = SessionSignatures(export_dir)
    try:
        expected = [
            [model.run(signature, inputs) for signature, inputs in mine]
            for mine in requests
        ]

        def in_process(_: int):
            return model.run, lambda: None

        results = {
            "in_process": soak(in_process, requests, expected, seconds, max_calls)
        }
        with LoopbackServing(export_dir, model_name="limaml", model=model) as server:

            def over_grpc(_: int):
                client = GrpcClient(server.grpc_target, "limaml", timeout_s=10.0)

                def call(signature, inputs):
                    return client.predict(inputs, signature)

                return call, client.close

            results["grpc"] = soak(over_grpc, requests, expected, seconds, max_calls)
            results["grpc"]["target"] = server.grpc_target
    finally:
        model.close()
    metadata = export.read_metadata(export_dir)
    errors = results["in_process"]["errors"] + results["grpc"]["errors"]
    return {
        "benchmark": "soak",
        "export_dir": export_dir,
        "model": {
            "meta_dim": metadata["meta_dim"],
            "max_support": metadata["max_support"],
            "inner_steps": metadata["inner_steps"],
        },
        "serving_default_rows": SERVING_ROWS,
        "seconds_per_phase": seconds,
        "callers": callers,
        "max_calls_per_caller": max_calls,
        "loader": "tf1_session (as TF Serving)",
        **results,
        "errors": errors,
        "zero_errors": errors == 0,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="Seconds per phase."
    )
    parser.add_argument("--callers", type=int, default=4, help="Concurrent callers.")
    parser.add_argument(
        "--max-calls",
        type=int,
        default=1_000_000,
        help="Most calls per caller and phase.",
    )
    parser.add_argument(
        "--architecture",
        choices=("default", "tiny"),
        default="default",
        help="Model built when --export is not given.",
    )
    parser.add_argument(
        "--export",
        default=None,
        help="An existing export version directory (needs --tasks).",
    )
    parser.add_argument("--tasks", default=None, help="Task files for the requests.")
    parser.add_argument(
        "--workdir", default=None, help="Scratch directory (default: temp)."
    )
    parser.add_argument(
        "--results", default=RESULTS, help="JSON-lines file to append to."
    )
    parser.add_argument(
        "--no-append", action="store_true", help="Only print the result."
    )
    args = parser.parse_args(argv)
    if bool(args.export) != bool(args.tasks):
        parser.error("--export and --tasks go together")
    export_dir, tasks = args.export, args.tasks
    if export_dir is None:
        workdir = args.workdir or tempfile.mkdtemp(prefix="bench_soak_")
        export_dir, tasks = build_export(workdir, args.architecture)
    result = run_soak(export_dir, tasks, args.seconds, args.callers, args.max_calls)
    result["architecture"] = args.architecture if args.export is None else "given"
    if args.no_append:
        print(json.dumps(result), flush=True)
        return result
    return record(result, args.results)


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["zero_errors"] else 1)
