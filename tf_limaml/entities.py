"""Several personalized entities: one meta embedding table per entity.

A LiMAML model personalizes one entity (the task entity, e.g. the member).
A second entity (e.g. the item) gets its own LiMAML model, meta-trained on its
own tasks (`limaml make-tasks` with the item as the entity column), and its
adapted meta embeddings reach the first model as a dense request feature,
joined by the item id. The first model's global block then reads both the
member's meta embedding and the item's, and its `serving_default` takes one
embedding input per entity: `meta_embedding` (the member) and
`<column>__meta_embedding` (e.g. `item_id__meta_embedding`, the item).

The meta-training alternates: first the item model, then its embeddings are
frozen into a table and the member model trains on them (a second round can
feed member embeddings back into the item tasks the same way).

Leakage: an item embedding adapted on a row's own label would tell the member
model that label. Training rows therefore read **out-of-fold** embeddings:
the members are split into folds by a stable hash (`cross_fit_fold`), and a
row of a member in fold f reads the item embedding adapted on the other folds'
interactions only (`cross_fit_support_records`, `CrossFitTables`). Rows that
are scored (val and test members) read the embedding adapted on every
training member.

Example:

    records = cross_fit_support_records(item_spec, rows, by="user_id",
                                        include=train_members)
    # ... `limaml embed` on the item model's export over `records` ...
    table, crossfit = CrossFitTables.from_embeddings(
        EmbeddingTable.read("item_embeddings/embeddings-*.tfrecord.gz"))
    member_spec = with_embedding_features(spec, {"item_id": table.dim})
    train = join_task_batch(train, {"item_id": crossfit})   # out-of-fold
    test = join_task_batch(test, {"item_id": table})        # all train members
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tf_limaml import data as task_data
from tf_limaml import statistics, tasks
from tf_limaml.features import (
    CATEGORICAL,
    ENTITY_ID_KEY,
    MASK_KEY,
    NUMERIC,
    PARTS,
    FeatureSpec,
    FeatureSpecError,
)

logger = logging.getLogger(__name__)

# `item_id` -> `item_id__meta_embedding`: the request feature (and the
# serving_default input) that carries the item's meta embedding.
EMBEDDING_SUFFIX = "__meta_embedding"
# Ids of the out-of-fold support records: "<entity>#oof=<fold>".
FOLD_SEPARATOR = "#oof="
DEFAULT_FOLDS = 2
SOURCE_JOINED = "entity_embeddings"


def embedding_feature_name(column: str) -> str:
    """The request feature holding the embedding of the entity in `column`.

    >>> embedding_feature_name("item_id")
    'item_id__meta_embedding'
    """
    return f"{column}{EMBEDDING_SUFFIX}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """One entity's meta embeddings by id: what `limaml embed` writes.

    Attributes:
        ids: Entity ids, one per row of `vectors`.
        vectors: `[N, d]` float32 embeddings.
        n_support: Support rows each embedding was adapted on (0: cold start),
            or None when unknown.
        model_version: The export version that wrote them, or None.
        default: The vector of an id absent from the table, or None (then
            such an id is an error).
    """

    ids: tuple[str, ...]
    vectors: np.ndarray
    n_support: np.ndarray | None = None
    model_version: int | None = None
    default: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(_text(i) for i in self.ids))
        vectors = np.asarray(self.vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(self.ids):
            raise ValueError(
                f"EmbeddingTable needs vectors of shape [len(ids), d] = "
                f"[{len(self.ids)}, d], got {list(vectors.shape)}"
            )
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("EmbeddingTable ids must be unique")
        if not np.all(np.isfinite(vectors)):
            raise ValueError("EmbeddingTable holds a non-finite embedding")
        object.__setattr__(self, "vectors", vectors)
        if self.default is not None:
            default = np.asarray(self.default, np.float32).reshape(-1)
            if default.shape != (vectors.shape[1],):
                raise ValueError(
                    f"EmbeddingTable default must have {vectors.shape[1]} numbers, "
                    f"got {default.shape[0]}"
                )
            object.__setattr__(self, "default", default)
        object.__setattr__(self, "_index", {e: i for i, e in enumerate(self.ids)})

    @property
    def dim(self) -> int:
        """The embedding size d."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, entity_id: Any) -> bool:
        return _text(entity_id) in self._index

    def __getitem__(self, entity_id: Any) -> np.ndarray:
        return self.lookup([entity_id])[0]

    @classmethod
    def from_mapping(
        cls, embeddings: Mapping[str, Sequence[float]], **kwargs
    ) -> EmbeddingTable:
        """A table from {entity id: vector} (ids sorted)."""
        ids = tuple(sorted(_text(k) for k in embeddings))
        by_text = {_text(k): v for k, v in embeddings.items()}
        vectors = (
            np.stack([np.asarray(by_text[i], np.float32) for i in ids])
            if ids
            else np.zeros((0, 0), np.float32)
        )
        return cls(ids, vectors, **kwargs)

    @classmethod
    def read(cls, pattern: str, default: Sequence[float] | None = None):
        """Reads `limaml embed` output: `embeddings-*.tfrecord.gz` tf.Examples.

        Args:
            pattern: File pattern, e.g. "DIR/embeddings-*.tfrecord.gz".
            default: The vector of ids absent from the files (None: an error).

        Raises:
            FileNotFoundError: Nothing matches the pattern.
        """
        import tensorflow as tf  # noqa: PLC0415

        files = sorted(tf.io.gfile.glob(pattern))
        if not files:
            raise FileNotFoundError(
                f"No embeddings match {pattern}; did `limaml embed` run?"
            )
        rows = {}
        versions = set()
        for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
            feature = tf.train.Example.FromString(record.numpy()).features.feature
            entity = feature["entity_id"].bytes_list.value[0].decode()
            rows[entity] = (
                np.asarray(feature["embedding"].float_list.value, np.float32),
                int(feature["n_support"].int64_list.value[0]),
            )
            versions.update(feature["model_version"].int64_list.value)
        ids = tuple(sorted(rows))
        return cls(
            ids,
            np.stack([rows[i][0] for i in ids]),
            n_support=np.asarray([rows[i][1] for i in ids], np.int64),
            model_version=versions.pop() if len(versions) == 1 else None,
            default=default,
        )

    def lookup(self, entity_ids: Any) -> np.ndarray:
        """Embeddings of an array of ids (any shape `[...]`) as `[..., d]`.

        Raises:
            KeyError: An id is not in the table and there is no `default`.
        """
        ids = np.asarray(entity_ids, dtype=object)
        flat = ids.reshape(-1)
        unique, inverse = np.unique(
            np.asarray([_text(e) for e in flat], dtype=object), return_inverse=True
        )
        rows = np.asarray([self._index.get(u, -1) for u in unique], np.int64)
        missing = rows < 0
        if missing.any() and self.default is None:
            raise KeyError(
                f"{int(missing.sum())} id(s) have no embedding in the table "
                f"(e.g. {unique[missing][0]!r}); embed them, or give the table a "
                "`default` (the entity model's cold-start embedding)"
            )
        table = self.vectors
        if missing.any():
            table = np.concatenate([table, self.default[None, :]])
            rows = np.where(missing, len(self.vectors), rows)
        return table[rows[inverse]].reshape(ids.shape + (self.dim,))


