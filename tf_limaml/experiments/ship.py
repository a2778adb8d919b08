"""`limaml train --recipe`: the recipe `limaml tune` chose, trained whole and saved.

A recipe (`recipes.Recipe`) is more than a MetaConfig: where meta-training
starts (the trained global network, or the network pretrained with member-ID
embeddings), how long it runs, and the adapt-time knobs tune picked on its
held-out fold. `train_recipe` runs all of it with the same functions
`limaml tune` and `limaml demo` train with (`baselines`), on the same task
batches (`protocol.Splits`), and writes a model directory that
`limaml export` exports as it would any other:

    config.json          the model: spec, meta_config, adapt_options (the
                         recipe's adapt-time knobs), architecture
    weights/             the weights (`tf_limaml.load_model` reads them)
    recipe.json          the recipe, as run
    training_args.json   the task shapes of meta-training (export reads
                         max_support from it), seed, and what the run started from
    history.json         the Keras history of meta-training ({} if none)
    health.json          the health check of the model on the val entities

The **fallback** recipe of tune (warm start from global, 0 meta-epochs, 0
inner steps, and 0 inner steps at adapt time) ships exactly the global
network: its meta block is the global model's, and nothing adapts.

This module is an experiment tool (it imports `baselines`); `limaml train`
imports it only when `--recipe` is given.

Example:

    recipe = ship.load_recipe("tune/tune_config.json")
    summary = ship.train_recipe(spec, "tasks/", recipe, "runs/shipped/model")
    # then: limaml export --model-dir runs/shipped/model --export-base exports/
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from tf_limaml.errors import UserInputError
from tf_limaml.experiments.protocol import Protocol, Splits, records_from_dir
from tf_limaml.experiments.recipes import Recipe

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
HISTORY_FILE = "history.json"


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def read_recipe(obj: Mapping[str, Any], source: str = "the recipe") -> Recipe:
    """The Recipe of a tune_config.json's content, or of a bare Recipe dict.

    Args:
        obj: The loaded JSON: `{"recipe": {...}, "meta_config": ...}` as
            `limaml tune` writes it, or a `Recipe.to_dict()` (any subset of
            its fields; the rest keep Recipe's defaults).
        source: What to name in errors (a file path).

    Raises:
        UserInputError: Not a JSON object, an unknown field or a bad value.
    """
    if not isinstance(obj, Mapping):
        raise UserInputError(
            f"{source} must hold a JSON object (a tune_config.json or a Recipe), "
            f"got {type(obj).__name__}"
        )
    fields = obj.get("recipe") if isinstance(obj.get("recipe"), Mapping) else obj
    try:
        recipe = Recipe.from_dict(fields)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"{source}: {err}") from None
    if recipe.support_half_life is not None:
        # Recency weighting is a prototype model class that load_model cannot
        # rebuild from config.json: shipping it would serve another model.
        raise UserInputError(
            f"{source}: support_half_life={recipe.support_half_life!r} is the "
            "prototype tf_limaml.experimental.prototypes.ShrunkSupportModel, "
            "which cannot be saved and exported; set it to null"
        )
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """`read_recipe` of a JSON file (tune_config.json or a bare Recipe).

    Raises:
        UserInputError: A missing file, bad JSON, or a bad recipe.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(
            f"recipe file not found: {path}; pass the tune_config.json that "
            "`limaml tune` writes, or a Recipe JSON"
        )
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path} is not JSON: {err}") from None
    return read_recipe(obj, path)


def is_fallback(recipe: Recipe) -> bool:
    """Whether the recipe is tune's fallback: the global network, unadapted
    (no inner step and no embedding fit when scoring)."""
    adapt_steps = (
        recipe.inner_steps
        if recipe.adapt_inner_steps is None
        else recipe.adapt_inner_steps
    )
    fit_steps = (
        recipe.embedding_steps
        if recipe.adapt_embedding_steps is None
        else recipe.adapt_embedding_steps
    )
    return (
        recipe.meta_block == "mlp"
        and recipe.warm_start == "global"
        and recipe.meta_epochs == 0
        and adapt_steps == 0
        and fit_steps == 0
    )


