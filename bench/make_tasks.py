"""Benchmark of the task pipeline (beam_pipelines/make_tasks.py).

Generates synthetic interactions (default 1,000,000 rows over 20,000 entities),
writes them as sharded CSV, and times, in one run on one machine:

* `pandas_floor`: an in-process pandas implementation of the same validation,
  split and encoding (vectorized where pandas can, `encode_task` per entity),
  the one-process floor;
* `direct_in_memory`: the Beam pipeline on DirectRunner, in memory;
* `direct_multi_processing`: the same with `--direct_running_mode=multi_processing`.

It reports rows/s of each and the pipeline's speed as a fraction of the floor's
(`speed_vs_floor` = pipeline rows/s / floor rows/s), checks that all three
write the same records, prints one JSON object and appends it to
bench/results.jsonl with the machine it ran on.

    python bench/make_tasks.py                       # full size
    python bench/make_tasks.py --rows 100000 --entities 2000
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.common import machine  # noqa: E402
from tf_limaml import tasks as task_rules  # noqa: E402
from tf_limaml.features import CATEGORICAL, NUMERIC, FeatureSpec  # noqa: E402


def generate(
    rows: int, entities: int, seed: int, input_dir: str, shards: int
) -> tuple[list[str], FeatureSpec, int]:
    """Synthetic interactions as `shards` CSV files; returns paths, spec, row count."""
    from tf_limaml.datasets import synthetic

    mean = max(rows // entities, 2)
    data = synthetic.generate_interactions(
        num_entities=entities,
        seed=seed,
        min_interactions=max(mean // 2, 1),
        max_interactions=mean + mean // 2,
    )
    frame = pd.DataFrame(data)
    paths = []
    for index, chunk in enumerate(np.array_split(np.arange(len(frame)), shards)):
        path = os.path.join(input_dir, f"interactions-{index:05d}-of-{shards:05d}.csv")
        frame.iloc[chunk].to_csv(path, index=False)
        paths.append(path)
    return paths, synthetic.synthetic_spec(), len(frame)


# ------------------------------------------------------------ the pandas floor
def _numeric(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce")


def pandas_floor(
    paths: Sequence[str],
    spec: FeatureSpec,
    rule: task_rules.SplitRule,
    output_dir: str,
    min_support: int = 1,
    min_query: int = 1,
    max_support: int | None = None,
    max_query: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, int]:
    """The same rules as the pipeline in one process, vectorized with pandas.

    Returns:
        Counts: rows_read, rows_rejected, rows_in_tasks, rows_dropped_by_caps,
        rows_cold, entities.
    """
    import tensorflow as tf

    from tf_limaml import data

    raw = pd.concat(
        [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths],
        ignore_index=True,
    )
    rows_read = len(raw)
    ok = np.ones(rows_read, dtype=bool)
    clean = pd.DataFrame(index=raw.index)
    clean[spec.entity] = raw[spec.entity].str.strip()
    ok &= (clean[spec.entity] != "").to_numpy()
    clean[spec.time] = _numeric(raw[spec.time]) + 0.0
    ok &= np.isfinite(clean[spec.time]).to_numpy() & (clean[spec.time].abs() < 2**62)
    label = _numeric(raw[spec.label.column])
    ok &= np.isfinite(label).to_numpy()
    if spec.label.threshold is not None:
        clean["label"] = (label >= spec.label.threshold).astype(int)
    else:
        ok &= label.isin([0.0, 1.0]).to_numpy()
        clean["label"] = label.fillna(0).astype(int)
    for feature in spec.features:
        column = raw[feature.name].str.strip()
        if feature.type == NUMERIC:
            values = _numeric(column)
            if feature.default is not None:
                values = values.where(column != "", feature.default)
            ok &= (np.isfinite(values) & (values.abs() <= 3.0e38)).to_numpy()
            clean[feature.name] = values + 0.0
        elif feature.type == CATEGORICAL:
            if feature.vocabulary is not None and not feature.allow_oov:
                ok &= column.isin(feature.vocabulary).to_numpy()
            clean[feature.name] = column
        else:
            width, separator = feature.values_per_row, feature.separator
            values = column.map(
                lambda cell, separator=separator: tuple(
                    v for v in (v.strip() for v in cell.split(separator)) if v
                )
            )
            if feature.vocabulary is not None and not feature.allow_oov:
                vocabulary = set(feature.vocabulary)
                ok &= values.map(vocabulary.issuperset).to_numpy()
            clean[feature.name] = values.map(lambda v, width=width: v[:width])
    if spec.tie_break and spec.tie_break not in clean:
        clean[spec.tie_break] = raw[spec.tie_break].str.strip()
    rows_rejected = int((~ok).sum())
    clean = clean[ok]

    # Same order as tasks.sort_rows: time, tie-break (numbers first, by value),
    # then every column by name.
    keys = [spec.entity, spec.time]
    if spec.tie_break:
        tie_number = _numeric(clean[spec.tie_break])
        clean = clean.assign(
            _tie_rank=tie_number.isna().astype(int),
            _tie_num=tie_number.fillna(0.0),
            _tie_str=clean[spec.tie_break].where(tie_number.isna(), ""),
        )
        keys += ["_tie_rank", "_tie_num", "_tie_str"]
    content = sorted(c for c in clean.columns if not c.startswith("_tie"))
    clean = clean.sort_values(keys + content, kind="mergesort", ignore_index=True)

    groups = clean.groupby(spec.entity, sort=False)
    n = groups[spec.time].transform("size").to_numpy()
    position = groups.cumcount().to_numpy()
    if rule.kind == "fraction":
        n_support = np.floor(n * rule.value).astype(int)
    elif rule.kind == "last":
        n_support = np.maximum(n - int(rule.value), 0)
    else:
        n_support = (
            (clean[spec.time] < rule.value)
            .groupby(clean[spec.entity])
            .transform("sum")
            .to_numpy()
        )
    cold = (n_support < min_support) | (n - n_support < min_query)
    in_support = position < n_support
    keep = np.where(
        in_support,
        position >= n_support - (max_support or 0) if max_support else True,
        position - n_support < max_query if max_query else True,
    )
    keep = keep | cold
    rows_cold = int(cold.sum())
    rows_dropped = int((~keep).sum())

    meta_names = [f.name for f in spec.meta_features]
    meta = groups[meta_names].last().to_dict("index") if meta_names else {}
    kept = clean[keep]
    records = kept[
        [spec.time, "label"] + [f.name for f in spec.request_features]
    ].to_dict("records")
    kept_support = in_support[keep]
    kept_cold = cold[keep]
    entity_ids = kept[spec.entity].to_numpy()
    boundaries = np.flatnonzero(entity_ids[1:] != entity_ids[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(entity_ids)]])
    by_split: dict[str, list[bytes]] = {
        name: [] for name in task_rules.SPLITS + ("cold",)
    }
    for start, end in zip(starts, ends, strict=True):
        entity_id = entity_ids[start]
        meta_values = meta.get(entity_id, {})
        split_at = start + int(kept_support[start:end].sum())
        record = data.encode_task(
            spec, entity_id, meta_values, records[start:split_at], records[split_at:end]
        ).SerializeToString(deterministic=True)
        name = (
            "cold"
            if kept_cold[start]
            else task_rules.assign_split(entity_id, seed, val_fraction, test_fraction)
        )
        by_split[name].append(record)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for name, split_records in by_split.items():
        path = os.path.join(output_dir, f"{name}-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options=options) as writer:
            for record in split_records:
                writer.write(record)
    return {
        "rows_read": rows_read,
        "rows_rejected": rows_rejected,
        "rows_in_tasks": int(keep.sum()) - rows_cold,
        "rows_dropped_by_caps": rows_dropped,
        "rows_cold": rows_cold,
        "entities": sum(len(v) for k, v in by_split.items() if k != "cold"),
    }


def read_output(output_dir: str) -> dict[str, list[bytes]]:
    """Every record by split, sorted: equal outputs give equal dicts."""
    import tensorflow as tf

    out = {}
    for name in task_rules.SPLITS + ("cold",):
        files = sorted(glob.glob(os.path.join(output_dir, f"{name}-*.tfrecord.gz")))
        out[name] = sorted(
            r.numpy()
            for f in files
            for r in tf.data.TFRecordDataset(f, compression_type="GZIP")
        )
    return out


# ------------------------------------------------------------------ the bench
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument(
        "--input-shards", type=int, default=8, help="CSV files the input is written as."
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="--direct_num_workers of the multi_processing run.",
    )
    parser.add_argument("--split", default="fraction:0.5")
    parser.add_argument("--max-support", type=int, default=32)
    parser.add_argument("--max-query", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes",
        default="in_memory,multi_processing",
        help="Comma-separated DirectRunner modes to time.",
    )
    parser.add_argument(
        "--workdir", default=None, help="Scratch directory (default: tmp)."
    )
    parser.add_argument("--results", default=os.path.join(HERE, "results.jsonl"))
    args = parser.parse_args(argv)

    from beam_pipelines import make_tasks

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_make_tasks_")
    input_dir = os.path.join(workdir, "input")
    os.makedirs(input_dir, exist_ok=True)
    started = time.perf_counter()
    paths, spec, n_rows = generate(
        args.rows, args.entities, args.seed, input_dir, args.input_shards
    )
    spec_path = os.path.join(workdir, "spec.json")
    spec.save(spec_path)
    generate_s = time.perf_counter() - started
    rule = task_rules.SplitRule.parse(args.split)

    result: dict[str, Any] = {
        "bench": "make_tasks",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "rows": n_rows,
        "entities": args.entities,
        "input_shards": args.input_shards,
        "split": args.split,
        "max_support": args.max_support,
        "max_query": args.max_query,
        "generate_s": round(generate_s, 1),
        "machine": machine(),
    }
    floor_dir = os.path.join(workdir, "pandas")
    os.makedirs(floor_dir, exist_ok=True)
    started = time.perf_counter()
    counts = pandas_floor(
        paths,
        spec,
        rule,
        floor_dir,
        max_support=args.max_support,
        max_query=args.max_query,
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    floor_rate = n_rows / seconds
    result["pandas_floor"] = {
        "seconds": round(seconds, 2),
        "rows_per_s": round(floor_rate),
    }
    expected = read_output(floor_dir)

    pattern = os.path.join(input_dir, "interactions-*.csv")
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        out = os.path.join(workdir, mode)
        shutil.rmtree(out, ignore_errors=True)
        flags = [
            "--input",
            pattern,
            "--features",
            spec_path,
            "--output",
            out,
            "--split",
            args.split,
            "--max-support",
            str(args.max_support),
            "--max-query",
            str(args.max_query),
            "--seed",
            str(args.seed),
            f"--direct_running_mode={mode}",
        ]
        if mode == "multi_processing":
            flags.append(f"--direct_num_workers={args.workers}")
        started = time.perf_counter()
        make_tasks.run(flags)
        seconds = time.perf_counter() - started
        with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        same_counts = all(stats[k] == v for k, v in counts.items())
        result[f"direct_{mode}"] = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(n_rows / seconds),
            "speed_vs_floor": round(n_rows / seconds / floor_rate, 3),
            "records_match_floor": read_output(out) == expected,
            "stats_match_floor": same_counts,
            "conservation_holds": stats["conservation"]["holds"],
        }
        if mode == "multi_processing":
            result[f"direct_{mode}"]["workers"] = args.workers
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    line = json.dumps(result)
    print(line)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
