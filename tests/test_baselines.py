"""Baselines and protocol helpers: hand-worked small cases, then tiny trainings."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tf_limaml.datasets import synthetic
from tf_limaml.experimental.prototypes import ShrunkSupportModel
from tf_limaml.experiments import baselines
from tf_limaml.experiments.protocol import (
    Protocol,
    Splits,
    cut_support,
    evaluate_sweep,
    flatten,
    measurement,
    query_metrics,
    random_support_cut,
    records_from_histories,
    training_rows,
)
from tf_limaml.experiments.recipes import Architecture, Recipe
from tf_limaml.features import ENTITY_ID_KEY, FeatureSpec
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.tasks import assign_split, build_tasks

SMALL = Architecture(meta_units=(8, 4), global_units=(8,), cross_layers=1)


def _spec() -> FeatureSpec:
    return FeatureSpec.from_dict(
        {
            "entity": "member",
            "time": "t",
            "label": "y",
            "meta_features": [
                {"name": "g", "type": "categorical", "vocabulary": ["a", "b"]}
            ],
            "request_features": [
                {"name": "item", "type": "categorical", "hash_buckets": 10}
            ],
        }
    )


def _batch():
    """Two tasks: 3 and 2 support rows (S = 4), 2 and 1 query rows (Q = 2)."""
    return {
        "entity_id": np.array([b"m1", b"m2"], dtype=object),
        "g": np.array([b"a", b"b"], dtype=object),
        "support_item": np.array(
            [[b"i1", b"i2", b"i3", b""], [b"i4", b"i5", b"", b""]], dtype=object
        ),
        "support_label": np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32),
        "support_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32),
        "query_item": np.array([[b"i6", b"i7"], [b"i8", b""]], dtype=object),
        "query_label": np.array([[1, 0], [1, 0]], np.float32),
        "query_mask": np.array([[1, 1], [1, 0]], np.float32),
        "n_support": np.array([3, 2], np.int32),
    }


# ------------------------------------------------------------- pure helpers
def test_cut_support_keeps_the_latest_k_rows():
    batch = _batch()
    cut = cut_support(batch, 1)
    np.testing.assert_array_equal(cut["support_mask"], [[0, 0, 1, 0], [0, 1, 0, 0]])
    cut = cut_support(batch, 2)
    np.testing.assert_array_equal(cut["support_mask"], [[0, 1, 1, 0], [1, 1, 0, 0]])
    # k beyond the history keeps everything; k = 0 keeps nothing; None is all.
    np.testing.assert_array_equal(
        cut_support(batch, 10)["support_mask"], batch["support_mask"]
    )
    assert cut_support(batch, 0)["support_mask"].sum() == 0
    assert cut_support(batch, None) is batch
    # The input is not modified.
    assert batch["support_mask"].sum() == 5


@pytest.mark.parametrize("k", [-1, 1.5, True, "3"])
def test_cut_support_rejects_bad_k(k):
    with pytest.raises(ValueError, match="Support size k"):
        cut_support(_batch(), k)


def test_flatten_repeats_meta_and_keeps_real_rows_in_order():
    rows = flatten(_batch(), _spec(), ("support", "query"))
    assert rows["item"].tolist() == [
        b"i1",
        b"i2",
        b"i3",
        b"i4",
        b"i5",
        b"i6",
        b"i7",
        b"i8",
    ]
    assert rows["entity_id"].tolist() == [b"m1"] * 3 + [b"m2"] * 2 + [b"m1"] * 2 + [
        b"m2"
    ]
    assert rows["g"].tolist() == [b"a"] * 3 + [b"b"] * 2 + [b"a"] * 2 + [b"b"]
    assert rows["label"].tolist() == [1, 0, 1, 0, 1, 1, 0, 1]


def test_training_rows_follow_the_protocol():
    """Train: support + query; val and test: support only, cut to k."""
    spec, batch = _spec(), _batch()
    rows = training_rows(batch, batch, batch, spec)
    assert len(rows["label"]) == 8 + 5 + 5
    rows = training_rows(batch, batch, batch, spec, k=1)
    assert len(rows["label"]) == 8 + 2 + 2
    # The k = 1 rows of val/test are each member's latest support row.
    assert rows["item"][8:].tolist() == [b"i3", b"i5", b"i3", b"i5"]


def test_query_metrics_by_hand():
    batch = _batch()
    # Real query rows: m1 (1, 0), m2 (1); the padding score 0.99 must be ignored.
    probabilities = np.array([[0.8, 0.3], [0.6, 0.99]])
    metrics = query_metrics(batch, probabilities)
    # Positives 0.8, 0.6 vs negative 0.3: both rank above, AUC 1.
    assert metrics["auc"] == 1.0
    expected = -np.mean([np.log(0.8), np.log(0.7), np.log(0.6)])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    # Only m1 has both classes.
    assert metrics["n_members_with_both_classes"] == 1
    assert metrics["mean_member_auc"] == 1.0


def test_evaluate_sweep_passes_each_cut_and_labels_k():
    batch = _batch()
    seen = {}

    def score(cut, k):
        seen[k] = cut["support_mask"].sum()
        return np.where(cut["query_label"] > 0, 0.9, 0.1)

    sweep = evaluate_sweep(score, batch, (1, 2, None))
    assert list(sweep) == ["1", "2", "all"]
    assert seen == {1: 2, 2: 4, None: 5}
    assert sweep["all"]["overall_auc"] == 1.0


def test_measurement_layout():
    sweep = {
        "1": {"overall_auc": 0.6, "logloss": 0.7, "mean_member_auc": 0.5},
        "all": {"overall_auc": 0.8, "logloss": 0.6, "mean_member_auc": 0.55},
    }
    entry = measurement(sweep, 12.5, {"epochs": 3})
    assert entry["overall_auc"] == 0.8 and entry["wall_s"] == 12.5
    assert entry["support_k"]["1"]["overall_auc"] == 0.6
    assert entry["details"] == {"epochs": 3}


def test_protocol_describes_the_issue_rules():
    text = str(Protocol().describe())
    for phrase in (
        "the spec's time column",
        "80%/10%/10%",
        "train members' support and query only",
        "val and test members' latest k support rows",
        "['1', '3', '5', '10', 'all']",
        "retrained per k",
    ):
        assert phrase in text


def test_protocol_orders_by_the_data_s_own_time_and_tie_break_columns():
    spec = _spec()
    assert "sorted by `t`; rows still tied" in Protocol().describe(spec)["order"]
    with_tie = dataclasses.replace(spec, tie_break="item")
    assert "sorted by `t`, then `item`;" in Protocol().describe(with_tie)["order"]
    assert "timestamp" not in str(Protocol().describe(with_tie))


def test_random_support_cut_keeps_a_latest_window():
    task = {"support_mask": tf.constant([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])}
    sizes = set()
    for seed in range(40):
        mask = random_support_cut(task, 1.0, seed)["support_mask"].numpy()
        kept = np.flatnonzero(mask)
        assert 1 <= len(kept) <= 5
        # Contiguous and ending at the last real row.
        assert kept[-1] == 4 and np.all(np.diff(kept) == 1)
        sizes.add(len(kept))
    assert len(sizes) > 1
    untouched = random_support_cut(task, 0.0, 0)["support_mask"].numpy()
    np.testing.assert_array_equal(untouched, task["support_mask"].numpy())


# ------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def tiny():
    """60 synthetic members, their task records and batches."""
    spec = synthetic.synthetic_spec(num_items=30)
    rows = synthetic.generate_interactions(
        num_entities=60, num_items=30, seed=3, min_interactions=8, max_interactions=16
    )
    histories, _, _ = build_tasks(spec, rows)
    records = records_from_histories(
        histories, spec, val_fraction=0.2, test_fraction=0.2
    )
    splits = Splits.from_records(records, spec, Protocol(max_support=8, max_query=8))
    return spec, records, splits, histories


def test_records_follow_the_hash_split(tiny):
    spec, records, splits, histories = tiny
    expected = {h.entity_id: assign_split(h.entity_id, 0, 0.2, 0.2) for h in histories}
    for split in ("train", "val", "test"):
        ids = [i.decode() for i in getattr(splits, split)["entity_id"]]
        assert ids and all(expected[i] == split for i in ids)
    assert sum(len(v) for v in records.values()) == len(histories)
    # Uncapped batches are padded to the longest history; capped ones to the caps.
    longest = max(len(h.support) for h in histories if expected[h.entity_id] == "train")
    assert splits.train["support_mask"].shape[1] == longest
    assert splits.train_meta["support_mask"].shape[1] == 8


def test_pointwise_unseen_member_scores_like_the_base(tiny):
    """ID vectors and biases start at zero: an unknown member gets the base score."""
    spec, _, splits, _ = tiny
    base = baselines.new_model(spec, architecture=SMALL, seed=0)
    with_ids = baselines.PointwiseModel(base, members=["m_known"])
    without = baselines.PointwiseModel(base)
    np.testing.assert_allclose(
        with_ids.task_probabilities(splits.test),
        without.task_probabilities(splits.test),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        without.task_probabilities(splits.test),
        baselines.query_probabilities(base, splits.test, 0),
        atol=1e-6,
    )


def test_global_never_trains_on_a_held_out_members_rows(tiny, monkeypatch):
    """Global (and fine-tuning and LiMAML on its network) meets a val or test
    member only through the k support rows it is scored with: trained on their
    full support, it would know them at k = 1 already."""
    spec, _, splits, _ = tiny
    seen = {}

    def record_rows(model, train_rows, val_rows, **kwargs):
        seen["train"] = {i.decode() for i in train_rows[ENTITY_ID_KEY]}
        return {"loss": [0.0]}

    monkeypatch.setattr(baselines, "fit_pointwise", record_rows)
    baselines.train_global(spec, splits, Recipe(architecture=SMALL), seed=0)
    held_out = set(splits.members("val", "test"))
    assert held_out and seen["train"] == set(splits.members("train"))
    assert not seen["train"] & held_out


def test_pointwise_metrics_are_only_the_compiled_loss(tiny):
    spec, _, splits, _ = tiny
    base = baselines.new_model(spec, architecture=SMALL, seed=0)
    model = baselines.PointwiseModel(base)
    history = baselines.fit_pointwise(
        model,
        training_rows(splits.train, splits.val, splits.test, spec),
        flatten(splits.val, spec, ("query",)),
        epochs=2,
        batch_size=64,
    )
    assert set(history) == {"loss", "val_loss"}
    # The base model's own trackers would log 0.0; the compiled loss is positive.
    assert all(v > 0.1 for v in history["loss"] + history["val_loss"])


def test_id_embedding_learns_a_member_bias():
    """Two members with opposite labels on the same items: only IDs can tell them apart."""
    spec = _spec()
    n = 64
    rows = {
        "entity_id": np.array([b"up", b"down"] * n, dtype=object),
        "g": np.array([b"a"] * (2 * n), dtype=object),
        "item": np.array([f"i{i % 4}".encode() for i in range(2 * n)], dtype=object),
        "label": np.array([1.0, 0.0] * n, np.float32),
    }
    base = baselines.new_model(spec, architecture=SMALL, seed=0)
    model = baselines.PointwiseModel(base, members=["up", "down"])
    baselines.fit_pointwise(
        model, rows, None, epochs=30, batch_size=32, learning_rate=0.05
    )
    probabilities = tf.sigmoid(model(model.encode_rows(rows))).numpy()
    assert probabilities[0] > 0.8 and probabilities[1] < 0.2


def test_finetune_model_matches_a_scalar_inner_lr(tiny):
    """The variable inner lr gives exactly what MetaConfig(inner_lr=...) gives."""
    spec, _, splits, _ = tiny
    tuned = baselines.new_model(
        spec,
        MetaConfig(inner_steps=0, inner_lr=0.0, jit_compile=False),
        SMALL,
        seed=1,
        model_class=baselines.FineTuneModel,
    )
    plain = baselines.new_model(
        spec, MetaConfig(inner_steps=2, inner_lr=0.3, jit_compile=False), SMALL, seed=2
    )
    plain.meta_block.set_weights(tuned.meta_block.get_weights())
    plain.global_block.set_weights(tuned.global_block.get_weights())
    expected = baselines.query_probabilities(plain, splits.test, 2)
    got = baselines.query_probabilities(tuned, splits.test, 2, inner_lr=0.3)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, baselines.query_probabilities(tuned, splits.test, 0))
    # Another lr reuses the trace and changes the result.
    other = baselines.query_probabilities(tuned, splits.test, 2, inner_lr=0.01)
    assert not np.allclose(got, other)


def test_query_functions_trace_once_for_every_support_size_and_stay_quiet(
    tiny, tensorflow_warnings
):
    """One trace per knob setting whatever k and chunk, and no "excessive
    retracing" warning though tune builds dozens of settings in a loop."""
    spec, _, splits, _ = tiny
    model = baselines.new_model(
        spec, MetaConfig(inner_steps=1, inner_lr=0.1, jit_compile=False), SMALL, seed=4
    )
    scores = {}
    # As tune scores its trials: a setting, then every k, then the next.
    for lr in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08):
        for k in (1, 3, None):
            cut = cut_support(splits.test, k)
            scores[lr, k] = baselines.query_probabilities(model, cut, 1, lr)
    chunked = baselines.query_probabilities(
        model, cut_support(splits.test, 3), 1, 0.03, chunk=5
    )
    functions = list(baselines._QUERY_FUNCTIONS[model].values())
    assert len(functions) == 8
    assert [f.experimental_get_tracing_count() for f in functions] == [1] * 8
    assert not [m for m in tensorflow_warnings if "retracing" in m]
    # Chunks are only memory: the same scores.
    np.testing.assert_allclose(chunked, scores[0.03, 3], atol=1e-6)
    assert not np.allclose(scores[0.01, None], scores[0.08, None])


