"""`limaml demo`: MovieLens-100K (or any interactions file) end to end.

The chain, one progress line per phase:

1. **make-tasks**: the interactions (the embedded ML-100K copy written as CSV,
   or `--input`) go through the Beam pipeline (`beam_pipelines.make_tasks`,
   DirectRunner) into per-member task records, split train/val/test by a
   stable hash;
2. per seed, **meta-train**: pretraining, then LiMAML and full-network MAML;
3. **ship** and **export**: seed 0's LiMAML model is saved in
   `WORKDIR/shipped/model` (a model directory, as `limaml train --recipe`
   writes) and exported from there to `WORKDIR/shipped/export/1`; the other
   seeds' go to `WORKDIR/seedN/export`;
4. **embed**: `limaml embed` (Beam) writes every test member's adapted meta
   embedding (once per support size k), and `serving_default` scores their
   query rows from those stored vectors: the `limaml_offline` row, which for
   the shipped seed must equal its `limaml` row (`shipped` in the report);
5. **baselines**: global, fine-tuning and the ID-embedding model (retrained per k);
6. **report**: `report.json`, `report.md`, `lift.png` in the work directory,
   and the table on stdout.

The protocol is `tf_limaml.experiments.protocol.Protocol`, the recipe
`tf_limaml.experiments.recipes.Recipe`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tf_limaml.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_WORKDIR = os.path.join("runs", "demo")
DEFAULT_SEEDS = 3
# Trained candidates of `limaml tune` when `--input` picks its own recipe: a
# budget that keeps the tuning within about one seed's time.
DEMO_TUNE_BUDGET = 4
DEMO_TUNE_BUDGET_FAST = 2
TUNING_FILE = os.path.join(os.path.dirname(__file__), "movielens_tuning.json")
# The seed whose LiMAML model the demo ships (`WORKDIR/shipped/`).
SHIPPED_SEED = 0
SHIPPED_DIR = "shipped"
_ALL = "all"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


# ------------------------------------------------------------ offline path
def cut_record(record: bytes, k: int | None, entity_suffix: str = "") -> bytes:
    """A task record with its support cut to the latest k rows (and a new id).

    Support feature lists are in time order, so the latest k are the last k.
    The query part stays (the task schema requires it); `limaml embed`
    reads only the support.
    """
    import tensorflow as tf  # noqa: PLC0415

    example = tf.train.SequenceExample.FromString(record)
    lists = example.feature_lists.feature_list
    if k is not None:
        for key in list(lists):
            if key.startswith("support/"):
                kept = list(lists[key].feature)[-k:] if k > 0 else []
                del lists[key].feature[:]
                lists[key].feature.extend(kept)
    if entity_suffix:
        ids = example.context.feature["entity_id"].bytes_list.value
        ids[0] = ids[0] + entity_suffix.encode()
    return example.SerializeToString()


def _suffix(k: int | None) -> str:
    # The whole support keeps the member's own id, so the export's
    # consistency check can match it against the task files.
    return "" if k is None else f"#k={k}"


def read_embeddings(pattern: str) -> dict[str, Any]:
    """{entity_id: embedding} from `limaml embed` output (tf.Example TFRecords)."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    files = tf.io.gfile.glob(pattern)
    if not files:
        raise FileNotFoundError(
            f"No embeddings match {pattern}; did `limaml embed` run?"
        )
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        out[feature["entity_id"].bytes_list.value[0].decode()] = np.array(
            feature["embedding"].float_list.value, np.float32
        )
    return out


def serve_scores(
    serving_fn,
    spec,
    batch: Mapping[str, Any],
    embeddings: Mapping[str, Any],
    suffix: str,
    chunk: int = 4096,
):
    """Query probabilities [T, Q] from `serving_default` fed stored embeddings."""
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    mask = batch["query_mask"] > 0
    ids = [e.decode() if isinstance(e, bytes) else str(e) for e in batch["entity_id"]]
    missing = [i for i in ids if i + suffix not in embeddings]
    if missing:
        raise KeyError(
            f"No stored embedding for {len(missing)} test members "
            f"(e.g. {missing[0] + suffix!r}); the embed job skipped them"
        )
    per_task = np.stack([embeddings[i + suffix] for i in ids])
    rows = np.repeat(per_task, mask.sum(axis=1), axis=0)
    request = {
        f.name: batch[spec.batch_key("query", f.name)][mask]
        for f in spec.request_features
    }
    scores = []
    for start in range(0, len(rows), chunk):
        inputs = {
            name: tf.constant(value[start : start + chunk])
            for name, value in request.items()
        }
        inputs["meta_embedding"] = tf.constant(rows[start : start + chunk])
        scores.append(serving_fn(**inputs)["score"].numpy())
    out = np.zeros(mask.shape, np.float32)
    out[mask] = np.concatenate(scores) if scores else []
    return out


