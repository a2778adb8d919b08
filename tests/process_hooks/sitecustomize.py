"""Test-only hooks in the processes a test starts; never on a user's path.

A test puts this folder first on a child's PYTHONPATH
(`tests/guarantees.py::process_env`); Python imports `sitecustomize` at
startup, in that process and in every process it starts with the same
environment (the DirectRunner's multi_processing workers too). Each hook is
off unless its variable is set:

* LIMAML_TEST_SABOTAGE=shard_by_pythons_hash: `beam_pipelines.shards.shard_of`
  becomes `hash(key) % n`, salted per process by PYTHONHASHSEED. Patched
  before any module takes the name, so every caller in the process gets it:
  the sabotage companion of the determinism test switches the SHA-256
  sharding off where the job runs, not only in the test process.
* LIMAML_TEST_SABOTAGE=vocabulary_ties_by_pythons_hash: the bounded
  vocabulary selection (`beam_pipelines.analyze._rank`) breaks count ties by
  `hash(value)` instead of the value: which values a `top_k` cut keeps then
  depends on PYTHONHASHSEED.
* LIMAML_TEST_SABOTAGE=write_outside_output: writing a shard first writes
  and deletes a file in LIMAML_TEST_LEAK_DIR (`leaking_shard_writer`), which
  leaves no trace on disk for a snapshot to see.
* LIMAML_TEST_WRITE_WATCH=DIR: every path the process writes (an audit hook,
  `write_watch.py`) is appended, as it happens, to DIR/writes-<pid>.jsonl, so
  a worker killed at the end of the job has reported already.
"""

import json
import os

_sabotage = os.environ.get("LIMAML_TEST_SABOTAGE")
if _sabotage == "shard_by_pythons_hash":
    from beam_pipelines import shards as _shards

    def _salted_shard_of(key: str, num_shards: int) -> int:
        return hash(key) % num_shards

    _shards.shard_of = _salted_shard_of
elif _sabotage == "vocabulary_ties_by_pythons_hash":
    from beam_pipelines import analyze as _analyze

    def _salted_rank(value_count):
        return -value_count[1], hash(value_count[0])

    _analyze._rank = _salted_rank
elif _sabotage == "write_outside_output":
    from write_watch import leaking_shard_writer

    from beam_pipelines import shards as _shards

    _shards._write_shard = leaking_shard_writer(
        _shards._write_shard, os.environ["LIMAML_TEST_LEAK_DIR"]
    )
elif _sabotage:
    raise RuntimeError(f"unknown LIMAML_TEST_SABOTAGE={_sabotage!r}")

_watch_dir = os.environ.get("LIMAML_TEST_WRITE_WATCH")
if _watch_dir:
    import write_watch as _write_watch

    _report = os.path.join(_watch_dir, f"writes-{os.getpid()}.jsonl")

    def _report_write(event: str, path: str) -> None:
        with open(_report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "path": path}) + "\n")

    _write_watch.start(_report_write)
