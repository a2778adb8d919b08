"""Metrics on query sets: exact AUC, log loss, per-entity AUC, support buckets.

AUC here is exact (rank statistic with ties averaged), not the bucketed
streaming estimate of `tf.keras.metrics.AUC` used for progress bars.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tf_limaml.config import AdaptOptions
from tf_limaml.errors import UserInputError

logger = logging.getLogger(__name__)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties count one half). NaN with one class."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = labels > 0.5
    n_pos = int(positives.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if labels.size == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)))


def mean_entity_auc(
    entity_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[float, int]:
    """Mean per-entity AUC over entities whose rows hold both classes.

    Returns:
        (mean AUC, number of entities it averages).
    """
    entity_ids = np.asarray(entity_ids).ravel()
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    order = np.argsort(entity_ids, kind="mergesort")
    ids, starts = np.unique(entity_ids[order], return_index=True)
    ends = np.append(starts[1:], order.size)
    values = []
    for start, end in zip(starts, ends, strict=True):
        idx = order[start:end]
        value = auc(labels[idx], scores[idx])
        if not np.isnan(value):
            values.append(value)
    return (float(np.mean(values)) if values else float("nan")), len(values)


def summarize(
    entity_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> dict[str, Any]:
    """Overall AUC, log loss and mean per-entity AUC of flat query rows."""
    member_auc, n_members = mean_entity_auc(entity_ids, labels, scores)
    return {
        "auc": auc(labels, scores),
        "loss": logloss(labels, scores),
        "mean_member_auc": member_auc,
        "n_members_with_both_classes": n_members,
        "n_rows": int(np.asarray(labels).size),
    }


def collect_query_predictions(
    model,
    batches: Iterable[Mapping[str, Any]],
    adapt: bool = True,
    steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Runs `model.predict_query` over task batches; returns flat real query rows.

    Returns:
        Arrays "entity_id", "label", "score" (one entry per real query row) and
        "n_support" (per row, the entity's support size).
    """
    out: dict[str, list] = {"entity_id": [], "label": [], "score": [], "n_support": []}
    for batch in batches:
        if steps is None:
            scores = model.predict_query(batch, adapt=adapt).numpy()
        else:
            options = AdaptOptions(inner_steps=steps)
            scores = model.predict_query(batch, options, adapt=adapt).numpy()
        mask = batch["query_mask"].numpy() > 0
        rows = mask.sum(axis=1)
        out["score"].append(scores[mask])
        out["label"].append(batch["query_label"].numpy()[mask])
        out["entity_id"].append(np.repeat(batch["entity_id"].numpy(), rows))
        out["n_support"].append(
            np.repeat(batch["support_mask"].numpy().sum(axis=1).astype(np.int64), rows)
        )
    if not out["score"]:
        raise UserInputError(
            "No task batches to evaluate: the task files hold no tasks"
        )
    return {k: np.concatenate(v) for k, v in out.items()}


def query_set_sizes(file_pattern, spec) -> list[int]:
    """Query rows of every task record the pattern matches, in file order.

    What `limaml evaluate` compares its `max_query` with, so that it scores
    every query row or says how many it left out.
    """
    import tensorflow as tf  # noqa: PLC0415 - keeps this module light to import

    from tf_limaml.data import GZIP, match_files  # noqa: PLC0415
    from tf_limaml.features import LABEL_KEY, QUERY  # noqa: PLC0415

    key = spec.sequence_key(QUERY, LABEL_KEY)
    schema = {key: tf.io.FixedLenSequenceFeature([], tf.float32)}
    sizes = []
    for record in tf.data.TFRecordDataset(
        match_files(file_pattern), compression_type=GZIP
    ):
        _, sequences = tf.io.parse_single_sequence_example(
            record, sequence_features=schema
        )
        sizes.append(int(sequences[key].shape[0]))
    return sizes


def query_coverage(sizes: Iterable[int], max_query: int) -> dict[str, Any]:
    """How many query rows a cap of `max_query` rows per task scores.

    Returns:
        {"in_files", "scored", "left_out", "max_query", "tasks_cut"}; when rows
        are left out, "why" says which and how to score them all.
    """
    sizes = list(sizes)
    scored = sum(min(n, max_query) for n in sizes)
    total = sum(sizes)
    out: dict[str, Any] = {
        "in_files": total,
        "scored": scored,
        "left_out": total - scored,
        "max_query": max_query,
        "tasks_cut": sum(1 for n in sizes if n > max_query),
    }
    if total > scored:
        out["why"] = (
            f"--max-query {max_query} scores the first {max_query} query rows of "
            f"each task; {out['tasks_cut']} task(s) have more. Leave --max-query "
            f"out (or pass {max(sizes)}) to score every row"
        )
    return out


