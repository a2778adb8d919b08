"""Reliability guarantees: faults lose nothing, bad input gets a clear error.

* Export is atomic: an export SIGKILLed midway leaves no version directory
  that TF Serving could load half-written, and the next export still works
  and removes what the killed one left.
* Serving inputs, through the TF1 loader (as TF Serving loads the export):
  wrong shapes and dtypes, labels outside {0, 1}, bad masks fail with
  InvalidArgument naming the input; support longer than `max_support` keeps
  the latest rows; an empty support set gives the cold-start embedding.
* The CLI: user errors print one line naming the problem and exit with 2,
  without a traceback (each through `python -m tf_limaml.cli`).
* Determinism: make-tasks writes byte-identical files for the same input,
  seed and flags.
* Security: no unpickling or evaluation on the data path; entity ids never
  become part of a written path.
"""

from __future__ import annotations

import ast
import concurrent.futures
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from guarantees import (
    check_child_writes_under,
    check_make_tasks_identical_across_processes,
    check_writes_under,
    process_env,
    watch_writes,
)
from serving_fixture import (
    TEST_MAX_SUPPORT,
    LoopbackServing,
    SessionSignatures,
    entity_inputs,
)

from tf_limaml import data, export
from tf_limaml.datasets import synthetic
from tf_limaml.export import commands as export_commands
from tf_limaml.export import versions as export_versions
from tf_limaml.features import FeatureSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def session(exported):
    model = SessionSignatures(exported["export_dir"])
    yield model
    _CALLABLES.clear()
    model.close()


# ------------------------------------------------------------ atomic export
def _complete(version_dir: str) -> bool:
    return all(
        os.path.exists(os.path.join(version_dir, p))
        for p in (
            "saved_model.pb",
            "variables/variables.index",
            "assets.extra/limaml.json",
            "assets.extra/tf_serving_warmup_requests",
        )
    )


def _assert_only_complete_versions(base: str, versions: list[int]) -> None:
    """What TF Serving can see: numeric directories, each a complete SavedModel."""
    numeric = sorted(int(n) for n in os.listdir(base) if n.isdigit())
    assert numeric == versions
    assert all(_complete(os.path.join(base, str(v))) for v in numeric)
    assert export.list_versions(base) == versions
    assert export_commands.versions_of(base) == versions
    for name in os.listdir(base):
        # Anything else is hidden from TF Serving's poller: not a number.
        assert name.isdigit() or name.startswith("."), name


# The export runs as `limaml export` in a child process. After it has written
# the SavedModel and the warmup requests to its temporary directory (before
# the metadata and the rename), it reports the directory and waits to be killed.
_EXPORT_THEN_HANG = r"""
import os, sys, time
from tf_limaml import cli
from tf_limaml.export import saved_model as export

write_warmup = export._write_warmup

def write_then_hang(path, *args, **kwargs):
    write_warmup(path, *args, **kwargs)
    temp_dir = os.path.dirname(os.path.dirname(path))
    with open(sys.argv[1] + ".part", "w") as f:
        f.write(temp_dir)
    os.rename(sys.argv[1] + ".part", sys.argv[1])
    time.sleep(600)

export._write_warmup = write_then_hang
sys.exit(cli.main(sys.argv[2:]))
"""


def _saved_model_dir(exported, tmp_path) -> str:
    from tf_limaml.saving import save_model

    model_dir = str(tmp_path / "model")
    save_model(exported["model"], model_dir)
    return model_dir


def _wait_for(path: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(
                f"the export exited ({process.returncode}) before the " "fault point"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the export did not reach the fault point in time")
        time.sleep(0.05)


def test_export_sigkilled_midway_leaves_no_partial_version(exported, tmp_path):
    base = str(tmp_path / "exports")
    shutil.copytree(exported["export_dir"], os.path.join(base, "1"))
    model_dir = _saved_model_dir(exported, tmp_path)
    sentinel = str(tmp_path / "temp_dir_written")
    log = open(tmp_path / "export.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _EXPORT_THEN_HANG,
            sentinel,
            "export",
            "--model-dir",
            model_dir,
            "--export-base",
            base,
        ],
        env=_env(),
        stdout=log,
        stderr=log,
    )
    try:
        _wait_for(sentinel, process)
        temp_dir = open(sentinel).read()
        # Midway: the SavedModel is on disk, under a name TF Serving ignores.
        assert os.path.dirname(temp_dir) == base
        assert os.path.exists(os.path.join(temp_dir, "saved_model.pb"))
        _assert_only_complete_versions(base, [1])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        log.close()
    assert process.returncode == -signal.SIGKILL

    # After the kill: version 1 only, still what TF Serving serves.
    _assert_only_complete_versions(base, [1])
    assert os.path.isdir(temp_dir) and os.path.basename(temp_dir).startswith(
        ".tmp-export-"
    )
    assert export.resolve_version_dir(base) == os.path.join(base, "1")

    # The next export works, takes the next number and removes the leftover.
    path = export.export_model(exported["model"], base, max_support=TEST_MAX_SUPPORT)
    assert path == os.path.join(base, "2")
    assert not os.path.exists(temp_dir)
    assert sorted(os.listdir(base)) == ["1", "2"]
    _assert_only_complete_versions(base, [1, 2])
    loaded = SessionSignatures(path)
    try:
        inputs = export.warmup_inputs(exported["spec"], 8, 3)
        scores = loaded.run("serving_default", inputs)["score"]
        expected = (
            exported["model"]
            .score(
                tf.constant(inputs["meta_embedding"]),
                {k: v for k, v in inputs.items() if k != "meta_embedding"},
            )
            .numpy()
        )
        np.testing.assert_allclose(scores, expected, atol=TOL)
    finally:
        loaded.close()


def test_abandoned_temp_dirs_are_removed_and_running_ones_kept(tmp_path):
    base = tmp_path / "exports"
    (base / "3").mkdir(parents=True)
    host = export_versions._host()
    # A pid that existed and is gone: a child that has exited and been reaped.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    hex_id = "0" * 32
    names = {
        "dead_here": f".tmp-export-4-{host}-{dead_pid}-{hex_id}",
        "running_here": f".tmp-export-4-{host}-{os.getpid()}-{hex_id}",
        "fresh_elsewhere": f".tmp-export-4-otherhost-{dead_pid}-{hex_id}",
        "old_elsewhere": f".tmp-export-4-otherhost-1-{hex_id}",
        "old_unnamed": ".tmp-export-4-0123abcd",
    }
    for name in names.values():
        (base / name / "variables").mkdir(parents=True)
        (base / name / "saved_model.pb").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for key in ("old_elsewhere", "old_unnamed"):
        os.utime(base / names[key], (two_days_ago, two_days_ago))
    # None of them is a version TF Serving (or our tools) would load.
    assert export.list_versions(str(base)) == [3]
    assert export_commands.versions_of(str(base)) == []  # 3/ has no saved_model.pb

    removed = export.remove_abandoned_exports(str(base))
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        names[k] for k in ("dead_here", "old_elsewhere", "old_unnamed")
    )
    assert sorted(os.listdir(base)) == sorted(
        ["3", names["running_here"], names["fresh_elsewhere"]]
    )
    assert export.remove_abandoned_exports(str(tmp_path / "missing")) == []


