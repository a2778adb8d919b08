"""The offline meta-embedding job, and its consistency with online scoring."""

import glob
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from guarantees import (
    check_embed_fails_when_an_entity_is_lost,
    check_embed_fails_when_the_writer_loses_a_record,
    drop_one_entity,
    drop_one_written_record,
)
from serving_fixture import entity_inputs

from beam_pipelines import generate_embeddings
from tf_limaml import data

TOL = 1e-5


def _records(pattern):
    return [
        r.numpy()
        for r in tf.data.TFRecordDataset(glob.glob(pattern), compression_type="GZIP")
    ]


def _cold_record(spec, entity_id="cold_member"):
    """A task with query rows but no support: an entity seen for the first time."""
    query = [
        {
            "label": 1,
            "timestamp": 10,
            "item_id": "3",
            "topics": "news|film",
            **{f"f{k}": 0.1 * k for k in range(4)},
        }
    ]
    return data.encode_task(
        spec, entity_id, {"segment": "seg_2", "activity": 12.0}, [], query
    ).SerializeToString()


def test_transform_embeds_every_entity_and_dead_letters_bad_records(exported):
    spec, model = exported["spec"], exported["model"]
    records = _records(exported["tasks"]["test"])
    expected_ids = sorted(
        tf.train.SequenceExample.FromString(r)
        .context.feature["entity_id"]
        .bytes_list.value[0]
        .decode()
        for r in records
    ) + ["cold_member"]
    cold = _cold_record(spec)
    cold_batch = data.tasks_to_batch([cold], spec, max_support=16, max_query=4)
    default = model.meta_embedding(cold_batch, steps=0).numpy()[0]

    def check_cold(rows):
        (row,) = [r for r in rows if r["entity_id"] == "cold_member"]
        if row["n_support"] != 0 or not np.allclose(
            row["embedding"], default, atol=TOL
        ):
            raise BeamAssertException(f"cold entity got {row}, expected {default}")
        versions = {r["model_version"] for r in rows}
        stamps = {r["generated_at"] for r in rows}
        if versions != {1} or stamps != {1_700_000_000}:
            raise BeamAssertException(f"versions {versions}, stamps {stamps}")

    with TestPipeline() as p:
        out = (
            p
            | beam.Create(records + [cold, b"not a task record"])
            | generate_embeddings.GenerateEmbeddings(
                exported["export_dir"], batch_size=7, generated_at=1_700_000_000
            )
        )
        ids = out["embeddings"] | "Ids" >> beam.Map(lambda r: r["entity_id"])
        assert_that(ids, equal_to(expected_ids), label="EveryEntityOnce")
        assert_that(out["embeddings"], check_cold, label="ColdStartDefault")
        reasons = out["rejected"] | "Reasons" >> beam.Map(lambda r: r["reason"])
        assert_that(reasons, equal_to(["bad_task_record"]), label="DeadLetter")
    counts = generate_embeddings.counters(p.result)
    assert counts["entities_in"] == len(records) + 2
    assert counts["entities_out"] == len(records) + 1
    assert counts["records_rejected"] == 1 and counts["entities_cold_start"] == 1


def test_small_batches_overlap_and_keep_each_entity_its_own_embedding(exported):
    """Many batches: TF works on one while the next is read; a bad one mid-way."""
    spec, model = exported["spec"], exported["model"]
    records = _records(exported["tasks"]["test"])[:12]
    expected = {}
    for record in records:
        batch = data.tasks_to_batch([record], spec, max_support=16, max_query=1)
        entity_id = batch["entity_id"].numpy()[0].decode()
        expected[entity_id] = model.meta_embedding(batch).numpy()[0]
    inputs = records[:5] + [b"\x00 broken"] + records[5:]

    def check(rows):
        got = {r["entity_id"]: np.array(r["embedding"]) for r in rows}
        if sorted(got) != sorted(expected):
            raise BeamAssertException(f"ids {sorted(got)} != {sorted(expected)}")
        for entity_id, embedding in expected.items():
            if not np.allclose(got[entity_id], embedding, atol=TOL):
                raise BeamAssertException(f"{entity_id}: wrong embedding")

    with TestPipeline() as p:
        out = (
            p
            | beam.Create(inputs, reshuffle=False)
            | generate_embeddings.GenerateEmbeddings(
                exported["export_dir"], batch_size=2, max_support=16, sort_window=2
            )
        )
        assert_that(out["embeddings"], check, label="OwnEmbeddings")
        reasons = out["rejected"] | "Reasons" >> beam.Map(lambda r: r["reason"])
        assert_that(reasons, equal_to(["bad_task_record"]), label="DeadLetter")
    counts = generate_embeddings.counters(p.result)
    assert counts["batches"] >= 3
    assert counts["entities_in"] == len(inputs)
    assert counts["entities_out"] == len(records) and counts["records_rejected"] == 1