def cross_fit_fold(entity_id: Any, folds: int = DEFAULT_FOLDS, seed: int = 0) -> int:
    """The cross-fitting fold of an entity: a stable SHA-256 hash, in [0, folds).

    The same in every process and run (Python's `hash` is not).
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds!r}")
    digest = hashlib.sha256(f"crossfit:{seed}:{_text(entity_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def fold_entity_id(entity_id: str, fold: int) -> str:
    """The id of an entity's support record without fold `fold`'s rows."""
    return f"{entity_id}{FOLD_SEPARATOR}{fold}"


@dataclasses.dataclass(frozen=True)
class CrossFitTables:
    """Out-of-fold tables: `tables[f]` was adapted without fold f's rows.

    A row of a (member) entity in fold f reads `tables[f]`, so its own label
    never reached the embedding it reads.

    Attributes:
        tables: One table per fold.
        seed: Seed of `cross_fit_fold`.
    """

    tables: tuple[EmbeddingTable, ...]
    seed: int = 0

    def __post_init__(self):
        if len(self.tables) < 2:
            raise ValueError(
                f"CrossFitTables needs one table per fold (>= 2), got "
                f"{len(self.tables)}"
            )
        if len({t.dim for t in self.tables}) != 1:
            raise ValueError("CrossFitTables' tables differ in embedding size")

    @property
    def dim(self) -> int:
        return self.tables[0].dim

    @property
    def folds(self) -> int:
        return len(self.tables)

    def table_for(self, entity_id: Any) -> EmbeddingTable:
        """The table a row of this (member) entity reads."""
        return self.tables[cross_fit_fold(entity_id, self.folds, self.seed)]

    @classmethod
    def from_embeddings(
        cls,
        table: EmbeddingTable,
        folds: int = DEFAULT_FOLDS,
        seed: int = 0,
    ) -> tuple[EmbeddingTable, CrossFitTables]:
        """Splits one `limaml embed` output of `cross_fit_support_records`.

        Returns:
            (the table adapted on every included row, the out-of-fold tables).
        """
        n_support = (
            table.n_support
            if table.n_support is not None
            else np.full(len(table), -1, np.int64)
        )
        whole, per_fold = {}, [dict() for _ in range(folds)]
        for entity_id, vector, n in zip(
            table.ids, table.vectors, n_support, strict=True
        ):
            base, sep, fold = entity_id.rpartition(FOLD_SEPARATOR)
            if sep and fold.isdigit() and int(fold) < folds:
                per_fold[int(fold)][base] = (vector, n)
            else:
                whole[entity_id] = (vector, n)
        if any(set(p) != set(whole) for p in per_fold):
            raise ValueError(
                f"The embeddings are not a cross-fit set of {folds} folds: every "
                f"entity needs its record and one '{FOLD_SEPARATOR}F' record per fold "
                "(write them with cross_fit_support_records)"
            )

        def make(part: Mapping[str, tuple[np.ndarray, int]]) -> EmbeddingTable:
            ids = tuple(sorted(part))
            return EmbeddingTable(
                ids,
                np.stack([part[i][0] for i in ids]),
                n_support=(
                    np.asarray([part[i][1] for i in ids], np.int64)
                    if table.n_support is not None
                    else None
                ),
                model_version=table.model_version,
                default=table.default,
            )

        return make(whole), cls(tuple(make(p) for p in per_fold), seed)


Tables = Mapping[str, "EmbeddingTable | CrossFitTables"]


# ------------------------------------------------------------------ the spec
def with_embedding_features(
    spec: FeatureSpec,
    dims: Mapping[str, int],
    statistics_by_column: (
        Mapping[str, tuple[Sequence[float], Sequence[float]]] | None
    ) = None,
) -> FeatureSpec:
    """The spec with one dense request feature per other entity.

    Args:
        spec: The (member) spec. Each key of `dims` is the other entity's id
            column: a categorical request feature (then `join_task_batch`
            can join task batches), or a column of the rows that is no
            feature at all (then join the rows, `join_rows`, before
            make-tasks).
        dims: {column: embedding size d}.
        statistics_by_column: Optional {column: (mean, std)} per component.
            Without it the new features need statistics from the data (the
            analyzer of make-tasks, or `complete_embedding_statistics`).

    Returns:
        A spec with `<column>__meta_embedding` (numeric, shape [d]) appended
        to the request features.

    Raises:
        FeatureSpecError: A column that is a feature but not a categorical
            request feature, or the spec's own entity.
    """
    obj = spec.to_dict()
    request = {f.name: f for f in spec.request_features}
    meta = {f.name for f in spec.meta_features}
    for column, dim in dims.items():
        feature = request.get(column)
        if (
            column == spec.entity
            or column in meta
            or (feature is not None and feature.type != CATEGORICAL)
        ):
            raise FeatureSpecError(
                f"Invalid feature spec: entity column {column!r} must be a "
                "categorical request feature or a column that is no feature; "
                f"the spec's entity is {spec.entity!r}, its meta features "
                f"{sorted(meta)} and request features {sorted(request)}"
            )
        entry: dict[str, Any] = {
            "name": embedding_feature_name(column),
            "type": NUMERIC,
            "shape": [int(dim)],
        }
        if statistics_by_column and column in statistics_by_column:
            mean, std = statistics_by_column[column]
            entry["mean"] = [float(m) for m in mean]
            entry["std"] = [float(s) for s in std]
        obj["request_features"].append(entry)
    return FeatureSpec.from_dict(obj)


def complete_embedding_statistics(
    spec: FeatureSpec, batch: Mapping[str, np.ndarray]
) -> FeatureSpec:
    """Mean and std of the embedding features over a joined training batch.

    Every real support and query row counts once, as the make-tasks analyzer
    counts rows; features that have statistics keep them.
    """
    moments = {}
    for feature in spec.request_features:
        if not (feature.name.endswith(EMBEDDING_SUFFIX) and feature.needs_statistics):
            continue
        values = np.concatenate(
            [
                np.asarray(batch[spec.batch_key(part, feature.name)])[
                    np.asarray(batch[f"{part}_{MASK_KEY}"]) > 0
                ]
                for part in PARTS
            ]
        ).astype(np.float64)
        rows = values.reshape(-1, feature.size).tolist()
        moments[feature.name] = statistics.Moments.of(rows, feature.size)
    return statistics.complete_spec(spec, moments, {}, source=SOURCE_JOINED)


# ------------------------------------------------------------------ the joins
def _table(tables: EmbeddingTable | CrossFitTables, entity_id: Any) -> EmbeddingTable:
    if isinstance(tables, CrossFitTables):
        return tables.table_for(entity_id)
    return tables


def join_rows(
    rows: Iterable[Mapping[str, Any]], tables: Tables, entity: str
) -> Iterator[dict[str, Any]]:
    """Interaction rows with each other entity's embedding as a column.

    The join before make-tasks (one table per other entity): a row gets
    `<column>__meta_embedding`, the list of d floats of the entity in
    `row[column]`, from the table of its (member) entity `row[entity]` when
    the tables are cross-fit.

    Args:
        rows: Raw interaction rows.
        tables: {column: EmbeddingTable or CrossFitTables}.
        entity: The (member) entity column (picks the cross-fit fold).
    """
    for row in rows:
        out = dict(row)
        for column, table in tables.items():
            vector = _table(table, row[entity]).lookup([row[column]])[0]
            out[embedding_feature_name(column)] = vector.tolist()
        yield out


def join_task_batch(
    batch: Mapping[str, np.ndarray], tables: Tables
) -> dict[str, np.ndarray]:
    """A task batch (NumPy) with each other entity's embedding per row.

    Adds `support_<column>__meta_embedding` and `query_<column>__meta_embedding`,
    `[T, S, d]` and `[T, Q, d]`. Rows outside the masks (padding) get zeros;
    they take no part in any loss or score. With `CrossFitTables`, task t
    reads the table of its entity `batch["entity_id"][t]`.

    Args:
        batch: A task batch (`tf_limaml.data` keys, NumPy values).
        tables: {column: EmbeddingTable or CrossFitTables}; each column is a
            request feature of the batch.
    """
    out = dict(batch)
    entities = [_text(e) for e in np.asarray(batch[ENTITY_ID_KEY])]
    for column, table in tables.items():
        for part in PARTS:
            ids = np.asarray(batch[FeatureSpec.batch_key(part, column)])
            mask = np.asarray(batch[f"{part}_{MASK_KEY}"]) > 0
            values = np.zeros(ids.shape + (table.dim,), np.float32)
            if isinstance(table, CrossFitTables):
                folds = np.asarray(
                    [cross_fit_fold(e, table.folds, table.seed) for e in entities]
                )
                for fold, fold_table in enumerate(table.tables):
                    rows = mask & (folds == fold)[:, None]
                    if rows.any():
                        values[rows] = fold_table.lookup(ids[rows])
            elif mask.any():
                values[mask] = table.lookup(ids[mask])
            out[FeatureSpec.batch_key(part, embedding_feature_name(column))] = values
    return out


# ---------------------------------------------------------- embedding inputs
def support_records(
    spec: FeatureSpec,
    rows: Iterable[Mapping[str, Any]],
    include: Any = None,
    id_suffix: str = "",
    max_support: int | None = None,
) -> tuple[list[bytes], dict[str, int]]:
    """One task record per entity, its included rows as support: the input of
    `limaml embed` for an entity table.

    Every valid row names an entity, so every entity gets a record; one with
    no included row has an empty support set and gets the cold-start
    embedding. The query part is empty (`limaml embed` reads only support).

    Args:
        spec: The spec of the entity (e.g. the item spec).
        rows: Raw interaction rows.
        include: `row -> bool` (None: every row) choosing the support rows.
        id_suffix: Appended to each entity id (e.g. `fold_entity_id`'s).
        max_support: Keep each entity's latest N support rows (None: all).

    Returns:
        (records sorted by entity id, counts {"entities", "cold", "rows",
        "rows_rejected"}).
    """
    groups, metas, _, rejected = _group(spec, rows, include)
    return _encode_support(spec, groups, metas, id_suffix, max_support, rejected)


def _group(spec, rows, include, fold_of=None):
    """Valid rows by entity: (support rows in time order, meta values, the
    fold of each support row, rows rejected)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    every: dict[str, list[dict[str, Any]]] = {}
    fold_by_row: dict[int, int] = {}
    rejected = 0
    for row in rows:
        try:
            clean = tasks.validate_row(spec, row)
        except tasks.RowError:
            rejected += 1
            continue
        entity = clean[spec.entity]
        every.setdefault(entity, []).append(clean)
        groups.setdefault(entity, [])
        if include is None or include(row):
            groups[entity].append(clean)
            if fold_of is not None:
                fold_by_row[id(clean)] = fold_of(row)
    # Sorted once (sort_rows returns the same row objects); a fold's subset
    # keeps the order.
    groups = {e: tasks.sort_rows(spec, r) for e, r in groups.items()}
    row_folds = {e: [fold_by_row.get(id(r), -1) for r in g] for e, g in groups.items()}
    metas = {
        e: tasks.merge_meta(spec, tasks.sort_rows(spec, r))[0] for e, r in every.items()
    }
    return groups, metas, row_folds, rejected


def _encode_support(spec, groups, metas, id_suffix, max_support, rejected):
    """Records of sorted support rows; `metas` holds each entity's meta values."""
    records, cold, used = [], 0, 0
    for entity in sorted(groups):
        ordered = groups[entity]
        if max_support is not None:
            ordered = ordered[-max_support:] if max_support > 0 else []
        cold += not ordered
        used += len(ordered)
        records.append(
            task_data.encode_task(
                spec, entity + id_suffix, metas[entity], ordered, []
            ).SerializeToString()
        )
    counts = {
        "entities": len(records),
        "cold": cold,
        "rows": used,
        "rows_rejected": rejected,
    }
    return records, counts


def cross_fit_support_records(
    spec: FeatureSpec,
    rows: Iterable[Mapping[str, Any]],
    by: str,
    include: Any = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    max_support: int | None = None,
) -> tuple[list[bytes], dict[str, Any]]:
    """Support records of an entity (item) table and its out-of-fold tables.

    For each entity: one record on every included row (id as is), and one
    per fold f on the included rows of the `by` entities (members) NOT in
    fold f (id `fold_entity_id(id, f)`). Embed them all in one `limaml embed`
    run and split the output with `CrossFitTables.from_embeddings`.

    Args:
        spec: The spec of the entity (e.g. the item spec).
        rows: Raw interaction rows.
        by: The column of the other (member) entity whose fold is left out.
        include: `row -> bool` choosing the rows that may be support (e.g.
            training members only; None: every row).
        folds: Number of folds.
        seed: Seed of `cross_fit_fold`.
        max_support: Keep each entity's latest N support rows (None: all).

    Returns:
        (records, counts by table: {"all": {...}, "fold_0": {...}, ...}).
    """
    groups, metas, row_folds, rejected = _group(
        spec, rows, include, lambda row: cross_fit_fold(row[by], folds, seed)
    )
    records, counts = _encode_support(spec, groups, metas, "", max_support, rejected)
    out_counts: dict[str, Any] = {"all": counts}
    for fold in range(folds):
        kept = {
            entity: [
                r
                for r, f in zip(groups[entity], row_folds[entity], strict=True)
                if f != fold
            ]
            for entity in groups
        }
        more, fold_counts = _encode_support(
            spec, kept, metas, f"{FOLD_SEPARATOR}{fold}", max_support, rejected
        )
        records += more
        out_counts[f"fold_{fold}"] = fold_counts
    return records, out_counts