def shipped_paths(workdir: str) -> dict[str, str]:
    """Where `limaml demo` keeps the model it ships: its directory and its export."""
    base = os.path.join(workdir, SHIPPED_DIR)
    return {
        "base": base,
        "model": os.path.join(base, "model"),
        "export": os.path.join(base, "export"),
    }


def ship_model(
    model,
    workdir: str,
    recipe,
    protocol,
    max_support: int,
    seed: int,
    history: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Saves the reported LiMAML model as `limaml train --recipe` would, and
    exports it from that directory: `WORKDIR/shipped/{model,export/1}`.

    The export is made from the saved directory (loaded back), so what is
    served is what a user exports; its support limit is the longest test
    support, so `limaml embed` adapts on every row the report's evaluation did.

    Returns:
        {"model_dir", "export"}: the directories written.
    """
    from tf_limaml import export  # noqa: PLC0415
    from tf_limaml.experiments import ship  # noqa: PLC0415
    from tf_limaml.saving import load_model  # noqa: PLC0415

    paths = shipped_paths(workdir)
    if os.path.exists(paths["base"]):
        shutil.rmtree(paths["base"])
    ship.save_shipped(
        model,
        paths["model"],
        recipe,
        history=history,
        health=health,
        training_args=ship.training_args(recipe, protocol, seed),
    )
    export_dir = export.export_model(
        load_model(paths["model"]), paths["export"], version=1, max_support=max_support
    )
    return {"model_dir": paths["model"], "export": export_dir}


def run_offline(
    model,
    spec,
    splits,
    records_test: Sequence[bytes],
    ks,
    workdir: str,
    progress,
    seed: int,
    ship: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Export, `limaml embed` (Beam), then serving_default: the offline LiMAML path.

    Args:
        ship: For the shipped seed, {"recipe", "protocol", "history", "health"}
            (`ship_model`'s arguments): the model
            is saved to `WORKDIR/shipped/model` and exported to
            `WORKDIR/shipped/export/1` (`ship_model`), and that export is the
            one embedded and served. Otherwise the export is `WORKDIR/seedN/export`.

    Returns:
        (sweep {k: metrics}, details, seconds spent).
    """
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from beam_pipelines import generate_embeddings  # noqa: PLC0415
    from tf_limaml import export  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        cut_support,
        k_label,
        metrics_entry,
        query_metrics,
    )

    start = time.perf_counter()
    seed_dir = os.path.join(workdir, f"seed{seed}")
    export_base = os.path.join(seed_dir, "export")
    if os.path.exists(export_base):
        shutil.rmtree(export_base)
    os.makedirs(seed_dir, exist_ok=True)
    max_support = max(int(splits.test["support_mask"].sum(axis=1).max()), 1)
    shipped = None
    if ship is not None:
        with progress.phase(
            f"ship (seed {seed}): the LiMAML model -> "
            f"{shipped_paths(workdir)['model']}, exported for TF Serving"
        ):
            shipped = ship_model(
                model, workdir, max_support=max_support, seed=seed, **ship
            )
        export_dir = shipped["export"]
    else:
        with progress.phase(f"export (seed {seed}): SavedModel for TF Serving"):
            export_dir = export.export_model(
                model, export_base, version=1, max_support=max_support
            )
    tasks_path = os.path.join(seed_dir, "embed_tasks.tfrecord.gz")
    from tf_limaml import data  # noqa: PLC0415

    data.write_tasks(
        tasks_path, [cut_record(r, k, _suffix(k)) for k in ks for r in records_test]
    )
    out_dir = os.path.join(seed_dir, "embeddings")
    with progress.phase(
        f"embed (seed {seed}): limaml embed, Beam DirectRunner, "
        f"{len(ks)} support sizes x {len(records_test)} test members"
    ):
        generate_embeddings.run(
            [
                "--export",
                export_dir,
                "--tasks",
                tasks_path,
                "--output",
                out_dir,
                "--overwrite",
            ]
        )
    embeddings = read_embeddings(os.path.join(out_dir, "embeddings-*.tfrecord.gz"))
    serving_fn = tf.saved_model.load(export_dir).signatures[export.SERVING_DEFAULT]
    sweep, health = {}, None
    for k in ks:
        cut = cut_support(splits.test, k)
        scores = serve_scores(serving_fn, spec, cut, embeddings, _suffix(k))
        sweep[k_label(k)] = metrics_entry(query_metrics(cut, scores))
        if k is None:
            health = model_health(splits.test, scores, name="limaml_offline")
    details = {"export": export_dir, "embeddings": len(embeddings)}
    if shipped is not None:
        details["shipped_model_dir"] = shipped["model_dir"]
    if health is not None:
        details["health"] = health
    test_pattern = os.path.join(workdir, "tasks", "test-*.tfrecord.gz")
    if tf.io.gfile.glob(test_pattern):
        check = export.check_serving_consistency(
            export_dir,
            test_pattern,
            os.path.join(out_dir, "embeddings-*.tfrecord.gz"),
            max_query=int(np.max(splits.test["query_mask"].sum(axis=1))),
        )
        details["serving_consistency"] = {
            "entities": check["entities"],
            "max_abs_score_diff": float(f"{check['max_abs_score_diff']:.3g}"),
            "consistent": check["consistent"],
        }
    return sweep, details, time.perf_counter() - start


