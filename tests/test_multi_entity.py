"""Several personalized entities: item tasks, one table per entity, serving, cross-fit.

The member and the item each have a LiMAMLModel; the item's adapted meta
embedding reaches the member model as the dense request feature
`item__meta_embedding` (`tf_limaml.entities`).
"""

import csv
import glob
import os
import random

import numpy as np
import pytest
import tensorflow as tf
from serving_fixture import SessionSignatures

from beam_pipelines import generate_embeddings, make_tasks
from tf_limaml import entities, export, tasks
from tf_limaml.experiments import multi_entity
from tf_limaml.experiments.protocol import records_from_histories, task_batch
from tf_limaml.features import FeatureSpec
from tf_limaml.model import LiMAMLModel, MetaConfig

TOL = 1e-5
MEMBER_SPEC = FeatureSpec.from_dict(
    {
        "entity": "user",
        "time": "ts",
        "label": "click",
        "tie_break": "item",
        "meta_features": [
            {"name": "country", "type": "categorical", "vocabulary": ["us", "fr"]},
            {"name": "age", "type": "numeric", "mean": 40.0, "std": 10.0},
        ],
        "request_features": [
            {"name": "item", "type": "categorical", "hash_buckets": 64},
            {"name": "genre", "type": "categorical", "vocabulary": ["a", "b", "c"]},
            {"name": "year", "type": "numeric", "mean": 2000.0, "std": 10.0},
        ],
    }
)
ITEM_SPEC = multi_entity.item_spec_for(MEMBER_SPEC, "item")
EMBEDDING = entities.embedding_feature_name("item")


def interactions(members=40, items=12, per_member=9, seed=0):
    """Rows with member and item features joined; each member rates distinct items."""
    rng = random.Random(seed)
    genre = {f"i{j}": "abc"[j % 3] for j in range(items)}
    year = {f"i{j}": 1990.0 + j for j in range(items)}
    rows = []
    for m in range(members):
        country, age = ("us", "fr")[m % 2], 20.0 + m
        taste = rng.random()
        for k, j in enumerate(rng.sample(range(items), per_member)):
            item = f"i{j}"
            p = 0.8 if (j % 3 == 0) == (taste > 0.5) else 0.25
            rows.append(
                {
                    "user": f"u{m}",
                    "item": item,
                    "ts": 1000 + 37 * m + 11 * k,
                    "click": int(rng.random() < p),
                    "country": country,
                    "age": age,
                    "genre": genre[item],
                    "year": year[item],
                }
            )
    return rows


def small_model(spec, seed=0):
    tf.keras.utils.set_random_seed(seed)
    return LiMAMLModel(
        spec,
        MetaConfig(inner_steps=1, inner_lr=0.5, jit_compile=False),
        meta_units=[8, 4],
        global_units=[16, 8],
        cross_layers=1,
    )


def member_batch(rows, spec=MEMBER_SPEC):
    histories, _, _ = tasks.build_tasks(spec, rows, "fraction:0.5")
    records = records_from_histories(histories, spec, val_fraction=0, test_fraction=0)
    return task_batch(records["train"], spec)


# ---------------------------------------------------------------- make-tasks
def test_make_tasks_builds_tasks_for_an_item_entity(tmp_path):
    rows = interactions()
    csv_path = tmp_path / "interactions.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec_path = tmp_path / "item_spec.json"
    ITEM_SPEC.save(spec_path)
    out = tmp_path / "tasks"
    make_tasks.run(
        [
            "--input",
            str(csv_path),
            "--features",
            str(spec_path),
            "--output",
            str(out),
            "--val-fraction",
            "0",
            "--test-fraction",
            "0",
        ]
    )
    assert ITEM_SPEC.entity == "item" and ITEM_SPEC.tie_break == "user"
    assert [f.name for f in ITEM_SPEC.meta_features] == ["genre", "year"]
    assert [f.name for f in ITEM_SPEC.request_features] == ["country", "age"]
    decoded = {}
    files = glob.glob(str(out / "train-*.tfrecord.gz"))
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.SequenceExample.FromString(record.numpy())
        lists = example.feature_lists.feature_list
        ids = example.context.feature["entity_id"].bytes_list.value[0].decode()
        decoded[ids] = {
            part: [
                (
                    t.int64_list.value[0],
                    int(y.float_list.value[0]),
                    c.bytes_list.value[0].decode(),
                    a.float_list.value[0],
                )
                for t, y, c, a in zip(
                    lists[f"{part}/time"].feature,
                    lists[f"{part}/label"].feature,
                    lists[f"{part}/country"].feature,
                    lists[f"{part}/age"].feature,
                    strict=True,
                )
            ]
            for part in ("support", "query")
        }
        decoded[ids]["genre"] = example.context.feature["genre"].bytes_list.value[0]
    items = sorted({r["item"] for r in rows})
    assert sorted(decoded) == items
    for item in items:
        # The item's ratings in time order (ties by member id), first half support.
        ratings = sorted(
            (r for r in rows if r["item"] == item), key=lambda r: (r["ts"], r["user"])
        )
        expected = [
            (r["ts"], r["click"], r["country"], float(r["age"])) for r in ratings
        ]
        half = len(expected) // 2
        assert decoded[item]["support"] == expected[:half], item
        assert decoded[item]["query"] == expected[half:], item
        assert decoded[item]["genre"].decode() == ratings[0]["genre"]


