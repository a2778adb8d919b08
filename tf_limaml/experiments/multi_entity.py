"""Several personalized entities on the demo's data: the member and the item.

`limaml_multi_entity` of the report, in two stages that alternate:

1. **Item stage.** The item is the entity (`item_spec_for`: the member spec
   with the roles swapped: the item's attributes are its meta features, the
   rating member's meta features its request features). `limaml make-tasks`
   builds the item tasks from the TRAIN members' interactions only, and an
   item LiMAMLModel is pretrained and meta-trained on them with the demo's
   recipe. `limaml embed` then writes the item table: every item adapted on
   every train member's rating of it, plus one out-of-fold version per fold
   (`tf_limaml.entities.cross_fit_support_records`). Items no train member
   rated get the item model's cold-start embedding.
2. **Member stage.** The member spec gains the dense request feature
   `item_id__meta_embedding` (`tf_limaml.entities.with_embedding_features`),
   joined by item id: train members' rows read the out-of-fold table of their
   fold, val and test members' rows the table of all train members. The member
   LiMAMLModel is pretrained and meta-trained as the demo's `limaml` is.

`train_multi_entity` returns the scorer of the demo's support sweep;
`item_rating_counts` gives each item's training ratings, to bucket test rows
by item popularity.

Example:

    score, details = train_multi_entity(spec, splits, records, recipe, protocol,
                                        seed, workdir, progress, "interactions.csv")
    sweep = protocol_module.evaluate_sweep(score, splits.test, protocol.support_ks)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_limaml import data as task_data
from tf_limaml import entities
from tf_limaml.experiments import baselines
from tf_limaml.experiments.protocol import Batch, Protocol, Splits, task_batch
from tf_limaml.experiments.recipes import Recipe
from tf_limaml.features import (
    ENTITY_ID_KEY,
    MASK_KEY,
    PARTS,
    FeatureSpec,
)

logger = logging.getLogger(__name__)

DEFAULT_ITEM_COLUMN = "item_id"
# Popularity buckets of the report: an item's number of training ratings.
POPULARITY_BUCKETS = ((0, 4), (5, 19), (20, 99), (100, None))


def item_spec_for(spec: FeatureSpec, column: str = DEFAULT_ITEM_COLUMN) -> FeatureSpec:
    """The member spec with the roles swapped: `column` is the entity.

    The member spec's other request features (the item's attributes) become
    the meta features, its meta features (who rated) the request features,
    and the member column breaks ties of equal times. Statistics are kept.

    Raises:
        ValueError: `column` is not a request feature, or the member spec has
            no meta features to become the item's request features.
    """
    obj = spec.to_dict()
    if column not in [f["name"] for f in obj["request_features"]]:
        raise ValueError(
            f"Item column {column!r} is not a request feature of the spec "
            f"({[f['name'] for f in obj['request_features']]})"
        )
    if not obj["meta_features"]:
        raise ValueError(
            "The member spec has no meta features; the item model needs them as "
            "its request features"
        )
    return FeatureSpec.from_dict(
        {
            "entity": column,
            "time": obj["time"],
            "label": obj["label"],
            "tie_break": spec.entity,
            "meta_features": [
                f
                for f in obj["request_features"]
                if f["name"] != column
                and not f["name"].endswith(entities.EMBEDDING_SUFFIX)
            ],
            "request_features": obj["meta_features"],
        }
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def item_rating_counts(
    records_train: Sequence[bytes],
    spec: FeatureSpec,
    column: str = DEFAULT_ITEM_COLUMN,
) -> dict[str, int]:
    """{item id: number of ratings} over the train members' task records.

    Support and query rows both count: every training rating of the item.
    """
    counts: dict[str, int] = {}
    for record in records_train:
        example = tf.train.SequenceExample.FromString(record)
        lists = example.feature_lists.feature_list
        for part in PARTS:
            key = spec.sequence_key(part, column)
            if key not in lists:
                continue
            for feature in lists[key].feature:
                item = feature.bytes_list.value[0].decode()
                counts[item] = counts.get(item, 0) + 1
    return counts


def popularity_bucket(count: int) -> str:
    """The bucket label of an item with `count` training ratings, e.g. "5-19"."""
    for low, high in POPULARITY_BUCKETS:
        if count >= low and (high is None or count <= high):
            return f"{low}+" if high is None else f"{low}-{high}"
    raise ValueError(f"A rating count must be >= 0, got {count}")


# ------------------------------------------------------------------ inputs
_ROWS: dict[tuple, list[dict[str, str]]] = {}


def read_rows(path: str) -> list[dict[str, str]]:
    """The interactions CSV (with a header) as dicts of strings, cached."""
    if not path.endswith(".csv"):
        raise ValueError(
            f"The multi-entity experiment reads a CSV of interactions, got {path!r}"
        )
    key = (os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path))
    if key not in _ROWS:
        with open(path, encoding="utf-8-sig", newline="") as f:
            _ROWS.clear()
            _ROWS[key] = list(csv.DictReader(f))
    return _ROWS[key]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def make_item_tasks(
    item_spec: FeatureSpec,
    rows: Sequence[Mapping[str, str]],
    train_members: set[str],
    member_column: str,
    protocol: Protocol,
    out_dir: str,
    key: str = "",
) -> str:
    """`limaml make-tasks` with the item as entity, on train members' rows only.

    Items are split train/val by the protocol's hash (val: early stopping of
    the item model); none is held out as test, since every item is embedded.
    The output does not depend on the seed of a run, so a directory written
    for the same rows, members, spec and `key` is reused. A list cell (a
    joined embedding) is written as make-tasks reads a vector from a CSV:
    numbers separated by '|'.

    Returns:
        The task directory.
    """
    from beam_pipelines import make_tasks  # noqa: PLC0415

    tasks_dir = os.path.join(out_dir, "item_tasks")
    marker = os.path.join(tasks_dir, "inputs.sha256")
    columns = list(rows[0]) if rows else list(item_spec.columns)
    kept = [r for r in rows if r[member_column] in train_members]
    digest = _digest(
        item_spec.to_dict(),
        sorted(train_members),
        len(rows),
        dataclasses.asdict(protocol),
        key,
    )
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == digest:
                return tasks_dir
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "train_member_interactions.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in kept)
    spec_path = os.path.join(out_dir, "item_spec.json")
    item_spec.save(spec_path)
    make_tasks.run(
        protocol.make_tasks_args(csv_path, spec_path, tasks_dir, test_fraction=0)
    )
    with open(marker, "w", encoding="utf-8") as f:
        f.write(digest)
    return tasks_dir


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "|".join(format(float(v), ".9g") for v in value)
    return value


def _read_records(pattern: str) -> list[bytes]:
    files = sorted(glob.glob(pattern))
    if not files:
        return []
    dataset = tf.data.TFRecordDataset(files, compression_type=task_data.GZIP)
    return sorted(bytes(r) for r in dataset.as_numpy_iterator())


def item_splits(tasks_dir: str, spec: FeatureSpec, protocol: Protocol) -> Splits:
    """The item tasks as `Splits`: train items meta-train, val items early-stop.

    No item is scored here (the member stage is), so `test` is the val batch.
    """
    train = _read_records(os.path.join(tasks_dir, "train-*.tfrecord.gz"))
    val = _read_records(os.path.join(tasks_dir, "val-*.tfrecord.gz"))
    if not train or not val:
        raise ValueError(
            f"The item tasks in {tasks_dir} need train and val items "
            f"({len(train)} and {len(val)}); the data has too few items"
        )
    val_batch = task_batch(val, spec)
    return Splits(
        train=task_batch(train, spec),
        val=val_batch,
        test=val_batch,
        train_meta=task_batch(train, spec, protocol.max_support, protocol.max_query),
        val_meta=task_batch(val, spec, protocol.max_support, protocol.max_query),
    )


def _scope(strategy: tf.distribute.Strategy | None):
    """The strategy's scope, or none: the demo's models are built and fit in it."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _init(spec, splits, recipe, seed):
    if recipe.warm_start == "global":
        return baselines.train_global(spec, splits, recipe, seed)[0]
    if recipe.pretrain_epochs:
        return baselines.pretrain(spec, splits, recipe, seed)
    return None