@pytest.mark.slow
def test_plain_export_killed_at_random_moments(exported, tmp_path):
    """`limaml export` SIGKILLed at random points of its run, then re-run."""
    base = str(tmp_path / "exports")
    model_dir = _saved_model_dir(exported, tmp_path)
    command = [
        sys.executable,
        "-m",
        "tf_limaml.cli",
        "export",
        "--model-dir",
        model_dir,
        "--export-base",
        base,
    ]
    start = time.monotonic()
    subprocess.run(command, env=_env(), check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    versions = [1]
    rng = random.Random(0)
    for attempt in range(4):
        process = subprocess.Popen(
            command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Late in the run is where the SavedModel is being written.
        time.sleep(duration * rng.uniform(0.5, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        # Killed before the rename: nothing new; after it: one complete version.
        found = export.list_versions(base)
        assert found in (versions, versions + [versions[-1] + 1]), (attempt, found)
        versions = found
        _assert_only_complete_versions(base, versions)
    path = export.export_model(exported["model"], base)
    assert path == os.path.join(base, str(versions[-1] + 1))
    assert not [n for n in os.listdir(base) if n.startswith(".tmp-export-")]
    _assert_only_complete_versions(base, versions + [versions[-1] + 1])


# ----------------------------------------------------------- serving inputs
def _raw_run(session: SessionSignatures, signature: str, inputs: dict) -> dict:
    """Runs a signature the way TF Serving's C++ server does.

    `Session.run` from Python compares fed shapes with the placeholders'
    before running; TF Serving does not. A callable made from CallableOptions
    feeds the tensors straight to the C++ session, so the graph's own checks
    are what is tested here.
    """
    from tensorflow.core.protobuf import config_pb2

    sig = session.signatures[signature]
    names = sorted(inputs)
    outputs = sorted(sig.outputs)
    key = (id(session), signature, tuple(names))
    if key not in _CALLABLES:  # each new callable prunes and optimizes the graph
        options = config_pb2.CallableOptions(
            feed=[sig.inputs[n].name for n in names],
            fetch=[sig.outputs[n].name for n in outputs],
        )
        _CALLABLES[key] = session.session._make_callable_from_options(
            options
        )  # noqa: SLF001
    values = _CALLABLES[key](*[np.asarray(inputs[n]) for n in names])
    return dict(zip(outputs, values, strict=True))


_CALLABLES: dict = {}


@pytest.fixture(scope="module")
def batches(exported):
    def parse(max_support):
        ds = data.task_dataset(
            exported["tasks"]["test"],
            exported["spec"],
            batch_tasks=1000,
            max_support=max_support,
            max_query=8,
        )
        return {k: v.numpy() for k, v in next(iter(ds)).items()}

    return {"full": parse(64), "capped": parse(TEST_MAX_SUPPORT)}


def _good_inputs(exported, batch) -> dict[str, dict[str, np.ndarray]]:
    """One valid request per signature, from real test tasks."""
    spec = exported["spec"]
    # An entity with a few support and query rows, so that cutting one is possible.
    index = int(
        np.flatnonzero(
            (batch["support_mask"].sum(axis=1) >= 2)
            & (batch["query_mask"].sum(axis=1) >= 3)
        )[0]
    )
    meta, support, labels, query = entity_inputs(batch, spec, index)
    adapt = dict(meta)
    adapt.update({f"support_{k}": v for k, v in support.items()})
    adapt.update({f"query_{k}": v for k, v in query.items()})
    adapt["support_label"] = labels.astype(np.float32)
    serving = {k: v[:3] for k, v in query.items()}
    serving["meta_embedding"] = np.full([len(serving["item_id"]), 8], 0.1, np.float32)
    embed = {f.name: batch[f.name][:2] for f in spec.meta_features}
    for key in ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]:
        embed[key] = batch[key][:2].copy()
    examples = [
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    "meta_embedding": tf.train.Feature(
                        float_list=tf.train.FloatList(value=[0.1] * 8)
                    ),
                    "item_id": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[b"7"])
                    ),
                    **{
                        f"f{k}": tf.train.Feature(
                            float_list=tf.train.FloatList(value=[0.5])
                        )
                        for k in range(4)
                    },
                }
            )
        ).SerializeToString()
    ]
    return {
        "serving_default": serving,
        "adapt_and_predict": adapt,
        "meta_embedding": embed,
        "predict_examples": {"examples": np.array(examples, dtype=object)},
    }


