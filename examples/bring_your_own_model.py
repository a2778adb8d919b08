"""Bring your own ranking model: personalize it per member with tf_limaml.

Your ranking model stays an ordinary Keras model. It reads one dict of
features, the member's meta embedding among them, and returns one logit per
row:

    logits = ranker({"meta_embedding": e, "item_id": ..., "f0": ..., ...})

`tf_limaml.LiMAMLModel(spec, global_block=ranker)` puts the library's meta
block in front of it and meta-trains both with MAML: each member's meta
embedding adapts to the member's own support rows, and your ranker is shared.
The export serves it as any tf_limaml export (TF Serving signatures).

    python examples/bring_your_own_model.py [--output DIR] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_limaml  # noqa: E402
from tf_limaml import data, export  # noqa: E402
from tf_limaml.datasets import synthetic  # noqa: E402


class Ranker(tf.keras.Model):
    """A ranking model as in TensorFlow Recommenders: item embedding + tower."""

    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=items)
        self.item_embedding = tf.keras.layers.Embedding(len(items) + 1, 8)
        self.tower = tf.keras.Sequential(
            [
                tf.keras.layers.Dense(32, activation="relu"),
                tf.keras.layers.Dense(1),
            ]
        )

    def encode(self, raw):
        # Optional: string lookups here run outside the XLA-compiled step
        # (without `encode`, the step runs without XLA).
        numeric = {f"f{k}": raw[f"f{k}"] for k in range(4)}
        return {"item_id": self.item_lookup(raw["item_id"]), **numeric}

    def call(self, features):
        item = self.item_embedding(features["item_id"])
        numeric = tf.stack([features[f"f{k}"] for k in range(4)], axis=-1)
        x = tf.concat([features["meta_embedding"], item, numeric], axis=-1)
        return self.tower(x)


def run(output: str, epochs: int) -> dict:
    """Tasks, meta-training, export and one served member, under `output`."""
    # 1. Tasks: one per member, support (earlier rows) and query (later rows).
    paths = synthetic.write_tasks(os.path.join(output, "tasks"), num_entities=200)
    spec = tf_limaml.FeatureSpec.load(paths["spec"])

    # 2. Your model as the global block; the library's meta block adapts.
    tf.keras.utils.set_random_seed(0)
    model = tf_limaml.LiMAMLModel(
        spec,
        tf_limaml.MetaConfig(inner_steps=1, inner_lr=0.5),
        meta_units=[16, 8],
        global_block=Ranker([str(i) for i in range(200)]),
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3))
    train = data.task_dataset(paths["train"], spec, batch_tasks=32)
    val = data.task_dataset(paths["val"], spec, batch_tasks=64)
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=2)

    # 3. Export for TF Serving, then score one member as a client would.
    export_dir = export.export_model(model, os.path.join(output, "export"))
    served = tf.saved_model.load(export_dir).signatures
    test = next(iter(data.task_dataset(paths["test"], spec, batch_tasks=1)))
    n_support = int(test["support_mask"][0].numpy().sum())
    n_query = int(test["query_mask"][0].numpy().sum())
    inputs = {f.name: test[f.name][0] for f in spec.meta_features}
    for f in spec.request_features:
        inputs[f"support_{f.name}"] = test[f"support_{f.name}"][0, :n_support]
        inputs[f"query_{f.name}"] = test[f"query_{f.name}"][0, :n_query]
    inputs["support_label"] = test["support_label"][0, :n_support]
    adapted = served["adapt_and_predict"](**inputs)
    keras_scores = model.predict_query(test).numpy()[0, :n_query]
    result = {
        "export_dir": export_dir,
        "val_auc": float(history.history["val_auc"][-1]),
        "served_scores": adapted["score"].numpy().tolist(),
        "max_abs_diff_vs_keras": float(
            np.max(np.abs(adapted["score"].numpy() - keras_scores))
        ),
    }
    print(f"exported to {export_dir}; val AUC {result['val_auc']:.3f}")
    print(f"member {test['entity_id'][0].numpy().decode()}: {n_support} support rows")
    scores = " ".join(f"{s:.3f}" for s in result["served_scores"])
    print(f"served scores of its {n_query} query rows: {scores}")
    print(f"max |served - Keras| = {result['max_abs_diff_vs_keras']:.2e}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="Working directory (default: a temp dir).")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    if args.output:
        return run(args.output, args.epochs)
    with tempfile.TemporaryDirectory(prefix="byom-") as output:
        return run(output, args.epochs)


if __name__ == "__main__":
    main()
