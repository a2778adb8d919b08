"""The checks of docs/guarantees.md, shared by their tests and their saboteurs.

Each `check_*` function raises AssertionError when its guarantee does not
hold. The test of a guarantee calls it on the real mechanism;
tests/test_guarantees_sabotage.py calls the same function with the mechanism
monkeypatched off and expects the AssertionError, so every check is known to
be able to fail.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

import numpy as np
import pytest
from process_hooks import write_watch

TASK_SPLITS = ("train", "val", "test")


# ------------------------------------------------- every row is accounted for
def decoded_task_rows(directory: str) -> dict[str, dict[str, int]]:
    """Rows per entity in the task records of a make-tasks output, by kind.

    Returns:
        {"tasks": {entity: rows}, "cold": {entity: rows}}, counted from the
        decoded records (support plus query rows), never from stats.json.
    """
    import tensorflow as tf

    out: dict[str, dict[str, int]] = {"tasks": {}, "cold": {}}
    for kind, prefixes in (("tasks", TASK_SPLITS), ("cold", ("cold",))):
        files = sorted(
            path
            for prefix in prefixes
            for path in glob.glob(os.path.join(directory, f"{prefix}-*.tfrecord.gz"))
        )
        for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
            example = tf.train.SequenceExample.FromString(record.numpy())
            entity = example.context.feature["entity_id"].bytes_list.value[0].decode()
            lists = example.feature_lists.feature_list
            rows = len(lists["support/label"].feature) + len(
                lists["query/label"].feature
            )
            assert entity not in out["tasks"] and entity not in out["cold"], entity
            out[kind][entity] = rows
    return out


def dead_letter_lines(directory: str) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(glob.glob(os.path.join(directory, "rejected-*.jsonl")))
        for line in open(path, encoding="utf-8")
    ]


def check_every_row_accounted_for(
    directory: str, rows_in: int, dropped_by_caps: int | None = None
) -> dict:
    """Every input row is in a task record, a cold record, the dead letter or the caps.

    Counts rows in the decoded records and lines of the dead letter, and holds
    stats.json to them. `dropped_by_caps`, when the caller knows it, is
    checked too.

    Returns:
        {"stats": ..., "decoded": decoded_task_rows(...), "rejected": lines}.
    """
    with open(os.path.join(directory, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    decoded = decoded_task_rows(directory)
    rejected = dead_letter_lines(directory)
    in_tasks = sum(decoded["tasks"].values())
    cold = sum(decoded["cold"].values())
    assert stats["rows_read"] == rows_in, (stats["rows_read"], rows_in)
    assert stats["rows_in_tasks"] == in_tasks, (stats["rows_in_tasks"], in_tasks)
    assert stats["rows_cold"] == cold, (stats["rows_cold"], cold)
    assert stats["rows_rejected"] == len(rejected), (stats, len(rejected))
    if dropped_by_caps is not None:
        assert stats["rows_dropped_by_caps"] == dropped_by_caps, stats
    assert all({"reason", "row"} <= set(line) for line in rejected)
    assert rows_in == (
        in_tasks
        + cold
        + len(rejected)
        + stats["rows_dropped_by_caps"]
        + stats.get("rows_dropped_as_duplicates", 0)
    )
    assert stats["conservation"]["holds"], stats["conservation"]
    assert stats["entities"] == len(decoded["tasks"]), stats
    assert stats["entities_cold"] == len(decoded["cold"]), stats
    return {"stats": stats, "decoded": decoded, "rejected": rejected}


# --------------------------------------------------------- training resumes
def check_nonfinite_step_is_not_applied(model, good_batch, bad_batch) -> str:
    """A step with a non-finite loss leaves every weight and optimizer slot as it was.

    One good step first, so that the optimizer has momentum: zeroed gradients
    alone would still move the weights through Adam's moments.

    Returns:
        The ids the model recorded for the non-finite batch.
    """
    model.train_step(good_batch)
    variables = list(model.trainable_variables) + list(model.optimizer.variables)
    before = [np.array(v.numpy(), copy=True) for v in variables]
    logs = model.train_step(bad_batch)
    assert not np.isfinite(float(logs["loss"])), "the poisoned batch's loss is finite"
    for variable, old in zip(variables, before, strict=True):
        np.testing.assert_array_equal(
            variable.numpy(), old, err_msg=f"{variable.name} changed"
        )
    return model.nonfinite_entities


def check_resume_runs_only_the_remaining_steps(
    model_dir: str, steps_total: int, run_again
) -> int:
    """A killed run's checkpoint holds k > 0 steps; the re-run does only the rest.

    Args:
        model_dir: The killed run's model directory (its backup/ checkpoint).
        steps_total: Steps of an uninterrupted run (epochs x steps per epoch).
        run_again: Re-runs training in `model_dir`; returns how many training
            steps (train batches) it executed.

    Returns:
        k, the step the checkpoint was taken at.
    """
    import tensorflow as tf

    backup = os.path.join(model_dir, "backup", "chief")
    latest = tf.train.latest_checkpoint(backup)
    assert latest is not None, f"no checkpoint in {backup}"
    reader = tf.train.load_checkpoint(latest)
    keys = list(reader.get_variable_to_shape_map())
    names = [k for k in keys if k.startswith("model/optimizer/_iterations/")]
    assert names, f"no optimizer.iterations in {latest}: {keys}"
    k = int(reader.get_tensor(names[0]))
    assert 0 < k < steps_total, (k, steps_total)
    executed = run_again()
    assert (
        executed == steps_total - k
    ), f"the re-run executed {executed} steps; {steps_total} - {k} remained"
    return k


class SimulatedCrash(Exception):
    """Raised from inside `fit` to stop a training run as a crash would."""


# The keys of a BackupAndRestore checkpoint that are not the model's state.
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def checkpoint_tensors(path: str, prefix: str = "model/") -> dict:
    """Every tensor under `prefix` of a checkpoint, by key, read with
    `tf.train.load_checkpoint`."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    return {
        key: reader.get_tensor(key)
        for key in sorted(reader.get_variable_to_shape_map())
        if key.startswith(prefix) and key != OBJECT_GRAPH
    }