def training_args(recipe: Recipe, protocol, seed: int, **extra: Any) -> dict:
    """`training_args.json` of a shipped model: the task shapes of meta-training
    (export reads max_support from it), its schedule, seed and warm start."""
    return {
        "max_support": protocol.max_support,
        "max_query": protocol.max_query,
        "batch_tasks": recipe.meta_batch_tasks,
        "epochs": recipe.meta_epochs,
        "learning_rate": recipe.meta_learning_rate,
        "seed": seed,
        **extra,
        "warm_start": start_of(recipe),
    }


def start_of(recipe: Recipe) -> str:
    """What meta-training starts from under `recipe`, in words."""
    if recipe.warm_start == "global":
        return "the trained global network"
    if recipe.pretrain_epochs:
        return f"the network pretrained {recipe.pretrain_epochs} epochs with member IDs"
    return "a fresh network"


def train_shipped(
    spec,
    splits: Splits,
    recipe: Recipe,
    seed: int = 0,
    phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
):
    """The LiMAML model a recipe stands for: its warm start, then meta-training.

    The model's `adapt_options` are the recipe's adapt-time knobs, so scoring,
    `limaml embed` and the export's signatures all adapt as tune measured.

    Args:
        spec: The FeatureSpec of the task records.
        splits: The task batches (`protocol.Splits`).
        recipe: The recipe.
        seed: Seeds every model.
        phase: `Progress.phase` of the CLI (one line per phase), or None.

    Returns:
        (the LiMAMLModel, the Keras history of meta-training: {} with 0 epochs).
    """
    from tf_limaml.experiments import baselines  # noqa: PLC0415

    phase = phase or _no_phase
    init = None
    if recipe.warm_start == "global":
        with phase(f"warm start: the global network ({recipe.epochs} epochs at most)"):
            init, _ = baselines.train_global(spec, splits, recipe, seed)
    elif recipe.pretrain_epochs:
        with phase(
            f"warm start: pretraining with member IDs ({recipe.pretrain_epochs} "
            "epochs)"
        ):
            init = baselines.pretrain(spec, splits, recipe, seed)
    order = "first" if recipe.first_order else "second"
    what = (
        f"meta-train: {recipe.meta_epochs} epoch(s) at most, "
        f"{recipe.inner_steps} inner step(s) of rate {recipe.inner_lr:g}, "
        f"{order} order, from {start_of(recipe)}"
        if recipe.meta_epochs
        else f"LiMAML from {start_of(recipe)}, no meta-training (0 meta-epochs)"
    )
    with phase(what):
        return baselines.train_meta_learner(spec, splits, recipe, seed, init=init)


def save_shipped(
    model,
    model_dir: str | os.PathLike,
    recipe: Recipe,
    history: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
) -> str:
    """Writes the model directory of `train_recipe` (see the module docstring).

    Returns:
        The model directory.
    """
    import tensorflow as tf  # noqa: PLC0415

    from tf_limaml import training  # noqa: PLC0415
    from tf_limaml.experiments import report  # noqa: PLC0415
    from tf_limaml.saving import save_model  # noqa: PLC0415

    model_dir = os.fspath(model_dir)
    save_model(model, model_dir)
    files = {
        RECIPE_FILE: recipe.to_dict(),
        training.TRAINING_ARGS: dict(training_args or {}),
        HISTORY_FILE: {k: [float(x) for x in v] for k, v in (history or {}).items()},
    }
    if health is not None:
        files[training.HEALTH] = dict(health)
    for name, content in files.items():
        with tf.io.gfile.GFile(os.path.join(model_dir, name), "w") as f:
            json.dump(report.json_safe(content), f, indent=2)
    return model_dir


