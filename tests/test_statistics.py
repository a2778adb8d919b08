"""Feature statistics from the data (tf_limaml/statistics.py, beam_pipelines/analyze.py).

Numeric mean/std and `"auto"` vocabularies are computed from the TRAIN entities
only, by the make-tasks job (written to DIR/spec.json) or by `limaml train`.
Standard deviations are population ones (ddof=0), as numpy's default.
"""

import collections
import csv
import glob
import json
import math

import apache_beam as beam
import hypothesis
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import strategies as st

from beam_pipelines import analyze, make_tasks
from tf_limaml import cli, data, statistics
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec, FeatureSpecError
from tf_limaml.layers import FeatureEmbedding
from tf_limaml.model import LiMAMLModel, MetaConfig
from tf_limaml.statistics import Moments, select_vocabulary

TYPES_ONLY = {
    "entity": "user",
    "time": "ts",
    "label": "click",
    "tie_break": "item",
    "meta_features": [
        {"name": "year", "type": "numeric"},
        {"name": "country", "type": "categorical", "vocabulary": "auto"},
    ],
    "request_features": [
        {"name": "item", "type": "categorical", "vocabulary": "auto", "min_count": 2},
        {"name": "price", "type": "numeric", "transform": "log1p", "clip": 5.0},
        {"name": "tags", "type": "multi_hot", "vocabulary": "auto", "top_k": 3},
    ],
}
SEED, VAL, TEST = 3, 0.25, 0.25


# ------------------------------------------------------------ the accumulators
def test_chan_merge_of_any_split_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(1990.0, 12.0, size=(500, 3)) * [1.0, 1e4, 1e-3]
    whole = Moments.of(x.tolist(), size=3)
    parts = [Moments.of(chunk.tolist(), size=3) for chunk in np.split(x, [7, 8, 300])]
    merged = Moments(3)
    for part in reversed(parts):
        merged.merge(part)
    for moments in (whole, merged):
        assert moments.count == 500
        np.testing.assert_allclose(moments.mean, x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.std(), x.std(axis=0, ddof=0), rtol=1e-9)
        assert moments.min == x.min(axis=0).tolist()
        assert moments.max == x.max(axis=0).tolist()


# Values whose float64 sum depends on the order they are added in.
ORDER_SENSITIVE_ROWS = [[3e38], [1.0], [-3e38], [0.1], [1e-300], [-2.5e37], [7.0]] * 3


def check_moments_are_exact_in_any_order(rows, cuts, order_seed) -> None:
    """Any split of `rows`, added and merged in any order, gives the mean and
    M2 nearest the exact ones (Fractions), bit for bit."""
    from fractions import Fraction

    rng = np.random.default_rng(order_seed)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    bounds = sorted({min(c, len(rows)) for c in cuts})
    parts = [
        Moments.of(shuffled[a:b])
        for a, b in zip([0, *bounds], [*bounds, len(rows)], strict=True)
    ]
    merged = Moments()
    for i in rng.permutation(len(parts)):
        merged.merge(parts[i])
    exact = [Fraction(x) for (x,) in rows]
    mean = sum(exact) / len(exact)
    m2 = sum((x - mean) ** 2 for x in exact)
    for moments in (Moments.of(rows), merged):
        assert moments.count == len(rows)
        assert moments.mean == [float(mean)], (moments.mean, float(mean))
        assert moments.m2 == [float(m2)], (moments.m2, float(m2))
        assert moments.std() == [math.sqrt(float(m2 / len(rows)))]


def test_moments_are_exact_whatever_the_order_of_adds_and_merges():
    for seed in range(5):
        check_moments_are_exact_in_any_order(ORDER_SENSITIVE_ROWS, [2, 5, 11], seed)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    rows=st.lists(
        st.floats(-3e38, 3e38, allow_nan=False).map(lambda x: [x + 0.0]),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=4),
    order_seed=st.integers(0, 2**16),
)
def test_moments_of_any_values_in_any_order_are_exact(rows, cuts, order_seed):
    check_moments_are_exact_in_any_order(rows, cuts, order_seed)