def test_dofn_copies_in_one_process_share_one_loaded_export(exported):
    """Beam runs a copy of the DoFn per worker thread: they share the model and
    its traced functions, and embed as one instance does."""
    import pickle

    fn = generate_embeddings.EmbedTasksFn(exported["export_dir"], 16, 0)
    copies = [pickle.loads(pickle.dumps(fn)) for _ in range(3)]
    other = pickle.loads(
        pickle.dumps(generate_embeddings.EmbedTasksFn(exported["export_dir"], 8, 0))
    )
    try:
        for copy in [*copies, other]:
            copy.setup()
        assert copies[0]._export is copies[1]._export is copies[2]._export
        assert other._export is not copies[0]._export and other._max_support == 8
        records = _records(exported["tasks"]["test"])[:4]
        embedded = [copy._compute(records) for copy in copies[:2]]
        np.testing.assert_array_equal(embedded[0][2], embedded[1][2])
        assert copies[0]._parse_sorted.experimental_get_tracing_count() == 1
    finally:
        for copy in [*copies, other]:
            copy.teardown()


@pytest.fixture(scope="module")
def embed_run(exported, tmp_path_factory):
    """`limaml embed` on the test tasks plus one cold entity, with Parquet."""
    tasks_dir = tmp_path_factory.mktemp("embed_tasks")
    pattern = str(tasks_dir / "*.tfrecord.gz")
    data.write_tasks(
        str(tasks_dir / "test.tfrecord.gz"), _records(exported["tasks"]["test"])
    )
    data.write_tasks(
        str(tasks_dir / "cold.tfrecord.gz"), [_cold_record(exported["spec"])]
    )
    output = str(tmp_path_factory.mktemp("embeddings"))
    from tf_limaml import cli

    assert (
        cli.main(
            [
                "embed",
                "--export",
                exported["export_base"],
                "--tasks",
                pattern,
                "--output",
                output,
                "--batch-size",
                "16",
                "--parquet",
            ]
        )
        == 0
    )
    rows = {}
    for record in _records(os.path.join(output, "embeddings-*.tfrecord.gz")):
        feature = tf.train.Example.FromString(record).features.feature
        rows[feature["entity_id"].bytes_list.value[0].decode()] = {
            "embedding": np.array(feature["embedding"].float_list.value, np.float32),
            "model_version": feature["model_version"].int64_list.value[0],
            "n_support": feature["n_support"].int64_list.value[0],
            "generated_at": feature["generated_at"].int64_list.value[0],
        }
    return {"output": output, "rows": rows, "pattern": pattern}


def test_embed_command_outputs_and_counts(embed_run, exported):
    output, rows = embed_run["output"], embed_run["rows"]
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    n_test = len(_records(exported["tasks"]["test"]))
    assert summary["entities_in"] == summary["entities_out"] == n_test + 1 == len(rows)
    assert summary["records_rejected"] == 0 and summary["balanced"]
    assert summary["entities_cold_start"] == 1 and summary["model_version"] == 1
    assert summary["entities_support_truncated"] > 0
    assert rows["cold_member"]["n_support"] == 0
    assert max(r["n_support"] for r in rows.values()) == 16  # the export's max_support
    import pandas as pd

    table = pd.concat(
        pd.read_parquet(p)
        for p in glob.glob(os.path.join(output, "parquet", "embeddings-*.parquet"))
    )
    assert sorted(table["entity_id"]) == sorted(rows)
    for _, row in table.iterrows():
        np.testing.assert_array_equal(
            np.asarray(row["embedding"], np.float32),
            rows[row["entity_id"]]["embedding"],
        )
        assert row["generated_at"] == summary["generated_at"]

    # A second run into the same directory would mix shards: refused.
    from tf_limaml import cli

    assert (
        cli.main(
            [
                "embed",
                "--export",
                exported["export_dir"],
                "--tasks",
                embed_run["pattern"],
                "--output",
                output,
            ]
        )
        == 2
    )


