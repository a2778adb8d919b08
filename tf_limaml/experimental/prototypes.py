"""Model changes measured on MovieLens before they are proposed for model.py.

`tf_limaml.model` and `tf_limaml.layers` are the library's core; a change to
them is prototyped here as a subclass, measured with the protocol of
`tf_limaml.experiments`, and proposed with its numbers (see the MovieLens report).

`ShrunkSupportModel`: the inner loop's support loss per task is
sum(mask * loss) / (sum(mask) + prior) instead of sum(mask * loss) /
max(sum(mask), 1). With the plain mean a member with one support row moves as
far as one with a hundred, which on ML-100K costs AUC at k = 1 (the single
label says little about the member's bias); with a prior of c pseudo-rows the
step shrinks by n / (n + c), as an empirical-Bayes estimate of a member's
shift would.

The same class can also weight support rows by recency
(`support_half_life`: a row's weight halves every h rows back in time), and
adapt a subset of the meta block (`adapt_only`, e.g. only the embedding's
last bias, as CAVIA-style context adaptation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tf_limaml.model import LiMAMLModel, MetaConfig


@tf.keras.utils.register_keras_serializable(package="tf_limaml")
class ShrunkSupportModel(LiMAMLModel):
    """LiMAMLModel whose inner-loop support loss shrinks toward no update.

    Built on LiMAMLModel's public hooks: `support_loss` (the shrunk, recency
    weighted loss) and `adaptable_variables` (`adapt_only`).

    Args:
        *args: As LiMAMLModel.
        support_prior: c, pseudo-rows added to each task's support count in
            the inner loop's loss (0 gives the usual masked mean).
        learn_support_prior: Learn c (as log c) in the outer loop (needs
            second order: c only enters through the inner gradient).
        adapt_only: Names (as in `adaptable_variables()`, e.g.
            "meta_block/dense_1/bias") of the only weights the inner loop adapts.
        support_half_life: h, recency weighting of the support loss: the
            latest real row weighs 1, the one before 0.5 ** (1 / h), ...
            None weighs rows equally.
        **kwargs: As LiMAMLModel.
    """

    def __init__(
        self,
        *args,
        support_prior: float = 0.0,
        learn_support_prior: bool = False,
        adapt_only: Sequence[str] | None = None,
        support_half_life: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        adapt_only = tuple(adapt_only or ())
        known = set(super().adaptable_variables())
        unknown = [n for n in adapt_only if n not in known]
        if unknown:
            raise ValueError(
                f"`adapt_only` names {unknown}, which are not adaptable; "
                f"choose from {sorted(known)}"
            )
        self.adapt_only = adapt_only
        if (
            isinstance(support_prior, bool)
            or not isinstance(support_prior, (int, float))
            or (not support_prior >= 0)
        ):
            raise ValueError(
                f"`support_prior` must be a number >= 0, got {support_prior!r}"
            )
        if learn_support_prior and support_prior <= 0:
            raise ValueError(
                "`learn_support_prior` needs a starting `support_prior` > 0, "
                f"got {support_prior!r}"
            )
        if support_half_life is not None and (
            isinstance(support_half_life, bool)
            or not isinstance(support_half_life, (int, float))
            or support_half_life <= 0
        ):
            raise ValueError(
                "`support_half_life` must be a number > 0 or None, got "
                f"{support_half_life!r}"
            )
        self.support_half_life = (
            None if support_half_life is None else float(support_half_life)
        )
        self.support_prior = float(support_prior)
        self.learn_support_prior = bool(learn_support_prior)
        self.log_support_prior = None
        if self.learn_support_prior:
            self.log_support_prior = self.add_weight(
                name="log_support_prior",
                shape=(),
                trainable=True,
                initializer=tf.keras.initializers.Constant(
                    math.log(self.support_prior)
                ),
            )

    def adaptable_variables(self) -> dict[str, tf.Variable]:
        params = super().adaptable_variables()
        if self.adapt_only:
            params = {k: v for k, v in params.items() if k in self.adapt_only}
        return params

    def _prior(self, dtype) -> tf.Tensor:
        if self.log_support_prior is not None:
            return tf.cast(tf.exp(self.log_support_prior), dtype)
        return tf.constant(self.support_prior, dtype)

    def support_loss(
        self,
        labels: tf.Tensor,
        logits: tf.Tensor,
        mask: tf.Tensor,
        config: MetaConfig | None = None,
    ) -> tf.Tensor:
        # The library's own prior (MetaConfig.support_prior, possibly a
        # per-call override) takes precedence over the prototype's.
        config = config or self.meta_config
        if config.support_prior or (
            not self.support_prior
            and self.log_support_prior is None
            and self.support_half_life is None
        ):
            return super().support_loss(labels, logits, mask, config)
        pointwise = self.pointwise_loss(labels[..., None], logits[..., None])
        weights = mask
        if self.support_half_life is not None:
            # Rows are in time order: 1 for the latest real row, 2 for the one before...
            rank = tf.cumsum(mask, axis=-1, reverse=True)
            weights = mask * tf.pow(0.5, (rank - 1.0) / self.support_half_life)
        prior = self._prior(pointwise.dtype)
        total = tf.reduce_sum(weights, axis=-1)
        if not self.support_prior and self.log_support_prior is None:
            total = tf.maximum(total, 1e-6)
        return tf.reduce_sum(pointwise * weights, axis=-1) / (total + prior)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "support_prior": self.support_prior,
                "learn_support_prior": self.learn_support_prior,
                "adapt_only": list(self.adapt_only),
                "support_half_life": self.support_half_life,
            }
        )
        return config
