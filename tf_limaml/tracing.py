"""Quiets TensorFlow's "excessive retracing" warning where tracing is planned.

TensorFlow counts the traces of every `tf.function` made from one closure
together, and warns after five in a few calls ("creating @tf.function
repeatedly in a loop"). Some functions are made per setting on purpose, each
traced once: the scoring functions of each of tune's knob settings, the embed
job's parser of each pipeline run in one process. For those alone the warning
is noise; it stays on for every other function.
"""

from __future__ import annotations

import logging

RETRACING_MESSAGE = "triggered tf.function retracing"
_QUIETED: set[str] = set()


class PlannedTracingFilter(logging.Filter):
    """Drops the retracing warning about functions whose qualified name
    contains one of `owners` (e.g. "LoadedExport.__init__.<locals>")."""

    def __init__(self, owners: set[str]):
        super().__init__()
        self.owners = owners

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return RETRACING_MESSAGE not in message or not any(
            owner in message for owner in self.owners
        )


_FILTER = PlannedTracingFilter(_QUIETED)


def quiet_planned_retracing(owner: str) -> None:
    """Stops TensorFlow's retracing warning about the functions defined in
    `owner` (a qualified-name prefix such as "_query_function.<locals>");
    idempotent.

    Args:
        owner: The text that names those functions in the warning.
    """
    _QUIETED.add(owner)
    tf_logger = logging.getLogger("tensorflow")
    if _FILTER not in tf_logger.filters:
        tf_logger.addFilter(_FILTER)
