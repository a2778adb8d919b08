"""Synthetic interactions with known per-entity structure.

Every entity has a hidden preference vector p and every item a vector q; the
click probability is sigmoid(scale * p.q + item bias + entity bias). The item
vector is observable (numeric request features f0..f{h-1}); the entity's
vector is only partly observable: its `segment` meta feature names the cluster
centre p was drawn around. A global model can learn the segment's taste; only
adaptation on the entity's own support set can recover the rest, so
personalization measurably helps.

Deterministic for a given seed. It is the fast fixture of the test suite and the
default dataset of `limaml demo --dataset synthetic`.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from tf_limaml.features import FeatureSpec
from tf_limaml.tasks import SPLITS, SplitRule, assign_split, build_tasks

LATENT_DIM = 4
NUM_SEGMENTS = 8
TOPICS = ("news", "sports", "music", "film", "tech", "food")


def synthetic_spec(num_items: int = 200) -> FeatureSpec:
    """The FeatureSpec of the synthetic interactions."""
    return FeatureSpec.from_dict(
        {
            "entity": "member_id",
            "time": "timestamp",
            "label": "clicked",
            "tie_break": "item_id",
            "meta_features": [
                {
                    "name": "segment",
                    "type": "categorical",
                    "vocabulary": [f"seg_{i}" for i in range(NUM_SEGMENTS)],
                    "dim": 8,
                },
                {"name": "activity", "type": "numeric", "mean": 30.0, "std": 10.0},
            ],
            "request_features": [
                {
                    "name": "item_id",
                    "type": "categorical",
                    "hash_buckets": 2 * num_items,
                    "dim": 8,
                },
                {
                    "name": "topics",
                    "type": "multi_hot",
                    "vocabulary": list(TOPICS),
                    "dim": 4,
                    "max_values": 2,
                },
            ]
            # The item vectors are drawn N(0, 1), so their statistics are known.
            + [
                {
                    "name": f"f{k}",
                    "type": "numeric",
                    "mean": 0.0,
                    "std": 1.0,
                    "statistics": {"source": "generator"},
                }
                for k in range(LATENT_DIM)
            ],
        }
    )


def generate_interactions(
    num_entities: int = 1000,
    num_items: int = 200,
    seed: int = 0,
    min_interactions: int = 16,
    max_interactions: int = 48,
    deviation: float = 1.0,
    scale: float = 1.5,
) -> list[dict[str, Any]]:
    """Interaction rows (one dict per interaction, meta features repeated per row).

    Args:
        num_entities: Members.
        num_items: Items.
        seed: Random seed; the same seed gives the same rows.
        min_interactions: Fewest interactions per member.
        max_interactions: Most interactions per member.
        deviation: Std of a member's preference around its segment centre;
            larger means more to gain from personalization.
        scale: Strength of the preference term in the click logit.

    Returns:
        Rows with member_id, timestamp, clicked, segment, activity, item_id,
        topics ("a|b") and f0..f3.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 0.7, size=(NUM_SEGMENTS, LATENT_DIM))
    items = rng.normal(0.0, 1.0, size=(num_items, LATENT_DIM))
    item_bias = rng.normal(0.0, 0.5, size=num_items)
    item_topics = [
        sorted(rng.choice(len(TOPICS), size=rng.integers(1, 3), replace=False))
        for _ in range(num_items)
    ]
    rows = []
    for e in range(num_entities):
        segment = int(rng.integers(NUM_SEGMENTS))
        preference = centres[segment] + rng.normal(0.0, deviation, size=LATENT_DIM)
        entity_bias = rng.normal(0.0, 0.5)
        count = int(rng.integers(min_interactions, max_interactions + 1))
        chosen = rng.integers(num_items, size=count)
        start = 1_600_000_000 + int(rng.integers(0, 10_000_000))
        times = start + np.cumsum(rng.integers(0, 600, size=count))
        logits = scale * items[chosen] @ preference / np.sqrt(LATENT_DIM) + (
            item_bias[chosen] + entity_bias
        )
        clicks = rng.random(count) < 1.0 / (1.0 + np.exp(-logits))
        for i, item in enumerate(chosen):
            row = {
                "member_id": f"m{e:06d}",
                "timestamp": int(times[i]),
                "clicked": int(clicks[i]),
                "segment": f"seg_{segment}",
                "activity": float(count),
                "item_id": str(int(item)),
                "topics": "|".join(TOPICS[t] for t in item_topics[item]),
            }
            row.update(
                {f"f{k}": round(float(items[item, k]), 6) for k in range(LATENT_DIM)}
            )
            rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Writes rows as a CSV file with a header (the input of `limaml make-tasks`)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_tasks(
    output_dir: str | os.PathLike,
    num_entities: int = 1000,
    num_items: int = 200,
    seed: int = 0,
    split: str = "fraction:0.5",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    **generate_kwargs,
) -> dict[str, str]:
    """Generates interactions and writes train/val/test task files in-process.

    Uses the same rules (`tf_limaml.tasks`) and encoder (`tf_limaml.data`) as
    the Beam pipeline, without Beam.

    Returns:
        Paths by name: "train", "val", "test" (file patterns) and "spec".
    """
    from tf_limaml import data  # noqa: PLC0415 - keeps the generator TF-free

    output_dir = str(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    spec = synthetic_spec(num_items)
    rows = generate_interactions(num_entities, num_items, seed, **generate_kwargs)
    histories, rejected, counts = build_tasks(spec, rows, SplitRule.parse(split))
    by_split: dict[str, list] = {name: [] for name in SPLITS}
    for history in histories:
        if not history.cold:
            by_split[
                assign_split(history.entity_id, seed, val_fraction, test_fraction)
            ].append(history)
    paths = {}
    for name in SPLITS:
        path = os.path.join(output_dir, f"{name}-00000-of-00001.tfrecord.gz")
        data.write_tasks(path, data.tasks_from_histories(spec, by_split[name]))
        paths[name] = path
        counts[f"entities_{name}"] = len(by_split[name])
    spec_path = os.path.join(output_dir, "spec.json")
    spec.save(spec_path)
    paths["spec"] = spec_path
    counts["rows_rejected"] = len(rejected)
    with open(os.path.join(output_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=2, sort_keys=True)
    return paths
