"""Runs in several passes (`--passes`): the same files as one pass, from 1/N of the data each.

A pass keeps the records of its share of the output shards, writes exactly
those shards and leaves a partial file; the merge after the last pass writes
stats.json/spec.json (make-tasks) or summary.json (embed).
"""

import base64
import glob
import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from guarantees import file_bytes

from beam_pipelines import generate_embeddings, make_tasks, passes, task_files
from beam_pipelines.shards import shard_of
from tf_limaml import cli, data
from tf_limaml import tasks as task_rules
from tf_limaml.datasets import synthetic
from tf_limaml.features import FeatureSpec

ITEM_TOP_K = 5


def _types_only_spec() -> FeatureSpec:
    """The synthetic spec with every statistic left to the data."""
    obj = synthetic.synthetic_spec().to_dict()
    for feature in obj["meta_features"] + obj["request_features"]:
        for key in ("mean", "std", "statistics"):
            feature.pop(key, None)
        if feature["name"] in ("segment", "topics"):
            feature["vocabulary"] = "auto"
        if feature["name"] == "item_id":  # selected in bounded memory
            feature.update(vocabulary="auto", top_k=ITEM_TOP_K)
            del feature["hash_buckets"]
    spec = FeatureSpec.from_dict(obj)
    assert set(spec.missing_statistics()) >= {"segment", "activity", "topics", "f0"}
    return spec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("passes_in"))


