"""The errors tf-limaml raises on purpose, free of TensorFlow.

Every error the library raises to explain a failure derives from
`LimamlError`; its message says what was wrong, with the value, and what to do.
Any other exception is a bug, and keeps its traceback.

    LimamlError                  a failure the library detected and explained
    ├── UserInputError           a bad flag, file, feature spec or config
    │   │                        (also a ValueError)
    │   └── ConfigError          a bad field of a config (names the field)
    └── TrainingFailedError      a run whose model is no good (also a RuntimeError)

The `limaml` command prints a `LimamlError` as one line: exit 1 for a
`TrainingFailedError`, 2 for the others. Everything else propagates with its
traceback.

Example:

    try:
        config = tf_limaml.MetaConfig(inner_lr=-1.0)
    except tf_limaml.errors.ConfigError as err:
        print(err.field, err)   # inner_lr MetaConfig.inner_lr must be ...
"""

from __future__ import annotations

from typing import Any


class LimamlError(Exception):
    """Base of the errors the library raises on purpose, with a message that explains."""


class UserInputError(LimamlError, ValueError):
    """A bad input from the user: a flag, a file, a feature spec, a config value.

    A `ValueError`, so code that catches `ValueError` keeps working.
    """


class ConfigError(UserInputError):
    """A bad field of a config (`MetaConfig`, `AdaptOptions`, `Architecture`).

    Attributes:
        field: The field (or unknown key) at fault; None when the whole object is.
        value: The value received.
    """

    def __init__(self, message: str, field: str | None = None, value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value


class TrainingFailedError(LimamlError, RuntimeError):
    """Training stopped or finished with a model that is no good.

    A non-finite loss or a failed health check: a problem of the data or the
    settings that the message explains, not a bug.
    """
