"""Saving and loading a LiMAMLModel: `config.json` plus a weights checkpoint.

The config is the one the model was trained with (`meta_config`), beside the
adapt-time knobs it is deployed with (`adapt_options`) and its architecture.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from tf_limaml.model import LiMAMLModel

logger = logging.getLogger(__name__)


def save_model(model: LiMAMLModel, model_dir: str | os.PathLike) -> str:
    """Writes `config.json` and a weights checkpoint; returns the checkpoint path."""
    model_dir = str(model_dir)
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(model.get_config(), f, indent=2)
    checkpoint = tf.train.Checkpoint(model=model)
    return checkpoint.write(os.path.join(model_dir, "weights", "model"))


def load_model(model_dir: str | os.PathLike) -> LiMAMLModel:
    """Loads a model written by `save_model` or `limaml train`.

    Restores the final weights (`weights/`) or, for a run that has not
    finished (stopped or killed), its latest training checkpoint (`backup/`).

    Raises:
        FileNotFoundError: No config or no weights in the directory.
    """
    model_dir = str(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(config_path):
        raise FileNotFoundError(f"No model in {model_dir}: {config_path} is missing")
    with tf.io.gfile.GFile(config_path) as f:
        model = LiMAMLModel.from_config(json.load(f))
    path = os.path.join(model_dir, "weights", "model")
    if not tf.io.gfile.exists(path + ".index"):
        path = tf.train.latest_checkpoint(os.path.join(model_dir, "backup", "chief"))
        if path is None:
            raise FileNotFoundError(f"No weights in {model_dir} (weights/ or backup/)")
        logger.warning(
            "%s has no final weights; loading the training checkpoint %s",
            model_dir,
            path,
        )
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    return model