def write_model_state(model, path: str) -> str:
    """Writes `model` (its layers' weights, its optimizer's iterations and
    slots) as BackupAndRestore does, under the key "model"; returns the path."""
    import tensorflow as tf

    return tf.train.Checkpoint(model=model).write(path)


def check_restored_state_equals_checkpoint(
    restored: dict, checkpoint: dict, trainable: int, slots_per_variable: int = 2
) -> int:
    """Every model variable and optimizer slot after the restore equals the
    checkpoint's tensor, bit for bit.

    Args:
        restored: `checkpoint_tensors` of the model's state written right
            after the restore (`write_model_state`): the same object graph as
            the checkpoint, so every key names the same variable.
        checkpoint: `checkpoint_tensors` of the checkpoint it restored.
        trainable: How many trainable variables the model has.
        slots_per_variable: The optimizer's slots for each (Adam and
            LazyAdam: m and v).

    Returns:
        How many tensors were compared.
    """
    assert sorted(restored) == sorted(checkpoint), sorted(
        set(restored) ^ set(checkpoint)
    )
    slots = [k for k in checkpoint if k.startswith("model/optimizer/_variables/")]
    weights = [k for k in checkpoint if not k.startswith("model/optimizer/")]
    iterations = "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    assert checkpoint[iterations] > 0, "the checkpoint is of step 0"
    # Adam's m and v for every trainable variable, and the layers' weights.
    assert len(slots) == slots_per_variable * trainable, (len(slots), trainable)
    assert len(weights) >= trainable, (len(weights), trainable)
    differ = [
        key
        for key in checkpoint
        if restored[key].shape != checkpoint[key].shape
        or not np.array_equal(restored[key], checkpoint[key])
    ]
    assert not differ, (
        f"{len(differ)} of {len(checkpoint)} tensors differ from the checkpoint "
        f"after the restore: {differ[:8]}"
    )
    return len(checkpoint)