def test_serving_default_with_stored_embedding_equals_adapt_and_predict(
    embed_run, exported, session
):
    """The paper's deployment contract, for every test entity."""
    spec = exported["spec"]
    ds = data.task_dataset(
        exported["tasks"]["test"], spec, batch_tasks=1000, max_support=64, max_query=64
    )
    batch = {k: v.numpy() for k, v in next(iter(ds)).items()}
    checked = 0
    for i, entity_id in enumerate(batch["entity_id"]):
        meta, support, labels, query = entity_inputs(batch, spec, i)
        inputs = dict(meta)
        inputs.update({f"support_{k}": v for k, v in support.items()})
        inputs.update({f"query_{k}": v for k, v in query.items()})
        inputs["support_label"] = labels
        adapted = session.run("adapt_and_predict", inputs)
        stored = embed_run["rows"][entity_id.decode()]["embedding"]
        n_query = len(query["item_id"])
        online = session.run(
            "serving_default",
            {"meta_embedding": np.repeat(stored[None], n_query, axis=0), **query},
        )
        np.testing.assert_allclose(online["score"], adapted["score"], atol=TOL)
        np.testing.assert_allclose(stored, adapted["meta_embedding"], atol=TOL)
        checked += 1
    assert checked == len(embed_run["rows"]) - 1  # every entity but the cold one


def test_check_serving_consistency_reports_the_contract(embed_run, exported):
    from tf_limaml import export

    report = export.check_serving_consistency(
        exported["export_base"],
        embed_run["pattern"],
        os.path.join(embed_run["output"], "embeddings-*.tfrecord.gz"),
    )
    assert report["consistent"] and report["entities"] == len(embed_run["rows"])
    assert (
        report["max_abs_score_diff"] <= TOL and report["max_abs_embedding_diff"] <= TOL
    )