# (signature, input, how to break it): each must fail naming the input.
BAD_SHAPES = [
    ("serving_default", "meta_embedding", lambda v: v[:, :3]),  # d = 3, not 8
    ("serving_default", "meta_embedding", lambda v: v[..., None]),  # rank 3
    ("serving_default", "topics", lambda v: np.concatenate([v, v[:, :1]], 1)),  # K = 3
    ("serving_default", "topics", lambda v: v[:, :1]),  # K = 1
    ("serving_default", "f0", lambda v: v[:, None]),  # [B, 1]
    ("adapt_and_predict", "segment", lambda v: np.array([v, v])),  # not a scalar
    ("adapt_and_predict", "support_topics", lambda v: v[:, :1]),
    ("adapt_and_predict", "support_label", lambda v: v[:, None]),
    ("adapt_and_predict", "query_item_id", lambda v: v[None]),
    ("meta_embedding", "support_mask", lambda v: v[:, 0]),  # rank 1
    ("meta_embedding", "support_item_id", lambda v: v[..., None]),
    ("meta_embedding", "activity", lambda v: v[:, None]),
    ("predict_examples", "examples", lambda v: v[:, None]),
]


@pytest.mark.parametrize(
    "signature, name, corrupt",
    BAD_SHAPES,
    ids=[f"{s}-{n}-{i}" for i, (s, n, _) in enumerate(BAD_SHAPES)],
)
def test_wrong_shapes_fail_naming_the_input(
    exported, session, batches, signature, name, corrupt
):
    inputs = dict(_good_inputs(exported, batches["capped"])[signature])
    check_wrong_shape_fails_naming_the_input(session, signature, inputs, name, corrupt)


def check_wrong_shape_fails_naming_the_input(session, signature, inputs, name, corrupt):
    """The valid request runs; with `name` corrupted it fails naming `name`."""
    inputs = dict(inputs)
    _raw_run(session, signature, inputs)  # the valid request runs
    inputs[name] = corrupt(inputs[name])
    # As TF Serving runs it: the in-graph check.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"Input `{name}` must have shape"
    ) as info:
        _raw_run(session, signature, inputs)
    assert "got shape" in info.value.message
    # Through Python's Session.run: refused before running, naming the tensor.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=name):
        session.run(signature, inputs)


BAD_DTYPES = [
    (
        "serving_default",
        "f0",
        lambda v: v.astype(str).astype(object),
    ),  # text for a number
    ("serving_default", "item_id", lambda v: np.zeros(len(v), np.float32)),
    ("serving_default", "meta_embedding", lambda v: v.astype(np.float64)),
    ("adapt_and_predict", "support_label", lambda v: v.astype(np.int64)),
    ("meta_embedding", "support_mask", lambda v: v.astype(np.int32)),
]


@pytest.mark.parametrize(
    "signature, name, corrupt", BAD_DTYPES, ids=[f"{s}-{n}" for s, n, _ in BAD_DTYPES]
)
def test_wrong_dtypes_fail_naming_the_input(
    exported, session, batches, signature, name, corrupt
):
    inputs = dict(_good_inputs(exported, batches["capped"])[signature])
    inputs[name] = corrupt(inputs[name])
    # TF Serving (and the fixture standing in for it) refuse it before running.
    with pytest.raises(ValueError, match=f"Expects arg {name} to be"):
        session.run(signature, inputs)
    # Fed to the graph anyway, the argument's type check names the input.
    with pytest.raises(tf.errors.InvalidArgumentError, match="Type mismatch") as info:
        _raw_run(session, signature, inputs)
    assert f"_{name}_" in info.value.message


def _set(name, index, value):
    def corrupt(v):
        v = v.copy()
        v[index] = value
        return v

    return name, corrupt


BAD_VALUES = [
    # (signature, input, corrupt, message)
    (
        "adapt_and_predict",
        *_set("support_label", 0, 2.0),
        "`support_label` must be 0 or 1",
    ),
    (
        "adapt_and_predict",
        *_set("support_label", 0, np.nan),
        "`support_label` must be 0 or 1",
    ),
    (
        "adapt_and_predict",
        *_set("support_label", 0, -1.0),
        "`support_label` must be 0 or 1",
    ),
    (
        "meta_embedding",
        *_set("support_label", (0, 0), 5.0),
        "`support_label` must be 0 or 1",
    ),
    ("meta_embedding", *_set("support_mask", (1, 0), 0.5), "`support_mask` must be 1"),
    ("serving_default", *_set("f0", 1, np.nan), "Input `f0` must be finite"),
    (
        "serving_default",
        *_set("meta_embedding", (0, 2), np.inf),
        "`meta_embedding` must be finite",
    ),
    (
        "adapt_and_predict",
        *_set("query_f2", 0, np.nan),
        "Input `query_f2` must be finite",
    ),
    (
        "adapt_and_predict",
        *_set("activity", (), np.nan),
        "Input `activity` must be finite",
    ),
    (
        "meta_embedding",
        *_set("support_f3", (0, 0), -np.inf),
        "Input `support_f3` must be finite",
    ),
    (
        "adapt_and_predict",
        "support_item_id",
        lambda v: v[:-1],
        "Input `support_item_id` must have as many rows as `support_label`",
    ),
    (
        "adapt_and_predict",
        "query_f1",
        lambda v: v[:-1],
        "Input `query_f1` must have as many rows as `query_",
    ),
    (
        "serving_default",
        "item_id",
        lambda v: v[:-1],
        "Input `item_id` must have as many rows as `meta_embedding`",
    ),
    (
        "meta_embedding",
        "segment",
        lambda v: v[:1],
        "Input `segment` must have as many rows as `support_label`",
    ),
]


