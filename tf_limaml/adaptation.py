"""The adaptation math of `LiMAMLModel`: the inner loop, the embedding fit and
the forward pass (adapt on the support set, score the query).

Functions of the model, as `tf_limaml.step` holds the train step: the model is
the thin Keras face that calls them. They reach the model only through its
block adapters (`tf_limaml.blocks`) and its public hooks (`adaptable_variables`,
`inner_lr`, `support_loss`, `embedding_prior`, `logits`), so a subclass that
overrides a hook changes what runs here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tf_limaml import maml, step
from tf_limaml.blocks import (
    META_INPUTS,
    GlobalBlockAdapter,
    MetaBlockAdapter,
    TaskBatch,
    learned_rate_shapes,
    runs_dense_path,
    split_fast_weights,
)
from tf_limaml.config import AdaptOptions, MetaConfig, as_adapt_options
from tf_limaml.features import SUPPORT

if TYPE_CHECKING:
    from tf_limaml.model import LiMAMLModel


def add_meta_weights(
    model: LiMAMLModel,
    meta: MetaBlockAdapter,
    glob: GlobalBlockAdapter,
    config: MetaConfig,
) -> tuple[dict[str, tf.Variable], tf.Variable | None]:
    """The meta-learned weights of the inner loop, created on `model` now so that
    checkpoints restore before the first batch.

    Returns:
        (Meta-SGD rates by adapted weight name, {} unless `learn_inner_lr`;
        the embedding fit's log prior precision per fitted dimension, None
        unless `learn_embedding_prior`: kept in log space, it stays > 0).
    """
    rates: dict[str, tf.Variable] = {}
    if config.learn_inner_lr:
        for name, shape in learned_rate_shapes(meta, glob, config).items():
            rates[name] = model.add_weight(
                name="inner_lr/" + ("meta_inputs" if name == META_INPUTS else name),
                shape=shape,
                trainable=True,
                initializer=tf.keras.initializers.Constant(config.inner_lr),
            )
    log_prior = None
    if config.learn_embedding_prior:
        log_prior = model.add_weight(
            name="embedding_prior/log",
            shape=(len(glob.fitted_dims),),
            trainable=True,
            initializer=tf.keras.initializers.Constant(
                math.log(config.embedding_prior)
            ),
        )
    return rates, log_prior


def inner_loop(
    model: LiMAMLModel, batch: TaskBatch, config: MetaConfig
) -> tuple[dict[str, Any], tf.Tensor | None]:
    """(fast weights by prefixed name, pre-adaptation support loss `[T]` or
    None) after `config.inner_steps` support steps (`tf_limaml.maml`); on the
    blocks' dense path the kernels stay factored (`maml.adapt_dense`)."""

    def task_loss(fast):
        logits, _ = model.logits(batch, SUPPORT, fast)
        return model.support_loss(
            batch.support_label, logits, batch.support_mask, config
        )

    params = model.adaptable_variables()
    rates = {name: model.inner_lr(name, config) for name in params}
    meta, glob = model.meta_adapter, model.global_adapter
    if runs_dense_path(meta, glob, config, params, rates):
        # No per-task copy of any weight (see `maml.adapt_dense`).
        return maml.adapt_dense(
            task_loss, params, config.inner_steps, rates, config.first_order
        )
    fast = maml.tile(params, batch.batch_size)
    if config.adapt_embeddings:
        fast[META_INPUTS] = meta.input_embeddings(batch)
        rates[META_INPUTS] = meta.input_rates(model.inner_lr(META_INPUTS, config))
    if not config.inner_steps:
        return fast, None
    return maml.adapt(task_loss, fast, config.inner_steps, rates, config.first_order)


def adapted_embedding(
    model: LiMAMLModel,
    batch: TaskBatch,
    fast: Mapping[str, Any] | None,
    config: MetaConfig,
) -> tf.Tensor:
    """Each task's meta embedding `[T, d]` under fast weights, then fitted to its
    support rows by `config.embedding_steps` Newton steps (`tf_limaml.newton`):
    what `embed` stores and the query is scored with."""
    meta_weights, global_weights = split_fast_weights(fast)
    embedding = model.meta_adapter.embed(batch, meta_weights)
    if not config.embedding_steps or batch.support is None:
        return embedding
    return model.global_adapter.fit_embedding(
        embedding,
        batch.support,
        batch.support_label,
        batch.support_mask,
        model.embedding_prior(config),
        config.embedding_steps,
        global_weights,
        config.differentiate_fit,
    )


def inference_config(model: LiMAMLModel, options: AdaptOptions) -> MetaConfig:
    """What scoring and embedding adapt with: the model's `adapt_options`, then
    `options`, over its `meta_config`; first order unless asked."""
    return (
        model.adapt_options.merged(AdaptOptions(first_order=True))
        .merged(options)
        .resolve(model.meta_config)
    )


def forward(
    model: LiMAMLModel,
    batch: TaskBatch,
    options: AdaptOptions | Mapping[str, Any] | None = None,
    training: bool = False,
) -> dict[str, tf.Tensor]:
    """`LiMAMLModel.forward`: adapts on the support set and scores the query."""
    if training:
        config = as_adapt_options(options).resolve(model.meta_config)
    else:
        config = inference_config(model, as_adapt_options(options))
    fast, support_loss = model.inner_loop(batch, config)
    embedding = model.adapted_embedding(batch, fast, config)
    logits = model.global_adapter.task_logits(
        embedding, batch.query, split_fast_weights(fast)[1]
    )
    out = {"query_logits": logits, "meta_embedding": embedding}
    if batch.query_label is not None:
        if support_loss is None:
            # Not adapted: report the plain mean, whatever the hook does.
            support_logits = model.logits(batch, SUPPORT, fast)[0]
            pointwise = model.pointwise_loss(
                batch.support_label[..., None], support_logits[..., None]
            )
            support_loss = step.masked_task_mean(pointwise, batch.support_mask)
        out.update(step.losses(model, batch, logits, support_loss))
    return out