# ------------------------------------------------------------------- seeds
def model_health(
    batch: Mapping[str, Any],
    probabilities,
    history: Mapping[str, Sequence[float]] | None = None,
    name: str = "model",
) -> dict[str, Any]:
    """`evaluation.health_check` of a model's query scores on a task batch.

    Args:
        batch: The task batch scored (its real query rows are checked).
        probabilities: Query probabilities `[T, Q]`.
        history: The Keras history; its best val loss is checked when present.
        name: The model's name, for the log.
    """
    import numpy as np  # noqa: PLC0415

    from tf_limaml import evaluation  # noqa: PLC0415

    mask = np.asarray(batch["query_mask"]) > 0
    val_losses = list((history or {}).get("val_loss", []))
    finite = [v for v in val_losses if np.isfinite(v)]
    # Early stopping keeps the best weights; a loss that was never finite fails.
    val_loss = (min(finite) if finite else val_losses[-1]) if val_losses else None
    return evaluation.health_check(
        np.asarray(batch["query_label"])[mask],
        np.asarray(probabilities)[mask],
        val_loss=val_loss,
        name=name,
    )


def run_seed(
    spec,
    splits,
    records,
    recipe,
    protocol,
    seed: int,
    workdir: str,
    progress,
    offline: bool = True,
    extra_models: Sequence[str] = (),
    item_feature: str | None = None,
    input_path: str | None = None,
    strategy: Any = None,
) -> dict[str, Any]:
    """Every model for one seed; returns {model name: measurement}.

    `extra_models` adds the models beyond the paper: "sequence"
    (`limaml_sequence`) and "multi_entity" (`limaml_multi_entity`, which
    personalizes `item_feature` from the interactions at `input_path`).
    """
    from tf_limaml.experiments import baselines  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        Timer,
        cut_support,
        evaluate_sweep,
        k_label,
        measurement,
        metrics_entry,
        query_metrics,
        without_buckets,
    )

    ks = protocol.support_ks
    results: dict[str, Any] = {}
    # The models are built and fit under `limaml demo --strategy`; the offline
    # path loads its SavedModel outside it.
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    with progress.phase(f"global (seed {seed}): conventional training"), scope():
        with Timer() as timer:
            base, history = baselines.train_global(spec, splits, recipe, seed)
            sweep = evaluate_sweep(
                lambda batch, k: baselines.query_probabilities(base, batch, 0),
                splits.test,
                ks,
            )
        results["global"] = measurement(
            sweep, timer.seconds, {"epochs": len(history["loss"])}
        )
        results["global"]["health"] = model_health(
            splits.test,
            baselines.query_probabilities(base, splits.test, 0),
            history,
            name="global",
        )
        global_s = timer.seconds
    start = "the global model" if recipe.warm_start == "global" else "pretrain"
    with (
        progress.phase(f"meta-train (seed {seed}): {start}, LiMAML, full MAML"),
        scope(),
    ):
        pretrained: dict[int, Any] = {}

        def start_of(chosen) -> Any:
            # The global model, or the member-ID pretraining (once per epochs).
            if chosen.warm_start == "global":
                return base
            if not chosen.pretrain_epochs:
                return None
            if chosen.pretrain_epochs not in pretrained:
                pretrained[chosen.pretrain_epochs] = baselines.pretrain(
                    spec, splits, chosen, seed
                )
            return pretrained[chosen.pretrain_epochs]

        timer = Timer()
        with timer:
            init = start_of(recipe)
        pretrain_s = timer.seconds
        learners, histories = {}, {}
        for name, adapt, chosen in (
            ("limaml", "meta_block", recipe),
            ("maml", "all", recipe.full_maml()),
        ):
            with Timer() as timer:
                model, history = baselines.train_meta_learner(
                    spec, splits, chosen, seed, adapt=adapt, init=start_of(chosen)
                )
                sweep = evaluate_sweep(
                    lambda batch, k, m=model: baselines.query_probabilities(m, batch),
                    splits.test,
                    ks,
                )
            # The meta-learned default, as a member with no history gets it.
            cold = query_metrics(
                splits.test, baselines.query_probabilities(model, splits.test, 0)
            )
            learners[name] = model
            histories[name] = history
            results[name] = measurement(
                sweep,
                pretrain_s + timer.seconds,
                {
                    "meta_epochs": len(history.get("loss", [])),
                    "best_val_loss": round(
                        min(history.get("val_loss", [float("nan")])), 4
                    ),
                    "pretrain_s": round(pretrain_s, 1),
                    "unadapted_overall_auc": round(cold["auc"], 4),
                },
            )
            results[name]["health"] = model_health(
                splits.test,
                baselines.query_probabilities(model, splits.test),
                history,
                name=name,
            )
    if "sequence" in extra_models:
        with (
            progress.phase(
                f"meta-train (seed {seed}): limaml_sequence, the sequence meta block"
            ),
            scope(),
        ):
            with Timer() as timer:
                model, history = baselines.train_meta_learner(
                    # Its own meta block learns: never frozen.
                    spec,
                    splits,
                    dataclasses.replace(recipe, freeze_network=False),
                    seed,
                    init=init,
                    sequence=True,
                )
                sweep = evaluate_sweep(
                    lambda batch, k, m=model: baselines.query_probabilities(m, batch),
                    splits.test,
                    ks,
                )
            amortized = query_metrics(
                splits.test, baselines.query_probabilities(model, splits.test, 0)
            )
            results["limaml_sequence"] = measurement(
                sweep,
                pretrain_s + timer.seconds,
                {
                    "meta_epochs": len(history.get("loss", [])),
                    "inner_steps": model.meta_config.inner_steps,
                    "zero_step_overall_auc": round(amortized["auc"], 4),
                },
            )
            results["limaml_sequence"]["health"] = model_health(
                splits.test,
                baselines.query_probabilities(model, splits.test),
                history,
                name="limaml_sequence",
            )
    if "multi_entity" in extra_models:
        from tf_limaml.experiments import multi_entity  # noqa: PLC0415

        with progress.phase(
            f"meta-train (seed {seed}): limaml_multi_entity, member and "
            f"{item_feature} meta blocks"
        ):
            with Timer() as timer:
                score, details = multi_entity.train_multi_entity(
                    spec,
                    splits,
                    records,
                    recipe,
                    protocol,
                    seed,
                    workdir,
                    progress,
                    input_path,
                    item_column=item_feature,
                    strategy=strategy,
                )
                sweep = evaluate_sweep(score, splits.test, ks)
            results["limaml_multi_entity"] = measurement(
                sweep, pretrain_s + timer.seconds, details
            )
            results["limaml_multi_entity"]["health"] = model_health(
                splits.test,
                score(without_buckets(splits.test), None),
                name="limaml_multi_entity",
            )
    if offline:
        sweep, details, seconds = run_offline(
            learners["limaml"],
            spec,
            splits,
            records["test"],
            ks,
            workdir,
            progress,
            seed,
            ship=(
                {
                    "recipe": recipe,
                    "protocol": protocol,
                    "history": histories["limaml"],
                    "health": results["limaml"].get("health"),
                }
                if seed == SHIPPED_SEED
                else None
            ),
        )
        health = details.pop("health", None)
        results["limaml_offline"] = measurement(
            sweep, results["limaml"]["wall_s"] + seconds, details
        )
        if health is not None:
            results["limaml_offline"]["health"] = health
    with (
        progress.phase(
            f"baselines (seed {seed}): fine-tuning, ID embedding "
            f"retrained for each of {len(ks)} support sizes"
        ),
        scope(),
    ):
        with Timer() as timer:
            sweep, chosen = baselines.finetune_sweep(base, splits, recipe, ks)
        results["finetune"] = measurement(
            sweep, global_s + timer.seconds, {"chosen_on_val": chosen}
        )
        full = chosen.get(k_label(None))
        if full is not None:
            results["finetune"]["health"] = model_health(
                splits.test,
                baselines.query_probabilities(
                    base, splits.test, full["steps"], full["inner_lr"]
                ),
                name="finetune",
            )
        sweep, epochs, id_health = {}, {}, None
        with Timer() as timer:
            for k in ks:
                model, history = baselines.train_id_embedding(
                    spec, splits, recipe, seed, k
                )
                cut = cut_support(splits.test, k)
                probabilities = model.task_probabilities(cut)
                sweep[k_label(k)] = metrics_entry(query_metrics(cut, probabilities))
                epochs[k_label(k)] = len(history["loss"])
                if k is None:
                    id_health = model_health(
                        cut, probabilities, history, name="id_embedding"
                    )
        results["id_embedding"] = measurement(sweep, timer.seconds, {"epochs": epochs})
        if id_health is not None:
            results["id_embedding"]["health"] = id_health
    return results


