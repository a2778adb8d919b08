"""Command-line arguments of the pipelines, importable without Beam or TensorFlow.

`limaml make-tasks` and `limaml embed` validate their flags with these parsers
before anything heavy is imported; the pipelines' `run(argv)` use the same
parsers, and pass the flags they do not know to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse

from tf_limaml.argtypes import fraction as _fraction
from tf_limaml.argtypes import non_negative_int as _non_negative_int
from tf_limaml.argtypes import positive_int as _positive_int
from tf_limaml.argtypes import unit_interval as _unit_interval


def make_tasks_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags of `limaml make-tasks` / `beam_pipelines.make_tasks`."""
    parser.add_argument(
        "--input",
        required=True,
        help="File pattern of the interactions (local, gs://, ...).",
    )
    parser.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="Input format; CSV needs a header row.",
    )
    parser.add_argument("--features", required=True, help="FeatureSpec JSON file.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument(
        "--entities",
        default=None,
        help="Optional entity table (same format) with the meta features.",
    )
    parser.add_argument(
        "--split",
        default="fraction:0.5",
        help="fraction:F | cutoff:UNIX_TIME | last:K (default fraction:0.5).",
    )
    parser.add_argument(
        "--min-support",
        type=_non_negative_int,
        default=1,
        help="Entities with fewer support rows are cold (default 1).",
    )
    parser.add_argument(
        "--min-query",
        type=_non_negative_int,
        default=1,
        help="Entities with fewer query rows are cold (default 1).",
    )
    parser.add_argument(
        "--max-support",
        type=_positive_int,
        default=None,
        help="Keep each entity's most recent N support rows.",
    )
    parser.add_argument(
        "--max-query",
        type=_positive_int,
        default=None,
        help="Keep each entity's first N query rows.",
    )
    parser.add_argument("--val-fraction", type=_fraction, default=0.1)
    parser.add_argument("--test-fraction", type=_fraction, default=0.1)
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the entity split hash."
    )
    parser.add_argument(
        "--num-shards",
        type=_non_negative_int,
        default=0,
        help="Output shards per split (0: let the runner decide).",
    )
    _passes_argument(parser)
    parser.add_argument(
        "--duplicates",
        choices=("keep", "drop"),
        default="keep",
        help="Rows equal in every column the spec reads: keep them all (default) "
        "or keep one. Counted in stats.json either way.",
    )
    parser.add_argument(
        "--min-valid-fraction",
        type=_unit_interval,
        default=0.5,
        help="Stop with an error (exit 2) when fewer than this share of the rows "
        "pass validation (default 0.5; 0 stops only when none does). The dead "
        "letter and stats.json are written first.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Delete the task files, dead letter and stats of an "
        "earlier run in --output first (otherwise they are an error).",
    )
    return parser


def _passes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passes",
        type=_positive_int,
        default=1,
        help="Run as this many pipelines, each over 1/N of the output shards, so "
        "that a runner which holds a GroupByKey in memory (the DirectRunner) "
        "needs 1/N of the memory; each pass reads the input again. Needs "
        "--num-shards >= N (default with N > 1: N). Same files as one pass.",
    )


def embed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the flags of `limaml embed` / `beam_pipelines.generate_embeddings`."""
    parser.add_argument(
        "--export", required=True, help="SavedModel version directory, e.g. EXPORT/1."
    )
    parser.add_argument("--tasks", required=True, help="File pattern of task records.")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="Largest batch of entities per signature call.",
    )
    parser.add_argument(
        "--max-support",
        type=_positive_int,
        default=None,
        help="Support rows per entity fed to the signature "
        "(default: the export's maximum).",
    )
    parser.add_argument(
        "--parquet", action="store_true", help="Also write the embeddings as Parquet."
    )
    parser.add_argument(
        "--num-shards",
        type=_non_negative_int,
        default=0,
        help="Shards per output (0: one per ~128 MiB).",
    )
    _passes_argument(parser)
    parser.add_argument(
        "--max-rejected-fraction",
        type=_unit_interval,
        default=0.0,
        help="Fail the run (after writing every output) when more than this "
        "fraction of the task records is rejected (default 0: any).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Delete the embeddings of an earlier run in --output.",
    )
    return parser
