"""MovieLens-100K loader: both layouts, item 267, the spec, and the real copy."""

import importlib.util
import os

import pytest

from tf_limaml.datasets import movielens
from tf_limaml.features import FeatureSpec

GENRE_FLAGS_TOY_STORY = (
    "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation, Children's, Comedy
)
GENRE_FLAGS_UNKNOWN = "1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0"


def _write(path, name, text, encoding="utf-8"):
    with open(os.path.join(path, name), "w", encoding=encoding, newline="") as f:
        f.write(text)


@pytest.fixture
def grouplens_dir(tmp_path):
    """Three users, two movies (one is item 267), four ratings; GroupLens layout."""
    _write(
        tmp_path,
        "u.data",
        "1\t1\t5\t881250949\n2\t267\t3\t881250950\n"
        "2\t1\t4\t881250950\n3\t1\t1\t881250000\n",
    )
    _write(
        tmp_path,
        "u.user",
        "1|24|M|technician|85711\n2|53|F|other|94043\n" "3|17|M|student|T8H1N\n",
    )
    _write(
        tmp_path,
        "u.item",
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{GENRE_FLAGS_TOY_STORY}\n"
        f"267|unknown||||{GENRE_FLAGS_UNKNOWN}\n",
        encoding="latin-1",
    )
    return tmp_path


@pytest.fixture
def recbole_dir(tmp_path):
    """The same content in recbole's atomic-file layout (with its `unkonwn`)."""
    _write(
        tmp_path,
        "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t1\t5\t881250949\n2\t267\t3\t881250950\n2\t1\t4\t881250950\n"
        "3\t1\t1\t881250000\n",
    )
    _write(
        tmp_path,
        "ml-100k.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t17\tM\tstudent\tT8H1N\n",
    )
    _write(
        tmp_path,
        "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "267\tunkonwn\tunkonwn\tunknown\n",
    )
    return tmp_path


def test_grouplens_rows_are_joined(grouplens_dir):
    rows = movielens.load_interactions(grouplens_dir)
    assert len(rows) == 4
    first = rows[0]
    assert first == {
        "user_id": "1",
        "item_id": "1",
        "timestamp": 881250949,
        "rating": 5.0,
        "age_bucket": "18-24",
        "gender": "M",
        "occupation": "technician",
        "zip_prefix": "8",
        "genres": "Animation|Children's|Comedy",
        "release_year": 1995.0,
    }
    # Item 267 has no title and no date: no year, genre "unknown".
    assert rows[1]["item_id"] == "267"
    assert rows[1]["release_year"] is None
    assert rows[1]["genres"] == "unknown"
    # Age 17 is under 18; a Canadian postcode keeps its letter.
    assert rows[3]["age_bucket"] == "under_18"
    assert rows[3]["zip_prefix"] == "T"


def test_both_layouts_give_the_same_rows(grouplens_dir, recbole_dir):
    assert movielens.load_interactions(recbole_dir) == movielens.load_interactions(
        grouplens_dir
    )


def test_layout_detection_errors_name_the_files(tmp_path):
    with pytest.raises(movielens.MovieLensError, match="u.data, u.user, u.item"):
        movielens.load_interactions(tmp_path)


def test_malformed_user_line_names_file_and_line(grouplens_dir):
    _write(grouplens_dir, "u.user", "1|24|M|technician|85711\n2|fifty|F|other|94043\n")
    with pytest.raises(movielens.MovieLensError, match=r"u.user line 2: age 'fifty'"):
        movielens.load_interactions(grouplens_dir)


@pytest.mark.parametrize(
    "age,bucket",
    [
        (0, "under_18"),
        (17, "under_18"),
        (18, "18-24"),
        (24, "18-24"),
        (25, "25-34"),
        (49, "45-49"),
        (55, "50-55"),
        (56, "56+"),
        (73, "56+"),
    ],
)
def test_age_buckets(age, bucket):
    assert movielens.age_bucket(age) == bucket


def test_release_year_sources():
    assert movielens.release_year("1995") == 1995.0
    assert movielens.release_year("", date="01-Jan-1995") == 1995.0
    # recbole's item 1412: "V" as the year, the year left in the title.
    assert movielens.release_year("V", title="Land Before Time III (1995)") == 1995.0
    assert movielens.release_year("unkonwn", title="unkonwn") is None


def test_spec_labels_and_validates_rows(grouplens_dir):
    from tf_limaml import tasks

    rows, spec = movielens.load(grouplens_dir)
    assert spec.entity == "user_id" and spec.time == "timestamp"
    assert spec.tie_break == "item_id"
    assert [f.name for f in spec.meta_features] == [
        "age_bucket",
        "gender",
        "occupation",
        "zip_prefix",
    ]
    assert [f.name for f in spec.request_features] == [
        "item_id",
        "genres",
        "release_year",
    ]
    assert spec.feature("item_id").hash_buckets == movielens.DEFAULT_ITEM_BUCKETS
    # Rating >= 4 is positive.
    labels = [tasks.validate_row(spec, r)["label"] for r in rows]
    assert labels == [1, 0, 1, 0]
    # Item 267's missing year becomes the spec's default (the mean year).
    clean = tasks.validate_row(spec, rows[1])
    assert clean["release_year"] == spec.feature("release_year").default == 1995.0
    # The spec survives a JSON round trip.
    assert FeatureSpec.from_json(spec.to_json()) == spec


