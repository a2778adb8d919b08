"""The SavedModel of an export: `export_model` writes it, `read_metadata` reads it.

`export_model` wraps a trained `LiMAMLModel` in a `LiMAMLServingModule`
(`tf_limaml.export.serving_module`) and writes a SavedModel with its four
signatures into a new TF Serving version directory, `EXPORT/<version>/`
(`tf_limaml.export.versions`). `assets.extra/` holds TF Serving's warmup
requests (`tf_limaml.export.warmup`) and `limaml.json`: the spec, meta_dim,
max_support, inner_steps, version and the signatures' inputs.

Example:

    model = tf_limaml.load_model("runs/model")
    path = export_model(model, "exports/limaml", max_support=32)
    read_metadata("exports/limaml")["model_version"]  # the latest version
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_limaml.errors import UserInputError
from tf_limaml.export.serving_module import DEFAULT_MAX_SUPPORT, LiMAMLServingModule
from tf_limaml.export.versions import (
    is_version_name,
    next_version,
    resolve_version_dir,
    staged_version,
)
from tf_limaml.export.warmup import (
    ASSETS_EXTRA,
    DEFAULT_WARMUP_BATCH_SIZES,
    WARMUP_FILE,
    write_warmup_requests,
)
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel
from tf_limaml.saving import load_model

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
        raise UserInputError(f"`version` must be a positive integer, got {version!r}")
    for size in warmup_batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise UserInputError(
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
    adapted = model.adapt_options.resolve(model.meta_config)
    if module.inner_steps == 0 and not adapted.embedding_steps:
        logger.warning(
            "inner_steps and embedding_steps are 0: the adaptation signatures "
            "return the unadapted (cold-start) embedding for every entity."
        )
    with staged_version(export_base, version) as temp:
        tf.saved_model.save(module, temp, signatures=module.concrete_signatures())
        extra = os.path.join(temp, ASSETS_EXTRA)
        tf.io.gfile.makedirs(extra)
        _write_warmup(os.path.join(extra, WARMUP_FILE), model, warmup_batch_sizes)
        adaptation = model.adapt_options.resolve(model.meta_config)
        metadata = {
            "format_version": METADATA_FORMAT,
            "model_version": version,
            "meta_dim": model.meta_dim,
            "max_support": max_support,
            "inner_steps": module.inner_steps,
            "adapt": model.meta_config.adapt,
            # What the adaptation signatures run with (`model.adapt_options`
            # over the trained `meta_config`, and this export's inner steps).
            "adaptation": {
                "inner_steps": module.inner_steps,
                "inner_lr": adaptation.inner_lr,
                "support_prior": adaptation.support_prior,
            },
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