def resume_and_write_restored_state(train, path: str) -> str:
    """Runs `train(callbacks=[...])` in a model directory with a checkpoint,
    writes the model's state as soon as BackupAndRestore has restored it
    (`on_train_begin`, before any step) and stops the run there.

    Returns:
        {"path": the written state, "trainable": the model's number of
        trainable variables}.
    """
    import tensorflow as tf

    written = []

    class WriteRestoredState(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            written.append(
                {
                    "path": write_model_state(self.model, path),
                    "trainable": len(self.model.trainable_variables),
                }
            )
            raise SimulatedCrash("stopped after the restore")

    try:
        train(callbacks=[WriteRestoredState()])
    except SimulatedCrash:
        pass
    assert written, "training never began"
    return written[0]


# `limaml ...` in a child process, counting the training steps it executes
# (argv[1]: where to write the count), for runs that are killed or resumed.
COUNTING_CLI = r"""
import sys
from tf_limaml import cli, training

class Counting(training.StopOnNonFiniteLoss):
    executed = 0

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        Counting.executed += 1
        with open(sys.argv[1], "w") as f:
            f.write(str(Counting.executed))

training.StopOnNonFiniteLoss = Counting
sys.exit(cli.main(sys.argv[2:]))
"""


def train_counting_steps(train, crash_after: int | None = None) -> int:
    """Runs `train()` and returns how many training steps it executed.

    With `crash_after`, the run stops after that many steps by raising
    SimulatedCrash inside `fit` (swallowed here), leaving its checkpoints as a
    crash would.
    """
    from tf_limaml import training

    executed = []
    original = training.StopOnNonFiniteLoss.on_train_batch_end

    def counting(self, batch, logs=None):
        original(self, batch, logs)
        executed.append(batch)
        if crash_after is not None and len(executed) == crash_after:
            raise SimulatedCrash(f"stopped after {crash_after} steps")

    training.StopOnNonFiniteLoss.on_train_batch_end = counting
    try:
        train()
    except SimulatedCrash:
        pass
    finally:
        training.StopOnNonFiniteLoss.on_train_batch_end = original
    return len(executed)


# -------------------------------------------------------------- determinism
def file_bytes(directory: str) -> dict[str, bytes]:
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
    }


def other_hash_seed() -> str:
    """A PYTHONHASHSEED other than this process's (random unless set)."""
    return "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"


