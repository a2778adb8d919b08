"""Every guarantee's check fails when its mechanism is switched off.

At least one test per row of the table in docs/guarantees.md: it
monkeypatches the mechanism off (skips the dead letter, drops the rename,
ignores the checkpoint, ...) and runs the same check the guarantee's own test runs
(`tests/guarantees.py`, or a `check_*` function of the test module), which
must now fail. A check that cannot fail proves nothing. The companions that
train a model or start a second process (over 20 s each) are marked slow.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import test_distribute as distribute_tests
import test_health as health_tests
import test_passes as passes_tests
import test_properties as properties_tests
import test_reliability as reliability_tests
import test_soak as soak_tests
import test_statistics as statistics_tests
import test_training as training_tests
import test_tune as tune_tests
from guarantees import (
    MULTI_PROCESSING,
    SimulatedCrash,
    check_blanks_get_the_train_mean,
    check_child_writes_under,
    check_embed_fails_when_an_entity_is_lost,
    check_embed_fails_when_the_writer_loses_a_record,
    check_every_row_accounted_for,
    check_make_tasks_identical_across_processes,
    check_nonfinite_step_is_not_applied,
    check_resume_runs_only_the_remaining_steps,
    check_the_data_guard_stops_a_job_that_runs_code,
    check_writes_under,
    drop_one_entity,
    drop_one_written_record,
    file_bytes,
    make_tasks_with_blank_prices,
    make_tasks_with_every_kind_of_loss,
    process_env,
    run_make_tasks_child,
    train_counting_steps,
    unpickle_in_the_data_path,
    watch_writes,
)
from process_hooks.write_watch import leaking_shard_writer
from serving_fixture import TEST_MAX_SUPPORT, SessionSignatures

from tf_limaml import data, evaluation, step
from tf_limaml.export import saved_model as export
from tf_limaml.model import LiMAMLModel, MetaConfig

# The check failed: an assertion, or pytest.raises that saw nothing raised.
CHECK_FAILED = (AssertionError, pytest.fail.Exception)
tiny = tune_tests.tiny  # the tuning fixture, shared with test_tune.py


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}


# -------------------------------------------------- every row is accounted for
def test_rows_sabotaged_without_the_dead_letter(tmp_path, monkeypatch):
    from beam_pipelines import build_tasks

    process = build_tasks.ValidateRows.process

    def no_dead_letter(self, element):
        for out in process(self, element):
            if not isinstance(out, build_tasks.beam.pvalue.TaggedOutput) or (
                out.tag != build_tasks.REJECTED
            ):
                yield out

    monkeypatch.setattr(build_tasks.ValidateRows, "process", no_dead_letter)
    run = make_tasks_with_every_kind_of_loss(tmp_path)
    with pytest.raises(AssertionError, match="rows_rejected"):
        check_every_row_accounted_for(run["output"], run["rows_in"])


# ------------------------------------------ statistics come from training only
def test_statistics_sabotaged_to_read_every_split(tmp_path, monkeypatch):
    from beam_pipelines import build_tasks

    process = build_tasks.SplitEntities.process
    tagged = build_tasks.beam.pvalue.TaggedOutput

    def every_split_analyzed(self, element):
        # The train-only filter off: val and test tasks feed the analyzers too.
        for out in process(self, element):
            yield out
            if isinstance(out, tagged) or out[0] == "train":
                continue
            history = build_tasks.task_rules.split_history(
                self.spec,
                element[0],
                list(element[1]),
                self.rule,
                self.min_support,
                self.min_query,
                self.max_support,
                self.max_query,
            )
            rows = history.support + history.query
            for item in build_tasks.analysis_inputs(self.spec, history.meta, rows):
                yield tagged(build_tasks.ANALYSIS, item)

    monkeypatch.setattr(build_tasks.SplitEntities, "process", every_split_analyzed)
    job = statistics_tests._run_make_tasks(tmp_path, "every_split")
    with pytest.raises(CHECK_FAILED):
        statistics_tests.check_statistics_from_train_records(job)


# ------------------------------------------ statistics under fuzz (issue 25)
def test_row_bound_sabotaged_to_keep_huge_values(tmp_path, monkeypatch):
    from tf_limaml import tasks

    # The +-3e38 bound off: 1e200 passes validation (in the job, which runs
    # in this process on the in-memory DirectRunner, and in the reference).
    monkeypatch.setattr(tasks, "MAX_ABS_NUMERIC", float("inf"))
    with pytest.raises(AssertionError, match="records hold non-finite floats"):
        properties_tests.check_fixed_fuzz_tables(str(tmp_path))


def test_fuzz_check_sabotaged_to_write_a_row_twice(tmp_path, monkeypatch):
    from beam_pipelines import build_tasks

    encode = build_tasks.task_data.encode_task

    def twice(spec, entity_id, meta, support, query):
        # Every row written is a row of the input (membership holds), one twice.
        return encode(spec, entity_id, meta, support, list(query) + list(query[:1]))

    monkeypatch.setattr(build_tasks.task_data, "encode_task", twice)
    with pytest.raises(AssertionError, match="counted with multiplicity"):
        properties_tests.check_fixed_fuzz_tables(str(tmp_path))


def test_overflow_refusal_sabotaged_off(monkeypatch):
    from tf_limaml import statistics

    monkeypatch.setattr(statistics, "overflowed_components", lambda moments: [])
    with pytest.raises(CHECK_FAILED):
        statistics_tests.check_overflowing_moments_are_refused()


def test_moments_sabotaged_to_sum_in_float64(monkeypatch):
    """The sums of x and x**2 kept as floats (a Welford/Chan-like accumulator
    rounds at every add and merge): the result depends on the order."""

    def add(self, values):
        self.count += 1
        for i, x in enumerate(values):
            self.sums[i] += float(x)
            self.squares[i] += float(x) * float(x)
            self.min[i], self.max[i] = min(self.min[i], x), max(self.max[i], x)
        return self

    def merge(self, other):
        for i in range(self.size):
            self.sums[i] += other.sums[i]
            self.squares[i] += other.squares[i]
        self.count += other.count
        return self

    monkeypatch.setattr(statistics_tests.Moments, "add", add)
    monkeypatch.setattr(statistics_tests.Moments, "merge", merge)
    with pytest.raises(CHECK_FAILED):
        statistics_tests.test_moments_are_exact_whatever_the_order_of_adds_and_merges()


def test_passes_vocabulary_sabotaged_to_keep_every_value(tmp_path, monkeypatch):
    from beam_pipelines import analyze, task_files

    # The prune off: the driver's selection after the last pass keeps every
    # (value, count) it meets (the spec is still right: only memory grows).
    monkeypatch.setattr(
        analyze.VocabularyCombineFn, "_prune", lambda self, acc, force=False: acc
    )
    seen = []
    read_partials = task_files.read_partials

    def spying(output_dir, count):
        seen.extend(read_partials(output_dir, count))
        return seen[-count:]

    monkeypatch.setattr(task_files, "read_partials", spying)
    candidates = passes_tests.spy_on_vocabulary_candidates(monkeypatch)
    inputs = passes_tests.write_inputs(tmp_path / "in")
    three = passes_tests._make_tasks(inputs, tmp_path / "three", "--passes", "3")
    with pytest.raises(AssertionError, match="candidates held"):
        passes_tests.check_passes_select_vocabularies_in_bounded_memory(
            three["spec.json"], candidates, seen
        )


# ------------------------------- blanks get the mean of the training rows only
def test_imputation_sabotaged_to_read_every_split(tmp_path, monkeypatch):
    from beam_pipelines import build_tasks

    process = build_tasks.SplitEntities.process
    tagged = build_tasks.beam.pvalue.TaggedOutput

    def every_split_imputes(self, element):
        # The train-only filter off: val and test prices reach the mean that
        # fills the blanks.
        for out in process(self, element):
            yield out
            name = out.value[0] if isinstance(out, tagged) else out[0]
            if name == "train" or (
                isinstance(out, tagged) and out.tag != build_tasks.NEEDS_FILL
            ):
                continue
            rows = [r for r in element[1]]
            for item in build_tasks.analysis_inputs(self.spec, {}, rows):
                yield tagged(build_tasks.ANALYSIS, item)

    monkeypatch.setattr(build_tasks.SplitEntities, "process", every_split_imputes)
    run = make_tasks_with_blank_prices(tmp_path)
    with pytest.raises(CHECK_FAILED):
        check_blanks_get_the_train_mean(run)


# ------------------------------------------------------------ no quiet garbage
@pytest.mark.slow  # over 20 s: a training run or a second process
def test_health_sabotaged_to_pass_everything(
    tmp_path, synthetic_tasks, monkeypatch, capsys
):
    check = evaluation.health_check

    def always_healthy(*args, **kwargs):
        return dict(check(*args, **kwargs), healthy=True, reasons=[])

    monkeypatch.setattr(
        LiMAMLModel, "predict_query", health_tests._constant_predict_query
    )
    monkeypatch.setattr(evaluation, "health_check", always_healthy)
    with pytest.raises(AssertionError):
        health_tests.check_a_constant_model_fails_training(
            tmp_path, synthetic_tasks, capsys
        )


# ------------------------------------------------- personalization never hurts
@pytest.mark.slow  # over 20 s: a training run or a second process
def test_tune_sabotaged_to_keep_candidates_below_global(tiny, monkeypatch):
    from tf_limaml.experiments import tune

    def best_lift(trials, *args, **kwargs):
        # No fallback preference, no "not below global at any k", no min gain.
        personal = [i for i, t in enumerate(trials) if not t.get("fallback")]
        return max(personal, key=lambda i: trials[i]["mean_lift"])

    monkeypatch.setattr(tune, "select", best_lift)
    with pytest.raises(AssertionError):
        tune_tests.check_tune_falls_back_when_personalization_hurts(tiny, monkeypatch)


# ----------------------------------------------- every entity is accounted for
def test_embed_sabotaged_without_the_balance_check(
    exported, tmp_path, capsys, monkeypatch
):
    from beam_pipelines import generate_embeddings

    summary = generate_embeddings.embed_summary
    monkeypatch.setattr(
        generate_embeddings,
        "embed_summary",
        lambda *args: dict(summary(*args), balanced=True),
    )
    drop_one_entity(monkeypatch)
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            exported["tasks"]["test"], compression_type="GZIP"
        ).take(6)
    ]
    with pytest.raises(AssertionError):
        check_embed_fails_when_an_entity_is_lost(
            records, tmp_path, exported["export_dir"], capsys
        )


# ---------------------------------------------------------------- atomic export
def test_export_sabotaged_to_write_in_place(exported, tmp_path, monkeypatch):
    base = str(tmp_path / "exports")
    shutil.copytree(exported["export_dir"], os.path.join(base, "1"))
    reliability_tests._assert_only_complete_versions(base, [1])

    @contextlib.contextmanager
    def in_place(export_base, version):
        yield os.path.join(str(export_base), str(version))  # no temp dir, no rename

    def crash(*args, **kwargs):  # killed midway: after the SavedModel, before the rest
        raise SimulatedCrash("killed while writing the warmup requests")

    monkeypatch.setattr(export, "staged_version", in_place)
    monkeypatch.setattr(export, "_write_warmup", crash)
    with pytest.raises(SimulatedCrash):
        export.export_model(exported["model"], base, max_support=TEST_MAX_SUPPORT)
    with pytest.raises(AssertionError):
        reliability_tests._assert_only_complete_versions(base, [1])


# ------------------------------------------------------------ training resumes
def test_resume_sabotaged_to_ignore_the_checkpoint(
    crashed_training, tmp_path, monkeypatch
):
    model_dir = tmp_path / "model"
    shutil.copytree(crashed_training["model_dir"], model_dir)
    backup_and_restore = tf.keras.callbacks.BackupAndRestore
    fresh = str(tmp_path / "elsewhere")
    monkeypatch.setattr(
        tf.keras.callbacks,
        "BackupAndRestore",
        lambda backup_dir, **kwargs: backup_and_restore(fresh, **kwargs),
    )
    with pytest.raises(AssertionError, match="remained"):
        check_resume_runs_only_the_remaining_steps(
            str(model_dir),
            crashed_training["steps_total"],
            lambda: train_counting_steps(lambda: crashed_training["train"](model_dir)),
        )


def test_nonfinite_step_sabotaged_to_be_applied(
    synthetic_tasks, synthetic_spec, monkeypatch
):
    def applied(model, grads, finite):
        model.optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )

    monkeypatch.setattr(step, "apply_gradients", applied)
    batch = next(iter(data.task_dataset(synthetic_tasks["train"], synthetic_spec, 8)))
    values = batch["support_f0"].numpy()
    values[3, 0] = np.nan
    bad = dict(batch, support_f0=tf.constant(values))
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        synthetic_spec, MetaConfig(jit_compile=False), **training_tests.SMALL
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    with pytest.raises(AssertionError, match="changed"):
        check_nonfinite_step_is_not_applied(model, batch, bad)


def test_zeroing_alone_sabotaged_in_for_the_skip(
    synthetic_tasks, synthetic_spec, monkeypatch
):
    """Zeroed gradients without the skip: Adam's moments still move the weights."""

    def zeroed_only(model, grads, finite):
        grads = [step.where_finite(finite, g) for g in grads]
        model.optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )

    monkeypatch.setattr(step, "apply_gradients", zeroed_only)
    batch = next(iter(data.task_dataset(synthetic_tasks["train"], synthetic_spec, 8)))
    values = batch["support_f0"].numpy()
    values[3, 0] = np.nan
    bad = dict(batch, support_f0=tf.constant(values))
    tf.keras.utils.set_random_seed(0)
    model = LiMAMLModel(
        synthetic_spec, MetaConfig(jit_compile=False), **training_tests.SMALL
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    with pytest.raises(AssertionError, match="changed"):
        check_nonfinite_step_is_not_applied(model, batch, bad)


# ---------------------------------------------------------------- determinism
@pytest.mark.slow  # over 20 s: a training run or a second process
def test_make_tasks_sabotaged_to_shard_by_pythons_hash(tmp_path, monkeypatch):
    from beam_pipelines import shards

    # Python's str hash, salted per process (PYTHONHASHSEED): in this process
    # by a monkeypatch, and in the child `limaml make-tasks` and its
    # multi_processing workers by tests/process_hooks/sitecustomize.py.
    monkeypatch.setattr(shards, "shard_of", lambda key, n: hash(key) % n)
    env = process_env(_env(), sabotage="shard_by_pythons_hash")
    inputs = reliability_tests._write_split_inputs(str(tmp_path / "in"))
    argv = reliability_tests._make_tasks_argv(inputs, None, "--num-shards", "3")
    with pytest.raises(AssertionError, match="differs between the two processes"):
        check_make_tasks_identical_across_processes(
            argv, str(tmp_path / "a"), str(tmp_path / "b"), env
        )
    # What fails is the salt, and the sabotage reaches the child: two
    # sabotaged children agree with the same PYTHONHASHSEED and differ with
    # another one.
    runs = {}
    for name, seed in (("seed1", "1"), ("seed1_again", "1"), ("seed2", "2")):
        out = str(tmp_path / name)
        run_make_tasks_child(
            [*argv, "--output", out, *MULTI_PROCESSING], {**env, "PYTHONHASHSEED": seed}
        )
        runs[name] = file_bytes(out)
    assert runs["seed1"] == runs["seed1_again"]
    assert runs["seed1"] != runs["seed2"]


@pytest.mark.slow  # a second process
def test_make_tasks_sabotaged_to_break_vocabulary_ties_by_pythons_hash(
    tmp_path, monkeypatch
):
    from beam_pipelines import analyze

    # The analyzers' determinism: item_id's top_k (50) cut falls inside a
    # tie (25 values seen 7 times, 14 of them kept), which the selection now
    # breaks by the salted hash of the value, here and in the child and its
    # workers; two salts keep the same 14 with odds of 1 in C(25, 14) = 4.5M.
    monkeypatch.setattr(analyze, "_rank", lambda vc: (-vc[1], hash(vc[0])))
    env = process_env(_env(), sabotage="vocabulary_ties_by_pythons_hash")
    inputs = reliability_tests._write_split_inputs(str(tmp_path / "in"), analyzed=True)
    argv = reliability_tests._make_tasks_argv(inputs, None, "--num-shards", "3")
    with pytest.raises(AssertionError, match="spec.json differs"):
        check_make_tasks_identical_across_processes(
            argv, str(tmp_path / "a"), str(tmp_path / "b"), env
        )


def test_training_sabotaged_to_ignore_the_seed(tmp_path, synthetic_tasks):
    # In the child processes, where training runs: each seeds from its pid.
    weights = training_tests.train_in_two_processes(
        tmp_path, synthetic_tasks, sabotage=True
    )
    with pytest.raises(AssertionError, match="differs between the processes"):
        training_tests.check_same_seed_gives_identical_weights(weights)


# ---------------------------------------------------- serving input validation
def test_serving_sabotaged_without_the_shape_checks(exported, tmp_path, monkeypatch):
    from tf_limaml.export import serving_module as export_signatures

    monkeypatch.setattr(
        export_signatures, "_checked_inputs", lambda inputs, specs: dict(inputs)
    )
    path = export.export_model(
        exported["model"], str(tmp_path / "exports"), max_support=TEST_MAX_SUPPORT
    )
    session = SessionSignatures(path)
    try:
        batch = next(
            iter(
                data.task_dataset(
                    exported["tasks"]["test"],
                    exported["spec"],
                    batch_tasks=1000,
                    max_support=TEST_MAX_SUPPORT,
                    max_query=8,
                )
            )
        )
        inputs = reliability_tests._good_inputs(
            exported, {k: v.numpy() for k, v in batch.items()}
        )["serving_default"]
        with pytest.raises(CHECK_FAILED):
            reliability_tests.check_wrong_shape_fails_naming_the_input(
                session,
                "serving_default",
                inputs,
                "meta_embedding",
                lambda v: v[:, :3],
            )
    finally:
        session.close()


# -------------------------------------------------------------- clear CLI errors
def test_cli_sabotaged_to_show_the_traceback(tmp_path, monkeypatch):
    # The one-line error handler off: the child process re-raises instead.
    script = (
        "import sys\nfrom tf_limaml import cli\n"
        "def fail(command, message):\n    raise SystemExit(f'Traceback: {message}')\n"
        "cli._fail = fail\nsys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = ["train", "--tasks", "x", "--features", str(tmp_path / "none.json")]
    result = subprocess.run(
        [sys.executable, "-c", script, *argv, "--model-dir", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    with pytest.raises(AssertionError):
        reliability_tests.check_cli_user_error(
            result, "train", "feature spec not found"
        )


# ------------------------------------------------------------------ under load
def test_soak_sabotaged_with_wrong_answers(exported, tmp_path, monkeypatch):
    from bench import soak

    run = SessionSignatures.run
    calls = itertools.count()

    def sometimes_wrong(self, signature, inputs):
        out = run(self, signature, inputs)
        if next(calls) % 5 == 4:
            out = {k: np.asarray(v) + 1.0 for k, v in out.items()}
        return out

    monkeypatch.setattr(SessionSignatures, "run", sometimes_wrong)
    result = soak.main(
        [
            "--export",
            exported["export_dir"],
            "--tasks",
            exported["tasks"]["test"],
            "--seconds",
            "1",
            "--callers",
            str(soak_tests.CALLERS),
            "--results",
            str(tmp_path / "results.jsonl"),
        ]
    )
    with pytest.raises(AssertionError):
        soak_tests._check(result, 1)


# ---------------------------------------------------------------- data is data
def test_data_path_sabotaged_to_unpickle(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in reliability_tests.DATA_PATH_PACKAGES:
        shutil.copytree(
            os.path.join(root, package),
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    # A cache of parsed tasks that unpickles what it reads.
    with open(tmp_path / "tf_limaml" / "data.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef read_cached(blob):\n    return pickle.loads(blob)\n")
    with pytest.raises(AssertionError, match="pickle.loads"):
        reliability_tests.check_nothing_on_the_data_path_unpickles(str(tmp_path))


# -------------------------------------------------- distributed = one device
def test_distribution_sabotaged_without_the_replica_scaling(synthetic_tasks):
    results = distribute_tests.run_mirrored_and_single(synthetic_tasks, sabotage=True)
    with pytest.raises(CHECK_FAILED):
        distribute_tests.check_mirrored_equals_single(results)


# ------------------------------------------------ the report tells the truth
def test_verdict_sabotaged_to_compare_with_global_only(monkeypatch):
    import test_report as report_tests

    from tf_limaml.experiments import report

    # The verdict's yardstick cut down to global: LiMAML beats it, so the
    # report would call LiMAML the winner while the ID embedding beats it.
    monkeypatch.setattr(report, "BASELINES", ("global",))
    with pytest.raises(CHECK_FAILED):
        report_tests.check_verdict_names_the_strongest_baseline_when_limaml_loses()


# ------------------------------------- training resumes: the restored state
def test_resume_sabotaged_to_restore_only_the_step_counter(
    crashed_training, tmp_path, monkeypatch
):
    from tf_keras.src.distribute import worker_training_state

    def counters_only(self):
        # The step counters come back, so the run resumes at the right step;
        # the weights and LazyAdam's slots keep their fresh values.
        reader = tf.train.load_checkpoint(
            self.read_checkpoint_manager.latest_checkpoint
        )

        def value(name):
            return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

        self._model.optimizer.iterations.assign(value("model/optimizer/_iterations"))
        self._ckpt_saved_epoch.assign(value("ckpt_saved_epoch"))
        self._ckpt_saved_batch.assign(value("ckpt_saved_batch"))

    monkeypatch.setattr(
        worker_training_state.WorkerTrainingState, "restore", counters_only
    )
    with pytest.raises(AssertionError, match="differ from the checkpoint"):
        training_tests.check_resume_restores_the_checkpoint(crashed_training, tmp_path)


def test_mirrored_nonfinite_step_sabotaged_without_the_zeroing(synthetic_tasks):
    # In the child process: `step.where_finite` is the identity there.
    result = distribute_tests.run_nonfinite_mirrored_step(
        synthetic_tasks, sabotage="where_finite"
    )
    with pytest.raises(AssertionError, match="changed"):
        distribute_tests.check_nonfinite_mirrored_step(result)


def test_mirrored_nonfinite_step_sabotaged_to_zero_one_replica_only(synthetic_tasks):
    # In the child process: each replica zeroes only its own gradients, so the
    # finite replica's half of the step is applied.
    result = distribute_tests.run_nonfinite_mirrored_step(
        synthetic_tasks, sabotage="all_replicas_finite"
    )
    with pytest.raises(AssertionError, match="changed"):
        distribute_tests.check_nonfinite_mirrored_step(result)


# ------------------------------- every entity is accounted for: what was written
def test_embed_sabotaged_to_balance_the_dofns_counts_only(
    exported, tmp_path, capsys, monkeypatch
):
    """The writer loses a record, and the balance ignores the read-back counts."""
    from beam_pipelines import generate_embeddings

    monkeypatch.setattr(
        generate_embeddings,
        "_with_written",
        lambda counts, written, parquet: dict(counts),
    )
    drop_one_written_record(monkeypatch)
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            exported["tasks"]["test"], compression_type="GZIP"
        ).take(6)
    ]
    with pytest.raises(AssertionError):
        check_embed_fails_when_the_writer_loses_a_record(
            records, tmp_path, exported["export_dir"], capsys
        )


# ------------------------------------------------- data is data, at run time
def test_data_guard_sabotaged_off(exported, tmp_path, monkeypatch):
    """The job unpickles and evaluates, and the runtime guard is off: nothing stops it."""
    from beam_pipelines import data_guard

    monkeypatch.setenv(data_guard.ENV, "0")
    unpickle_in_the_data_path(monkeypatch)
    records = [
        r.numpy()
        for r in tf.data.TFRecordDataset(
            exported["tasks"]["test"], compression_type="GZIP"
        ).take(4)
    ]
    with pytest.raises(CHECK_FAILED):
        check_the_data_guard_stops_a_job_that_runs_code(
            tmp_path, exported["export_dir"], records
        )


# ------------------------------------ every file a job writes is under --output
def test_writes_sabotaged_outside_output(tmp_path, tmp_path_factory, monkeypatch):
    from beam_pipelines import make_tasks, shards

    # Each shard write first writes and deletes a file elsewhere: no trace
    # left on disk, so only a watch of the whole run can see it.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    leaky = leaking_shard_writer(shards._write_shard, str(elsewhere))
    monkeypatch.setattr(shards, "_write_shard", leaky)
    inputs = reliability_tests._write_split_inputs(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    with watch_writes() as written:
        make_tasks.run(reliability_tests._make_tasks_argv(inputs, out))
    assert os.listdir(elsewhere) == []
    with pytest.raises(AssertionError, match="wrote outside --output"):
        check_writes_under(written, [out])


@pytest.mark.slow  # a second process
def test_child_writes_sabotaged_outside_output(tmp_path, tmp_path_factory):
    # In the child and its multi_processing workers, where the shards are written.
    elsewhere, watch = tmp_path_factory.mktemp("elsewhere"), tmp_path / "watch"
    watch.mkdir()
    env = process_env(
        _env(),
        sabotage="write_outside_output",
        watch_dir=str(watch),
        leak_dir=str(elsewhere),
    )
    inputs = reliability_tests._write_split_inputs(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    argv = reliability_tests._make_tasks_argv(inputs, out, "--num-shards", "3")
    run_make_tasks_child([*argv, *MULTI_PROCESSING], env)
    assert os.listdir(elsewhere) == []
    with pytest.raises(AssertionError, match="wrote outside --output"):
        check_child_writes_under(str(watch), out)