def test_choose_finetune_considers_no_adaptation(tiny):
    spec, _, splits, _ = tiny
    model = baselines.new_model(
        spec,
        MetaConfig(inner_steps=0, inner_lr=0.0, jit_compile=False),
        SMALL,
        seed=1,
        model_class=baselines.FineTuneModel,
    )
    best, grid = baselines.choose_finetune(
        model, splits.val, lrs=(0.1, 100.0), steps=(1,)
    )
    assert [(g["inner_lr"], g["steps"]) for g in grid] == [
        (0.0, 0),
        (0.1, 1),
        (100.0, 1),
    ]
    assert best == max(grid, key=lambda g: (g["auc"], -g["loss"]))


def _tasks_batch(splits):
    return {k: tf.constant(v) for k, v in splits.test.items()}


def test_shrunk_support_scales_the_first_step(tiny):
    """One step on n rows with prior c moves the weights n / (n + c) as far."""
    spec, _, splits, _ = tiny
    config = MetaConfig(inner_steps=1, inner_lr=0.5, jit_compile=False)
    plain = baselines.new_model(spec, config, SMALL, seed=0)
    shrunk = baselines.new_model(
        spec, config, SMALL, seed=0, model_class=ShrunkSupportModel, support_prior=4.0
    )
    shrunk.set_weights(plain.get_weights())
    batch = _tasks_batch(splits)
    n = splits.test["support_mask"].sum(axis=1)
    name = "meta_block/dense_1/bias"
    initial = plain.meta_block.adaptable_weights()["dense_1/bias"].numpy()
    moved_plain = plain.adapt(batch)[name].numpy() - initial
    moved_shrunk = shrunk.adapt(batch)[name].numpy() - initial
    np.testing.assert_allclose(
        moved_shrunk, moved_plain * (n / (n + 4.0))[:, None], rtol=1e-4, atol=1e-7
    )
    # Without adaptation both score alike (the prior acts only in the inner loop).
    np.testing.assert_allclose(
        baselines.query_probabilities(plain, splits.test, 0),
        baselines.query_probabilities(shrunk, splits.test, 0),
        atol=1e-6,
    )


