"""`tf_limaml.tracing`: the retracing warning is quiet only for planned owners."""

import logging

import tensorflow as tf

from tf_limaml.tracing import quiet_planned_retracing


def _retrace_in_a_loop(make):
    """Six functions from one closure, each traced once: TensorFlow warns."""
    for scale in range(6):
        make(float(scale))(tf.constant([1.0, 2.0]))


def _planned_owner(scale):
    @tf.function
    def planned(x):
        return x * scale

    return planned


def _other_owner(scale):
    @tf.function
    def unplanned(x):
        return x + scale

    return unplanned


def test_only_the_planned_owner_s_retracing_warning_is_dropped(tensorflow_warnings):
    tf_logger = logging.getLogger("tensorflow")
    quiet_planned_retracing("_planned_owner.<locals>")
    quiet_planned_retracing("_planned_owner.<locals>")  # idempotent
    _retrace_in_a_loop(_planned_owner)
    _retrace_in_a_loop(_other_owner)
    tf_logger.warning("an unrelated warning")
    retracing = [m for m in tensorflow_warnings if "retracing" in m]
    assert retracing and all("_other_owner.<locals>" in m for m in retracing)
    assert "an unrelated warning" in tensorflow_warnings
    assert (
        sum(f.__class__.__name__ == "PlannedTracingFilter" for f in tf_logger.filters)
        == 1
    )
