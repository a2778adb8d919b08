"""Peak RSS of make-tasks' vocabulary step: bounded selection vs the old grouping.

Runs `beam_pipelines.analyze.AnalyzeFeatures` (the analyzer make-tasks runs)
on a synthetic PCollection of `--distinct` distinct values of one `"auto"`
categorical feature with `top_k`, value j occurring 1 + j % 3 times (so the
cut at `top_k` falls inside a tie). One child process per variant, each on
the DirectRunner in memory with one worker, reports its peak RSS (ru_maxrss)
and wall time:

* `bounded`: `VocabularyCombineFn` (the default): accumulators keep at most
  2 * `top_k` candidates;
* `grouped`: `AnalyzeFeatures(bounded=False)`: every (value, count) of the
  feature grouped on one worker, then selected (the path before issue 25);
* `floor`: only the input and `Count.PerElement`, no selection: what the
  DirectRunner holds anyway (its in-memory combiner table holds every
  distinct (feature, value) key; on a distributed runner that table is
  sharded by key across workers).

Both selecting variants must write the same spec (checked, when both run).
The result is appended to bench/results.jsonl with the commit and the machine.

    python bench/vocabulary.py [--distinct 1000000] [--top-k 1000] \
        [--variants floor,bounded,grouped]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import record  # noqa: E402

VARIANTS = ("floor", "bounded", "grouped")
CHUNKS = 200


def spec_of(top_k: int):
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    return FeatureSpec.from_dict(
        {
            "entity": "user",
            "time": "ts",
            "label": "click",
            "request_features": [
                {
                    "name": "item",
                    "type": "categorical",
                    "vocabulary": "auto",
                    "top_k": top_k,
                }
            ],
        }
    )


def _values(chunk: int, distinct: int):
    from beam_pipelines.analyze import VALUE  # noqa: PLC0415

    step = -(-distinct // CHUNKS)
    for j in range(chunk * step, min(distinct, (chunk + 1) * step)):
        for _ in range(1 + j % 3):
            yield VALUE, "item", f"id{j:010d}"


def run_variant(variant: str, distinct: int, top_k: int, out: str) -> dict:
    import apache_beam as beam  # noqa: PLC0415
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    from beam_pipelines import analyze  # noqa: PLC0415

    options = PipelineOptions(
        runner="DirectRunner", direct_running_mode="in_memory", direct_num_workers=1
    )
    start = time.perf_counter()
    with beam.Pipeline(options=options) as pipeline:
        inputs = (
            pipeline
            | beam.Create(list(range(CHUNKS)))
            | beam.FlatMap(_values, distinct)
        )
        if variant == "floor":
            result = (
                inputs
                | beam.Map(lambda e: (e[1], e[2]))
                | beam.combiners.Count.PerElement()
                | beam.combiners.Count.Globally()
                | beam.Map(str)
            )
        else:
            result = inputs | analyze.AnalyzeFeatures(
                spec_of(top_k), bounded=variant == "bounded"
            )
        result | beam.io.WriteToText(out, shard_name_template="")
    seconds = time.perf_counter() - start
    with open(out) as f:
        text = f.read()
    return {
        "variant": variant,
        "distinct": distinct,
        "top_k": top_k,
        "seconds": round(seconds, 1),
        # ru_maxrss is KiB on Linux.
        "peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "output_sha": __import__("hashlib").sha256(text.encode()).hexdigest()[:16],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distinct", type=int, default=1_000_000)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--variant", choices=VARIANTS, help="one variant, in-process")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated variants to run, each in its own process",
    )
    args = parser.parse_args(argv)
    if args.variant:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_variant(
                args.variant, args.distinct, args.top_k, os.path.join(tmp, "out")
            )
        print(json.dumps(result))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = []
    for variant in variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", variant]
            + ["--distinct", str(args.distinct), "--top-k", str(args.top_k)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in results}
    same = None
    if {"bounded", "grouped"} <= set(by):
        same = by["bounded"]["output_sha"] == by["grouped"]["output_sha"]
    record(
        {
            "benchmark": "vocabulary",
            "runner": "DirectRunner in_memory, 1 worker",
            "distinct": args.distinct,
            "top_k": args.top_k,
            "same_spec": same,
            "peak_rss_mib": {r["variant"]: r["peak_rss_mib"] for r in results},
            "seconds": {r["variant"]: r["seconds"] for r in results},
            "results": results,
        }
    )
    return 0 if same in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