# ------------------------------------------------------- one table per entity
@pytest.fixture(scope="module")
def two_entities(tmp_path_factory):
    """An item model and a member model reading its embeddings, both exported."""
    root = tmp_path_factory.mktemp("multi_entity")
    rows = interactions()
    item_model = small_model(ITEM_SPEC, seed=1)
    item_records, _ = entities.support_records(ITEM_SPEC, rows)
    item_batch = task_batch(item_records, ITEM_SPEC)
    table = entities.EmbeddingTable(
        tuple(i.decode() for i in item_batch["entity_id"]),
        item_model.meta_embedding(item_batch).numpy(),
    )
    spec = entities.with_embedding_features(MEMBER_SPEC, {"item": table.dim})
    batch = entities.join_task_batch(member_batch(rows), {"item": table})
    spec = entities.complete_embedding_statistics(spec, batch)
    member_model = small_model(spec, seed=2)
    exports = {
        "item": export.export_model(item_model, str(root / "item"), max_support=16),
        "member": export.export_model(
            member_model, str(root / "member"), max_support=8
        ),
    }
    return {
        "rows": rows,
        "root": root,
        "item_model": item_model,
        "item_records": item_records,
        "member_model": member_model,
        "member_records": records_from_histories(
            tasks.build_tasks(spec, entities.join_rows(rows, {"item": table}, "user"))[
                0
            ],
            spec,
            val_fraction=0,
            test_fraction=0,
        )["train"],
        "spec": spec,
        "batch": batch,
        "exports": exports,
    }


def _embed(export_dir, records, out):
    path = os.path.join(out, "tasks.tfrecord.gz")
    os.makedirs(out, exist_ok=True)
    from tf_limaml import data  # noqa: PLC0415

    data.write_tasks(path, records)
    generate_embeddings.run(
        ["--export", export_dir, "--tasks", path, "--output", os.path.join(out, "emb")]
    )
    return entities.EmbeddingTable.read(os.path.join(out, "emb", "embeddings-*"))


def test_limaml_embed_writes_one_table_per_entity(two_entities):
    setup = two_entities
    item_table = _embed(
        setup["exports"]["item"], setup["item_records"], str(setup["root"] / "e_item")
    )
    member_table = _embed(
        setup["exports"]["member"],
        setup["member_records"],
        str(setup["root"] / "e_member"),
    )
    rows = setup["rows"]
    assert list(item_table.ids) == sorted({r["item"] for r in rows})
    assert list(member_table.ids) == sorted({r["user"] for r in rows})
    assert item_table.dim == setup["item_model"].meta_dim == 4
    assert member_table.dim == setup["member_model"].meta_dim == 4
    assert item_table.model_version == member_table.model_version == 1
    # Each table is its own model's adapted embedding (16 / 8: the exports' caps).
    item_batch = task_batch(setup["item_records"], ITEM_SPEC, max_support=16)
    np.testing.assert_allclose(
        item_table.lookup(item_batch["entity_id"]),
        setup["item_model"].meta_embedding(item_batch).numpy(),
        atol=TOL,
    )
    member_batch_ = task_batch(setup["member_records"], setup["spec"], max_support=8)
    np.testing.assert_allclose(
        member_table.lookup(member_batch_["entity_id"]),
        setup["member_model"].meta_embedding(member_batch_).numpy(),
        atol=TOL,
    )
    # The member records carry the item embedding joined before make-tasks.
    joined = member_batch_[f"support_{EMBEDDING}"][member_batch_["support_mask"] > 0]
    ids = member_batch_["support_item"][member_batch_["support_mask"] > 0]
    item_in_graph = entities.EmbeddingTable(
        tuple(
            i.decode()
            for i in task_batch(setup["item_records"], ITEM_SPEC)["entity_id"]
        ),
        setup["item_model"]
        .meta_embedding(task_batch(setup["item_records"], ITEM_SPEC))
        .numpy(),
    )
    np.testing.assert_allclose(joined, item_in_graph.lookup(ids), atol=TOL)