@pytest.mark.parametrize(
    "signature, name, corrupt, message",
    BAD_VALUES,
    ids=[f"{s}-{n}-{i}" for i, (s, n, _, _) in enumerate(BAD_VALUES)],
)
def test_bad_values_fail_naming_the_input(
    exported, session, batches, signature, name, corrupt, message
):
    inputs = dict(_good_inputs(exported, batches["capped"])[signature])
    inputs[name] = corrupt(inputs[name])
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _raw_run(session, signature, inputs)
    assert message in info.value.message
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        session.run(signature, inputs)
    assert message in info.value.message


def test_padding_rows_may_hold_any_label(exported, session, batches):
    inputs = dict(_good_inputs(exported, batches["capped"])["meta_embedding"])
    padding = np.argwhere(inputs["support_mask"] == 0)
    assert len(padding)
    clean = _raw_run(session, "meta_embedding", inputs)["meta_embedding"]
    inputs["support_label"][tuple(padding.T)] = 9.0
    out = _raw_run(session, "meta_embedding", inputs)["meta_embedding"]
    # Equal to the run on clean padding: a leaked 9.0 would still be finite.
    np.testing.assert_array_equal(out, clean)


def test_batched_support_beyond_max_support_equals_only_the_latest_rows(
    exported, session, batches
):
    """meta_embedding [E, S > max_support]: same as sending only the latest real rows."""
    spec, full = exported["spec"], batches["full"]
    n_real = full["support_mask"].sum(axis=1).astype(int)
    assert n_real.max() > TEST_MAX_SUPPORT, "no entity has more rows than max_support"
    support_keys = ["support_label", "support_mask"] + [
        f"support_{f.name}" for f in spec.request_features
    ]
    everything = {f.name: full[f.name] for f in spec.meta_features}
    everything.update({k: full[k] for k in support_keys})
    latest = {f.name: full[f.name] for f in spec.meta_features}
    for key in support_keys:
        rows = []
        for i, n in enumerate(n_real):
            kept = full[key][i, max(n - TEST_MAX_SUPPORT, 0) : n]
            pad = np.zeros_like(full[key][i, : TEST_MAX_SUPPORT - len(kept)])
            if pad.dtype == object:
                pad[...] = b""
            rows.append(np.concatenate([kept, pad]))
        latest[key] = np.stack(rows)
    got = session.run("meta_embedding", everything)["meta_embedding"]
    expected = session.run("meta_embedding", latest)["meta_embedding"]
    np.testing.assert_allclose(got, expected, atol=TOL)
    # The cap matters: with the oldest rows instead, long histories differ.
    oldest = dict(
        everything,
        support_mask=everything["support_mask"]
        * (np.arange(everything["support_mask"].shape[1]) < TEST_MAX_SUPPORT),
    )
    other = session.run("meta_embedding", oldest)["meta_embedding"]
    long = n_real > TEST_MAX_SUPPORT
    assert np.max(np.abs(other[long] - got[long])) > 1e-6


def test_zero_width_support_is_the_cold_start_embedding(exported, session, batches):
    spec, capped = exported["spec"], batches["capped"]
    model = exported["model"]
    inputs = {f.name: capped[f.name][:4] for f in spec.meta_features}
    inputs["support_label"] = np.zeros([4, 0], np.float32)
    inputs["support_mask"] = np.zeros([4, 0], np.float32)
    for f in spec.request_features:
        value = capped[f"support_{f.name}"][:4, :0]
        inputs[f"support_{f.name}"] = value
    cold = _raw_run(session, "meta_embedding", inputs)["meta_embedding"]
    default = model.meta_embedding(
        {k: v[:4] for k, v in capped.items()}, steps=0
    ).numpy()
    assert np.all(np.isfinite(cold))
    np.testing.assert_allclose(cold, default, atol=TOL)
    adapted = model.meta_embedding({k: v[:4] for k, v in capped.items()}).numpy()
    assert np.max(np.abs(adapted - default)) > 1e-3  # adaptation would have moved it


def test_grpc_caller_gets_invalid_argument_naming_the_input(exported, session, batches):
    import grpc

    from serving import client as serving_client

    inputs = dict(_good_inputs(exported, batches["capped"])["serving_default"])
    inputs["meta_embedding"] = inputs["meta_embedding"][:, :3]
    with LoopbackServing(exported["export_dir"], model=session) as server:
        with serving_client.GrpcClient(
            server.grpc_target, "limaml", timeout_s=10.0
        ) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.predict(inputs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "meta_embedding" in info.value.details()


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, synthetic_tasks):
    root = tmp_path_factory.mktemp("cli_errors")
    spec = synthetic.synthetic_spec()
    synthetic.write_csv(
        synthetic.generate_interactions(num_entities=5, seed=2),
        root / "interactions.csv",
    )
    spec.save(str(root / "spec.json"))
    extra = spec.to_dict()
    extra["request_features"].append({"name": "price_typo", "type": "numeric"})
    (root / "spec_extra_column.json").write_text(json.dumps(extra))
    unknown = dict(spec.to_dict(), weights="uniform")
    (root / "spec_unknown_key.json").write_text(json.dumps(unknown))
    (root / "spec_malformed.json").write_text('{"entity": "member_id", ')
    (root / "meta_unknown_key.json").write_text(
        json.dumps({"inner_steps": 1, "inner_learning_rate": 0.1})
    )
    return {"root": str(root), "tasks": synthetic_tasks["train"]}


