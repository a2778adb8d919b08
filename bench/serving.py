"""Benchmark of the export: serving latency and offline embedding throughput.

Measures, in one run on this machine:

* in-process latency of the exported signatures loaded as TF Serving loads
  them (TF1 loader, `session.run` on the SignatureDef tensors), p50 and p99
  over `--calls` calls: `serving_default` with B=100 and `adapt_and_predict`
  with S=50 support rows and Q=100 query rows;
* throughput of `beam_pipelines.generate_embeddings` (DirectRunner, end to end:
  reading task files, batched `meta_embedding` calls, writing TFRecords, Beam's
  start-up included) in entities/s, against a naive Python loop that reads,
  parses and writes the same way but calls `adapt_and_predict` once per
  entity. The two alternate for `--rounds` rounds, and the ratios use
  each side's median rate. `throughput_ratio` compares the two end to end (the Beam side
  with its start-up, the naive side without its warm-up);
  `throughput_ratio_vs_calls_only` compares with the naive loop's signature
  calls alone (a lower bound on the speed-up).

The model has the default architecture (`tf_limaml.training.default_model_kwargs`)
with untrained weights: latency does not depend on the weights' values.

Prints one JSON object and appends it to bench/results.jsonl with the machine.

    python bench/serving.py                 # ~2-4 minutes on 2 cores
    python bench/serving.py --entities 5000 --calls 200 --no-append   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import git_commit, machine  # noqa: E402
from tf_limaml import data, export, training  # noqa: E402
from tf_limaml.datasets import synthetic  # noqa: E402
from tf_limaml.features import MULTI_HOT, NUMERIC, FeatureSpec  # noqa: E402
from tf_limaml.model import LiMAMLModel, MetaConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")
SERVING_BATCH = 100
SUPPORT_ROWS = 50
QUERY_ROWS = 100
WARMUP_ENTITIES = 20


def request_rows(spec: FeatureSpec, rows: int, rng: np.random.Generator) -> dict:
    """Random request features of `rows` interactions, typed as the export wants."""
    out = {}
    for feature in spec.request_features:
        if feature.type == NUMERIC:
            out[feature.name] = rng.normal(size=rows).astype(np.float32)
        elif feature.type == MULTI_HOT:
            vocab = list(feature.vocabulary or ["x"])
            out[feature.name] = np.array(
                [
                    [vocab[rng.integers(len(vocab))].encode()]
                    + [b""] * (feature.values_per_row - 1)
                    for _ in range(rows)
                ],
                dtype=object,
            )
        else:
            out[feature.name] = np.array(
                [str(rng.integers(1000)).encode() for _ in range(rows)], dtype=object
            )
    return out


def latency(fn, calls: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "calls": calls,
    }


def session_runner(export_dir: str):
    """(run(signature, inputs) -> outputs, close) with the TF1 loader, like TF Serving."""
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], export_dir
        )
    signatures = meta_graph.signature_def

    def run(name, inputs):
        sig = signatures[name]
        return session.run(
            {k: v.name for k, v in sig.outputs.items()},
            {sig.inputs[k].name: v for k, v in inputs.items()},
        )

    return run, session.close


def replicate_tasks(pattern: str, path: str, count: int) -> int:
    """Writes `count` task records cycling through `pattern`'s, with unique entity ids."""
    base = [
        tf.train.SequenceExample.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(
            tf.io.gfile.glob(pattern), compression_type="GZIP"
        )
    ]

    def records():
        for i in range(count):
            record = tf.train.SequenceExample()
            record.CopyFrom(base[i % len(base)])
            ids = record.context.feature["entity_id"].bytes_list.value
            ids[0] = ids[0] + f"_{i}".encode()
            yield record

    return data.write_tasks(path, records())