def shipped_summary(
    per_seed: Sequence[Mapping[str, Any]], workdir: str
) -> dict[str, Any] | None:
    """The shipped model against the report: its served AUC and the reported one.

    Served: the export in `WORKDIR/shipped/export`, every test member's
    embedding from `limaml embed`, query rows scored by `serving_default`
    (the `limaml_offline` row of the shipped seed). Reported: the `limaml`
    row of the same seed, scored in-process. None when the seed has no
    offline row.
    """
    if len(per_seed) <= SHIPPED_SEED:
        return None
    online = per_seed[SHIPPED_SEED].get("limaml")
    offline = per_seed[SHIPPED_SEED].get("limaml_offline")
    if not online or not offline or "shipped_model_dir" not in offline["details"]:
        return None
    diffs = {
        k: abs(cell["overall_auc"] - online["support_k"][k]["overall_auc"])
        for k, cell in offline["support_k"].items()
        if k in online["support_k"]
    }
    return {
        "seed": SHIPPED_SEED,
        "model_dir": os.path.relpath(offline["details"]["shipped_model_dir"], workdir),
        "export": os.path.relpath(offline["details"]["export"], workdir),
        "reported_overall_auc": online["overall_auc"],
        "served_overall_auc": offline["overall_auc"],
        "abs_auc_diff": abs(online["overall_auc"] - offline["overall_auc"]),
        "max_abs_auc_diff_over_k": max(diffs.values(), default=float("nan")),
    }


