"""Damped Newton steps on each task's meta embedding: the embedding fit.

MAML's inner loop moves the meta block's weights by a gradient step; what an
entity is finally served is its meta embedding e, d floats. `fit_embedding`
fits those d floats directly, per task, to the task's support rows: the
maximum a posteriori embedding under a Gaussian prior centered on the
meta-learned default e0,

    e* = argmin_e  sum_s m_s * BCE(y_s, f(e)_s) + 1/2 (e - e0)^T diag(lam) (e - e0),

where f is the global block's logit on support row s and lam > 0 the prior
precision per dimension (meta-learned when the model learns it). Each step is
a Gauss-Newton (IRLS) step with the prior as damping:

    H = J^T W J + diag(lam),   g = J^T m (p - y) + lam * (e - e0),   e <- e - H^-1 g,

with J = d f / d e `[T, S, d]`, p = sigmoid(f) and W = m p (1 - p).

Why this shape:
* The shrinkage grows with the support size n by construction: the data
  term of H grows with n and the prior's does not, so an entity with one row
  moves a little and one with a hundred moves to its own fit; with no row
  (m = 0) the step is exactly zero and the entity keeps the default.
* A few Newton steps reach the fit that an ID embedding gets from epochs of
  SGD, and one d x d solve per task is cheap: the adapted state stays d
  floats, so `limaml embed` stores it and TF Serving scores it as any other.
* With the library's personal residual (`GlobalBlock(residual_dim=r)`), the
  fit moves only the residual's r + 1 dimensions, which are zero by default:
  a vector scored against a learned projection of the request and a logit
  offset whose Jacobian is 1, the entity's own bias. The logit is then linear
  in what is fitted, so Gauss-Newton is Newton's method on a convex objective
  and two or three steps reach the MAP. The Jacobian is then a constant that
  the block hands over from one pass (`fit_affine`), where `fit_embedding`
  differentiates it in forward mode, one pass per dimension and step.

The functions here are plain TensorFlow on tensors (no Keras), so they run
inside the compiled meta-train step and inside the exported signatures.

Example:

    def support_logits(embedding):          # [T, d] -> [T, S]
        return global_block_logits(embedding, support_rows)

    adapted = newton.fit_embedding(
        support_logits, default, labels, mask, prior=tf.fill([d], 4.0), steps=2
    )
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def fit_embedding(
    support_logits: Callable[[tf.Tensor], tf.Tensor],
    embedding: tf.Tensor,
    labels: tf.Tensor,
    mask: tf.Tensor,
    prior: tf.Tensor,
    steps: int,
    first_order: bool = True,
) -> tf.Tensor:
    """`steps` damped Gauss-Newton steps on every task's embedding, all at once.

    Args:
        support_logits: Embeddings `[T, d]` -> logits `[T, S]` of each task's
            support rows; row (t, s) must depend on embedding t only.
        embedding: The default embeddings e0 `[T, d]`, the prior's center.
        labels: Support labels `[T, S]` in [0, 1].
        mask: 1.0 on real support rows, 0.0 on padding, `[T, S]`.
        prior: Prior precision per dimension `[d]` (or a scalar), > 0.
        steps: Newton steps (0 returns `embedding`).
        first_order: Treat the Jacobian and the residuals as constants for an
            outer tape; gradients still reach `embedding` (the default, through
            the identity) and `prior` (through the solve), so both can be
            meta-learned without differentiating through the Jacobian.

    Returns:
        The fitted embeddings `[T, d]`.

    Raises:
        ValueError: `steps` is not an integer >= 0.
    """
    return _newton_steps(
        lambda current: _logits_and_jacobian(support_logits, current),
        embedding,
        labels,
        mask,
        prior,
        steps,
        first_order,
    )


def fit_affine(
    base_logits: tf.Tensor,
    jacobian: tf.Tensor,
    embedding: tf.Tensor,
    labels: tf.Tensor,
    mask: tf.Tensor,
    prior: tf.Tensor,
    steps: int,
    first_order: bool = True,
) -> tf.Tensor:
    """`fit_embedding` where the support logits are affine in the embedding:
    `base_logits + jacobian . embedding`, the Jacobian a constant.

    The same steps, without a network pass per step and dimension: a global
    block whose logit is linear in what is fitted (the personal residual)
    hands over its Jacobian from one pass (`GlobalBlock.fitted_logit_terms`).

    Args:
        base_logits: Support logits at a zero embedding, `[T, S]`.
        jacobian: d logits / d embedding, `[T, S, d]`.
        embedding: The default embeddings e0 `[T, d]`, the prior's center.
        labels: As `fit_embedding`.
        mask: As `fit_embedding`.
        prior: As `fit_embedding`.
        steps: As `fit_embedding`.
        first_order: As `fit_embedding`.

    Returns:
        The fitted embeddings `[T, d]`.
    """
    jacobian = tf.cast(jacobian, embedding.dtype)
    base_logits = tf.cast(base_logits, embedding.dtype)

    def logits_and_jacobian(current):
        return base_logits + tf.einsum("tsd,td->ts", jacobian, current), jacobian

    return _newton_steps(
        logits_and_jacobian, embedding, labels, mask, prior, steps, first_order
    )


def _newton_steps(
    logits_and_jacobian: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    embedding: tf.Tensor,
    labels: tf.Tensor,
    mask: tf.Tensor,
    prior: tf.Tensor,
    steps: int,
    first_order: bool,
) -> tf.Tensor:
    """The damped Gauss-Newton steps of `fit_embedding`, given the support
    logits and Jacobian `[T, S]`, `[T, S, d]` at the current embedding."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got {steps!r}")
    dtype = embedding.dtype
    labels = tf.cast(labels, dtype)
    mask = tf.cast(mask, dtype)
    precision = tf.broadcast_to(tf.cast(prior, dtype), tf.shape(embedding)[-1:])
    damping = tf.linalg.diag(precision)  # [d, d]
    center = embedding
    current = embedding
    for _ in range(steps):
        logits, jacobian = logits_and_jacobian(current)
        probabilities = tf.sigmoid(logits)
        residual = mask * (probabilities - labels)
        curvature = mask * probabilities * (1.0 - probabilities)
        if first_order:
            jacobian = tf.stop_gradient(jacobian)
            residual = tf.stop_gradient(residual)
            curvature = tf.stop_gradient(curvature)
        gradient = tf.einsum("ts,tsd->td", residual, jacobian)
        gradient += precision * (current - center)
        hessian = tf.einsum("ts,tsd,tse->tde", curvature, jacobian, jacobian)
        hessian += damping
        step = tf.linalg.solve(hessian, gradient[..., None])[..., 0]
        current = current - step
    return current


