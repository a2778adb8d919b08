"""Process set-up that must happen before anything resolves `tf.keras`."""

import os
import sys


def use_legacy_keras() -> None:
    """Makes `tf.keras` resolve to Keras 2 (tf-keras), which TFRS requires.

    `import tensorflow` loads the `keras` package but leaves `tf.keras` a lazy
    loader that reads TF_USE_LEGACY_KERAS when first touched. So what matters
    is what `tf.keras` already resolved to, not whether a module named `keras`
    is loaded: `import tensorflow as tf; import tf_limaml` is fine.

    Raises:
        ImportError: `tf.keras` already resolved to Keras 3 in this process.
    """
    tensorflow = sys.modules.get("tensorflow")
    resolved = vars(tensorflow).get("keras") if tensorflow is not None else None
    # Read attributes through vars(): any other access resolves a lazy loader.
    name = vars(resolved).get("__name__", "") if resolved is not None else ""
    still_lazy = resolved is not None and "_tfll_name" in vars(resolved)
    if resolved is not None and not still_lazy and not name.startswith("tf_keras"):
        raise ImportError(
            "tf_limaml needs Keras 2 (tf-keras), but `tf.keras` already resolved to "
            f"Keras 3 ({name}) in this process. Import tf_limaml "
            "before touching tf.keras, or set TF_USE_LEGACY_KERAS=1 in the "
            "environment before starting Python."
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