def test_vocabulary_is_count_descending_then_value_ascending():
    counts = {"b": 3, "a": 3, "c": 5, "d": 1, "e": 2}
    assert select_vocabulary(counts) == ["c", "a", "b", "e", "d"]
    assert select_vocabulary(counts, min_count=2) == ["c", "a", "b", "e"]
    assert select_vocabulary(counts, top_k=2) == ["c", "a"]
    assert select_vocabulary(counts, top_k=3, min_count=4) == ["c"]


# --------------------------------------------------------------------- the spec
def test_spec_keys_round_trip_and_missing_statistics():
    spec = FeatureSpec.from_dict(TYPES_ONLY)
    assert spec.missing_statistics() == ["year", "country", "item", "price", "tags"]
    assert FeatureSpec.from_json(spec.to_json()) == spec
    price = spec.feature("price")
    assert (price.transform, price.clip, price.mean, price.std) == (
        "log1p",
        5.0,
        None,
        None,
    )
    assert spec.feature("tags").allow_oov and spec.feature("tags").top_k == 3
    vector = FeatureSpec.from_dict(
        dict(
            TYPES_ONLY,
            request_features=[
                {
                    "name": "v",
                    "type": "numeric",
                    "shape": [3],
                    "mean": [1, 2, 3],
                    "std": 2,
                }
            ],
        )
    )
    assert vector.feature("v").shape == (3,) and vector.missing_statistics() == [
        "year",
        "country",
    ]
    assert FeatureSpec.from_json(vector.to_json()) == vector
    raw = dict(
        TYPES_ONLY,
        meta_features=[],
        request_features=[{"name": "x", "type": "numeric", "normalize": False}],
    )
    assert FeatureSpec.from_dict(raw).missing_statistics() == []


@pytest.mark.parametrize(
    "feature, message",
    [
        ({"name": "x", "type": "numeric", "transform": "log"}, r"transform` = 'log'"),
        ({"name": "x", "type": "numeric", "clip": -1}, r"clip` = -1"),
        ({"name": "x", "type": "numeric", "shape": [0]}, r"shape` = \[0\]"),
        ({"name": "x", "type": "numeric", "shape": [2], "mean": [1]}, r"mean` = \[1\]"),
        (
            {"name": "x", "type": "numeric", "normalize": False, "mean": 1},
            r"normalize` = False",
        ),
        (
            {"name": "x", "type": "categorical", "hash_buckets": 5, "top_k": 2},
            r"only allowed with `\"vocabulary\": \"auto\"`",
        ),
        (
            {"name": "x", "type": "categorical", "vocabulary": "auto", "min_count": 0},
            r"min_count` = 0",
        ),
        (
            {
                "name": "x",
                "type": "categorical",
                "vocabulary": "auto",
                "allow_oov": False,
            },
            r"allow_oov` = False: an auto vocabulary",
        ),
    ],
)
def test_invalid_statistics_keys_name_the_field(feature, message):
    with pytest.raises(FeatureSpecError, match=message):
        FeatureSpec.from_dict(dict(TYPES_ONLY, request_features=[feature]))