def write_inputs(directory):
    """Interactions with bad rows, an entity table with a bad row, a types-only spec."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = synthetic.generate_interactions(num_entities=150, seed=6)
    rows += [
        dict(rows[0], clicked="maybe"),
        dict(rows[1], timestamp="yesterday"),
        dict(rows[2], member_id=""),
        dict(rows[3], member_id="lonely"),  # one row: cold
    ]
    synthetic.write_csv(rows, directory / "interactions.csv")
    members = sorted({row["member_id"] for row in rows if row["member_id"]})
    table = [
        {"member_id": m, "segment": "seg_1", "activity": 10.0 + i}
        for i, m in enumerate(members[::3])
    ]
    table += [
        {"member_id": members[1], "segment": "seg_2", "activity": "lots"},  # rejected
        {"member_id": "nobody", "segment": "seg_0", "activity": 1.0},  # no rows
    ]
    synthetic.write_csv(table, directory / "members.csv")
    _types_only_spec().save(str(directory / "spec.json"))
    return directory


def _make_tasks(inputs, output, *extra):
    make_tasks.run(
        [
            "--input",
            str(inputs / "interactions.csv"),
            "--entities",
            str(inputs / "members.csv"),
            "--features",
            str(inputs / "spec.json"),
            "--output",
            str(output),
            "--max-support",
            "6",
            "--num-shards",
            "4",
            *extra,
        ]
    )
    return file_bytes(str(output))


def test_make_tasks_in_passes_writes_the_files_of_one_pass(
    inputs, tmp_path, monkeypatch
):
    seen = []

    def spying(output_dir, count):
        partials = read_partials(output_dir, count)
        seen.extend(partials)
        return partials

    read_partials = task_files.read_partials
    monkeypatch.setattr(task_files, "read_partials", spying)
    validated = []
    validate_row = task_rules.validate_row

    def counting(spec, row):
        validated.append(row)
        return validate_row(spec, row)

    monkeypatch.setattr(task_rules, "validate_row", counting)
    one = _make_tasks(inputs, tmp_path / "one")
    validated_in_one_pass = len(validated)
    candidates = spy_on_vocabulary_candidates(monkeypatch)
    three = _make_tasks(inputs, tmp_path / "three", "--passes", "3")
    check_passes_select_vocabularies_in_bounded_memory(
        three["spec.json"], candidates, seen
    )
    # A pass drops other passes' rows before validating them: only the row
    # without an entity id is validated by every pass.
    assert len(validated) - validated_in_one_pass == validated_in_one_pass + 2

    assert sorted(one) == sorted(three)
    for name in one:
        assert one[name] == three[name], f"{name} differs between 1 and 3 passes"
    assert not any(name.startswith(passes.PARTIAL_PREFIX) for name in three)
    # What the comparison covers: statistics computed from the data, every
    # kind of dead letter, the entity table, several non-empty shards.
    stats = json.loads(one["stats.json"])
    assert stats["conservation"]["holds"] and stats["rows_rejected"] == 3
    assert stats["entity_table"]["rows_rejected"] == 1
    assert stats["entity_table"]["entities_used"] > 10
    assert stats["entity_table"]["entities_without_interactions"] == 1
    assert FeatureSpec.from_json(one["spec.json"].decode()).missing_statistics() == []
    assert sum(bool(one[f"train-0000{i}-of-00004.tfrecord.gz"][30:]) for i in range(4))
    assert (
        sum(len(one[f"rejected-0000{i}-of-00004.jsonl"].splitlines()) for i in range(4))
        == 4
    )

    # A rejected row with an entity id is in its entity's shard.
    (member,) = {
        json.loads(line)["row"]["member_id"]
        for i in range(4)
        for line in one[f"rejected-0000{i}-of-00004.jsonl"].splitlines()
        if json.loads(line)["reason"] == "bad_label"
    }
    shard = shard_of(member, 4)
    assert b"bad_label" in one[f"rejected-0000{shard}-of-00004.jsonl"]

    # Each pass read only its share: its partial counts part of the rows.
    assert len(seen) == 3
    read = [dict((tuple(k), n) for k, n in p["counts"])[("rows_read",)] for p in seen]
    assert sum(read) == stats["rows_read"] and max(read) < stats["rows_read"]


def spy_on_vocabulary_candidates(monkeypatch) -> list[int]:
    """The candidates a `VocabularyCombineFn` accumulator holds after each input."""
    from beam_pipelines import analyze

    sizes: list[int] = []
    add_input = analyze.VocabularyCombineFn.add_input

    def recording(self, accumulator, element):
        accumulator = add_input(self, accumulator, element)
        sizes.append(len(accumulator[3]))
        return accumulator

    monkeypatch.setattr(analyze.VocabularyCombineFn, "add_input", recording)
    return sizes


def check_passes_select_vocabularies_in_bounded_memory(
    spec_json: bytes, candidates: list[int], partials: list[dict]
) -> None:
    """A --passes run's item_id vocabulary (top_k) came from a bounded selection.

    No pass's partial holds values, and the driver's selection
    (`value_counts.merge_value_counts`) never held more than 2 * top_k + 2
    candidates of item_id, whose distinct values are more than that.
    """
    spec = FeatureSpec.from_json(spec_json.decode())
    item = spec.feature("item_id")
    assert len(item.vocabulary) == ITEM_TOP_K
    assert item.statistics["distinct"] > 4 * (2 * ITEM_TOP_K + 2), item.statistics
    for partial in partials:
        assert set(partial["analysis"]) == {"moments"}, sorted(partial["analysis"])
    assert candidates, "no bounded selection ran in this process"
    assert max(candidates) <= 2 * ITEM_TOP_K + 2, f"{max(candidates)} candidates held"


def test_a_pass_that_keeps_another_pass_s_records_fails(inputs, tmp_path, monkeypatch):
    # The writer refuses a record of a shard it does not own: half a shard
    # would overwrite the file another pass wrote whole.
    monkeypatch.setattr(passes.Partition, "keeps", lambda self, key: True)
    with pytest.raises(Exception, match="does not write"):
        _make_tasks(inputs, tmp_path / "out", "--passes", "2")


def test_partition_owns_each_shard_once():
    parts = [passes.Partition(i, 3, 7) for i in range(3)]
    for shard in range(7):
        assert [p.owns(shard) for p in parts].count(True) == 1
    for key in ("a", "member-17", "ü"):
        assert [p.keeps(key) for p in parts].count(True) == 1
        assert parts[shard_of(key, 7) % 3].keeps(key)
    assert passes.check_passes(1, 0) == 0
    assert passes.check_passes(3, 0) == 3
    assert passes.check_passes(3, 8) == 8
    with pytest.raises(ValueError, match="--passes \\(4\\) must be between 1 and"):
        passes.check_passes(4, 3)


def test_cli_refuses_zero_passes_and_more_passes_than_shards(inputs, tmp_path, capsys):
    argv = [
        "make-tasks",
        "--input",
        str(inputs / "interactions.csv"),
        "--features",
        str(inputs / "spec.json"),
        "--output",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as raised:
        cli.main([*argv, "--passes", "0"])
    assert raised.value.code == 2
    assert cli.main([*argv, "--passes", "5", "--num-shards", "2"]) == 2
    assert (
        "--passes (5) must be between 1 and --num-shards (2)" in capsys.readouterr().err
    )


def _records(pattern):
    return [
        r.numpy() for r in tf.data.TFRecordDataset(sorted(glob.glob(pattern)), "GZIP")
    ]


def _examples(path):
    found = []
    for record in _records(str(path)):
        feature = tf.train.Example.FromString(record).features.feature
        found.append(
            (
                feature["entity_id"].bytes_list.value[0],
                list(feature["embedding"].float_list.value),
            )
        )
    return found


def test_embed_in_passes_writes_the_files_of_one_pass(exported, tmp_path, monkeypatch):
    # One time stamp for both runs: it is in every embedding row.
    monkeypatch.setattr(
        generate_embeddings, "time", types.SimpleNamespace(time=lambda: 1.7e9)
    )
    seen = []
    read_partials = generate_embeddings.read_partials

    def spying(output_dir, count):
        seen.extend(read_partials(output_dir, count))
        return seen[-count:]

    monkeypatch.setattr(generate_embeddings, "read_partials", spying)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    good = _records(exported["tasks"]["test"])[:40]
    data.write_tasks(str(tasks_dir / "a.tfrecord.gz"), good)
    bad = [b"\x08 not a task record", b"\x00 nor this"]
    data.write_tasks(str(tasks_dir / "b.tfrecord.gz"), bad)

    def embed(name, *extra):
        output = tmp_path / name
        generate_embeddings.run(
            [
                "--export",
                exported["export_dir"],
                "--tasks",
                str(tasks_dir / "*.tfrecord.gz"),
                "--output",
                str(output),
                "--parquet",
                "--num-shards",
                "3",
                "--batch-size",
                "8",
                "--max-rejected-fraction",
                "0.5",
                *extra,
            ]
        )
        files = {
            os.path.relpath(path, output): open(path, "rb").read()
            for path in glob.glob(str(output / "**" / "*"), recursive=True)
            if os.path.isfile(path)
        }
        return files, json.loads(files.pop("summary.json"))

    one, one_summary = embed("one")
    three, three_summary = embed("three", "--passes", "3")
    assert sorted(one) == sorted(three)
    for name in one:
        if not name.endswith(".jsonl"):
            continue
        assert one[name] == three[name], f"{name} differs between 1 and 3 passes"
    for i in range(3):
        a = _examples(tmp_path / "one" / f"embeddings-0000{i}-of-00003.tfrecord.gz")
        b = _examples(tmp_path / "three" / f"embeddings-0000{i}-of-00003.tfrecord.gz")
        assert [x[0] for x in a] == [x[0] for x in b]
        np.testing.assert_allclose([x[1] for x in a], [x[1] for x in b], atol=1e-6)
    # Equal counts (three passes call the signature in more batches), from
    # partials that are gone.
    for summary in (one_summary, three_summary):
        summary.pop("generated_at"), summary.pop("generated_at_utc")
    assert three_summary.pop("batches") >= one_summary.pop("batches")
    assert one_summary == three_summary
    assert three_summary["entities_out"] == len(good)
    # What the writer wrote, read back in each pass and added up.
    assert three_summary["embeddings_written"] == len(good)
    assert three_summary["rejected_written"] == len(bad)
    assert three_summary["records_rejected"] == len(bad) and three_summary["balanced"]
    assert not glob.glob(str(tmp_path / "three" / f"{passes.PARTIAL_PREFIX}*"))
    # Each pass embedded only its share of the records.
    entities_in = [partial["entities_in"] for partial in seen]
    assert len(seen) == 3 and sum(entities_in) == len(good) + len(bad)
    assert max(entities_in) < len(good)
    assert sum(
        len(one[f"rejected-0000{i}-of-00003.jsonl"].splitlines()) for i in range(3)
    ) == len(bad)
    # A rejected record is sharded by the key the pass filter used.
    for i in range(3):
        for line in one[f"rejected-0000{i}-of-00003.jsonl"].splitlines():
            record = base64.b64decode(json.loads(line)["row"]["record_b64"])
            assert shard_of(generate_embeddings.record_key(record), 3) == i


def test_cli_prints_a_line_per_pass(inputs, tmp_path, capsys):
    argv = [
        "make-tasks",
        "--input",
        str(inputs / "interactions.csv"),
        "--features",
        str(inputs / "spec.json"),
        "--output",
        str(tmp_path / "out"),
        "--passes",
        "2",
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "[limaml] make-tasks: pass 1 of 2 ..." in err
    assert "[limaml] make-tasks: pass 2 of 2 ..." in err
    assert len(glob.glob(str(tmp_path / "out" / "train-*-of-00002.tfrecord.gz"))) == 2