def shipped_line(shipped: Mapping[str, Any], root: str = "") -> str:
    """The shipped model in one sentence (stdout and the report's summary).

    Args:
        shipped: `shipped_summary`.
        root: Joined before its paths (they are relative to the work directory).
    """
    model_dir = os.path.join(root, shipped["model_dir"])
    export_dir = os.path.join(root, shipped["export"])
    return (
        f"Shipped: the LiMAML model of seed {shipped['seed']}, saved in "
        f"{model_dir} and exported to {export_dir}; scored "
        "through that export (limaml embed + serving_default) its test overall "
        f"AUC is {shipped['served_overall_auc']:.6f}, the limaml row of seed "
        f"{shipped['seed']} {shipped['reported_overall_auc']:.6f} (|difference| "
        f"{shipped['abs_auc_diff']:.1e}; largest over support sizes "
        f"{shipped['max_abs_auc_diff_over_k']:.1e})."
    )


# ------------------------------------------------------------------ inputs
def _prepare_input(
    args: argparse.Namespace, workdir: str, progress
) -> tuple[str, str, str, str]:
    """(interactions path, format, spec path, dataset name) for make-tasks."""
    if args.input:
        if not args.features:
            raise UserInputError(
                "--input needs --features SPEC.json, the FeatureSpec of the file "
                "(see tf_limaml/datasets/movielens.py for an example)"
            )
        if not os.path.exists(args.features):
            raise FileNotFoundError(f"feature spec not found: {args.features}")
        return args.input, args.format, args.features, os.path.basename(args.input)
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    with progress.phase("load MovieLens-100K (the copy in the recbole wheel)"):
        rows, spec = movielens.load()
        path = os.path.join(data_dir, "interactions.csv")
        movielens.write_csv(rows, path)
        spec_path = os.path.join(data_dir, "spec.json")
        spec.save(spec_path)
    return path, "csv", spec_path, "MovieLens-100K"