def test_library_support_prior_equals_the_prototype(tiny):
    """MetaConfig.support_prior (the library) adapts exactly as the prototype did."""
    spec, _, splits, _ = tiny
    config = MetaConfig(inner_steps=2, inner_lr=0.5, jit_compile=False)
    prototype = baselines.new_model(
        spec, config, SMALL, seed=0, model_class=ShrunkSupportModel, support_prior=4.0
    )
    library = baselines.new_model(
        spec, dataclasses.replace(config, support_prior=4.0), SMALL, seed=0
    )
    library.set_weights(prototype.get_weights())
    batch = _tasks_batch(splits)
    for name, value in prototype.adapt(batch).items():
        np.testing.assert_allclose(
            library.adapt(batch)[name].numpy(), value.numpy(), atol=1e-6
        )


def test_support_half_life_weights_by_recency():
    """h = 1: the latest row weighs 1, the one before 0.5, then 0.25; padding 0."""
    spec = _spec()
    model = baselines.new_model(
        spec,
        MetaConfig(inner_steps=1, jit_compile=False),
        SMALL,
        model_class=ShrunkSupportModel,
        support_prior=1.0,
        support_half_life=1.0,
    )
    labels = tf.constant([[1.0, 0.0, 1.0, 0.0]])
    logits = tf.constant([[0.0, 0.0, 0.0, 5.0]])
    mask = tf.constant([[1.0, 1.0, 1.0, 0.0]])
    got = float(model.support_loss(labels, logits, mask)[0])
    # Every real row has loss log 2; weights 0.25, 0.5, 1 and a prior of 1 row.
    assert got == pytest.approx(np.log(2.0) * 1.75 / (1.75 + 1.0), rel=1e-5)
    plain = float(LiMAMLModel.support_loss(model, labels, logits, mask)[0])
    assert plain == pytest.approx(np.log(2.0), rel=1e-5)
    with pytest.raises(ValueError, match="support_half_life"):
        baselines.new_model(
            spec,
            MetaConfig(jit_compile=False),
            SMALL,
            model_class=ShrunkSupportModel,
            support_half_life=0.0,
        )