# (name, argv, what the one error line must say). {root} and {tasks} are filled in.
CLI_ERRORS = [
    (
        "missing-input",
        [
            "make-tasks",
            "--input",
            "{root}/nothing-*.csv",
            "--features",
            "{root}/spec.json",
            "--output",
            "{root}/out1",
        ],
        "--input '{root}/nothing-*.csv' matches no file",
    ),
    (
        "malformed-spec",
        [
            "make-tasks",
            "--input",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec_malformed.json",
            "--output",
            "{root}/out2",
        ],
        "Invalid feature spec: not valid JSON",
    ),
    (
        "unknown-spec-key",
        [
            "make-tasks",
            "--input",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec_unknown_key.json",
            "--output",
            "{root}/out3",
        ],
        "`<spec>.weights` = 'uniform': unknown key",
    ),
    (
        "spec-column-not-in-input",
        [
            "make-tasks",
            "--input",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec_extra_column.json",
            "--output",
            "{root}/out4",
        ],
        "has no column 'price_typo' (the spec's request feature)",
    ),
    (
        "bad-flag-make-tasks",
        [
            "make-tasks",
            "--input",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec.json",
            "--output",
            "{root}/out5",
            "--max-support",
            "-3",
        ],
        "argument --max-support: expected a positive integer, got '-3'",
    ),
    (
        "bad-fraction-flag",
        [
            "make-tasks",
            "--input",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec.json",
            "--output",
            "{root}/out6",
            "--val-fraction",
            "1.5",
        ],
        "argument --val-fraction: expected a number in [0, 1), got '1.5'",
    ),
    (
        "unknown-meta-config-key",
        [
            "train",
            "--tasks",
            "{tasks}",
            "--features",
            "{root}/spec.json",
            "--model-dir",
            "{root}/m1",
            "--meta-config",
            "{root}/meta_unknown_key.json",
        ],
        "Unknown MetaConfig key 'inner_learning_rate'",
    ),
    (
        "spec-feature-not-in-tasks",
        [
            "train",
            "--tasks",
            "{tasks}",
            "--features",
            "{root}/spec_extra_column.json",
            "--model-dir",
            "{root}/m3",
        ],
        "Feature list 'query/price_typo' is required but could not be found",
    ),
    (
        "tasks-not-tfrecords",
        [
            "train",
            "--tasks",
            "{root}/interactions.csv",
            "--features",
            "{root}/spec.json",
            "--model-dir",
            "{root}/m4",
        ],
        "interactions.csv is not a GZIP TFRecord of task records",
    ),
    (
        "bad-flag-train",
        [
            "train",
            "--tasks",
            "{tasks}",
            "--features",
            "{root}/spec.json",
            "--model-dir",
            "{root}/m5",
            "--learning-rate",
            "nan",
        ],
        "argument --learning-rate: expected a positive number, got 'nan'",
    ),
    (
        "missing-export",
        [
            "embed",
            "--export",
            "{root}/no-export",
            "--tasks",
            "{tasks}",
            "--output",
            "{root}/embeddings",
        ],
        "No SavedModel at {root}/no-export",
    ),
    (
        "bad-flag-embed",
        [
            "embed",
            "--export",
            "{root}/no-export",
            "--tasks",
            "{tasks}",
            "--output",
            "{root}/embeddings",
            "--batch-size",
            "0",
        ],
        "argument --batch-size: expected a positive integer, got '0'",
    ),
]


@pytest.fixture(scope="module")
def cli_results(cli_files):
    """Runs every CLI_ERRORS command as its own process, two at a time."""

    def run(case):
        name, argv, _ = case
        argv = [a.format(**cli_files) for a in argv]
        return name, subprocess.run(
            [sys.executable, "-m", "tf_limaml.cli", *argv],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=cli_files["root"],
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, CLI_ERRORS))


@pytest.mark.parametrize(
    "name, argv, message", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS]
)
def test_cli_user_error_is_one_line_exit_2_no_traceback(
    cli_files, cli_results, name, argv, message
):
    check_cli_user_error(cli_results[name], argv[0], message.format(**cli_files))