def item_support_records(
    item_spec: FeatureSpec,
    rows: Sequence[Mapping[str, str]],
    train_members: set[str],
    member_column: str,
    out_dir: str,
    folds: int = entities.DEFAULT_FOLDS,
    key: str = "",
) -> tuple[str, dict[str, Any]]:
    """The input of the item table's `limaml embed`: every item, whole and out-of-fold.

    Support rows are the train members' ratings only
    (`entities.cross_fit_support_records`). Like the item tasks, they do not
    depend on the seed, so a file written for the same inputs is reused.

    Returns:
        (the task file, counts by table plus "max_support", the longest support).
    """
    path = os.path.join(out_dir, "item_support.tfrecord.gz")
    counts_path = os.path.join(out_dir, "item_support.json")
    digest = _digest(item_spec.to_dict(), sorted(train_members), len(rows), folds, key)
    if os.path.exists(counts_path) and os.path.exists(path):
        with open(counts_path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("digest") == digest:
            return path, cached["counts"]
    records, counts = entities.cross_fit_support_records(
        item_spec,
        rows,
        by=member_column,
        include=lambda row: row[member_column] in train_members,
        folds=folds,
    )
    counts["max_support"] = max(1, _longest(records))
    os.makedirs(out_dir, exist_ok=True)
    task_data.write_tasks(path, records)
    with open(counts_path, "w", encoding="utf-8") as f:
        json.dump({"digest": digest, "counts": counts}, f)
    return path, counts


def embed_entities(
    model,
    records_path: str,
    max_support: int,
    out_dir: str,
    folds: int = entities.DEFAULT_FOLDS,
    name: str = "item",
) -> tuple[entities.EmbeddingTable, entities.CrossFitTables]:
    """Exports a model and runs `limaml embed` (Beam) on its support records.

    Args:
        model: The entity's LiMAMLModel.
        records_path: `entities.cross_fit_support_records` output.
        max_support: The export's cap (the longest support: nothing is cut).
        out_dir: Writes `<name>_export/` and `<name>_embeddings/` there.
        folds: Cross-fitting folds of the records.
        name: The entity, for the directory names.

    Returns:
        (the table adapted on every train member, the out-of-fold tables).
    """
    from beam_pipelines import generate_embeddings  # noqa: PLC0415
    from tf_limaml import export  # noqa: PLC0415

    export_base = os.path.join(out_dir, f"{name}_export")
    if os.path.exists(export_base):
        shutil.rmtree(export_base)
    export_dir = export.export_model(
        model, export_base, version=1, max_support=max_support
    )
    embeddings_dir = os.path.join(out_dir, f"{name}_embeddings")
    generate_embeddings.run(
        [
            "--export",
            export_dir,
            "--tasks",
            records_path,
            "--output",
            embeddings_dir,
            "--overwrite",
        ]
    )
    table = entities.EmbeddingTable.read(
        os.path.join(embeddings_dir, "embeddings-*.tfrecord.gz")
    )
    return entities.CrossFitTables.from_embeddings(table, folds)


def _longest(records: Sequence[bytes]) -> int:
    longest = 0
    for record in records:
        lists = tf.train.SequenceExample.FromString(record).feature_lists
        longest = max(longest, len(lists.feature_list["support/label"].feature))
    return longest


def join_splits(
    splits: Splits,
    column: str,
    whole: entities.EmbeddingTable,
    crossfit: entities.CrossFitTables,
) -> Splits:
    """Train members read out-of-fold embeddings; val and test members all of them."""
    train_tables = {column: crossfit}
    scored_tables = {column: whole}
    return Splits(
        train=entities.join_task_batch(splits.train, train_tables),
        val=entities.join_task_batch(splits.val, scored_tables),
        test=entities.join_task_batch(splits.test, scored_tables),
        train_meta=entities.join_task_batch(splits.train_meta, train_tables),
        val_meta=entities.join_task_batch(splits.val_meta, scored_tables),
    )


@dataclasses.dataclass
class MultiEntityScorer:
    """The member model with the item table: `scorer(batch, k)` -> [T, Q].

    Attributes:
        model: The member LiMAMLModel (reads `item_id__meta_embedding`).
        spec: Its spec.
        column: The item column.
        table: The item table every scored row reads (all train members).
        item_model: The item LiMAMLModel.
    """

    model: Any
    spec: FeatureSpec
    column: str
    table: entities.EmbeddingTable
    item_model: Any = None

    def __call__(self, batch: Batch, k: int | None = None) -> np.ndarray:
        """Query probabilities of a member task batch (support cut as given)."""
        joined = entities.join_task_batch(batch, {self.column: self.table})
        return baselines.query_probabilities(self.model, joined)


def _item_stage(
    item_spec: FeatureSpec,
    rows: Sequence[Mapping[str, Any]],
    train_members: set[str],
    member_column: str,
    recipe: Recipe,
    protocol: Protocol,
    seed: int,
    tasks_root: str,
    seed_dir: str,
    folds: int,
    key: str = "",
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, Any]:
    """make-tasks with the item as entity, pretrain, meta-train, limaml embed.

    The models are trained under `strategy`; the Beam jobs and the embed step
    (which loads the export) run outside it.
    """
    start = time.perf_counter()
    tasks_dir = make_item_tasks(
        item_spec, rows, train_members, member_column, protocol, tasks_root, key
    )
    item_spec = FeatureSpec.load(os.path.join(tasks_dir, "spec.json"))
    items = item_splits(tasks_dir, item_spec, protocol)
    records_path, counts = item_support_records(
        item_spec, rows, train_members, member_column, tasks_root, folds, key
    )
    tasks_s = time.perf_counter() - start
    with _scope(strategy):
        init = _init(item_spec, items, recipe, seed)
        model, history = baselines.train_meta_learner(
            item_spec, items, recipe, seed, init=init
        )
    embed_start = time.perf_counter()
    whole, crossfit = embed_entities(
        model, records_path, counts["max_support"], seed_dir, folds
    )
    return {
        "model": model,
        "spec": item_spec,
        "whole": whole,
        "crossfit": crossfit,
        "details": {
            "item_meta_epochs": len(history.get("loss", [])),
            "item_tasks": {
                "train": int(len(items.train[ENTITY_ID_KEY])),
                "val": int(len(items.val[ENTITY_ID_KEY])),
            },
            "items_embedded": len(whole),
            "cold_items": (
                int(np.sum(whole.n_support == 0))
                if whole.n_support is not None
                else None
            ),
            "support_rows": {
                k: v["rows"] for k, v in counts.items() if isinstance(v, dict)
            },
            "item_tasks_s": round(tasks_s, 1),
            "item_embed_s": round(time.perf_counter() - embed_start, 1),
            "item_stage_s": round(time.perf_counter() - start, 1),
        },
    }


def _member_stage(
    spec: FeatureSpec,
    splits: Splits,
    recipe: Recipe,
    seed: int,
    item_column: str,
    item: Mapping[str, Any],
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[MultiEntityScorer, dict[str, Any]]:
    """The member model with the item table joined (out-of-fold for training)."""
    start = time.perf_counter()
    whole = item["whole"]
    member_spec = entities.with_embedding_features(spec, {item_column: whole.dim})
    joined = join_splits(splits, item_column, whole, item["crossfit"])
    member_spec = entities.complete_embedding_statistics(member_spec, joined.train)
    with _scope(strategy):
        init = _init(member_spec, joined, recipe, seed)
        model, history = baselines.train_meta_learner(
            member_spec, joined, recipe, seed, init=init
        )
    scorer = MultiEntityScorer(model, member_spec, item_column, whole, item["model"])
    return scorer, {
        "meta_epochs": len(history.get("loss", [])),
        "embedding_feature": entities.embedding_feature_name(item_column),
        "embedding_dim": whole.dim,
        "member_stage_s": round(time.perf_counter() - start, 1),
    }


def train_multi_entity(
    spec: FeatureSpec,
    splits: Splits,
    records: Mapping[str, Sequence[bytes]],
    recipe: Recipe,
    protocol: Protocol,
    seed: int,
    workdir: str,
    progress,
    interactions_path: str,
    item_column: str = DEFAULT_ITEM_COLUMN,
    folds: int = entities.DEFAULT_FOLDS,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[MultiEntityScorer, dict[str, Any]]:
    """Item stage, then member stage with item embeddings (see the module doc).

    Args:
        spec: The member spec (completed, as make-tasks wrote it).
        splits: The member task batches.
        records: The member task records by split (unused: the splits carry
            the members; kept so every trainer of the demo takes the same).
        recipe: The demo's recipe (both stages use it).
        protocol: The demo's protocol.
        seed: Weights, shuffling and support cuts of both models.
        workdir: The demo's work directory (writes `seed<N>/multi_entity/`
            and the seed-independent `multi_entity/`: item tasks and support
            records).
        progress: `tf_limaml.cli.Progress`.
        interactions_path: The interactions CSV make-tasks read.
        item_column: The item id column (a request feature of `spec`).
        folds: Cross-fitting folds of the train members.
        strategy: A `tf.distribute.Strategy` both stages' models are trained
            under (None: the default).

    Returns:
        (scorer: `scorer(batch, k)` -> query probabilities [T, Q] of a member
        task batch, details: a JSON-able dict).
    """
    del records
    rows = read_rows(interactions_path)
    train_members = set(splits.members("train"))
    seed_dir = os.path.join(workdir, f"seed{seed}", "multi_entity")
    os.makedirs(seed_dir, exist_ok=True)
    with progress.phase(
        f"multi-entity (seed {seed}): item stage, make-tasks with {item_column} "
        "as the entity, pretrain, meta-train, limaml embed"
    ):
        item = _item_stage(
            item_spec_for(spec, item_column),
            rows,
            train_members,
            spec.entity,
            recipe,
            protocol,
            seed,
            os.path.join(workdir, "multi_entity"),
            seed_dir,
            folds,
            strategy=strategy,
        )
    with progress.phase(
        f"multi-entity (seed {seed}): member stage with {item_column}"
        f"{entities.EMBEDDING_SUFFIX} [{item['whole'].dim}] as a request feature"
    ):
        scorer, details = _member_stage(
            spec, splits, recipe, seed, item_column, item, strategy
        )
    details = {**details, **item["details"], "folds": folds}
    logger.info("multi-entity (seed %d): %s", seed, details)
    return scorer, details


def second_round(
    first: MultiEntityScorer,
    spec: FeatureSpec,
    splits: Splits,
    recipe: Recipe,
    protocol: Protocol,
    seed: int,
    workdir: str,
    progress,
    interactions_path: str,
    folds: int = entities.DEFAULT_FOLDS,
) -> tuple[MultiEntityScorer, dict[str, Any]]:
    """One more alternation: member embeddings into the item tasks, then both again.

    1. `limaml embed` on the first round's member model: every train member
       adapted on all its rows, and out-of-fold by ITEM fold (a rating's own
       label never reaches the member embedding joined onto it);
    2. the item tasks gain `<member>__meta_embedding` (joined into the rows
       before `limaml make-tasks`, which computes its statistics), and the
       item model is trained and embedded again;
    3. the member model is trained again on the new item table.

    Returns:
        (scorer, details) as `train_multi_entity`'s.
    """
    rows = read_rows(interactions_path)
    member_column, item_column = spec.entity, first.column
    train_members = set(splits.members("train"))
    seed_dir = os.path.join(workdir, f"seed{seed}", "multi_entity", "round2")
    os.makedirs(seed_dir, exist_ok=True)
    with progress.phase(
        f"multi-entity round 2 (seed {seed}): member table, item stage with "
        f"{member_column}{entities.EMBEDDING_SUFFIX}"
    ):
        start = time.perf_counter()
        member_rows = list(
            entities.join_rows(rows, {item_column: first.table}, member_column)
        )
        records, counts = entities.cross_fit_support_records(
            first.spec,
            member_rows,
            by=item_column,
            include=lambda row: row[member_column] in train_members,
            folds=folds,
        )
        path = os.path.join(seed_dir, "member_support.tfrecord.gz")
        task_data.write_tasks(path, records)
        members_whole, members_crossfit = embed_entities(
            first.model, path, max(1, _longest(records)), seed_dir, folds, "member"
        )
        member_s = time.perf_counter() - start
        item_spec = entities.with_embedding_features(
            item_spec_for(spec, item_column), {member_column: members_whole.dim}
        )
        item_rows = list(
            entities.join_rows(rows, {member_column: members_crossfit}, item_column)
        )
        item = _item_stage(
            item_spec,
            item_rows,
            train_members,
            member_column,
            recipe,
            protocol,
            seed,
            seed_dir,
            seed_dir,
            folds,
            key=hashlib.sha256(members_whole.vectors.tobytes()).hexdigest(),
        )
    with progress.phase(f"multi-entity round 2 (seed {seed}): member stage"):
        scorer, details = _member_stage(spec, splits, recipe, seed, item_column, item)
    details = {
        **details,
        **item["details"],
        "member_table_s": round(member_s, 1),
        "members_embedded": len(members_whole),
        "member_support_rows": counts["all"]["rows"],
    }
    return scorer, details


def bucket_metrics(
    batch: Batch,
    probabilities: np.ndarray,
    counts: Mapping[str, int],
    column: str = DEFAULT_ITEM_COLUMN,
) -> dict[str, dict[str, float]]:
    """Overall AUC of the test query rows by item popularity bucket.

    Args:
        batch: The scored task batch.
        probabilities: Its query probabilities [T, Q].
        counts: `item_rating_counts` of the train members.
        column: The item column.

    Returns:
        {bucket: {"rows", "positives", "auc"}} (auc None with one class only).
    """
    from tf_limaml import evaluation  # noqa: PLC0415

    mask = np.asarray(batch[f"query_{MASK_KEY}"]) > 0
    items = np.asarray(batch[FeatureSpec.batch_key("query", column)])[mask]
    labels = np.asarray(batch["query_label"])[mask]
    scores = np.asarray(probabilities)[mask]
    buckets = np.asarray([popularity_bucket(counts.get(_text(i), 0)) for i in items])
    out = {}
    for low, _ in POPULARITY_BUCKETS:
        name = popularity_bucket(low)
        rows = buckets == name
        y = labels[rows]
        auc = (
            float(evaluation.auc(y, scores[rows]))
            if rows.any() and 0 < y.sum() < len(y)
            else None
        )
        out[name] = {"rows": int(rows.sum()), "positives": int(y.sum()), "auc": auc}
    return out