def naive_loop(
    export_dir: str, spec: FeatureSpec, tasks_path: str, output: str, entities: int
) -> dict:
    """The naive job: one adapt_and_predict call per entity, in a Python loop.

    It reads, parses (with the same compiled parser as the Beam job) and writes
    (the same tf.Example rows) like the Beam job, so the end-to-end rates
    compare like with like; the signature calls are also timed on their own.
    """
    from beam_pipelines.generate_embeddings import to_example  # noqa: PLC0415

    loaded = tf.saved_model.load(export_dir)
    adapt = loaded.signatures[export.ADAPT_AND_PREDICT]
    metadata = export.read_metadata(export_dir)
    max_support = metadata["max_support"]
    parse = tf.function(
        lambda s: data.parse_task_batch(s, spec, max_support, 64),
        input_signature=[tf.TensorSpec([None], tf.string)],
        autograph=False,
    )
    meta_names = [f.name for f in spec.meta_features]
    request_names = [f.name for f in spec.request_features]
    calls_seconds = 0.0
    done = 0
    start = time.perf_counter()
    if entities <= WARMUP_ENTITIES:
        raise ValueError(
            f"--naive-entities must be more than {WARMUP_ENTITIES} (warm-up)"
        )
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(output + ".tfrecord.gz", options=options) as writer:
        for serialized in tf.data.TFRecordDataset(
            tasks_path, compression_type="GZIP"
        ).take(entities):
            # Sliced as numpy: cheaper per entity than eager TF slicing ops.
            batch = {k: v.numpy() for k, v in parse(serialized[None]).items()}
            n_s = min(int(batch["n_support"][0]), max_support)
            n_q = int(batch["query_mask"][0].sum())
            inputs = {name: batch[name][0] for name in meta_names}
            inputs["support_label"] = batch["support_label"][0, :n_s]
            for name in request_names:
                inputs[f"support_{name}"] = batch[f"support_{name}"][0, :n_s]
                inputs[f"query_{name}"] = batch[f"query_{name}"][0, :n_q]
            call_start = time.perf_counter()
            embedding = adapt(**inputs)[export.EMBEDDING_KEY].numpy()
            if done >= WARMUP_ENTITIES:
                calls_seconds += time.perf_counter() - call_start
            writer.write(
                to_example(
                    {
                        "entity_id": batch["entity_id"][0].decode(),
                        "embedding": embedding.tolist(),
                        "model_version": metadata["model_version"],
                        "n_support": n_s,
                        "generated_at": 0,
                    }
                )
            )
            done += 1
            if done == WARMUP_ENTITIES:
                # Tracing the parser and first calls are one-time costs: not timed.
                start = time.perf_counter()
    seconds = time.perf_counter() - start
    timed = done - WARMUP_ENTITIES
    return {
        "entities_timed": timed,
        "seconds_end_to_end": round(seconds, 2),
        "end_to_end_entities_per_s": round(timed / seconds, 1),
        "calls_only_entities_per_s": round(timed / calls_seconds, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entities",
        type=int,
        default=50_000,
        help="Entities embedded by the Beam job.",
    )
    parser.add_argument(
        "--naive-entities",
        type=int,
        default=1_000,
        help="Entities of the naive per-entity loop.",
    )
    parser.add_argument(
        "--calls", type=int, default=1_000, help="Calls per latency figure."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Alternating rounds of the naive loop and the Beam job (medians).",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="Entities per meta_embedding call in the Beam job.",
    )
    parser.add_argument(
        "--workdir", default=None, help="Scratch directory (default: temp)."
    )
    parser.add_argument(
        "--no-append", action="store_true", help="Do not append to bench/results.jsonl."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or tempfile.mkdtemp(prefix="limaml-bench-")
    rng = np.random.default_rng(0)

    paths = synthetic.write_tasks(
        os.path.join(workdir, "tasks"), num_entities=1000, seed=0
    )
    spec = FeatureSpec.load(paths["spec"])
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        spec, MetaConfig(jit_compile=False), **training.default_model_kwargs()
    )
    export_dir = export.export_model(
        model, os.path.join(workdir, "export"), max_support=SUPPORT_ROWS
    )
    metadata = export.read_metadata(export_dir)

    # --- latency, as TF Serving runs the graph
    run, close = session_runner(export_dir)
    serving_inputs = {
        "meta_embedding": rng.normal(size=(SERVING_BATCH, model.meta_dim)).astype(
            np.float32
        ),
        **request_rows(spec, SERVING_BATCH, rng),
    }
    adapt_inputs = {
        "segment": np.array(b"seg_1", dtype=object),
        "activity": np.array(30.0, np.float32),
        "support_label": rng.integers(0, 2, SUPPORT_ROWS).astype(np.float32),
    }
    adapt_inputs.update(
        {f"support_{k}": v for k, v in request_rows(spec, SUPPORT_ROWS, rng).items()}
    )
    adapt_inputs.update(
        {f"query_{k}": v for k, v in request_rows(spec, QUERY_ROWS, rng).items()}
    )
    serving_latency = latency(
        lambda: run(export.SERVING_DEFAULT, serving_inputs), args.calls
    )
    adapt_latency = latency(
        lambda: run(export.ADAPT_AND_PREDICT, adapt_inputs), args.calls
    )
    close()

    # --- throughput: the Beam job against a per-entity loop. The two
    # alternate for --rounds rounds (naive, Beam, naive, Beam, ...) so that a
    # slow spell of this shared machine falls on both sides.
    tasks_path = os.path.join(workdir, "bench_tasks.tfrecord.gz")
    replicate_tasks(paths["train"], tasks_path, args.entities)
    from beam_pipelines import generate_embeddings  # noqa: PLC0415

    beam_runs, naive_runs = [], []
    for round_index in range(args.rounds):
        # Each timed run starts without the previous one's garbage.
        gc.collect()
        naive_runs.append(
            naive_loop(
                export_dir,
                spec,
                tasks_path,
                os.path.join(workdir, f"naive-{round_index}"),
                args.naive_entities,
            )
        )
        output = os.path.join(workdir, f"embeddings-{round_index}")
        gc.collect()
        start = time.perf_counter()
        generate_embeddings.run(
            [
                "--export",
                export_dir,
                "--tasks",
                tasks_path,
                "--output",
                output,
                "--batch-size",
                str(args.batch_size),
            ]
        )
        seconds = time.perf_counter() - start
        with open(os.path.join(output, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        beam_runs.append(
            {
                "entities": summary["entities_out"],
                "balanced": summary["balanced"],
                "seconds_end_to_end": round(seconds, 2),
                "entities_per_s": round(summary["entities_out"] / seconds, 1),
            }
        )

    def median(runs, key):
        return float(np.median([run[key] for run in runs]))

    beam_rate = median(beam_runs, "entities_per_s")
    naive_rate = median(naive_runs, "end_to_end_entities_per_s")
    naive_calls_rate = median(naive_runs, "calls_only_entities_per_s")
    result = {
        "benchmark": "serving",
        "git_commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": machine(),
        "model": {
            **training.default_model_kwargs(),
            "meta_dim": model.meta_dim,
            "inner_steps": metadata["inner_steps"],
            "max_support": metadata["max_support"],
            "weights": "untrained",
        },
        "latency_loader": "tf1_session (as TF Serving)",
        "serving_default_b100": serving_latency,
        "adapt_and_predict_s50_q100": adapt_latency,
        "generate_embeddings": {
            "batch_size": args.batch_size,
            "runner": "DirectRunner (defaults)",
            "entities_per_s": round(beam_rate, 1),
            "runs": beam_runs,
        },
        "naive_adapt_and_predict_loop": {
            "end_to_end_entities_per_s": round(naive_rate, 1),
            "calls_only_entities_per_s": round(naive_calls_rate, 1),
            "runs": naive_runs,
        },
        # Same work on both sides: read, parse, embed, write. The Beam side
        # includes its start-up (pipeline, model load, first calls); the naive
        # side's warm-up entities are not timed.
        "throughput_ratio": round(beam_rate / naive_rate, 2),
        # Against the signature calls alone: a lower bound on the speed-up.
        "throughput_ratio_vs_calls_only": round(beam_rate / naive_calls_rate, 2),
        "target_ratio": 20.0,
    }
    print(json.dumps(result))
    if not args.no_append:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
