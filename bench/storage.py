"""The storage argument of LiMAML in numbers, from the reference model itself.

Three ways to keep per-entity personalization, for the `reference`
configuration of `bench/meta_train.py` (meta MLP [64, 32], so d = 32):

* `offline_embedding`: what LiMAML stores, the adapted meta embedding
  (d float32) plus the entity id;
* `per_entity_weights`: the adapted meta block itself, every parameter the
  inner loop adapts (`LiMAMLModel.adaptable_variables`), in float32, plus the id;
* `id_embedding`: the ID-embedding baseline's per-entity row
  (`tf_limaml.experiments.baselines.PointwiseModel`: its member vector and
  member bias), in float32, plus the id.

Each is counted from a built model, not from the config's numbers, and
totalled for 1M, 10M and 100M entities. Given the embed job's entities per
CPU-second (`bench/scale.py` measures it on the same configuration), it also
gives the CPU hours of refreshing every embedding once a day.

    python bench/storage.py                           # bytes only
    python bench/storage.py --entities-per-cpu-s 900  # and the refresh cost
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENTITY_COUNTS = (1_000_000, 10_000_000, 100_000_000)
# An entity id as a 64-bit integer key; string ids cost their length instead.
ID_BYTES = 8
FLOAT32_BYTES = 4
REFRESH_ENTITIES = 100_000_000
SECONDS_PER_HOUR = 3600.0


def parameter_counts(model=None) -> dict[str, int]:
    """Per-entity float counts of the three stores, from a built model.

    Args:
        model: A LiMAMLModel (default: the reference configuration's).

    Returns:
        {"meta_dim", "adaptable_params", "id_embedding_params"}.
    """
    import numpy as np  # noqa: PLC0415

    from tf_limaml.experiments.baselines import PointwiseModel  # noqa: PLC0415

    if model is None:
        from bench.meta_train import REFERENCE  # noqa: PLC0415

        model = REFERENCE.model()
    adaptable = sum(int(np.prod(v.shape)) for v in model.adaptable_variables().values())
    # One member is enough: the table has a row per member (plus one shared
    # out-of-vocabulary row); a row is what each member costs.
    baseline = PointwiseModel(model, members=["member"])
    rows = baseline.member_embedding.input_dim
    id_params = (
        int(np.prod(baseline.member_embedding.embeddings.shape))
        + int(np.prod(baseline.member_bias.embeddings.shape))
    ) // rows
    return {
        "meta_dim": int(model.meta_dim),
        "adaptable_params": adaptable,
        "id_embedding_params": id_params,
    }


def costs(
    entities_per_cpu_s: float | None = None,
    counts: dict[str, int] | None = None,
    entity_counts: Sequence[int] = ENTITY_COUNTS,
    id_bytes: int = ID_BYTES,
    refresh_entities: int = REFRESH_ENTITIES,
) -> dict[str, Any]:
    """Bytes per entity and totals of the three stores, and the daily refresh.

    Args:
        entities_per_cpu_s: The embed job's measured rate per CPU-second
            (None: no refresh figure).
        counts: `parameter_counts()` (default: computed from the reference model).
        entity_counts: Entity counts to total.
        id_bytes: Bytes of one stored entity id.
        refresh_entities: Entities refreshed per day.
    """
    counts = counts or parameter_counts()
    per_entity = {
        "offline_embedding": counts["meta_dim"] * FLOAT32_BYTES + id_bytes,
        "per_entity_weights": counts["adaptable_params"] * FLOAT32_BYTES + id_bytes,
        "id_embedding": counts["id_embedding_params"] * FLOAT32_BYTES + id_bytes,
    }
    out: dict[str, Any] = {
        **counts,
        "id_bytes": id_bytes,
        "bytes_per_entity": per_entity,
        "total_gb": {
            str(n): {k: round(v * n / 1e9, 3) for k, v in per_entity.items()}
            for n in entity_counts
        },
        "weights_vs_embedding": round(
            per_entity["per_entity_weights"] / per_entity["offline_embedding"], 1
        ),
    }
    if entities_per_cpu_s:
        cpu_hours = refresh_entities / entities_per_cpu_s / SECONDS_PER_HOUR
        out["refresh"] = {
            "entities_per_day": refresh_entities,
            "entities_per_cpu_s": entities_per_cpu_s,
            "cpu_hours_per_day": round(cpu_hours, 1),
            "cores_busy_all_day": round(cpu_hours / 24.0, 2),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entities-per-cpu-s",
        type=float,
        default=None,
        help="The embed job's rate (bench/scale.py's refresh run).",
    )
    parser.add_argument("--id-bytes", type=int, default=ID_BYTES)
    args = parser.parse_args(argv)
    result = costs(args.entities_per_cpu_s, id_bytes=args.id_bytes)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