def test_embed_fails_in_a_line_on_records_of_another_spec(exported, tmp_path, capsys):
    from tf_limaml import cli
    from tf_limaml.features import FeatureSpec

    other = FeatureSpec.from_dict(
        {
            "entity": "user",
            "time": "ts",
            "label": "label",
            "meta_features": [
                {"name": "country", "type": "categorical", "hash_buckets": 8}
            ],
            "request_features": [
                {"name": "price", "type": "numeric", "normalize": False}
            ],
        }
    )
    row = {"ts": 1, "label": 1, "price": 2.0}
    data.write_tasks(
        str(tmp_path / "other.tfrecord.gz"),
        [data.encode_task(other, "u1", {"country": "fr"}, [row], [row])],
    )
    output = tmp_path / "out"
    code = cli.main(
        [
            "embed",
            "--export",
            exported["export_dir"],
            "--tasks",
            str(tmp_path / "*.tfrecord.gz"),
            "--output",
            str(output),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "not a GZIP TFRecord of task records for this feature spec" in err[0]
    assert not output.exists()  # failed before the job started


def test_embed_fails_after_writing_everything_when_records_are_rejected(
    exported, tmp_path, capsys
):
    from tf_limaml import cli

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    good = _records(exported["tasks"]["test"])[:6]
    data.write_tasks(str(tasks_dir / "a.tfrecord.gz"), good)
    data.write_tasks(str(tasks_dir / "b.tfrecord.gz"), [b"\x08 not a task record"])
    output = tmp_path / "out"
    argv = [
        "embed",
        "--export",
        exported["export_dir"],
        "--tasks",
        str(tasks_dir / "*.tfrecord.gz"),
        "--output",
        str(output),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    # The job's progress line, then the error in one line, with no traceback.
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("limaml embed: error: 1 of 7 task records were rejected")
    )
    # Nothing is lost: the good rows, the dead letter and the counters are there.
    assert len(_records(str(output / "embeddings-*.tfrecord.gz"))) == len(good)
    (rejected_file,) = glob.glob(str(output / "rejected-*.jsonl"))
    with open(rejected_file) as f:
        (line,) = f.read().splitlines()
    assert json.loads(line)["reason"] == "bad_task_record"
    with open(output / "summary.json") as f:
        assert json.load(f)["records_rejected"] == 1

    argv += ["--overwrite", "--max-rejected-fraction", "0.2"]
    assert cli.main(argv) == 0


def test_embed_fails_when_the_job_loses_an_entity(
    exported, tmp_path, capsys, monkeypatch
):
    drop_one_entity(monkeypatch)
    records = _records(exported["tasks"]["test"])[:6]
    check_embed_fails_when_an_entity_is_lost(
        records, tmp_path, exported["export_dir"], capsys
    )


def test_embed_fails_when_the_writer_loses_a_record(
    exported, tmp_path, capsys, monkeypatch
):
    """The balance counts the records read back from the files, not the DoFn's."""
    drop_one_written_record(monkeypatch)
    records = _records(exported["tasks"]["test"])[:6]
    check_embed_fails_when_the_writer_loses_a_record(
        records, tmp_path, exported["export_dir"], capsys
    )


def test_embed_summary_counts_what_the_writer_wrote(exported, tmp_path):
    """A clean run with Parquet: every written count equals the DoFn's."""
    records = _records(exported["tasks"]["test"])[:6]
    _embed_to(str(tmp_path / "a"), exported, records + [b"\x00 not a record"])
    with open(tmp_path / "a" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["embeddings_written"] == summary["entities_out"] == 6
    assert summary["parquet_written"] == 6
    assert summary["rejected_written"] == summary["records_rejected"] == 1
    assert summary["balanced"] is True


def _embed_to(directory, exported, inputs, parquet=True):
    """GenerateEmbeddings + WriteEmbeddings in one pipeline, at a fixed time stamp."""
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.Create(inputs)
            | generate_embeddings.GenerateEmbeddings(
                exported["export_dir"], batch_size=5, generated_at=1_700_000_000
            )
            | generate_embeddings.WriteEmbeddings(
                directory, parquet=parquet, run_info={"model_version": 1}
            )
        )
    return {
        os.path.relpath(path, directory): open(path, "rb").read()
        for path in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
        if os.path.isfile(path)
    }


def test_embed_writes_through_the_shared_shard_writer_and_counts_as_elements(
    exported, tmp_path
):
    """Deterministic shards, the make-tasks dead-letter format, counts as elements."""
    records = _records(exported["tasks"]["test"])[:9]
    inputs = records + [b"\x00 not a record"]
    first = _embed_to(str(tmp_path / "a"), exported, inputs)
    # Another order of the same records: the same bytes.
    second = _embed_to(str(tmp_path / "b"), exported, list(reversed(inputs)))
    assert (
        sorted(first)
        == sorted(second)
        == [
            "embeddings-00000-of-00001.tfrecord.gz",
            os.path.join("parquet", "embeddings-00000-of-00001.parquet"),
            "rejected-00000-of-00001.jsonl",
            "summary.json",
        ]
    )
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs"

    # Records sorted by entity id within the shard.
    ids = [
        tf.train.Example.FromString(r).features.feature["entity_id"].bytes_list.value[0]
        for r in _records(str(tmp_path / "a" / "embeddings-*.tfrecord.gz"))
    ]
    assert ids == sorted(ids) and len(ids) == len(records)

    (line,) = first["rejected-00000-of-00001.jsonl"].decode().splitlines()
    record = json.loads(line)
    assert set(record) == {"reason", "detail", "source", "row"}
    assert (record["reason"], record["source"]) == ("bad_task_record", "task_records")
    import base64

    assert base64.b64decode(record["row"]["record_b64"]) == b"\x00 not a record"

    summary = json.loads(first["summary.json"])
    assert summary == {
        "model_version": 1,
        "entities_in": len(inputs),
        "entities_out": len(records),
        "entities_cold_start": 0,
        "entities_support_truncated": summary["entities_support_truncated"],
        "records_rejected": 1,
        "batches": summary["batches"],
        "embeddings_written": len(records),
        "parquet_written": len(records),
        "rejected_written": 1,
        "balanced": True,
    }
    assert summary["batches"] >= 1
