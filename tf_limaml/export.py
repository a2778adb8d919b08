"""SavedModel export for TF Serving: four signatures in `EXPORT/<version>/`.

`export_model` wraps a trained `LiMAMLModel` in a `tf.Module` whose
tf.functions call the model's traceable methods, and writes a SavedModel that
TF Serving, `saved_model_cli` and the TF1 loader read. The signatures have
named inputs and outputs, `None` batch axes and standard TensorFlow ops only:

* `serving_default`: `meta_embedding` [B, d] + request features [B] -> `score` [B];
* `adapt_and_predict`: one entity's meta features, `support_<f>` [S],
  `support_label` [S], `query_<f>` [Q] -> `score` [Q], `meta_embedding` [d];
* `meta_embedding`: E entities, `support_<f>`, `support_label`, `support_mask`
  [E, S] -> `meta_embedding` [E, d];
* `predict_examples`: `examples` [B] (serialized tf.Example) -> `score` [B].

This module is what users call; the parts live beside it:

* `tf_limaml.signatures`: the signature and input/output names (no TensorFlow);
* `tf_limaml.export_signatures`: the signatures themselves and the rules
  they enforce (`LiMAMLServingModule`);
* `tf_limaml.export_versions`: the numbered version directories, written to a
  hidden temporary directory and renamed when complete;
* `tf_limaml.export_warmup`: TF Serving's warmup requests.

`assets.extra/` holds TF Serving's warmup requests and `limaml.json` (spec,
meta_dim, max_support, inner_steps, version).

Example:

    model = tf_limaml.load_model("runs/model")
    path = tf_limaml.export.export_model(model, "exports/limaml", max_support=32)
    # tensorflow_model_server --model_base_path=$PWD/exports/limaml ...
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data
from tf_limaml.export_signatures import (
    DEFAULT_MAX_SUPPORT,
    LiMAMLServingModule,
    example_parsing_spec,
    signature_input_specs,
)
from tf_limaml.export_versions import (
    ABANDONED_AFTER_S,
    is_version_name,
    list_versions,
    next_version,
    remove_abandoned_exports,
    resolve_version_dir,
    staged_version,
)
from tf_limaml.export_warmup import (
    ASSETS_EXTRA,
    DEFAULT_WARMUP_BATCH_SIZES,
    WARMUP_FILE,
    prediction_log_bytes,
    warmup_inputs,
    write_warmup_requests,
)
from tf_limaml.features import QUERY, SUPPORT, FeatureSpec
from tf_limaml.model import LiMAMLModel
from tf_limaml.saving import load_model
from tf_limaml.signatures import (
    ADAPT_AND_PREDICT,
    EMBEDDING_KEY,
    EXAMPLES_KEY,
    META_EMBEDDING,
    PREDICT_EXAMPLES,
    SCORE_KEY,
    SERVING_DEFAULT,
    SIGNATURE_NAMES,
    SUPPORT_LABEL_KEY,
    SUPPORT_MASK_KEY,
)

__all__ = [
    "ABANDONED_AFTER_S",
    "ADAPT_AND_PREDICT",
    "ASSETS_EXTRA",
    "DEFAULT_MAX_SUPPORT",
    "DEFAULT_WARMUP_BATCH_SIZES",
    "EMBEDDING_KEY",
    "EXAMPLES_KEY",
    "META_EMBEDDING",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "PREDICT_EXAMPLES",
    "SCORE_KEY",
    "SERVING_DEFAULT",
    "SIGNATURE_NAMES",
    "SUPPORT_LABEL_KEY",
    "SUPPORT_MASK_KEY",
    "WARMUP_FILE",
    "LiMAMLServingModule",
    "check_serving_consistency",
    "example_parsing_spec",
    "export_from_model_dir",
    "export_model",
    "list_versions",
    "prediction_log_bytes",
    "read_metadata",
    "remove_abandoned_exports",
    "resolve_version_dir",
    "signature_input_specs",
    "warmup_inputs",
]

logger = logging.getLogger(__name__)

METADATA_FILE = "limaml.json"
METADATA_FORMAT = 1


def export_model(
    model: LiMAMLModel,
    export_base: str | os.PathLike,
    version: int | None = None,
    max_support: int | None = None,
    inner_steps: int | None = None,
    warmup_batch_sizes: Sequence[int] = DEFAULT_WARMUP_BATCH_SIZES,
) -> str:
    """Writes a SavedModel for TF Serving at `export_base/<version>/`.

    Args:
        model: A trained LiMAMLModel.
        export_base: The directory TF Serving's `--model_base_path` points at.
        version: Version number; default one more than the latest there (1 if none).
        max_support: Most support rows the adaptation signatures use per entity
            (the latest ones); default 32, the training default. Use the
            `--max-support` the model was trained with.
        inner_steps: In-graph inner steps; default the model's `inner_steps`.
        warmup_batch_sizes: Batch sizes of the serving_default warmup requests.

    Returns:
        The version directory written.

    Raises:
        FileExistsError: The version directory exists already.
        ValueError: A bad argument, or clashing input names.
    """
    export_base = str(export_base)
    max_support = DEFAULT_MAX_SUPPORT if max_support is None else max_support
    if version is None:
        version = next_version(export_base)
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(f"`version` must be a positive integer, got {version!r}")
    for size in warmup_batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(
                f"`warmup_batch_sizes` must hold positive integers, got "
                f"{list(warmup_batch_sizes)!r}"
            )
    final = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(
            f"Export version {final} exists already; pass another --version or omit "
            "it to write the next one."
        )
    module = LiMAMLServingModule(
        model, max_support=max_support, inner_steps=inner_steps
    )
    if model.meta_config.adapt == "all":
        logger.warning(
            "The model adapts the global block too (adapt='all'): serving_default and "
            "predict_examples score with the shared global block, so they reproduce "
            "adapt_and_predict only for the meta-block part of the adaptation."
        )
    if module.inner_steps == 0:
        logger.warning(
            "inner_steps is 0: the adaptation signatures return the "
            "unadapted (cold-start) embedding for every entity."
        )
    with staged_version(export_base, version) as temp:
        tf.saved_model.save(module, temp, signatures=module.concrete_signatures())
        extra = os.path.join(temp, ASSETS_EXTRA)
        tf.io.gfile.makedirs(extra)
        _write_warmup(os.path.join(extra, WARMUP_FILE), model, warmup_batch_sizes)
        metadata = {
            "format_version": METADATA_FORMAT,
            "model_version": version,
            "meta_dim": model.meta_dim,
            "max_support": max_support,
            "inner_steps": module.inner_steps,
            "adapt": model.meta_config.adapt,
            "signatures": {
                name: {
                    key: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                    for key, spec in specs.items()
                }
                for name, specs in module.input_specs.items()
            },
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "spec": model.spec.to_dict(),
        }
        with tf.io.gfile.GFile(os.path.join(extra, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
    logger.info(
        "Exported version %d (max_support=%d, inner_steps=%d) to %s",
        version,
        max_support,
        module.inner_steps,
        final,
    )
    return final


def _write_warmup(path: str, model: LiMAMLModel, batch_sizes: Sequence[int]) -> None:
    """The warmup step of `export_model` (a seam the fault-injection tests patch)."""
    write_warmup_requests(path, model.spec, model.meta_dim, batch_sizes)


def read_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The `assets.extra/limaml.json` of an export (a version dir or its base).

    Returns:
        The metadata dict, with `spec` as a FeatureSpec and `export_dir` and
        `model_version` (the version directory's number) filled in.
    """
    export_dir = resolve_version_dir(export_dir)
    path = os.path.join(export_dir, ASSETS_EXTRA, METADATA_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: {export_dir} was not written by tf_limaml.export; "
            "re-export it with `limaml export`."
        )
    with tf.io.gfile.GFile(path) as f:
        metadata = json.load(f)
    metadata["spec"] = FeatureSpec.from_dict(metadata["spec"])
    metadata["export_dir"] = export_dir
    name = os.path.basename(export_dir)
    if is_version_name(name):
        metadata["model_version"] = int(name)
    return metadata


def export_from_model_dir(
    model_dir: str | os.PathLike,
    export_base: str | os.PathLike,
    version: int | None = None,
    max_support: int | None = None,
) -> str:
    """`limaml export`: loads a model directory and exports it (see `export_model`).

    `max_support` defaults to the value the model was trained with.
    """
    from tf_limaml.training import read_training_args  # noqa: PLC0415

    if max_support is None:
        max_support = read_training_args(str(model_dir)).get("max_support")
    return export_model(
        load_model(model_dir), export_base, version=version, max_support=max_support
    )


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
                    np.max(np.abs(stored[entity_id] - adapted[EMBEDDING_KEY].numpy()))
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
