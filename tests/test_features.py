"""FeatureSpec: JSON round trip, validation errors, the derived task schema."""

import json

import pytest
import tensorflow as tf

from tf_limaml import data
from tf_limaml.features import FeatureSpec, FeatureSpecError

EXAMPLE = {
    "entity": "member_id",
    "time": "timestamp",
    "label": {"column": "rating", "threshold": 4},
    "meta_features": [
        {"name": "age", "type": "numeric"},
        {
            "name": "occupation",
            "type": "categorical",
            "vocabulary": ["artist", "doctor"],
        },
        {"name": "zip", "type": "categorical", "hash_buckets": 1000, "dim": 8},
    ],
    "request_features": [
        {"name": "item_id", "type": "categorical", "hash_buckets": 10000, "dim": 16},
        {
            "name": "genres",
            "type": "multi_hot",
            "vocabulary": ["Action", "Drama"],
            "separator": "|",
        },
        {"name": "year", "type": "numeric"},
    ],
}


def test_example_spec_round_trips_through_json(tmp_path):
    spec = FeatureSpec.from_dict(EXAMPLE)
    assert spec.label.threshold == 4
    assert [f.name for f in spec.meta_features] == ["age", "occupation", "zip"]
    assert spec.feature("genres").values_per_row == 2
    assert spec.feature("occupation").num_ids == 3  # two words + the OOV id
    path = tmp_path / "spec.json"
    spec.save(path)
    again = FeatureSpec.load(path)
    assert again == spec
    assert json.loads(again.to_json()) == spec.to_dict()


def test_plain_label_column_and_empty_meta_features():
    spec = FeatureSpec.from_dict(
        {
            "entity": "e",
            "time": "t",
            "label": "clicked",
            "request_features": [{"name": "x", "type": "numeric"}],
        }
    )
    assert spec.label.column == "clicked" and spec.label.threshold is None
    assert spec.meta_features == ()
    assert spec.label.binarize("1") == 1
    with pytest.raises(ValueError, match="not 0 or 1"):
        spec.label.binarize(3)
    assert FeatureSpec.from_dict(EXAMPLE).label.binarize(4.0) == 1
    assert FeatureSpec.from_dict(EXAMPLE).label.binarize("3") == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("entity"), r"`entity` = None: is required"),
        (lambda s: s.update(time=3), r"`time` = 3"),
        (lambda s: s["meta_features"][0].update(type="float"), r"type` = 'float'"),
        (
            lambda s: s["meta_features"][1].update(hash_buckets=5),
            r"exactly one of `vocabulary` or `hash_buckets`",
        ),
        (lambda s: s["meta_features"][2].update(hash_buckets=0), r"hash_buckets` = 0"),
        (
            lambda s: s["meta_features"][1].update(vocabulary=["a", "a"]),
            r"appears more than once",
        ),
        (
            lambda s: s["request_features"].append({"name": "age", "type": "numeric"}),
            r"`request_features\[age\]` = 'age': is already used",
        ),
        (lambda s: s.update(colour="red"), r"`<spec>.colour` = 'red': unknown key"),
        (
            lambda s: s["meta_features"][0].update(dim=4),
            r"dim` = 4: not allowed on a numeric",
        ),
        (lambda s: s["request_features"][1].update(separator=""), r"separator` = ''"),
        (
            lambda s: s.update(label={"column": "rating", "threshold": "high"}),
            r"`label.threshold` = 'high'",
        ),
        (lambda s: s.update(request_features=[]), r"needs at least one feature"),
        (lambda s: s["meta_features"][0].update(name="label"), r"is reserved"),
        (lambda s: s["meta_features"][0].update(name="../etc"), r"name` = '../etc'"),
    ],
)
def test_invalid_specs_name_the_field_and_value(change, message):
    spec = json.loads(json.dumps(EXAMPLE))
    change(spec)
    with pytest.raises(FeatureSpecError, match=message):
        FeatureSpec.from_dict(spec)


def test_malformed_json_is_a_spec_error():
    with pytest.raises(FeatureSpecError, match="not valid JSON"):
        FeatureSpec.from_json("{'entity': 1")


def test_schema_is_derived_from_the_spec():
    context, sequence = data.record_schema(FeatureSpec.from_dict(EXAMPLE))
    assert set(context) == {"entity_id", "age", "occupation", "zip"}
    assert isinstance(context["age"], tf.io.FixedLenFeature)
    assert context["age"].dtype == tf.float32
    assert context["zip"].dtype == tf.string
    assert set(sequence) == {
        f"{p}/{n}"
        for p in ("support", "query")
        for n in ("label", "time", "item_id", "genres", "year")
    }
    assert isinstance(sequence["support/genres"], tf.io.VarLenFeature)
    assert sequence["query/time"].dtype == tf.int64
