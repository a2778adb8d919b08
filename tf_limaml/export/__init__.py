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

The package re-exports what users call; one concept lives in each module:

* `saved_model`: `export_model`, `export_from_model_dir`, `read_metadata`;
* `serving_module`: the signatures and the rules they enforce
  (`LiMAMLServingModule`);
* `versions`: TF Serving's numbered version directories, each written to a
  hidden temporary directory and renamed when complete;
* `warmup`: TF Serving's warmup requests;
* `consistency`: stored embeddings against in-graph adaptation;
* `commands`: the `tensorflow_model_server` and `docker run` lines
  (TensorFlow-free, with the batching parameters file it ships);
* the signature and input/output names come from `tf_limaml.signatures`.

Names are imported on first use, so `limaml serve-command` (which reaches
`commands` through this package) never imports TensorFlow.

Example:

    model = tf_limaml.load_model("runs/model")
    path = tf_limaml.export.export_model(model, "exports/limaml", max_support=32)
    print(tf_limaml.export.serve_commands("exports/limaml"))
"""

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "export_model": "tf_limaml.export.saved_model",
    "export_from_model_dir": "tf_limaml.export.saved_model",
    "read_metadata": "tf_limaml.export.saved_model",
    "check_serving_consistency": "tf_limaml.export.consistency",
    "list_versions": "tf_limaml.export.versions",
    "resolve_version_dir": "tf_limaml.export.versions",
    "remove_abandoned_exports": "tf_limaml.export.versions",
    "DEFAULT_WARMUP_BATCH_SIZES": "tf_limaml.export.warmup",
    "warmup_inputs": "tf_limaml.export.warmup",
    "serve_commands": "tf_limaml.export.commands",
    # The names of the signatures and of their inputs and outputs.
    "SERVING_DEFAULT": "tf_limaml.signatures",
    "ADAPT_AND_PREDICT": "tf_limaml.signatures",
    "META_EMBEDDING": "tf_limaml.signatures",
    "PREDICT_EXAMPLES": "tf_limaml.signatures",
    "SIGNATURE_NAMES": "tf_limaml.signatures",
    "SCORE_KEY": "tf_limaml.signatures",
    "EMBEDDING_KEY": "tf_limaml.signatures",
    "EXAMPLES_KEY": "tf_limaml.signatures",
    "SUPPORT_LABEL_KEY": "tf_limaml.signatures",
    "SUPPORT_MASK_KEY": "tf_limaml.signatures",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # Static tools see the names that __getattr__ imports lazily.
    from tf_limaml.export.commands import serve_commands  # noqa: F401
    from tf_limaml.export.consistency import check_serving_consistency  # noqa: F401
    from tf_limaml.export.saved_model import (  # noqa: F401
        export_from_model_dir,
        export_model,
        read_metadata,
    )
    from tf_limaml.export.versions import (  # noqa: F401
        list_versions,
        remove_abandoned_exports,
        resolve_version_dir,
    )
    from tf_limaml.export.warmup import (  # noqa: F401
        DEFAULT_WARMUP_BATCH_SIZES,
        warmup_inputs,
    )
    from tf_limaml.signatures import (  # noqa: F401
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


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tf_limaml.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