def support_size_buckets(
    n_support: np.ndarray, edges: tuple[int, ...] = (0, 1, 5, 10, 20, 50)
) -> np.ndarray:
    """Bucket label per row by support size, e.g. "0", "1-4", "5-9", ..., "50+"."""
    labels = []
    for low, high in zip(edges, edges[1:], strict=False):
        labels.append((low, high, str(low) if high - low == 1 else f"{low}-{high - 1}"))
    n_support = np.asarray(n_support)
    names = np.full(n_support.shape, f"{edges[-1]}+", dtype=object)
    for low, high, name in labels:
        names[(n_support >= low) & (n_support < high)] = name
    return names


def evaluate_model(model, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Adapted and unadapted query metrics of a model on task batches.

    Returns:
        {"adapted": {...}, "unadapted": {...}, "n_tasks": N, "by_support_size": {...}}.
    """
    batches = list(batches)
    adapted = collect_query_predictions(model, batches, adapt=True)
    unadapted = collect_query_predictions(model, batches, adapt=False)
    buckets = support_size_buckets(adapted["n_support"])
    by_size = {}
    for name in sorted(set(buckets), key=lambda b: int(b.split("-")[0].rstrip("+"))):
        rows = buckets == name
        by_size[name] = {
            "adapted_auc": auc(adapted["label"][rows], adapted["score"][rows]),
            "unadapted_auc": auc(unadapted["label"][rows], unadapted["score"][rows]),
            "n_rows": int(rows.sum()),
        }
    return {
        "adapted": summarize(adapted["entity_id"], adapted["label"], adapted["score"]),
        "unadapted": summarize(
            unadapted["entity_id"], unadapted["label"], unadapted["score"]
        ),
        "n_tasks": int(sum(int(b["entity_id"].shape[0]) for b in batches)),
        "by_support_size": by_size,
    }


def health_check(
    labels: np.ndarray,
    scores: np.ndarray,
    val_loss: float | None = None,
    name: str = "model",
) -> dict[str, Any]:
    """Whether a trained model's scores are usable, and if not, why.

    A model that diverged (NaN weights), collapsed to one output, or ranks no
    better than chance still "finishes" training; this is the check that
    says so, so that no report or export treats its numbers as results.

    A model is failed when any of these holds:
    * `val_loss` is given and is not finite;
    * some score is not finite;
    * every score is the same (a constant model: every AUC would be 0.5);
    * the AUC of `scores` against `labels` is <= 0.5 (no better than chance).
      Labels of a single class give no AUC; that alone does not fail a model.

    Args:
        labels: 0/1 labels of the scored rows (any shape; flattened).
        scores: The model's scores (probabilities or logits) of the same rows.
        val_loss: The validation loss training ended with, if known.
        name: The model's name, for the log line.

    Returns:
        {"healthy": bool, "reasons": [str, ...], "auc": float or None,
        "n_rows": int}; "reasons" is empty when healthy.

    Example:

        health = health_check(labels, model_scores, val_loss=history["val_loss"][-1])
        if not health["healthy"]:
            raise RuntimeError("; ".join(health["reasons"]))
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    reasons = []
    if val_loss is not None and not np.isfinite(float(val_loss)):
        reasons.append(f"validation loss is {float(val_loss)} (not finite)")
    value = None
    if scores.size == 0:
        reasons.append("no scores to check (0 rows)")
    else:
        finite = np.isfinite(scores)
        if not finite.all():
            reasons.append(
                f"{int((~finite).sum())} of {scores.size} scores are not finite "
                "(NaN or Inf)"
            )
        elif float(scores.max() - scores.min()) == 0.0:
            reasons.append(
                f"every one of the {scores.size} scores is {scores[0]:.6g} "
                "(a constant model)"
            )
        else:
            value = auc(labels, scores)
            if not np.isnan(value) and value <= 0.5:
                reasons.append(f"AUC {value:.4f} <= 0.5 (no better than chance)")
    healthy = not reasons
    if not healthy:
        logger.warning("%s failed the health check: %s", name, "; ".join(reasons))
    return {
        "healthy": healthy,
        "reasons": reasons,
        "auc": None if value is None or np.isnan(value) else float(value),
        "n_rows": int(scores.size),
    }
