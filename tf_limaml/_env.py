"""Process set-up that must happen before anything imports tf.keras."""

import os
import sys


def use_legacy_keras() -> None:
    """Makes `tf.keras` resolve to Keras 2 (tf-keras), which TFRS requires.

    Raises:
        ImportError: Keras 3 is already loaded in this process, so `tf.keras`
            may already point at it.
    """
    keras = sys.modules.get("keras")
    version = getattr(keras, "__version__", "") if keras is not None else ""
    if version.startswith("3.") and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise ImportError(
            "tf_limaml needs Keras 2 (tf-keras), but Keras 3 (`import keras`) was "
            "already imported in this process. Import tf_limaml before keras and "
            "tensorflow, or set TF_USE_LEGACY_KERAS=1 in the environment before "
            "starting Python."
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