def _val_health(model, splits: Splits, history: Mapping[str, Any]) -> dict[str, Any]:
    """The health check of the model's adapted query scores on the val entities."""
    import numpy as np  # noqa: PLC0415

    from tf_limaml import evaluation  # noqa: PLC0415
    from tf_limaml.experiments import baselines  # noqa: PLC0415

    mask = np.asarray(splits.val["query_mask"]) > 0
    scores = baselines.query_probabilities(model, splits.val)
    losses = [v for v in history.get("val_loss", []) if math.isfinite(v)]
    val_loss = min(losses) if losses else None
    if history.get("val_loss") and not losses:
        val_loss = float("nan")
    health = evaluation.health_check(
        np.asarray(splits.val["query_label"])[mask],
        scores[mask],
        val_loss=val_loss,
        name="LiMAML",
    )
    health["checked_on"] = "the val entities' query rows, adapted"
    return health


def train_recipe(
    spec,
    tasks_dir: str | os.PathLike,
    recipe: Recipe,
    model_dir: str | os.PathLike,
    seed: int = 0,
    progress=None,
    protocol: Protocol | None = None,
) -> dict[str, Any]:
    """`limaml train --recipe`: trains the recipe whole and writes the model directory.

    Args:
        spec: The completed FeatureSpec of the records (`TASKS/spec.json`).
        tasks_dir: The make-tasks output directory (train, val and test records).
            The global network and the pretraining read what `limaml demo`'s
            do: the train entities' rows and the others' support rows; test
            query rows are never trained on.
        recipe: The recipe (`load_recipe`).
        model_dir: The model directory to write.
        seed: Seeds every model.
        progress: `tf_limaml.cli.Progress`, or None.
        protocol: Task shapes of meta-training (default `Protocol()`).

    Returns:
        {"model_dir", "warm_start", "meta_epochs" (run), "adapt_options",
        "fallback", "healthy"}.

    Raises:
        tf_limaml.training.ModelFailedError: The model failed its health check
            on the val entities (the directory is written first).
    """
    from tf_limaml import training  # noqa: PLC0415

    protocol = protocol or Protocol()
    phase = progress.phase if progress is not None else _no_phase
    tasks_dir = os.fspath(tasks_dir)
    with phase(f"load tasks from {tasks_dir}"):
        splits = Splits.from_records(records_from_dir(tasks_dir), spec, protocol)
    model, history = train_shipped(spec, splits, recipe, seed, phase)
    health = _val_health(model, splits, history)
    save_shipped(
        model,
        model_dir,
        recipe,
        history=history,
        health=health,
        training_args=training_args(recipe, protocol, seed, tasks=tasks_dir),
    )
    if not health["healthy"]:
        raise training.ModelFailedError(
            f"The model trained by the recipe in {os.fspath(model_dir)} failed its "
            f"health check on {health['checked_on']}: "
            f"{'; '.join(health['reasons'])}. Ship tune's fallback recipe instead, "
            "or look at the data for a label that is constant.",
            health,
        )
    return {
        "model_dir": os.fspath(model_dir),
        "warm_start": recipe.warm_start,
        "meta_epochs": len(history.get("loss", [])),
        "adapt_options": model.adapt_options.overrides,
        "fallback": is_fallback(recipe),
        "healthy": bool(health["healthy"]),
    }


def recipe_summary(recipe: Recipe) -> str:
    """The recipe in one line, for the CLI's progress."""
    knobs = recipe.adaptation()
    block = "the sequence meta block, " if recipe.meta_block == "sequence" else ""
    return (
        f"{block}warm start {recipe.warm_start}, "
        f"{recipe.meta_epochs} meta-epoch(s) at most, "
        f"{recipe.inner_steps} inner step(s)"
        + (f", adapt-time {knobs}" if knobs else "")
        + (" (tune's fallback: the global network)" if is_fallback(recipe) else "")
    )