EXTRA_MODELS = ("sequence", "multi_entity")


def movielens_item_feature() -> str:
    from tf_limaml.datasets import movielens  # noqa: PLC0415

    return movielens.ITEM_FEATURE


def _extra_models(
    args: argparse.Namespace, own_data: bool, item_feature: str | None
) -> tuple[str, ...]:
    """The models beyond the paper this run adds (`--extra-models`)."""
    text = getattr(args, "extra_models", None)
    if text is None:
        return () if own_data else EXTRA_MODELS
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    if chosen == ("none",):
        return ()
    unknown = [x for x in chosen if x not in EXTRA_MODELS]
    if unknown:
        raise UserInputError(
            f"--extra-models: unknown {unknown}; choose from {list(EXTRA_MODELS)} "
            "or 'none'"
        )
    if "multi_entity" in chosen and not item_feature:
        raise UserInputError("--extra-models multi_entity needs --item-feature NAME")
    return chosen


def _with_buckets(splits, spec, item_feature: str | None):
    """The test batch labelled with its buckets: member history length, and
    the item's training-rating count when the item feature is known."""
    from tf_limaml.experiments import protocol as proto  # noqa: PLC0415

    buckets = {proto.MEMBER_HISTORY: proto.member_history_buckets(splits.test)}
    if item_feature:
        names = {f.name for f in spec.request_features}
        if item_feature not in names:
            raise UserInputError(
                f"--item-feature {item_feature!r} is not a request feature; the "
                f"spec's are {sorted(names)}"
            )
        counts = proto.item_counts([splits.train], spec, item_feature)
        buckets[proto.ITEM_POPULARITY] = proto.item_popularity_buckets(
            splits.test, spec, item_feature, counts
        )
    return dataclasses.replace(splits, test=proto.with_buckets(splits.test, buckets))


def _tuning() -> dict[str, Any] | None:
    """The record of what was tried, when this package ships one."""
    if not os.path.exists(TUNING_FILE):
        return None
    with open(TUNING_FILE, encoding="utf-8") as f:
        return json.load(f)