def test_complete_spec_keeps_what_the_user_wrote():
    obj = json.loads(json.dumps(TYPES_ONLY))
    obj["meta_features"][0]["mean"] = 2000.0  # std left to the data
    obj["meta_features"][1]["vocabulary"] = ["fr", "us"]  # a list is never replaced
    spec = FeatureSpec.from_dict(obj)
    stats = statistics.SpecStatistics(spec)
    stats.add_entity(
        {"year": 1990.0, "country": "de"},
        [
            {"item": "i1", "price": 9.0, "tags": ["a", "b"]},
            {"item": "i1", "price": 99.0, "tags": ["b"]},
            {"item": "i2", "price": -9.0, "tags": []},
        ],
    )
    stats.add_entity({"year": 2010.0, "country": "us"}, [])
    done = stats.complete("unit")
    year = done.feature("year")
    assert (year.mean, year.std) == (2000.0, 10.0)
    assert year.statistics == {
        "count": 2,
        "min": 1990.0,
        "max": 2010.0,
        "source": "unit",
    }
    assert done.feature("country").vocabulary == ("fr", "us")
    assert done.feature("item").vocabulary == ("i1",)  # i2 is under min_count 2
    assert done.feature("item").statistics == {
        "values_seen": 3,
        "distinct": 2,
        "kept": 1,
        "kept_count": 2,
        "source": "unit",
    }
    assert done.feature("tags").vocabulary == ("b", "a")
    logged = [np.sign(p) * np.log1p(abs(p)) for p in (9.0, 99.0, -9.0)]
    assert done.feature("price").mean == pytest.approx(np.mean(logged), rel=1e-9)
    assert done.feature("price").std == pytest.approx(np.std(logged), rel=1e-9)
    assert done.missing_statistics() == []
    assert FeatureSpec.from_json(done.to_json()) == done


def test_a_model_on_a_spec_without_statistics_says_how_to_get_them():
    spec = FeatureSpec.from_dict(TYPES_ONLY)
    for build, named in (
        (lambda: LiMAMLModel(spec, MetaConfig(jit_compile=False)), "`year` (mean/std)"),
        (lambda: FeatureEmbedding(spec.request_features), "`item` (auto vocabulary)"),
    ):
        with pytest.raises(FeatureSpecError) as err:
            build()
        assert named in str(err.value)
        assert "spec.json" in str(err.value)
        assert "complete_spec_from_tasks" in str(err.value)