def test_shrunk_support_with_zero_prior_is_limaml(tiny):
    spec, _, splits, _ = tiny
    config = MetaConfig(inner_steps=2, inner_lr=0.5, jit_compile=False)
    plain = baselines.new_model(spec, config, SMALL, seed=0)
    shrunk = baselines.new_model(
        spec, config, SMALL, seed=0, model_class=ShrunkSupportModel
    )
    shrunk.set_weights(plain.get_weights())
    np.testing.assert_allclose(
        baselines.query_probabilities(shrunk, splits.test),
        baselines.query_probabilities(plain, splits.test),
        atol=1e-6,
    )


def test_shrunk_support_adapt_only_and_config_round_trip(tiny):
    spec, _, _, _ = tiny
    model = baselines.new_model(
        spec,
        MetaConfig(inner_steps=1, learn_inner_lr=True, jit_compile=False),
        SMALL,
        seed=0,
        model_class=ShrunkSupportModel,
        support_prior=2.0,
        adapt_only=["meta_block/dense_1/bias"],
    )
    assert list(model.inner_lrs) == ["meta_block/dense_1/bias"]
    clone = ShrunkSupportModel.from_config(model.get_config())
    assert clone.support_prior == 2.0 and clone.adapt_only == (
        "meta_block/dense_1/bias",
    )
    with pytest.raises(ValueError, match="not adaptable"):
        baselines.new_model(
            spec,
            MetaConfig(jit_compile=False),
            SMALL,
            model_class=ShrunkSupportModel,
            adapt_only=["nope"],
        )
    with pytest.raises(ValueError, match="support_prior"):
        baselines.new_model(
            spec,
            MetaConfig(jit_compile=False),
            SMALL,
            model_class=ShrunkSupportModel,
            support_prior=-1.0,
        )