def run(args: argparse.Namespace, progress) -> int:
    """`limaml demo` for MovieLens-100K or `--input FILE --features SPEC`.

    Args:
        args: dataset, input, format, features, workdir, seeds, epochs, fast,
            strategy (the models of each seed are built and fit under it).
        progress: `tf_limaml.cli.Progress` (one line per phase).

    Returns:
        The exit code (0).
    """
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    workdir = args.workdir or DEFAULT_WORKDIR
    os.makedirs(workdir, exist_ok=True)
    seeds = args.seeds or DEFAULT_SEEDS
    input_path, input_format, spec_path, dataset = _prepare_input(
        args, workdir, progress
    )

    from beam_pipelines import make_tasks  # noqa: PLC0415
    from tf_limaml.experiments import readme_table, report  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        Protocol,
        Splits,
        records_from_dir,
    )
    from tf_limaml.experiments.recipes import Recipe  # noqa: PLC0415
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    recipe = Recipe.fast() if args.fast else Recipe()
    if args.epochs:
        recipe = dataclasses.replace(
            recipe, epochs=args.epochs, meta_epochs=args.epochs
        )
    own_data = bool(args.input)
    protocol = Protocol()
    tasks_dir = os.path.join(workdir, "tasks")
    with progress.phase("make-tasks (Beam, DirectRunner)"):
        make_tasks.run(
            protocol.make_tasks_args(input_path, spec_path, tasks_dir, input_format)
        )
    spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    with open(os.path.join(tasks_dir, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    records = records_from_dir(tasks_dir)
    splits = Splits.from_records(records, spec, protocol)
    item_feature = getattr(args, "item_feature", None) or (
        None if own_data else movielens_item_feature()
    )
    splits = _with_buckets(splits, spec, item_feature)
    extra_models = _extra_models(args, own_data, item_feature)
    tuned = None
    budget = getattr(args, "tune_budget", None)
    if budget is None:
        budget = DEMO_TUNE_BUDGET_FAST if args.fast else DEMO_TUNE_BUDGET
    if own_data and budget > 0:
        # The MovieLens recipe was tuned on MovieLens; other data gets its own,
        # chosen on its val members with the global fallback always available.
        from tf_limaml.experiments import tune  # noqa: PLC0415

        with progress.phase(
            f"tune (budget {budget}): LiMAML's recipe vs global, on a held-out "
            f"{tune.TUNING_FOLD:.0%} of the train members"
        ):
            tuned = tune.tune(
                spec,
                tune.tuning_splits(records, spec, protocol),
                recipe,
                budget=budget,
                seed=protocol.split_seed,
                ks=protocol.support_ks,
                report_line=lambda text: print(text, file=sys.stderr, flush=True),
            )
            tune_paths = tune.write_outputs(tuned, os.path.join(workdir, "tune"))
        recipe = tune.chosen_recipe(tuned)
    per_seed = []
    for seed in range(seeds):
        per_seed.append(
            run_seed(
                spec,
                splits,
                records,
                recipe,
                protocol,
                seed,
                workdir,
                progress,
                extra_models=extra_models,
                item_feature=item_feature,
                input_path=input_path,
                strategy=getattr(args, "strategy", None),
            )
        )
    shipped = shipped_summary(per_seed, workdir)
    with progress.phase("report"):
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
        members = {s: len(records[s]) for s in ("train", "val", "test")}
        described = protocol.describe(spec)
        result = report.aggregate(
            per_seed,
            protocol={
                **described,
                "members": (
                    f"{described['members']}: {members['train']}/{members['val']}/"
                    f"{members['test']} members"
                ),
            },
            title=f"LiMAML on {dataset}: comparison report",
            summary=(
                f"{dataset}: {stats.get('rows_in_tasks', 'n/a')} interactions in tasks "
                f"({stats.get('rows_rejected', 0)} rejected), "
                f"{sum(members.values())} members; every model shares one network "
                "(meta block + global block) and the same features."
                + (f" {shipped_line(shipped)}" if shipped else "")
            ),
            shipped=shipped,
            run={
                "seeds": seeds,
                "wall_s_before_report": round(wall, 1),
                "cpu_s_before_report": round(cpu, 1),
                "cpu_count": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "python": platform.python_version(),
                "commit": readme_table.git_commit(),
                "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
            },
            training=_training_notes(recipe),
            config={
                "recipe": recipe.to_dict(),
                "protocol": dataclasses.asdict(protocol),
                "limaml_model": _model_note(recipe),
            },
            # MovieLens's tuning record and targets describe MovieLens only.
            tried=None if own_data else _tuning(),
            target_set="own" if own_data else "movielens",
            data=report.data_summary(tasks_dir) if own_data else None,
            tune=(
                {
                    **report.tune_summary(tuned),
                    "files": {
                        k: os.path.relpath(v, workdir) for k, v in tune_paths.items()
                    },
                }
                if tuned
                else None
            ),
        )
        paths = report.write_report(result, workdir)
        readme_table.write_table(result, workdir)  # runs/demo/README_table.md
    comparison = result.get("comparison")
    if comparison:
        # The verdict first: which model wins on this data, and what to ship.
        print(comparison["text"])
        for warning in comparison.get("warnings", ()):
            print(f"warning: {warning}")
        print()
    print(report.format_table(result))
    print()
    for target in result["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"[{verdict}] {target['target']}: {target['measured']}")
    for failed in result["failed"]:
        print(
            f"[FAILED] {failed['model']} (seed {failed['seed']}): "
            + "; ".join(failed["reasons"])
        )
    if shipped:
        print(shipped_line(shipped, workdir))
    total = time.perf_counter() - started
    print(
        f"\nReport: {paths['markdown']} (+ report.json, lift.png). Total wall time "
        f"{total:.0f} s for {seeds} seed(s); CPU time {_cpu_seconds() - cpu_started:.0f} s."
    )
    if any(f["model"] in ("limaml", "limaml_offline") for f in result["failed"]):
        print(
            "limaml demo: error: LiMAML failed its health check (see [FAILED] above); "
            "its numbers are not results.",
            file=sys.stderr,
        )
        return 1
    return 0


def _training_notes(recipe) -> list[str]:
    """How each model was trained, in words, from the recipe."""
    arch = recipe.architecture
    maml = recipe.full_maml()
    residual = (
        ""
        if arch.residual_dim is None
        else f", plus the personal residual ({arch.residual_dim} + 1 dimensions, "
        "zero unless fitted)"
    )
    notes = [
        f"Shared network: meta block MLP {list(arch.meta_units)} (the last width is the "
        f"meta embedding size{residual}), global block with {arch.cross_layers} DCN-v2 "
        f"cross layer(s), MLP {list(arch.global_units)}, meta embedding interaction "
        f"`{arch.interaction}`.",
        f"global and id_embedding: Adam lr {recipe.learning_rate:g}, batches of "
        f"{recipe.batch_size} rows, at most {recipe.epochs} epochs, early stopping on the "
        f"val members' query loss (patience {recipe.patience}); id_embedding adds a "
        "zero-initialized member vector (added to the meta embedding) and a member bias "
        "on the logit.",
        "finetune: the global model; per k, SGD on the meta block over each test member's "
        f"support, inner lr in {list(recipe.finetune_lrs)} and steps in "
        f"{list(recipe.finetune_steps)} (or none) chosen by val overall AUC with the val "
        "members' support cut to the same k.",
        _limaml_note(recipe),
        f"maml: start from the network pretrained for {maml.pretrain_epochs} epochs on the "
        "train members' rows with train-member ID embeddings (dropped afterwards; val and "
        "test members are never seen), then meta-train every dense weight of both blocks: "
        f"{maml.inner_steps} inner step(s), inner lr {maml.inner_lr:g}, support prior "
        f"{maml.support_prior:g}, {'first' if maml.first_order else 'second'} order, Adam "
        f"lr {maml.meta_learning_rate:g}.",
        "limaml_offline: the limaml model exported as a SavedModel, every test member's "
        "adapted embedding written by `limaml embed` (Beam), query rows scored by "
        "`serving_default` from the stored vectors.",
    ]
    return notes


def _limaml_note(recipe) -> str:
    """LiMAML's training and adaptation in words."""
    start = (
        "the trained global model of the same seed"
        if recipe.warm_start == "global"
        else f"the network pretrained for {recipe.pretrain_epochs} epochs with "
        "train-member ID embeddings"
    )
    steps = []
    if recipe.inner_steps:
        steps.append(
            f"{recipe.inner_steps} gradient step(s) on the meta block (inner lr "
            f"{recipe.inner_lr:g}, support prior {recipe.support_prior:g})"
        )
    if recipe.embedding_steps:
        prior = (
            f"a meta-learned per-dimension prior (from {recipe.embedding_prior:g})"
            if recipe.learn_embedding_prior
            else f"prior precision {recipe.embedding_prior:g}"
        )
        steps.append(
            f"{recipe.embedding_steps} Newton steps that fit each member's personal "
            f"residual to its support rows, with {prior}"
        )
    unadapted = (
        "the global model's"
        if recipe.warm_start == "global"
        else "the pretrained network's, without an ID"
    )
    frozen = (
        f"; the network is frozen (its unadapted scores stay {unadapted}), so "
        "meta-training learns only the residual's item projection and the prior"
        if recipe.freeze_network
        else ""
    )
    return (
        f"limaml: starts from {start}{frozen}; inner loop: "
        + (" then ".join(steps) or "none")
        + f"; Adam lr {recipe.meta_learning_rate:g} on {recipe.meta_batch_tasks} tasks "
        f"per step, at most {recipe.meta_epochs} epochs with early stopping on the val "
        f"members' adapted query loss (patience {recipe.meta_patience}); "
        f"{recipe.support_cut:.0%} of the tasks drawn see their support cut to a random "
        "latest-k window."
    )


def _model_note(recipe) -> str:
    if recipe.support_half_life:
        return (
            "limaml and maml are tf_limaml.experimental.prototypes.ShrunkSupportModel "
            f"(support prior {recipe.support_prior:g}, recency half-life "
            f"{recipe.support_half_life:g} rows)"
        )
    if recipe.embedding_steps:
        return (
            "limaml is tf_limaml.LiMAMLModel with MetaConfig.embedding_steps="
            f"{recipe.embedding_steps} (tf_limaml.newton) and Architecture.residual_dim="
            f"{recipe.architecture.residual_dim}"
        )
    if recipe.support_prior:
        return (
            "limaml and maml are tf_limaml.LiMAMLModel with MetaConfig.support_prior="
            f"{recipe.support_prior:g}: the inner-loop support loss is "
            f"sum(mask*loss)/(sum(mask)+{recipe.support_prior:g}), so a member with n "
            f"support rows moves n/(n+{recipe.support_prior:g}) as far"
        )
    return "tf_limaml.model.LiMAMLModel"