def test_encode_applies_transform_standardizes_per_component_and_clips():
    layer = FeatureEmbedding(
        [
            {
                "name": "p",
                "type": "numeric",
                "transform": "log1p",
                "mean": 1.0,
                "std": 2.0,
                "clip": 1.0,
            },
            {
                "name": "v",
                "type": "numeric",
                "shape": [2],
                "mean": [1.0, -1.0],
                "std": [2.0, 4.0],
            },
            {"name": "r", "type": "numeric", "normalize": False},
        ]
    )
    encoded = layer.encode(
        {
            "p": tf.constant([0.0, np.e - 1.0, 1e9]),
            "v": tf.constant([[3.0, 3.0], [1.0, -1.0], [0.0, 0.0]]),
            "r": tf.constant([5.0, 6.0, 7.0]),
        }
    )
    np.testing.assert_allclose(encoded["p"], [-0.5, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(encoded["v"], [[1.0, 1.0], [0.0, 0.0], [-0.5, 0.25]])
    np.testing.assert_allclose(encoded["r"], [5.0, 6.0, 7.0])
    assert layer.output_dim == 4
    assert layer(encoded).shape == (3, 4)


# --------------------------------------------------------------- the Beam job
def _entities_by_split(n=200):
    split = {
        f"u{k:03d}": task_rules.assign_split(f"u{k:03d}", SEED, VAL, TEST)
        for k in range(n)
    }
    by = collections.defaultdict(list)
    for entity, name in sorted(split.items()):
        by[name].append(entity)
    return by


def _rows():
    """Interactions where some values occur only in val or test entities."""
    by = _entities_by_split()
    rng = np.random.default_rng(1)
    rows = []
    for name, entities in by.items():
        for e, entity in enumerate(entities[:12]):
            year = 1980 + (e * 7) % 40
            for k in range(6):
                item = f"i{(e + k) % 9}"
                tags = "|".join(sorted({f"t{(e * k) % 5}", f"t{k % 3}"}))
                price = float(np.round(rng.lognormal(6.0, 1.0), 3))
                country = ["us", "fr", "de"][(e + k) % 3]
                if name != "train":
                    # Leaks: values no train entity has.
                    item, tags, country = "ONLY_HELD_OUT", "ONLY_HELD_OUT", "zz"
                    price, year = 1e12, 3000
                rows.append(
                    {
                        "user": entity,
                        "ts": 100 + 10 * k,
                        "click": int(k % 2 == e % 2),
                        "item": item,
                        "price": price,
                        "tags": tags,
                        "country": country,
                        "year": year,
                    }
                )
    # A train entity's rows past the cap never reach its task, nor statistics.
    rows.append(
        {
            "user": by["train"][0],
            "ts": 1,
            "click": 1,
            "item": "CAPPED",
            "price": 1e15,
            "tags": "CAPPED",
            "country": "us",
            "year": 1980,
        }
    )
    return rows


def _run_make_tasks(tmp_path, name, flags=()):
    folder = tmp_path / name
    folder.mkdir()
    rows = _rows()
    with open(folder / "in.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "spec.json").write_text(json.dumps(TYPES_ONLY))
    out = folder / "out"
    make_tasks.run(
        [
            "--input",
            str(folder / "in.csv"),
            "--features",
            str(folder / "spec.json"),
            "--output",
            str(out),
            "--split",
            "fraction:0.5",
            "--max-support",
            "2",
            "--seed",
            str(SEED),
            "--val-fraction",
            str(VAL),
            "--test-fraction",
            str(TEST),
            *flags,
        ]
    )
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return _run_make_tasks(tmp_path_factory.mktemp("statistics"), "in_memory")


def _train_values(out):
    """Every value of the train records, as the model reads them."""
    spec = FeatureSpec.from_dict(TYPES_ONLY)
    context_schema, sequence_schema = data.record_schema(spec)
    values = collections.defaultdict(list)
    for path in sorted(glob.glob(str(out / "train-*"))):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            context, seqs = tf.io.parse_single_sequence_example(
                record, context_schema, sequence_schema
            )
            values["year"].append(float(context["year"]))
            values["country"].append(context["country"].numpy().decode())
            for part in ("support", "query"):
                values["price"] += seqs[f"{part}/price"].numpy().tolist()
                values["item"] += [v.decode() for v in seqs[f"{part}/item"].numpy()]
                values["tags"] += [
                    v.decode() for v in seqs[f"{part}/tags"].values.numpy()
                ]
    return values


def test_beam_statistics_equal_numpy_on_the_train_records(job):
    check_statistics_from_train_records(job)


def check_statistics_from_train_records(job):
    """spec.json's statistics are numpy's on the train records, nothing held out."""
    spec = FeatureSpec.load(str(job / "spec.json"))
    assert spec.missing_statistics() == []
    values = _train_values(job)
    year = np.array(values["year"])
    price = np.array(values["price"])
    logged = np.sign(price) * np.log1p(np.abs(price))
    assert (
        len(year) == json.load(open(job / "stats.json"))["splits"]["train"]["entities"]
    )
    for name, x in (("year", year), ("price", logged)):
        feature = spec.feature(name)
        assert feature.mean == pytest.approx(x.mean(), abs=1e-6, rel=1e-9)
        assert feature.std == pytest.approx(x.std(ddof=0), abs=1e-6, rel=1e-9)
        assert feature.statistics["count"] == len(x)
        assert feature.statistics["source"] == "make_tasks"
    assert spec.feature("price").statistics["max"] == pytest.approx(logged.max())
    for name, top_k, min_count in (
        ("country", None, 1),
        ("item", None, 2),
        ("tags", 3, 1),
    ):
        counts = collections.Counter(values[name])
        want = sorted(
            (v for v in counts if counts[v] >= min_count), key=lambda v: (-counts[v], v)
        )[:top_k]
        assert list(spec.feature(name).vocabulary) == want
        assert spec.feature(name).statistics["values_seen"] == sum(counts.values())
    # The guarantee: nothing only val/test entities (or capped rows) hold.
    for name in ("country", "item", "tags"):
        vocabulary = spec.feature(name).vocabulary
        assert not {"ONLY_HELD_OUT", "zz", "CAPPED"} & set(vocabulary), vocabulary
    assert spec.feature("year").statistics["max"] < 3000
    assert spec.feature("price").statistics["max"] < np.log1p(1e12)
    # Held-out values still made tasks (their auto vocabulary has an OOV bucket).
    stats = json.load(open(job / "stats.json"))
    assert stats["splits"]["val"]["entities"] > 0 and stats["rows_rejected"] == 0
    assert set(stats["rejected_by_feature"]) == {f.name for f in spec.features}


def test_spec_json_is_identical_across_direct_runner_modes(job, tmp_path):
    other = _run_make_tasks(
        tmp_path,
        "multi_processing",
        ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    )
    assert (other / "spec.json").read_bytes() == (job / "spec.json").read_bytes()


# ------------------------------------------------------------ scale invariance
def _scaled_rows(scale, offset, entities=24, rows=12):
    rng = np.random.default_rng(5)
    out = []
    for e in range(entities):
        w = rng.normal()
        for k in range(rows):
            x = rng.normal()
            out.append(
                {
                    "user": f"e{e}",
                    "ts": k,
                    "click": int(w * x > 0),
                    "x": x * scale + offset,
                    "g": "ab"[k % 2],
                }
            )
    return out


def _scores(tmp_path, scale, offset):
    spec = FeatureSpec.from_dict(
        {
            "entity": "user",
            "time": "ts",
            "label": "click",
            "request_features": [
                {"name": "x", "type": "numeric"},
                {"name": "g", "type": "categorical", "vocabulary": "auto"},
            ],
        }
    )
    histories, _, _ = task_rules.build_tasks(spec, _scaled_rows(scale, offset))
    analyzer = statistics.SpecStatistics(spec)
    for history in histories:
        analyzer.add_entity(history.meta, history.support + history.query)
    spec = analyzer.complete("test")
    path = str(tmp_path / f"tasks-{scale}.tfrecord.gz")
    data.write_tasks(path, data.tasks_from_histories(spec, histories))
    batches = data.task_dataset(path, spec, batch_tasks=8, max_support=6, max_query=6)
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        spec,
        MetaConfig(jit_compile=False),
        meta_units=[8],
        global_units=[8],
        cross_layers=0,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    history = model.fit(batches, epochs=3, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    return np.concatenate([model.predict_query(b).numpy() for b in batches]), spec


def test_scores_do_not_depend_on_the_scale_of_a_numeric_column(tmp_path):
    plain, plain_spec = _scores(tmp_path, 1.0, 0.0)
    scaled, scaled_spec = _scores(tmp_path, 1e4, 1e6)
    assert scaled_spec.feature("x").mean == pytest.approx(1e6, rel=1e-3)
    assert np.isfinite(scaled).all()
    # float32 holds 1e6 + 1e4 x to ~0.06, i.e. ~6e-6 of a std: scores agree to 1e-4.
    np.testing.assert_allclose(scaled, plain, atol=1e-4)


# ------------------------------------------------------------------ limaml train
def test_limaml_train_computes_missing_statistics(tmp_path, synthetic_tasks, capsys):
    obj = json.loads(open(synthetic_tasks["spec"]).read())
    for feature in obj["meta_features"] + obj["request_features"]:
        for key in ("mean", "std", "statistics"):
            feature.pop(key, None)
        if feature["name"] == "segment":
            feature["vocabulary"] = "auto"
    types_only = tmp_path / "types_only.json"
    types_only.write_text(json.dumps(obj))
    model_dir = tmp_path / "model"
    argv = [
        "train",
        "--tasks",
        synthetic_tasks["train"],
        "--features",
        str(types_only),
        "--model-dir",
        str(model_dir),
        "--epochs",
        "1",
        "--batch-tasks",
        "64",
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "statistics of segment, activity, f0, f1, f2, f3" in err, err
    saved = FeatureSpec.load(str(model_dir / "spec.json"))
    expected = statistics.complete_spec_from_tasks(
        FeatureSpec.from_dict(obj), synthetic_tasks["train"]
    )
    assert saved == expected and saved.missing_statistics() == []
    assert saved.feature("activity").statistics["source"] == "train_tasks"
    assert len(saved.feature("segment").vocabulary) == 8

    # A vocabulary nothing reaches is refused in one line naming the feature.
    obj["meta_features"][0]["min_count"] = 10**9
    types_only.write_text(json.dumps(obj))
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "meta_features[segment].vocabulary" in lines[-1], lines


# ---------------------------------------------------------------- dense vectors
VECTOR_SPEC = {
    "entity": "user",
    "time": "ts",
    "label": "click",
    "tie_break": "item",
    "meta_features": [{"name": "user_vec", "type": "numeric", "shape": [2]}],
    "request_features": [
        {"name": "item", "type": "categorical", "vocabulary": "auto"},
        {"name": "item_vec", "type": "numeric", "shape": [3]},
    ],
}


def _vector_rows():
    rng = np.random.default_rng(7)
    rows = []
    for e in range(40):
        user = rng.normal(size=2) * [10.0, 0.1] + [100.0, -5.0]
        for k in range(8):
            item = rng.normal(size=3) * [1.0, 50.0, 1e-2] + [0.0, 1e3, 0.0]
            rows.append(
                {
                    "user": f"u{e:02d}",
                    "ts": k,
                    "click": int(item[0] + user[0] / 100.0 > 1.0),
                    "item": f"i{k % 5}",
                    "item_vec": "|".join(f"{v:.6g}" for v in item),
                    "user_vec": "|".join(f"{v:.6g}" for v in user),
                }
            )
    rows.append(dict(rows[0], ts=99, item_vec="1|2"))  # wrong length
    return rows


def test_a_vector_feature_goes_from_csv_to_every_signature(tmp_path):
    from serving_fixture import SessionSignatures, entity_inputs

    from tf_limaml.export import export_model
    from tf_limaml.features import QUERY, SUPPORT

    rows = _vector_rows()
    with open(tmp_path / "in.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "spec.json").write_text(json.dumps(VECTOR_SPEC))
    out = tmp_path / "out"
    make_tasks.run(
        [
            "--input",
            str(tmp_path / "in.csv"),
            "--features",
            str(tmp_path / "spec.json"),
            "--output",
            str(out),
            "--split",
            "fraction:0.5",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
        ]
    )
    stats = json.load(open(out / "stats.json"))
    assert stats["rejected_by_reason"]["bad_numeric"] == 1
    assert stats["rejected_by_feature"]["item_vec"] == 1
    spec = FeatureSpec.load(str(out / "spec.json"))
    assert (
        len(spec.feature("item_vec").mean) == 3
        and len(spec.feature("user_vec").std) == 2
    )
    assert spec.feature("item_vec").mean[1] == pytest.approx(1e3, rel=0.05)

    train = str(out / "train-*")
    batches = data.task_dataset(train, spec, batch_tasks=8, max_support=4, max_query=4)
    batch = next(iter(batches))
    assert batch["support_item_vec"].shape[1:] == (4, 3)
    assert batch["user_vec"].shape[1:] == (2,)
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        spec,
        MetaConfig(jit_compile=False, inner_lr=0.5),
        meta_units=[8],
        global_units=[8],
        cross_layers=0,
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    history = model.fit(batches, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))

    export_dir = export_model(model, str(tmp_path / "export"), max_support=4)
    session = SessionSignatures(export_dir)
    try:
        dims = {
            name: [d.size for d in sig.inputs[key].tensor_shape.dim]
            for name, sig, key in (
                ("serving", session.signatures["serving_default"], "item_vec"),
                ("adapt", session.signatures["adapt_and_predict"], "support_item_vec"),
                ("meta", session.signatures["adapt_and_predict"], "user_vec"),
                ("embed", session.signatures["meta_embedding"], "support_item_vec"),
            )
        }
        assert dims == {
            "serving": [-1, 3],
            "adapt": [-1, 3],
            "meta": [2],
            "embed": [-1, -1, 3],
        }
        b = {k: v.numpy() for k, v in batch.items()}
        embeddings = model.meta_embedding(batch).numpy()
        inputs = {f.name: b[f.name] for f in spec.meta_features}
        for key in ["support_label", "support_mask"] + [
            f"support_{f.name}" for f in spec.request_features
        ]:
            inputs[key] = b[key]
        got = session.run("meta_embedding", inputs)["meta_embedding"]
        np.testing.assert_allclose(got, embeddings, atol=1e-5)

        meta, support, labels, query = entity_inputs(b, spec, 0)
        adapt = dict(meta, support_label=labels.astype(np.float32))
        adapt.update({f"{SUPPORT}_{k}": v for k, v in support.items()})
        adapt.update({f"{QUERY}_{k}": v for k, v in query.items()})
        out_adapt = session.run("adapt_and_predict", adapt)
        n_query = len(out_adapt["score"])
        np.testing.assert_allclose(
            out_adapt["score"],
            model.predict_query(batch).numpy()[0, :n_query],
            atol=1e-5,
        )

        request = {k: np.asarray(v) for k, v in query.items()}
        embedding = np.repeat(embeddings[:1], n_query, axis=0).astype(np.float32)
        served = session.run(
            "serving_default", {"meta_embedding": embedding, **request}
        )
        expected = model.score(tf.constant(embedding), request).numpy()
        np.testing.assert_allclose(served["score"], expected, atol=1e-5)

        examples = []
        for i in range(n_query):
            feature = {
                "meta_embedding": tf.train.Feature(
                    float_list=tf.train.FloatList(value=embedding[i].tolist())
                ),
                "item": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[request["item"][i]])
                ),
                "item_vec": tf.train.Feature(
                    float_list=tf.train.FloatList(value=request["item_vec"][i].tolist())
                ),
            }
            examples.append(
                tf.train.Example(
                    features=tf.train.Features(feature=feature)
                ).SerializeToString()
            )
        by_example = session.run(
            "predict_examples", {"examples": np.array(examples, dtype=object)}
        )["score"]
        np.testing.assert_allclose(by_example, expected, atol=1e-5)
    finally:
        session.close()


def test_the_client_types_vector_inputs_even_without_rows():
    from serving.client import typed_inputs

    spec = FeatureSpec.from_dict(
        dict(
            VECTOR_SPEC,
            meta_features=[
                {
                    "name": "user_vec",
                    "type": "numeric",
                    "shape": [2],
                    "mean": 0,
                    "std": 1,
                }
            ],
        )
    )
    typed = typed_inputs(
        {"support_item_vec": [], "query_item_vec": [[1, 2, 3]], "user_vec": [1, 2]},
        spec,
    )
    assert typed["support_item_vec"].shape == (0, 3)
    assert typed["query_item_vec"].dtype == np.float32
    assert typed["query_item_vec"].shape == (1, 3)
    assert typed["user_vec"].shape == (2,)


# ------------------------------------------------- bounded vocabulary selection


# ------------------------------------------------- moments that would overflow
OVERFLOW_SPEC = FeatureSpec.from_dict(
    {
        "entity": "user",
        "time": "ts",
        "label": "click",
        "request_features": [{"name": "x", "type": "numeric"}],
    }
)


def check_overflowing_moments_are_refused() -> None:
    """Moments whose M2 overflows float64 refuse the feature with the reason."""
    moments = Moments.of([[1e200], [-1e200]])
    with pytest.raises(FeatureSpecError, match="`x`: its training statistics overflow"):
        statistics.complete_spec(OVERFLOW_SPEC, {"x": moments}, {}, "test")
    # make-tasks' analyzer hands the reason to its one-line stop.
    written = json.loads(
        analyze.completed_json(OVERFLOW_SPEC, {"x": moments}, {}, "make_tasks")
    )
    assert "overflow float64" in written.get(analyze.ERROR_KEY, ""), written


def test_moments_that_would_overflow_are_refused_with_the_reason():
    check_overflowing_moments_are_refused()


def test_values_validation_keeps_cannot_overflow_the_moments():
    """|x| <= 3e38 (what validate_row keeps): M2 stays finite, merged or not."""
    row = {"user": "u", "ts": 1, "click": 1}
    assert task_rules.validate_row(OVERFLOW_SPEC, dict(row, x="3e38"))["x"] == 3e38
    for huge in ("1e200", "-3.1e38"):
        with pytest.raises(task_rules.RowError, match="beyond") as err:
            task_rules.validate_row(OVERFLOW_SPEC, dict(row, x=huge))
        assert err.value.reason == task_rules.REASON_BAD_NUMERIC
    edge = [[3e38], [-3e38]] * 5_000
    merged = Moments()
    for k in range(0, len(edge), 1_000):
        merged.merge(Moments.of(edge[k : k + 1_000]))
    for moments in (Moments.of(edge), merged):
        assert statistics.overflowed_components(moments) == []
        done = statistics.complete_spec(OVERFLOW_SPEC, {"x": moments}, {}, "test")
        assert done.feature("x").std == pytest.approx(3e38, rel=1e-9)
        assert abs(done.feature("x").mean) < 1e30


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    counts=st.dictionaries(
        st.text("abcxyz", min_size=1, max_size=3), st.integers(1, 4), max_size=40
    ),
    top_k=st.one_of(st.none(), st.integers(0, 6)),
    min_count=st.integers(1, 3),
    cuts=st.lists(st.integers(0, 40), max_size=4),
)
def test_bounded_vocabulary_combiner_selects_what_select_vocabulary_does(
    counts, top_k, min_count, cuts
):
    """Any split into accumulators, merged: the same counts as the old selection.

    Counts are small so that ties are the rule; values are short strings of a
    few letters, so ties are broken between prefixes and their extensions.
    """
    fn = analyze.VocabularyCombineFn({"f": (top_k, min_count)})
    elements = [("f", value, n) for value, n in counts.items()]
    bounds = [0, *sorted(min(c, len(elements)) for c in cuts), len(elements)]
    accumulators = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        accumulator = fn.create_accumulator()
        for element in elements[lo:hi]:
            accumulator = fn.add_input(accumulator, element)
            if top_k is not None:
                assert len(accumulator[3]) <= 2 * top_k + 2
        accumulators.append(fn.compact(accumulator))
    merged = fn.merge_accumulators(
        [fn.merge_accumulators(accumulators[:1]), *accumulators[1:]]
    )
    got = fn.extract_output(merged)
    want = statistics.VocabularyCounts.of(counts, top_k, min_count)
    assert got == want
    assert list(got.kept) == select_vocabulary(counts, top_k, min_count)


def test_bounded_and_grouped_vocabulary_give_the_same_spec(tmp_path):
    """AnalyzeFeatures on a synthetic PCollection: bounded == GroupByKey, ties too."""
    spec = FeatureSpec.from_dict(
        {
            **TYPES_ONLY,
            "request_features": [
                {
                    "name": "item",
                    "type": "categorical",
                    "vocabulary": "auto",
                    "top_k": 7,
                    "min_count": 2,
                },
                {"name": "tags", "type": "multi_hot", "vocabulary": "auto", "top_k": 3},
            ],
        }
    )
    rng = np.random.default_rng(0)
    inputs = [(analyze.VALUE, "country", f"c{i % 5}") for i in range(23)]
    # Many values share each count: the cut at top_k falls inside a tie.
    inputs += [
        (analyze.VALUE, "item", f"i{v}") for v in rng.integers(0, 200, 900).tolist()
    ]
    inputs += [(analyze.VALUE, "tags", t) for t in ["b", "a", "c", "d", "a", "b"]]

    def spec_json(bounded):
        path = str(tmp_path / f"spec-{bounded}.json")
        with beam.Pipeline("DirectRunner") as pipeline:
            (
                pipeline
                | beam.Create(inputs)
                | analyze.AnalyzeFeatures(spec, bounded=bounded)
                | beam.io.WriteToText(path, shard_name_template="")
            )
        with open(path) as f:
            return f.read()

    bounded = spec_json(True)
    assert bounded == spec_json(False)
    done = FeatureSpec.from_json(bounded)
    assert list(done.feature("tags").vocabulary) == ["a", "b", "c"]
    assert len(done.feature("item").vocabulary) == 7