def test_warm_start_copies_both_blocks_and_checks_shapes(tiny):
    spec, _, splits, _ = tiny
    source = baselines.new_model(spec, architecture=SMALL, seed=0)
    target = baselines.new_model(
        spec, MetaConfig(inner_steps=0, jit_compile=False), SMALL, seed=5
    )
    baselines.warm_start(target, source)
    np.testing.assert_allclose(
        baselines.query_probabilities(target, splits.test, 0),
        baselines.query_probabilities(source, splits.test, 0),
        atol=1e-6,
    )
    other = baselines.new_model(spec, architecture=Architecture(meta_units=(8, 6)))
    with pytest.raises(ValueError, match="Cannot warm-start"):
        baselines.warm_start(other, source)


def test_cut_record_keeps_latest_support_and_query(tiny):
    from tf_limaml import data
    from tf_limaml.experiments.movielens_demo import cut_record

    spec, records, _, _ = tiny
    record = records["test"][0]
    original = data.tasks_to_batch([record], spec, 64, 64)
    cut = data.tasks_to_batch([cut_record(record, 2, "#k=2")], spec, 64, 64)
    n = int(original["support_mask"].numpy().sum())
    assert cut["entity_id"].numpy()[0] == original["entity_id"].numpy()[0] + b"#k=2"
    assert cut["support_mask"].numpy().sum() == 2
    np.testing.assert_array_equal(
        cut["support_item_id"].numpy()[0, :2],
        original["support_item_id"].numpy()[0, n - 2 : n],
    )
    np.testing.assert_array_equal(
        cut["query_label"].numpy(), original["query_label"].numpy()
    )


@pytest.mark.slow
def test_limaml_recipe_beats_global_on_synthetic_members(tiny):
    """A fast recipe end to end on in-memory tasks: personalization helps."""
    spec, records, _, _ = tiny
    rows = synthetic.generate_interactions(num_entities=400, num_items=60, seed=1)
    histories, _, _ = build_tasks(spec, rows)
    records = records_from_histories(histories, spec)
    splits = Splits.from_records(records, spec, Protocol(max_support=24, max_query=24))
    recipe = Recipe(
        architecture=SMALL, epochs=8, pretrain_epochs=4, meta_epochs=8, inner_lr=0.5
    )
    base, _ = baselines.train_global(spec, splits, recipe, seed=0)
    init = baselines.pretrain(spec, splits, recipe, seed=0)
    limaml, _ = baselines.train_meta_learner(spec, splits, recipe, seed=0, init=init)
    global_auc = query_metrics(
        splits.test, baselines.query_probabilities(base, splits.test, 0)
    )["auc"]
    limaml_auc = query_metrics(
        splits.test, baselines.query_probabilities(limaml, splits.test)
    )["auc"]
    assert limaml_auc > global_auc