def _logits_and_jacobian(
    support_logits: Callable[[tf.Tensor], tf.Tensor], embedding: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(logits `[T, S]`, d logits / d embedding `[T, S, d]`) in forward mode.

    One forward pass per embedding dimension: d is small (tens) while S, the
    support rows, may be hundreds, so d forward-mode passes cost far less than
    the S reverse passes of `GradientTape.batch_jacobian`.
    """
    width = embedding.shape[-1]
    if width is None:
        raise ValueError("The meta embedding needs a static size d")
    columns, logits = [], None
    for dimension in range(width):
        tangent = tf.broadcast_to(
            tf.one_hot(dimension, width, dtype=embedding.dtype), tf.shape(embedding)
        )
        with tf.autodiff.ForwardAccumulator(embedding, tangent) as accumulator:
            logits = support_logits(embedding)
        column = accumulator.jvp(logits)
        # A logit that does not read this dimension has no tangent.
        columns.append(tf.zeros_like(logits) if column is None else column)
    return logits, tf.stack(columns, axis=-1)


def support_objective(
    logits: tf.Tensor,
    labels: tf.Tensor,
    mask: tf.Tensor,
    embedding: tf.Tensor,
    center: tf.Tensor,
    prior: tf.Tensor,
) -> tf.Tensor:
    """The per-task objective `fit_embedding` minimizes, `[T]` (for tests and
    diagnostics): masked summed BCE plus the Gaussian prior's penalty."""
    dtype = logits.dtype
    pointwise = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(labels, dtype), logits=logits
    )
    data = tf.reduce_sum(tf.cast(mask, dtype) * pointwise, axis=-1)
    penalty = 0.5 * tf.reduce_sum(
        tf.cast(prior, dtype) * tf.square(embedding - center), axis=-1
    )
    return data + penalty
