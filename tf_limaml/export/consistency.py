"""Stored embeddings against in-graph adaptation: `check_serving_consistency`.

The online path scores with an embedding that `limaml embed` computed
offline; `adapt_and_predict` adapts in the graph. Both must give the same
scores, entity by entity, or the offline job and the export disagree (another
`max_support`, another export version, another model).

Example:

    report = check_serving_consistency(
        "exports/limaml", "tasks/test-*.tfrecord.gz", "embeddings/embeddings-*"
    )
    assert report["consistent"], report
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data
from tf_limaml.export.saved_model import read_metadata
from tf_limaml.features import QUERY, SUPPORT, FeatureSpec
from tf_limaml.signatures import (
    ADAPT_AND_PREDICT,
    META_EMBEDDING_KEY,
    SCORE_KEY,
    SERVING_DEFAULT,
    SUPPORT_LABEL_KEY,
)

logger = logging.getLogger(__name__)


def check_serving_consistency(
    export_dir: str | os.PathLike,
    tasks: str | Sequence[str],
    embeddings: str | Sequence[str],
    max_query: int = 64,
    tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Checks that stored embeddings reproduce in-graph adaptation, entity by entity.

    For every entity in both the task records and the embedding files (the
    output of `limaml embed`), scores its query rows twice: `serving_default`
    fed the stored embedding (the online path) and `adapt_and_predict` on its
    support rows (the in-graph path). They must agree to `tolerance`.

    Args:
        export_dir: The export (version directory or base).
        tasks: File pattern(s) of the task records that were embedded.
        embeddings: File pattern(s) of `embeddings-*.tfrecord.gz`.
        max_query: Query rows scored per entity.
        tolerance: Largest absolute score difference that passes.

    Returns:
        {"entities", "max_abs_score_diff", "max_abs_embedding_diff", "tolerance",
        "consistent"}.
    """
    metadata = read_metadata(export_dir)
    spec: FeatureSpec = metadata["spec"]
    loaded = tf.saved_model.load(metadata["export_dir"])
    serve = loaded.signatures[SERVING_DEFAULT]
    adapt = loaded.signatures[ADAPT_AND_PREDICT]
    patterns = (
        [embeddings] if isinstance(embeddings, (str, os.PathLike)) else embeddings
    )
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(str(p))})
    if not files:
        raise FileNotFoundError(f"No embedding files match {embeddings!r}")
    stored = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        stored[feature["entity_id"].bytes_list.value[0]] = np.array(
            feature["embedding"].float_list.value, np.float32
        )
    score_diff = embedding_diff = 0.0
    checked = 0
    for batch in data.task_dataset(
        tasks,
        spec,
        batch_tasks=64,
        max_support=metadata["max_support"],
        max_query=max_query,
    ):
        batch = {k: v.numpy() for k, v in batch.items()}
        for i, entity_id in enumerate(batch["entity_id"]):
            if entity_id not in stored:
                continue
            n_support = int(batch["support_mask"][i].sum())
            n_query = int(batch["query_mask"][i].sum())
            inputs = {f.name: batch[f.name][i] for f in spec.meta_features}
            inputs[SUPPORT_LABEL_KEY] = batch[SUPPORT_LABEL_KEY][i, :n_support]
            request = {}
            for f in spec.request_features:
                support_key = spec.batch_key(SUPPORT, f.name)
                inputs[support_key] = batch[support_key][i, :n_support]
                request[f.name] = batch[spec.batch_key(QUERY, f.name)][i, :n_query]
                inputs[spec.batch_key(QUERY, f.name)] = request[f.name]
            adapted = adapt(**inputs)
            online = serve(
                **request,
                meta_embedding=np.repeat(stored[entity_id][None], n_query, axis=0),
            )[SCORE_KEY].numpy()
            score_diff = max(
                score_diff,
                float(np.max(np.abs(online - adapted[SCORE_KEY].numpy()), initial=0.0)),
            )
            embedding_diff = max(
                embedding_diff,
                float(
                    np.max(
                        np.abs(stored[entity_id] - adapted[META_EMBEDDING_KEY].numpy())
                    )
                ),
            )
            checked += 1
    result = {
        "entities": checked,
        "max_abs_score_diff": score_diff,
        "max_abs_embedding_diff": embedding_diff,
        "tolerance": tolerance,
        "consistent": checked > 0 and score_diff <= tolerance,
    }
    logger.info(
        "Serving consistency over %d entities: max |score diff| %.3g (tolerance "
        "%.0e)",
        checked,
        score_diff,
        tolerance,
    )
    return result