def test_serving_default_fed_both_embeddings_equals_in_graph_adaptation(two_entities):
    setup = two_entities
    spec, model = setup["spec"], setup["member_model"]
    item_session = SessionSignatures(setup["exports"]["item"])
    member_session = SessionSignatures(setup["exports"]["member"])
    try:
        # The item table from the item export's meta_embedding signature.
        item_batch = task_batch(setup["item_records"], ITEM_SPEC, max_support=16)
        inputs = {f.name: item_batch[f.name] for f in ITEM_SPEC.meta_features}
        for key in ["support_label", "support_mask"] + [
            f"support_{f.name}" for f in ITEM_SPEC.request_features
        ]:
            inputs[key] = item_batch[key]
        item_table = entities.EmbeddingTable(
            tuple(i.decode() for i in item_batch["entity_id"]),
            item_session.run("meta_embedding", inputs)["meta_embedding"],
        )
        batch = entities.join_task_batch(
            task_batch(setup["member_records"], spec, max_support=8),
            {"item": item_table},
        )
        # The member table from the member export's meta_embedding signature.
        inputs = {f.name: batch[f.name] for f in spec.meta_features}
        for key in ["support_label", "support_mask"] + [
            f"support_{f.name}" for f in spec.request_features
        ]:
            inputs[key] = batch[key]
        member_embedding = member_session.run("meta_embedding", inputs)[
            "meta_embedding"
        ]
        serving = member_session.signatures["serving_default"].inputs
        assert sorted(serving) == sorted(
            ["meta_embedding", EMBEDDING, "item", "genre", "year"]
        )
        assert [d.size for d in serving[EMBEDDING].tensor_shape.dim] == [-1, 4]
        mask = batch["query_mask"] > 0
        request = {
            f.name: batch[f"query_{f.name}"][mask] for f in spec.request_features
        }
        got = member_session.run(
            "serving_default",
            {
                "meta_embedding": np.repeat(member_embedding, mask.sum(axis=1), axis=0),
                **request,
            },
        )["score"]
        in_graph = model.predict_query(batch).numpy()[mask]
        assert len(got) > 100
        np.testing.assert_allclose(got, in_graph, atol=TOL)
        # And the export's own in-graph adaptation, one member at a time.
        first = 0
        for t in range(len(batch["entity_id"])):
            n_s, n_q = int(batch["support_mask"][t].sum()), int(mask[t].sum())
            feed = {f.name: batch[f.name][t] for f in spec.meta_features}
            for f in spec.request_features:
                feed[f"support_{f.name}"] = batch[f"support_{f.name}"][t][:n_s]
                feed[f"query_{f.name}"] = batch[f"query_{f.name}"][t][:n_q]
            feed["support_label"] = batch["support_label"][t][:n_s]
            out = member_session.run("adapt_and_predict", feed)
            np.testing.assert_allclose(out["score"], got[first : first + n_q], atol=TOL)
            first += n_q
    finally:
        item_session.close()
        member_session.close()


# ------------------------------------------------------------------ cross-fit
def _cross_fit_join(rows, item_model, train_members):
    """The experiment's path, in-graph: out-of-fold item tables joined into
    the train members' task batch."""
    records, _ = entities.cross_fit_support_records(
        ITEM_SPEC, rows, by="user", include=lambda r: r["user"] in train_members
    )
    batch = task_batch(records, ITEM_SPEC)
    table = entities.EmbeddingTable(
        tuple(i.decode() for i in batch["entity_id"]),
        item_model.meta_embedding(batch).numpy(),
    )
    whole, crossfit = entities.CrossFitTables.from_embeddings(table)
    joined = entities.join_task_batch(member_batch(rows), {"item": crossfit})
    return whole, joined


def _row(batch, user, item):
    t = [e.decode() for e in batch["entity_id"]].index(user)
    for part in ("support", "query"):
        hits = np.flatnonzero(
            (batch[f"{part}_item"][t] == item.encode()) & (batch[f"{part}_mask"][t] > 0)
        )
        if len(hits):
            return batch[f"{part}_{EMBEDDING}"][t, hits[0]]
    raise AssertionError(f"{user} did not rate {item}")