def test_release_year_stats_count_each_movie_once():
    rows = [
        {"item_id": "1", "release_year": 1990.0},
        {"item_id": "1", "release_year": 1990.0},
        {"item_id": "2", "release_year": 2000.0},
        {"item_id": "3", "release_year": None},
    ]
    assert movielens.release_year_stats(rows) == (1995.0, 5.0)


def test_ties_split_by_item_id(grouplens_dir):
    """User 2 rated items 267 and 1 in the same second: item 1 sorts first."""
    from tf_limaml import tasks

    rows, spec = movielens.load(grouplens_dir)
    histories, rejected, _ = tasks.build_tasks(spec, rows, "fraction:0.5")
    assert not rejected
    user2 = next(h for h in histories if h.entity_id == "2")
    assert [r["item_id"] for r in user2.support] == ["1"]
    assert [r["item_id"] for r in user2.query] == ["267"]


def test_write_csv_round_trips_through_validation(grouplens_dir, tmp_path):
    import csv

    from tf_limaml import tasks

    rows, spec = movielens.load(grouplens_dir)
    path = tmp_path / "interactions.csv"
    assert movielens.write_csv(rows, path) == 4
    with open(path, encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert read[1]["release_year"] == ""
    assert [tasks.validate_row(spec, r) for r in read] == [
        tasks.validate_row(spec, r) for r in rows
    ]


def test_as_frame(grouplens_dir):
    frame, _ = movielens.load(grouplens_dir, as_frame=True)
    assert list(frame.columns) == list(movielens.COLUMNS)
    assert len(frame) == 4


@pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None,
    reason="the recbole wheel (embedded copy) is not installed",
)
def test_embedded_copy_is_ml100k():
    from tf_limaml import tasks

    rows, spec = movielens.load()
    assert len(rows) == 100_000
    assert len({r["user_id"] for r in rows}) == 943
    assert len({r["item_id"] for r in rows}) == 1682
    assert [r for r in rows if r["item_id"] == "267"][0]["release_year"] is None
    histories, rejected, counts = tasks.build_tasks(spec, rows[:3000], "fraction:0.5")
    assert not rejected
    assert counts["rows_in_tasks"] + counts["rows_cold"] == 3000
    import sys

    # Found through importlib, never imported (importing recbole pulls in torch).
    assert "recbole" not in sys.modules and "torch" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None,
    reason="the recbole wheel (embedded copy) is not installed",
)
def test_demo_end_to_end_fast(tmp_path, monkeypatch, capsys):
    """`limaml demo --fast --seeds 1 --epochs 2 --strategy mirrored`: Beam
    tasks, every model (the two beyond the paper included), offline path, report.

    Every `fit` runs under the strategy, and the offline path still loads and
    serves its SavedModel outside it. One run covers both, to keep CI short.
    """
    import json

    import tensorflow as tf

    from tf_limaml import cli

    strategies = []
    original = tf.keras.Model.fit

    def spy(self, *args, **kwargs):
        strategies.append(type(self.distribute_strategy).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tf.keras.Model, "fit", spy)
    argv = ["demo", "--fast", "--seeds", "1", "--epochs", "2", "--strategy", "mirrored"]
    assert cli.main([*argv, "--workdir", str(tmp_path)]) == 0
    assert strategies and set(strategies) == {"MirroredStrategy"}, strategies
    with open(tmp_path / "report.json", encoding="utf-8") as f:
        result = json.load(f)
    assert list(result["models"]) == [
        "global",
        "id_embedding",
        "finetune",
        "maml",
        "limaml",
        "limaml_offline",
        "limaml_sequence",
        "limaml_multi_entity",
    ]
    for entry in result["models"].values():
        assert set(entry["support_k"]) == {"1", "3", "5", "10", "all"}
        assert 0.5 < entry["overall_auc"] < 1.0
    offline = next(t for t in result["targets"] if t["target"].startswith("Offline"))
    assert offline["met"] is True
    assert (tmp_path / "lift.png").exists() and (tmp_path / "report.md").exists()
    assert "| limaml_offline |" in capsys.readouterr().out


def test_demo_input_needs_features(tmp_path):
    import argparse

    from tf_limaml.experiments import movielens_demo

    args = argparse.Namespace(
        dataset=None,
        input=str(tmp_path / "x.csv"),
        format="csv",
        features=None,
        workdir=str(tmp_path),
        seeds=1,
        epochs=None,
        fast=True,
    )
    with pytest.raises(ValueError, match="--input needs --features"):
        movielens_demo.run(args, progress=None)