def check_cli_user_error(result, command: str, message: str) -> None:
    """Exit 2, one `limaml COMMAND: error: ...` line naming `message`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last == errors[0] and last.startswith(f"limaml {command}: error: ")
    # No TensorFlow C++ start-up lines and no Beam import warnings around it.
    for noise in ("I0000", "absl::", "oneDNN", "cuda", "apitools"):
        assert noise not in result.stderr, result.stderr
    assert message in last


# -------------------------------------------------------------- determinism
# The synthetic spec with everything left to the analyzers: "auto"
# vocabularies (one with top_k), normalized numerics without mean/std (one
# log1p), and a numeric fed raw whose blanks get the training mean.
ANALYZED = {
    "segment": {"vocabulary": "auto"},
    "activity": {"mean": None, "std": None},
    "item_id": {"vocabulary": "auto", "top_k": 50, "hash_buckets": None},
    "topics": {"vocabulary": "auto"},
    "f0": {"mean": None, "std": None, "transform": "log1p", "statistics": None},
    "f1": {"normalize": False, "mean": None, "std": None, "statistics": None},
    "f2": {"mean": None, "std": None, "statistics": None},
}


def analyzed_spec() -> dict:
    obj = synthetic.synthetic_spec().to_dict()
    for part in ("meta_features", "request_features"):
        for entry in obj[part]:
            entry.update(ANALYZED.get(entry["name"], {}))
            for key in [k for k, v in entry.items() if v is None]:
                del entry[key]
    return obj


def _write_split_inputs(
    directory, num_entities=60, parts=3, seed=4, analyzed: bool = False
) -> str:
    """Synthetic interactions in `parts` CSV files and their spec.json.

    With `analyzed`, the spec is `analyzed_spec()` and some f1 and activity
    cells are blank, so every analyzer make-tasks has runs.
    """
    rows = synthetic.generate_interactions(num_entities=num_entities, seed=seed)
    rows.append(dict(rows[0], clicked="maybe"))  # one row for the dead letter
    if analyzed:
        for i, row in enumerate(rows):
            if i % 7 == 3:
                row["f1"] = ""
            if i % 11 == 5:
                row["activity"] = ""
    os.makedirs(directory, exist_ok=True)
    for k in range(parts):
        synthetic.write_csv(rows[k::parts], os.path.join(directory, f"part-{k}.csv"))
    spec = analyzed_spec() if analyzed else synthetic.synthetic_spec().to_dict()
    with open(os.path.join(directory, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return os.path.join(directory, "part-*.csv")


def _file_bytes(directory) -> dict[str, bytes]:
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
    }


def _make_tasks_argv(inputs, output, *extra):
    """make-tasks arguments; without `--output` when output is None."""
    return [
        "--input",
        inputs,
        "--features",
        os.path.join(os.path.dirname(inputs), "spec.json"),
        *(["--output", output] if output is not None else []),
        "--max-support",
        "8",
        "--seed",
        "3",
        *extra,
    ]


def check_the_analyzers_ran(directory: str) -> None:
    """spec.json of an `analyzed` input holds what the analyzers computed."""
    spec = FeatureSpec.load(os.path.join(directory, "spec.json"))
    assert spec.missing_statistics() == []
    assert len(spec.feature("item_id").vocabulary) == 50
    assert spec.feature("segment").vocabulary and spec.feature("topics").vocabulary
    for name in ("activity", "f0", "f2"):
        assert spec.feature(name).statistics["source"] == "make_tasks", name
    assert spec.feature("f1").default is not None  # blanks: the training mean


def test_make_tasks_writes_byte_identical_files(tmp_path):
    # The spec leaves statistics, vocabularies and blanks' means to the
    # analyzers, so their merges are compared too.
    inputs = _write_split_inputs(str(tmp_path / "in"), analyzed=True)
    # Three shards: Beam's own sinks would put each record in a shard picked
    # at random (and order it by bundle), so two runs would rarely match. The
    # second run is another process, with another PYTHONHASHSEED and the other
    # DirectRunner mode (multi_processing).
    first, second = str(tmp_path / "run1"), str(tmp_path / "run2")
    argv = _make_tasks_argv(inputs, None, "--num-shards", "3")
    # Beside: every file each run writes, in every process, is under its
    # --output (an audit hook here, and in the child and its workers).
    watch = tmp_path / "watch"
    watch.mkdir()
    env = process_env(_env(), watch_dir=str(watch))
    with watch_writes() as written:
        a = check_make_tasks_identical_across_processes(argv, first, second, env)
    check_writes_under(written, [first])
    check_child_writes_under(str(watch), second)
    check_the_analyzers_ran(first)
    assert len([n for n in a if n.startswith("train-")]) == 3
    # The GZIP header has no time stamp (MTIME = 0), so the day of the run
    # cannot change the bytes either.
    for name in a:
        if name.endswith(".gz"):
            assert a[name][:2] == b"\x1f\x8b" and a[name][4:8] == b"\0\0\0\0", name
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            sorted(glob.glob(os.path.join(first, "train-*.tfrecord.gz"))),
            compression_type="GZIP",
        )
    ]
    stats = json.load(open(os.path.join(first, "stats.json")))
    assert len(records) == stats["splits"]["train"]["entities"] > 0
    assert stats["rows_rejected"] == 1 and stats["conservation"]["holds"]
    # Within a shard, records are sorted by entity id.
    shard = sorted(glob.glob(os.path.join(first, "train-00000-*.tfrecord.gz")))[0]
    ids = [
        tf.train.SequenceExample.FromString(r.numpy())
        .context.feature["entity_id"]
        .bytes_list.value[0]
        for r in tf.data.TFRecordDataset(shard, compression_type="GZIP")
    ]
    assert ids == sorted(ids) and len(ids) > 1


@pytest.mark.slow
def test_make_tasks_is_byte_identical_across_processes_and_running_modes(tmp_path):
    """Every analyzer, with and without --passes, in both DirectRunner modes.

    Six child processes, each with its own PYTHONHASHSEED: in memory and
    multi_processing, each in one pass and in three (`--passes 3`, whose
    partial statistics the driver merges), and in memory with another seed.
    """
    inputs = _write_split_inputs(str(tmp_path / "in"), num_entities=200, analyzed=True)
    in_memory = ["--direct_running_mode=in_memory"]
    multi = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    passes = ["--passes", "3"]
    runs = {
        "in_memory_hashseed_1": ("1", in_memory),
        "in_memory_hashseed_2": ("2", in_memory),
        "multi_processing": ("3", multi),
        "in_memory_passes": ("4", in_memory + passes),
        "multi_processing_passes": ("5", multi + passes),
    }
    outputs = {}
    for name, (seed, flags) in runs.items():
        out = str(tmp_path / name)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tf_limaml.cli",
                "make-tasks",
                *_make_tasks_argv(inputs, out, "--num-shards", "3"),
                *flags,
            ],
            env=_env(PYTHONHASHSEED=seed),
            check=True,
            capture_output=True,
            timeout=600,
        )
        outputs[name] = _file_bytes(out)
    check_the_analyzers_ran(str(tmp_path / "in_memory_hashseed_1"))
    reference = outputs.pop("in_memory_hashseed_1")
    assert "spec.json" in reference and len(reference) > 6, sorted(reference)
    for name, files in outputs.items():
        assert sorted(files) == sorted(reference), name
        for file in reference:
            assert files[file] == reference[file], f"{name} wrote another {file}"


# ----------------------------------------------------------------- security
DATA_PATH_PACKAGES = ("tf_limaml", "beam_pipelines", "serving")
# The runtime guard imports pickle to wrap its loaders, and never calls them on
# data itself; the scan skips it (its own test is below).
GUARD_MODULE = os.path.join("beam_pipelines", "data_guard.py")
# Calls that run or unpickle what they read.
UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("_pickle", "load"),
    ("_pickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "unsafe_load_all"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("joblib", "load"),
    ("torch", "load"),
    ("jsonpickle", "decode"),
}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__", "input"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Calls in `source` that could evaluate or unpickle data, as "file:line: call"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.split(".")[0] in (
                    "pickle",
                    "cPickle",
                    "_pickle",
                    "dill",
                    "cloudpickle",
                    "marshal",
                    "shelve",
                    "jsonpickle",
                ):
                    found.append(f"{filename}:{node.lineno}: import {module}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        keywords = {k.arg: k.value for k in node.keywords}
        if name in UNSAFE_BUILTINS or parts[-2:] in UNSAFE_CALLS:
            found.append(f"{filename}:{node.lineno}: {name}()")
        elif parts[-2:] in (("yaml", "load"), ("yaml", "load_all")):
            loader = keywords.get("Loader") or (
                node.args[1] if len(node.args) > 1 else None
            )
            if (
                loader is None
                or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS
            ):
                found.append(f"{filename}:{node.lineno}: {name}() without SafeLoader")
        elif parts[-1] in ("load", "loadtxt") and parts[0] in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (
                isinstance(allow, ast.Constant) and allow.value is False
            ):
                found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=...)")
        elif parts[-1] in (
            "Popen",
            "run",
            "call",
            "check_call",
            "check_output",
            "system",
        ):
            shell = keywords.get("shell")
            if parts[0] == "os" or (
                shell is not None
                and not (isinstance(shell, ast.Constant) and shell.value is False)
            ):
                found.append(f"{filename}:{node.lineno}: {name}(shell)")
        elif parts[-1] == "load_model" and "safe_mode" in keywords:
            found.append(f"{filename}:{node.lineno}: {name}(safe_mode=...)")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = (
        "import pickle\nimport numpy as np\nimport yaml\nfrom dill import loads\n"
        "pickle.loads(b)\neval(text)\nexec(code)\nyaml.load(f)\n"
        "yaml.load(f, Loader=yaml.Loader)\nnp.load(p, allow_pickle=True)\n"
        "pd.read_pickle(p)\nsubprocess.run(cmd, shell=True)\nos.system(cmd)\n"
    )
    lines = [int(hit.split(":")[1]) for hit in unsafe_calls(bad, "bad.py")]
    # Every line but the harmless imports of numpy (2) and yaml (3).
    assert lines == [1] + list(range(4, 14))
    good = (
        "import json\nimport numpy as np\nimport yaml\njson.loads(s)\n"
        "yaml.load(f, Loader=yaml.SafeLoader)\nyaml.safe_load(f)\n"
        "np.load(p)\nnp.load(p, allow_pickle=False)\nsubprocess.run([a, b])\n"
        "tf.saved_model.load(path)\nmodel.evaluate(x)\n"
    )
    assert unsafe_calls(good, "good.py") == []


def test_nothing_on_the_data_path_unpickles_or_evaluates_input():
    check_nothing_on_the_data_path_unpickles(ROOT)


def check_nothing_on_the_data_path_unpickles(root: str) -> None:
    """No module of the data-path packages under `root` makes an unsafe call."""
    files = [
        path
        for package in DATA_PATH_PACKAGES
        for path in glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True)
    ]
    assert len(files) > 15
    found = []
    for path in files:
        if os.path.relpath(path, root) == GUARD_MODULE:
            continue
        with open(path, encoding="utf-8") as f:
            found += unsafe_calls(f.read(), os.path.relpath(path, root))
    assert not found, "unsafe calls on the data path:\n" + "\n".join(found)


HOSTILE_IDS = [
    "../../etc",
    "/abs",
    "../../../../../../tmp/limaml-escape",
    "a/../../b",
    "..",
    "~root",
    "$(touch pwned)",
    "C:\\Windows\\x",
    "name\nwith newline",
]


def _snapshot(root: str) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def _run_both_jobs(tmp_path, tasks_dir: str, embed_dir: str, export_dir: str) -> None:
    """make-tasks on tmp_path/interactions.csv, then embed of its tasks."""
    from beam_pipelines import generate_embeddings, make_tasks

    make_tasks.run(
        [
            "--input",
            str(tmp_path / "interactions.csv"),
            "--features",
            str(tmp_path / "spec.json"),
            "--output",
            tasks_dir,
        ]
    )
    generate_embeddings.run(
        [
            "--export",
            export_dir,
            "--tasks",
            os.path.join(tasks_dir, "*.tfrecord.gz"),
            "--output",
            embed_dir,
            "--parquet",
        ]
    )


def test_entity_ids_are_data_never_paths(exported, tmp_path, monkeypatch):

    rows = synthetic.generate_interactions(num_entities=len(HOSTILE_IDS) + 2, seed=6)
    owners = sorted({r["member_id"] for r in rows})
    rename = dict(zip(owners, HOSTILE_IDS, strict=False))
    for row in rows:
        row["member_id"] = rename.get(row["member_id"], row["member_id"])
    # Relative ids would resolve against the working directory: make it a
    # deep folder of tmp_path, so any escape lands where the snapshot sees it.
    cwd = tmp_path / "a" / "b" / "c" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    synthetic.write_csv(rows, tmp_path / "interactions.csv")
    synthetic.synthetic_spec().save(str(tmp_path / "spec.json"))
    before = _snapshot(str(tmp_path))
    outside = ["/abs", "/etc/limaml-test", "/tmp/limaml-escape", str(cwd / "pwned")]
    existed = {p: os.path.exists(p) for p in outside}

    tasks_dir, embed_dir = str(tmp_path / "tasks"), str(tmp_path / "embeddings")
    # The snapshot below sees what is left in tmp_path; the audit hook every
    # write of the whole run, anywhere, even of a file deleted afterwards.
    with watch_writes() as written:
        _run_both_jobs(tmp_path, tasks_dir, embed_dir, exported["export_dir"])
    check_writes_under(written, [tasks_dir, embed_dir])
    for root in (tasks_dir, embed_dir):
        assert any(p.startswith(root + os.sep) for p in written), root

    written = _snapshot(str(tmp_path)) - before
    assert written, "the jobs wrote nothing"
    for path in written:
        assert path.startswith((tasks_dir + os.sep, embed_dir + os.sep)), path
    for path, was_there in existed.items():
        assert os.path.exists(path) == was_there, path
    # File names come from the fixed output names only.
    for path in written:
        name = os.path.relpath(path, tmp_path)
        assert not any(
            bad in name for bad in ("etc", "abs", "escape", "pwned", "~")
        ), name

    # And every id is still there, byte for byte, as data.
    task_ids = set()
    for record in tf.data.TFRecordDataset(
        sorted(glob.glob(os.path.join(tasks_dir, "*.tfrecord.gz"))),
        compression_type="GZIP",
    ):
        example = tf.train.SequenceExample.FromString(record.numpy())
        task_ids.add(example.context.feature["entity_id"].bytes_list.value[0].decode())
    assert set(HOSTILE_IDS) <= task_ids
    embedded = set()
    for record in tf.data.TFRecordDataset(
        sorted(glob.glob(os.path.join(embed_dir, "embeddings-*.tfrecord.gz"))),
        compression_type="GZIP",
    ):
        example = tf.train.Example.FromString(record.numpy())
        embedded.add(example.features.feature["entity_id"].bytes_list.value[0].decode())
    assert embedded == task_ids
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(embed_dir, "parquet"))
    assert set(table.column("entity_id").to_pylist()) == task_ids


def test_the_runtime_data_guard_stops_a_job_that_unpickles_or_evaluates(
    exported, tmp_path, monkeypatch
):
    """Beside the scan: make-tasks and embed, made to run code on data, fail.

    The guard (beam_pipelines/data_guard.py) is on in every test (conftest);
    every other make-tasks and embed test shows the real data path passes it.
    """
    from guarantees import (
        check_the_data_guard_stops_a_job_that_runs_code,
        unpickle_in_the_data_path,
    )

    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            exported["tasks"]["test"], compression_type="GZIP"
        ).take(4)
    ]
    unpickle_in_the_data_path(monkeypatch)
    check_the_data_guard_stops_a_job_that_runs_code(
        tmp_path, exported["export_dir"], records
    )


def test_the_runtime_data_guard_is_scoped_to_the_data_path():
    """Off the guarded functions, and for imports inside them, nothing is refused."""
    import pickle

    from beam_pipelines import data_guard

    assert data_guard.enabled()
    assert pickle.loads(pickle.dumps({"a": 1})) == {"a": 1}
    assert eval("1 + 1") == 2  # noqa: S307

    @data_guard.guarded
    def swallowing():
        try:
            pickle.loads(pickle.dumps(1))
        except Exception:  # noqa: BLE001 - the guard raises again on return
            return "swallowed"

    with pytest.raises(data_guard.DataIsCodeError, match=r"pickle.loads"):
        swallowing()

    loads = getattr(pickle, "loads")  # noqa: B009 - an alias the scan misses

    @data_guard.guarded
    def runs(code):
        return code()

    import _pickle
    import collections

    for what, code in [
        ("pickle.loads", lambda: loads(pickle.dumps([1, 2]))),
        (
            "pickle.find_class",
            lambda: _pickle.loads(pickle.dumps(collections.Counter())),
        ),
        ("marshal.loads", lambda: __import__("marshal").loads(b"N")),
        ("exec", lambda: eval("1 + 1")),  # noqa: S307
    ]:
        with pytest.raises(data_guard.DataIsCodeError, match=what):
            runs(code)

    @data_guard.guarded
    def importing():
        import json.tool  # noqa: F401, PLC0415 - exec and marshal of an import

        return "imported"

    assert importing() == "imported"
