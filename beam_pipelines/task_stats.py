"""make-tasks' statistics: the summed counts turned into stats.json.

The counts come from the task DoFns (`beam_pipelines.build_tasks`) as
elements, summed by `beam_pipelines.counting.SumStats`. `finalize_stats`
names every reject reason and split (0 if none), adds the size histograms and
checks the conservation identity

    rows_read = rows_in_tasks + rows_rejected + rows_dropped_by_caps + rows_cold
                + rows_dropped_as_duplicates

Beside it, what happened to the valid rows' cells and copies: blank cells
imputed per feature (`imputed_by_feature`), rows equal to an earlier row
(`duplicate_rows`, kept or dropped as `--duplicates` says) and the labels.

Example:

    stats = finalize_stats({("rows_read",): 3, ("rows_in_tasks",): 3}, {}, False)
    stats["conservation"]["holds"]   # True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tf_limaml.tasks import REJECT_REASONS, SPLITS

logger = logging.getLogger(__name__)

CONSERVATION = (
    "rows_read = rows_in_tasks + rows_rejected + rows_dropped_by_caps + rows_cold"
    " + rows_dropped_as_duplicates"
)
# Count keys that are histogram buckets: in stats.json, not in Beam's metrics.
HISTOGRAMS = ("support_size_histogram", "query_size_histogram")


def size_bucket(n: int) -> str:
    """Histogram bucket of a set size: "0", "1", "2-3", "4-7", "8-15", ..."""
    if n <= 1:
        return str(n)
    low = 1 << (n.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def _bucket_low(name: str) -> int:
    return int(name.split("-")[0])


def finalize_stats(
    counts: Mapping[tuple, int],
    options: Mapping[str, Any],
    with_entity_table: bool,
    feature_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Turns the summed counters into the stats.json object.

    Args:
        counts: {key tuple: count} from the pipeline's DoFns.
        options: The flags of the run, recorded for provenance.
        with_entity_table: Whether an entity table was read.
        feature_names: The spec's features, each listed (0 if none) under
            `rejected_by_feature`.

    Returns:
        The stats, with every reject reason and split present (0 if none) and
        the conservation identity checked.
    """

    def get(*key: str) -> int:
        return int(counts.get(key, 0))

    stats: dict[str, Any] = {
        "rows_read": get("rows_read"),
        "rows_in_tasks": get("rows_in_tasks"),
        "rows_rejected": get("rows_rejected"),
        "rows_dropped_by_caps": get("rows_dropped_by_caps"),
        "rows_cold": get("rows_cold"),
        "rows_dropped_as_duplicates": get("rows_dropped_as_duplicates"),
    }
    total = (
        stats["rows_in_tasks"]
        + stats["rows_rejected"]
        + stats["rows_dropped_by_caps"]
        + stats["rows_cold"]
        + stats["rows_dropped_as_duplicates"]
    )
    stats["conservation"] = {
        "identity": CONSERVATION,
        "rows_read": stats["rows_read"],
        "sum": total,
        "holds": stats["rows_read"] == total,
    }
    stats["rejected_by_reason"] = {
        r: get("rejected_by_reason", r) for r in REJECT_REASONS
    }
    stats["rejected_by_feature"] = _by_feature(
        counts, "rejected_by_feature", feature_names
    )
    stats["rows_valid"] = stats["rows_read"] - stats["rows_rejected"]
    stats["duplicate_rows"] = get("duplicate_rows")
    stats["rows_with_imputed_values"] = get("rows_with_imputed_values")
    stats["imputed_by_feature"] = _by_feature(
        counts, "imputed_by_feature", feature_names
    )
    stats["labels"] = {
        "positive": get("labels", "positive"),
        "negative": get("labels", "negative"),
    }
    stats["entities"] = get("entities")
    stats["entities_cold"] = get("entities_cold")
    stats["meta_conflicts"] = get("meta_conflicts")
    stats["splits"] = {
        split: {
            name: get("splits", split, name)
            for name in ("entities", "interactions", "support_rows", "query_rows")
        }
        for split in SPLITS
    }
    for part in ("support", "query"):
        name = f"{part}_size_histogram"
        buckets = sorted((key[1] for key in counts if key[0] == name), key=_bucket_low)
        stats[name] = {bucket: get(name, bucket) for bucket in buckets}
    if with_entity_table:
        stats["entity_table"] = {
            "rows_read": get("entity_table", "rows_read"),
            "rows_rejected": get("entity_table", "rows_rejected"),
            "rejected_by_reason": {
                r: get("entity_table", "rejected_by_reason", r) for r in REJECT_REASONS
            },
            "rejected_by_feature": _by_feature(
                counts, ("entity_table", "rejected_by_feature"), feature_names
            ),
            "imputed_by_feature": _by_feature(
                counts, ("entity_table", "imputed_by_feature"), feature_names
            ),
            "entities_used": get("entity_table", "entities_used"),
            "conflicts": get("entity_table", "conflicts"),
            "entities_without_interactions": get(
                "entity_table", "entities_without_interactions"
            ),
        }
    stats["options"] = dict(options)
    return stats


def _by_feature(
    counts: Mapping[tuple, int], prefix: str | tuple[str, ...], names: Sequence[str]
) -> dict[str, int]:
    prefix = (prefix,) if isinstance(prefix, str) else prefix
    found = {
        key[len(prefix)]: int(n)
        for key, n in counts.items()
        if key[: len(prefix)] == prefix and len(key) == len(prefix) + 1
    }
    return {name: found.get(name, 0) for name in sorted(set(names) | set(found))}


def log_conservation(stats: dict[str, Any]) -> dict[str, Any]:
    """Logs an error when the conservation identity does not hold; returns `stats`."""
    if not stats["conservation"]["holds"]:
        logger.error(
            "Conservation identity broken: %s, but rows_read = %d and the sum " "is %d",
            CONSERVATION,
            stats["rows_read"],
            stats["conservation"]["sum"],
        )
    return stats