MULTI_PROCESSING = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def run_make_tasks_child(argv, env) -> None:
    """`limaml make-tasks ARGV` in a child process (raises if it fails)."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "tf_limaml.cli", "make-tasks", *argv],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )


def check_make_tasks_identical_across_processes(argv, first: str, second: str, env):
    """make-tasks in this process (in memory) and in another process (another
    PYTHONHASHSEED, multi_processing) write byte-identical files.

    Args:
        argv: make-tasks arguments without `--output`.
        first: Output directory of the in-process run.
        second: Output directory of the child-process run.
        env: Environment of the child process (PYTHONHASHSEED is set here).

    Returns:
        The files of the first run, by name.
    """
    from beam_pipelines import make_tasks

    make_tasks.run([*argv, "--output", first])
    run_make_tasks_child(
        [*argv, "--output", second, *MULTI_PROCESSING],
        {**env, "PYTHONHASHSEED": other_hash_seed()},
    )
    a, b = file_bytes(first), file_bytes(second)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for name in a:
        assert a[name] == b[name], f"{name} differs between the two processes"
    return a


# ---------------------------------- test-only hooks in the processes tests start
HOOKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "process_hooks")


def process_env(
    env: dict,
    sabotage: str | None = None,
    watch_dir: str | None = None,
    leak_dir: str | None = None,
) -> dict:
    """`env` for a child process with tests/process_hooks/sitecustomize.py on.

    Args:
        env: The child's environment (its PYTHONPATH must name the repository).
        sabotage: LIMAML_TEST_SABOTAGE (see sitecustomize.py).
        watch_dir: LIMAML_TEST_WRITE_WATCH: every process reports its writes
            there (`reported_writes`).
        leak_dir: LIMAML_TEST_LEAK_DIR, for the "write_outside_output" sabotage.
    """
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (HOOKS_DIR, env.get("PYTHONPATH")) if p
    )
    for name, value in (
        ("LIMAML_TEST_SABOTAGE", sabotage),
        ("LIMAML_TEST_WRITE_WATCH", watch_dir),
        ("LIMAML_TEST_LEAK_DIR", leak_dir),
    ):
        if value is not None:
            out[name] = value
    if watch_dir is not None:
        # The interpreter's bytecode cache is not the job's output.
        out["PYTHONDONTWRITEBYTECODE"] = "1"
    return out


# --------------------------------------------- every file a job writes is under --output
@contextlib.contextmanager
def watch_writes():
    """Every path this process writes while the block runs (an audit hook).

    Yields the list the hook fills: the absolute path of every file opened
    for writing, created, renamed (both names), removed or truncated, by any
    thread (the in-memory DirectRunner runs its steps on threads of this
    process).
    """
    written: list[str] = []

    def sink(event: str, path: str) -> None:
        written.append(path)

    write_watch.start(sink)
    try:
        yield written
    finally:
        write_watch.stop(sink)


def reported_writes(watch_dir: str) -> dict[int, list[str]]:
    """{pid: paths} that the watched child processes reported (`process_env`)."""
    out: dict[int, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(watch_dir, "writes-*.jsonl"))):
        pid = int(os.path.basename(path)[len("writes-") : -len(".jsonl")])
        with open(path, encoding="utf-8") as f:
            out[pid] = [json.loads(line)["path"] for line in f]
    return out


def _under(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root + os.sep)


# The only writes allowed outside --output, by name, relative to
# tempfile.gettempdir(): Beam's own files (the pipeline's local temp dirs, the
# pickled main session that `save_main_session` checks and the stager stages,
# each in a fresh `tempfile.mkdtemp()` directory), and the file of 8 random
# characters that `tempfile` writes and removes once per process to find a
# writable temp directory. And os.devnull, which stores nothing.
RUNNER_TEMP_PATTERNS = (
    "beam-pipeline-temp*",
    "beam-temp*",
    "tmp*/main_session.pickle",
    "tmp*/pickled_main_session",
    "[a-z0-9_]" * 8,
)


def _runner_temp(path: str) -> bool:
    import fnmatch
    import tempfile

    if path == os.devnull:
        return True
    temp = os.path.realpath(tempfile.gettempdir())
    path = os.path.realpath(path)
    if not path.startswith(temp + os.sep):
        return False
    relative = os.path.relpath(path, temp)
    # The mkdtemp() directory that holds a pickled main session.
    if os.sep not in relative and fnmatch.fnmatch(relative, "tmp*"):
        return True
    return any(fnmatch.fnmatch(relative, p) for p in RUNNER_TEMP_PATTERNS)


def check_writes_under(written, roots) -> None:
    """Every path in `written` is under one of `roots` (or is Beam's temp file)."""
    assert written, "the watch saw no write: is the audit hook on?"
    outside = sorted(
        {
            p
            for p in written
            if not any(_under(p, r) for r in roots) and not _runner_temp(p)
        }
    )
    assert not outside, f"the job wrote outside --output {list(roots)}: {outside}"


def check_child_writes_under(watch_dir: str, root: str) -> dict[int, list[str]]:
    """Every process of a watched child job wrote only under `root`; more than
    one process reported (the DirectRunner's multi_processing workers)."""
    reports = reported_writes(watch_dir)
    writers = [pid for pid, paths in reports.items() if paths]
    assert len(writers) >= 2, f"writes reported by processes {writers} only"
    for paths in reports.values():
        if paths:
            check_writes_under(paths, [root])
    return reports


# ------------------------------------------------ every entity is accounted for
def drop_one_entity(monkeypatch) -> None:
    """A fault: the embed DoFn loses the first entity of every batch it embeds."""
    from beam_pipelines.generate_embeddings import EmbedTasksFn

    rows = EmbedTasksFn._rows

    def dropping(self, computed):
        return rows(self, computed)[1:]

    monkeypatch.setattr(EmbedTasksFn, "_rows", dropping)


def check_embed_fails_when_an_entity_is_lost(records, tmp_path, export_dir, capsys):
    """`limaml embed` over `records`, with an entity lost, exits 2 and says so.

    Call it with `drop_one_entity` in effect.
    """
    from tf_limaml import cli, data

    tasks = tmp_path / "tasks.tfrecord.gz"
    data.write_tasks(str(tasks), records)
    output = tmp_path / "embeddings"
    code = cli.main(
        [
            "embed",
            "--export",
            export_dir,
            "--tasks",
            str(tasks),
            "--output",
            str(output),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    n = len(records)
    assert err and err[-1] == (
        f"limaml embed: error: Entities in ({n}) != entities out ({n - 1}) "
        f"+ rejected (0); see {output}/summary.json"
    ), err
    with open(output / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["balanced"] is False


def drop_one_written_record(monkeypatch) -> None:
    """A fault in the writer: each embeddings TFRecord shard loses its first record.

    The embed DoFn's counts are untouched (entities out = entities in); only
    the file the shard writer writes is short.
    """
    from beam_pipelines import shards

    write_shard = shards._write_shard

    def dropping(element, *args, **kwargs):
        (name, index), items = element
        if name == "embeddings":
            items = sorted(item for item in items if item is not None)[1:]
        return write_shard(((name, index), items), *args, **kwargs)

    monkeypatch.setattr(shards, "_write_shard", dropping)


def check_embed_fails_when_the_writer_loses_a_record(
    records, tmp_path, export_dir, capsys
):
    """`limaml embed` over `records`, its writer losing one, exits 2 and says so.

    Call it with `drop_one_written_record` in effect (one shard: one record
    lost).
    """
    from tf_limaml import cli, data

    tasks = tmp_path / "tasks.tfrecord.gz"
    data.write_tasks(str(tasks), records)
    output = tmp_path / "embeddings"
    code = cli.main(
        [
            "embed",
            "--export",
            export_dir,
            "--tasks",
            str(tasks),
            "--output",
            str(output),
            "--num-shards",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    n = len(records)
    assert err and err[-1] == (
        f"limaml embed: error: Entities in ({n}) != the records the writer wrote "
        f"(embeddings_written {n - 1}, parquet_written None, rejected_written 0); "
        f"see {output}/summary.json"
    ), err
    with open(output / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["balanced"] is False
    assert summary["entities_out"] == n


def make_tasks_with_every_kind_of_loss(directory) -> dict:
    """`make_tasks.run` on synthetic rows with garbage rows, caps and a cold member.

    Returns:
        {"output": the output directory, "rows_in": rows in the CSV}.
    """
    from beam_pipelines import make_tasks
    from tf_limaml.datasets import synthetic

    directory = str(directory)
    rows = synthetic.generate_interactions(num_entities=12, seed=5)
    rows += [
        dict(rows[0], clicked="maybe"),  # bad label
        dict(rows[1], timestamp="yesterday"),  # bad time
        dict(rows[2], member_id=""),  # no entity
        dict(rows[3], member_id="lonely"),  # one row: cold
    ]
    os.makedirs(directory, exist_ok=True)
    synthetic.write_csv(rows, os.path.join(directory, "interactions.csv"))
    synthetic.synthetic_spec().save(os.path.join(directory, "spec.json"))
    output = os.path.join(directory, "out")
    make_tasks.run(
        [
            "--input",
            os.path.join(directory, "interactions.csv"),
            "--features",
            os.path.join(directory, "spec.json"),
            "--output",
            output,
            "--max-support",
            "8",
            "--max-query",
            "8",
        ]
    )
    return {"output": output, "rows_in": len(rows)}


# ------------------------------------------- blanks get the TRAIN mean only
def make_tasks_with_blank_prices(directory) -> dict:
    """`limaml make-tasks` on rows whose `price` is blank in every third row.

    Train entities' prices sit near 10, val and test entities' near 1000, so
    a mean that lets a held-out value in is far from the train mean.

    Returns:
        {"output": the output directory, "rows": the rows written}.
    """
    from tf_limaml import cli
    from tf_limaml.tasks import assign_split

    directory = str(directory)
    rows = []
    for e in range(40):
        member = f"m{e}"
        base = 10.0 if assign_split(member) == "train" else 1000.0
        for k in range(6):
            rows.append(
                {
                    "member": member,
                    "ts": f"2024-03-{k + 1:02d}T10:00:00Z",
                    "clicked": "yes" if (e + k) % 2 else "no",
                    "item": f"i{k}",
                    "price": "" if k % 3 == 0 else f"{base + e % 5 + k}",
                }
            )
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "rows.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("member,ts,clicked,item,price\n")
        for r in rows:
            f.write(
                ",".join(r[c] for c in ("member", "ts", "clicked", "item", "price"))
            )
            f.write("\n")
    spec = {
        "entity": "member",
        "time": "ts",
        "label": {"column": "clicked", "positive": ["yes"]},
        "request_features": [
            {"name": "item", "type": "categorical", "hash_buckets": 16},
            {"name": "price", "type": "numeric"},
        ],
    }
    with open(os.path.join(directory, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    output = os.path.join(directory, "out")
    code = cli.main(
        [
            "make-tasks",
            "--input",
            path,
            "--features",
            os.path.join(directory, "spec.json"),
            "--output",
            output,
            "--split",
            "last:2",
        ]
    )
    if code != 0:  # not an AssertionError: a saboteur must not pass on it
        raise RuntimeError(f"limaml make-tasks exited {code}")
    return {"output": output, "rows": rows}


def check_blanks_get_the_train_mean(run: dict) -> None:
    """spec.json's price default is the mean of the TRAIN entities' prices only.

    The train entities are read from the train records; the blanks in every
    record (train, val and test) hold that default.
    """
    import tensorflow as tf

    output = run["output"]
    with open(os.path.join(output, "spec.json"), encoding="utf-8") as f:
        price = next(
            f for f in json.load(f)["request_features"] if f["name"] == "price"
        )
    train = set()
    files = sorted(glob.glob(os.path.join(output, "train-*.tfrecord.gz")))
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        example = tf.train.SequenceExample.FromString(record.numpy())
        train.add(example.context.feature["entity_id"].bytes_list.value[0].decode())
    values = [
        float(r["price"]) for r in run["rows"] if r["member"] in train and r["price"]
    ]
    assert train and values
    assert price["default"] == _approx(float(np.mean(values))), (
        price["default"],
        float(np.mean(values)),
    )
    with open(os.path.join(output, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    blanks = sum(1 for r in run["rows"] if not r["price"])
    assert stats["imputed_by_feature"]["price"] == blanks, stats
    every = sorted(glob.glob(os.path.join(output, "*.tfrecord.gz")))
    seen = []
    for record in tf.data.TFRecordDataset(every, compression_type="GZIP"):
        example = tf.train.SequenceExample.FromString(record.numpy())
        for part in ("support", "query"):
            for cell in example.feature_lists.feature_list[f"{part}/price"].feature:
                seen.append(cell.float_list.value[0])
    assert not any(np.isnan(seen)), "a blank was written as NaN"
    filled = sum(1 for v in seen if abs(v - price["default"]) < 1e-3)
    assert filled >= blanks, (filled, blanks)


def _approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-6)


# ----------------------------------------------------------------- data is data
def unpickle_in_the_data_path(monkeypatch) -> None:
    """A fault: make-tasks' row validation and embed's record parsing run code.

    Each reaches the loaders the way the static scan cannot see: make-tasks
    through an alias of `pickle.loads` (plain data, so only the patched loader
    can catch it) and `_pickle.loads` of a class (the audit hook's
    "pickle.find_class"); embed through `eval` (the "exec" event), while its
    parse function is traced.
    """
    import _pickle
    import collections
    import pickle

    from beam_pipelines import data_guard  # noqa: F401 - patches the loaders first
    from tf_limaml import data
    from tf_limaml import tasks as task_rules

    loads = getattr(pickle, "loads")  # noqa: B009 - the alias is the point
    validate_row = task_rules.validate_row

    def unpickling(spec, row):
        loads(pickle.dumps([1, 2]))
        _pickle.loads(pickle.dumps(collections.OrderedDict(a=1)))
        return validate_row(spec, row)

    monkeypatch.setattr(task_rules, "validate_row", unpickling)
    parse_task_batch = data.parse_task_batch

    def evaluating(*args, **kwargs):
        eval("1 + 1")  # noqa: S307 - the fault
        return parse_task_batch(*args, **kwargs)

    monkeypatch.setattr(data, "parse_task_batch", evaluating)


def check_the_data_guard_stops_a_job_that_runs_code(tmp_path, export_dir, records):
    """make-tasks and embed, with `unpickle_in_the_data_path` in effect, both fail."""
    from beam_pipelines import generate_embeddings
    from tf_limaml import data

    with pytest.raises(Exception, match=r"pickle.* on the data path"):
        make_tasks_with_every_kind_of_loss(tmp_path / "make_tasks")
    tasks = tmp_path / "tasks.tfrecord.gz"
    data.write_tasks(str(tasks), records)
    with pytest.raises(Exception, match=r"exec.* on the data path"):
        generate_embeddings.run(
            [
                "--export",
                export_dir,
                "--tasks",
                str(tasks),
                "--output",
                str(tmp_path / "embeddings"),
            ]
        )