def test_cross_fit_item_embedding_never_reads_the_rows_own_label():
    rows = interactions(members=30, items=6, per_member=5)
    item_model = small_model(ITEM_SPEC, seed=3)
    train_members = {r["user"] for r in rows}
    whole, joined = _cross_fit_join(rows, item_model, train_members)
    user, item = rows[0]["user"], rows[0]["item"]
    fold = entities.cross_fit_fold(user)
    flipped = [dict(r) for r in rows]
    flipped[0]["click"] = 1 - flipped[0]["click"]
    whole_after, joined_after = _cross_fit_join(flipped, item_model, train_members)
    # The label moves the item's embedding adapted on every train member ...
    assert not np.allclose(whole[item], whole_after[item], atol=1e-6)
    # ... and the embedding other-fold members' rows read, but never the row's own.
    np.testing.assert_array_equal(
        _row(joined, user, item), _row(joined_after, user, item)
    )
    others = [
        r["user"]
        for r in rows
        if r["item"] == item and entities.cross_fit_fold(r["user"]) != fold
    ]
    assert others
    assert not np.allclose(
        _row(joined, others[0], item), _row(joined_after, others[0], item), atol=1e-6
    )


def test_cross_fit_folds_are_stable_and_balanced():
    ids = [f"member{i}" for i in range(2000)]
    folds = [entities.cross_fit_fold(i) for i in ids]
    assert folds == [entities.cross_fit_fold(i) for i in ids]
    assert 900 < sum(folds) < 1100
    assert entities.cross_fit_fold("member1", seed=1) in (0, 1)
    with pytest.raises(ValueError, match="folds"):
        entities.cross_fit_fold("x", folds=1)


# ---------------------------------------------------------------- the pieces
def test_embedding_table_lookup_default_and_errors():
    table = entities.EmbeddingTable(("a", "b"), np.array([[1.0, 2.0], [3.0, 4.0]]))
    got = table.lookup(np.array([[b"b", b"a"], [b"a", b"a"]], dtype=object))
    np.testing.assert_array_equal(got[0], [[3.0, 4.0], [1.0, 2.0]])
    assert got.shape == (2, 2, 2) and "a" in table and b"b" in table
    with pytest.raises(KeyError, match="no embedding"):
        table.lookup(["c"])
    cold = entities.EmbeddingTable(table.ids, table.vectors, default=[0.5, 0.5])
    np.testing.assert_array_equal(cold.lookup(["c", "a"]), [[0.5, 0.5], [1.0, 2.0]])
    with pytest.raises(ValueError, match="shape"):
        entities.EmbeddingTable(("a",), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        entities.EmbeddingTable(("a",), np.array([[np.nan]]))


def test_with_embedding_features_adds_one_dense_feature_per_entity():
    spec = entities.with_embedding_features(
        MEMBER_SPEC, {"item": 3}, {"item": ([0.0, 1.0, 2.0], [1.0, 1.0, 2.0])}
    )
    feature = spec.feature(EMBEDDING)
    assert feature.is_numeric and feature.shape == (3,) and feature.mean == (0, 1, 2)
    assert spec.request_features[:-1] == MEMBER_SPEC.request_features
    # The member id is no feature of the item spec: joined into rows by join_rows.
    item_spec = entities.with_embedding_features(ITEM_SPEC, {"user": 4})
    assert item_spec.feature("user__meta_embedding").needs_statistics
    with pytest.raises(Exception, match="categorical request feature or a column"):
        entities.with_embedding_features(MEMBER_SPEC, {"year": 3})
    with pytest.raises(Exception, match="categorical request feature or a column"):
        entities.with_embedding_features(MEMBER_SPEC, {"country": 3})


def test_support_records_keep_every_item_and_only_included_rows():
    rows = interactions(members=10, items=5, per_member=3)
    records, counts = entities.support_records(
        ITEM_SPEC, rows, include=lambda r: r["user"] != "u0"
    )
    batch = task_batch(records, ITEM_SPEC)
    assert [e.decode() for e in batch["entity_id"]] == sorted({r["item"] for r in rows})
    assert counts["rows"] == sum(r["user"] != "u0" for r in rows)
    assert int(batch["support_mask"].sum()) == counts["rows"]
    assert int(batch["query_mask"].sum()) == 0


def test_item_rating_counts_and_buckets():
    rows = interactions(members=10, items=5, per_member=3)
    histories, _, _ = tasks.build_tasks(MEMBER_SPEC, rows, "fraction:0.5")
    records = records_from_histories(histories, MEMBER_SPEC, 0, 0, 0)["train"]
    counts = multi_entity.item_rating_counts(records, MEMBER_SPEC, "item")
    expected = {}
    for r in rows:
        expected[r["item"]] = expected.get(r["item"], 0) + 1
    assert counts == expected
    assert [multi_entity.popularity_bucket(n) for n in (0, 4, 5, 19, 20, 99, 100)] == [
        "0-4",
        "0-4",
        "5-19",
        "5-19",
        "20-99",
        "20-99",
        "100+",
    ]
