"""The `limaml` command.

Argument parsing, `--help` and argument errors import neither TensorFlow nor
Beam; each subcommand imports what it needs only when it runs.

`limaml train` builds its inner-loop flags from the fields of
`tf_limaml.config.MetaConfig` and its architecture flags from
`tf_limaml.config.Architecture`: one name (`inner_lr`, `--inner-lr`), one
default, one description for each knob.

Errors the library explains (`tf_limaml.errors.LimamlError`: missing files, bad
specs, bad flag or config values) print one line and exit with 2 (1 for a run
whose model failed); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from tf_limaml import config
from tf_limaml.argtypes import non_negative_int as _non_negative_int
from tf_limaml.argtypes import positive_float as _positive_float
from tf_limaml.argtypes import positive_int as _positive_int
from tf_limaml.errors import (
    ConfigError,
    LimamlError,
    TrainingFailedError,
    UserInputError,
)

EXIT_USAGE = 2
# 128 + SIGINT, as a shell reports a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
# A run that finished but whose model failed (diverged, constant, chance-level).
EXIT_FAILED = 1


class CommandError(UserInputError):
    """A user error the command itself finds: printed as one line, exit code 2."""


def _quiet_tensorflow() -> None:
    """Hides TensorFlow's C++ start-up noise; must run before TF is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")


# Commands that import TensorFlow, and those that also run Beam pipelines.
_TF_FREE_COMMANDS = {"serve-command"}
_BEAM_COMMANDS = {"make-tasks", "embed", "demo"}


@contextlib.contextmanager
def _quiet_imports():
    """Hides what importing TensorFlow and Beam prints to a terminal.

    absl's C++ start-up lines (oneDNN, CUDA drivers) go straight to file
    descriptor 2, out of reach of TF_CPP_MIN_LOG_LEVEL, so fd 2 points at
    /dev/null for the import; Beam warns on the root logger about optional
    GCP libraries a local run does not use. Exceptions still propagate, after
    stderr is restored.
    """
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    root = logging.getLogger()
    saved_level = root.level
    os.dup2(devnull, 2)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)
        root.setLevel(saved_level)


def _import_quietly(command: str) -> None:
    if command in _TF_FREE_COMMANDS:
        return
    with _quiet_imports():
        import tensorflow  # noqa: F401, PLC0415

        if command in _BEAM_COMMANDS:
            import apache_beam.io  # noqa: F401, PLC0415


class Progress:
    """One line per phase on stderr: `[limaml] phase ... done in 3.2 s`."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def phase(self, name: str):
        progress = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"[limaml] {name} ...", file=progress.stream, flush=True)
                return self

            def __exit__(self, exc_type, exc, tb):
                if exc_type is None:
                    seconds = time.perf_counter() - self.start
                    print(
                        f"[limaml] {name}: done in {seconds:.1f} s",
                        file=progress.stream,
                        flush=True,
                    )
                return False

        return _Phase()

    def step(self, job: str):
        """A callback for a job's passes: `[limaml] job: pass 2 of 8 ...`."""

        def announce(index: int, count: int) -> None:
            print(
                f"[limaml] {job}: pass {index + 1} of {count} ...",
                file=self.stream,
                flush=True,
            )

        return announce


def _load_spec(path: str):
    from tf_limaml.features import FeatureSpec  # noqa: PLC0415

    if not os.path.exists(path) and "://" not in path:
        raise CommandError(f"feature spec not found: {path}")
    return FeatureSpec.load(path)


def _check_tasks(pattern: str, spec=None) -> None:
    import tensorflow as tf  # noqa: PLC0415

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise CommandError(f"no task files match {pattern!r}")
    if spec is None:
        return
    from tf_limaml import data  # noqa: PLC0415

    # Parse one record now: a wrong file or a spec that does not match the
    # records would otherwise fail deep inside training with a traceback.
    try:
        for record in tf.data.TFRecordDataset(files[:1], compression_type="GZIP").take(
            1
        ):
            data.parse_task_batch(record[None], spec, 1, 1)
    except tf.errors.OpError as err:
        # TF's first line, without its "{{function_node ...}}" and "[Op:...]" noise.
        detail = (err.message.strip().splitlines() or [type(err).__name__])[0]
        detail = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{[^}]*\}\}\s*", "", detail))
        detail = detail.replace("Name: <unknown>, ", "").split("  Did you mean")[0]
        raise CommandError(
            f"{files[0]} is not a GZIP TFRecord of task records for this feature spec "
            f"({detail}); pass the make-tasks output and its spec.json"
        ) from None


# ------------------------------------------------------------------ commands
def _complete_spec(spec, tasks: str, model_dir: str, progress: Progress):
    """The spec with its missing statistics computed from the TRAIN task records.

    A spec of types only would otherwise train on raw scales (a year of 1990,
    a price in thousands) and diverge; saying so and fixing it beats that.
    """
    missing = spec.missing_statistics()
    if not missing:
        return spec
    import tensorflow as tf  # noqa: PLC0415

    from tf_limaml.statistics import complete_spec_from_tasks  # noqa: PLC0415

    path = os.path.join(model_dir, "spec.json")
    with progress.phase(
        f"statistics of {', '.join(missing)} (the spec has none) from the train "
        f"tasks {tasks} -> {path}"
    ):
        spec = complete_spec_from_tasks(spec, tasks)
        tf.io.gfile.makedirs(model_dir)
        spec.save(path)
    return spec


def _strategy(args: argparse.Namespace):
    """The --strategy of a command, built before TensorFlow runs any op.

    MultiWorkerMirroredStrategy and logical CPU devices configure the runtime,
    which is only possible before its first op (reading a record is one).
    """
    from tf_limaml import distribute  # noqa: PLC0415

    if args.devices is not None and args.strategy != "mirrored":
        raise CommandError(
            f"--devices applies to --strategy mirrored, got --strategy {args.strategy}"
        )
    try:
        return distribute.get_strategy(args.strategy, devices=args.devices)
    except distribute.StrategyError as err:
        raise CommandError(str(err)) from None


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of config class `cls` set on the command line, by name."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


def _meta_config(args: argparse.Namespace) -> config.MetaConfig:
    """MetaConfig's defaults, under the --meta-config file, under the flags."""
    from_file = {}
    if args.meta_config:
        try:
            from_file = config.MetaConfig.load(args.meta_config).to_dict()
        except ConfigError as err:
            raise CommandError(f"--meta-config {args.meta_config}: {err}") from None
    return config.MetaConfig.from_dict({**from_file, **_given(args, config.MetaConfig)})


# `limaml train`'s task and optimizer flags, and their defaults. They default
# to None in the parser so that `--recipe` can tell a flag given from one left out.
TRAIN_DEFAULTS = {
    "epochs": 5,
    "batch_tasks": 32,
    "max_support": 32,
    "max_query": 32,
    "learning_rate": 1e-3,
}
# Flags that set what a recipe sets: refused beside `--recipe`.
_RECIPE_CONFLICTS = (
    "meta_config",
    *TRAIN_DEFAULTS,
    "validation_tasks",
    "tensorboard",
    "checkpoint_every",
    "devices",
)


def _recipe_conflicts(args: argparse.Namespace) -> list[str]:
    """The flags given beside --recipe that the recipe sets (or cannot honour)."""
    names = [n for n in _RECIPE_CONFLICTS if getattr(args, n, None) is not None]
    names += list(_given(args, config.MetaConfig))
    names += list(_given(args, config.Architecture))
    if args.strategy != "none":
        names.append("strategy")
    return [_flag(n) for n in names]


def cmd_train_recipe(args: argparse.Namespace) -> int:
    """`limaml train --recipe FILE`: the recipe whole (`experiments.ship`)."""
    conflicts = _recipe_conflicts(args)
    if conflicts:
        raise CommandError(
            f"{', '.join(conflicts)} cannot be given with --recipe, which sets the "
            "warm start, meta-training and adapt-time knobs itself; edit the "
            "recipe file instead"
        )
    if not os.path.isdir(args.tasks):
        raise CommandError(
            f"--tasks {args.tasks!r} is not a directory; with --recipe pass the "
            "--output directory of `limaml make-tasks`"
        )
    from tf_limaml.experiments import ship  # noqa: PLC0415

    recipe = ship.load_recipe(args.recipe)
    spec = _load_spec(args.features or os.path.join(args.tasks, "spec.json"))
    train_pattern = os.path.join(args.tasks, "train-*.tfrecord.gz")
    _check_tasks(train_pattern, spec)
    progress = Progress()
    spec = _complete_spec(spec, train_pattern, args.model_dir, progress)
    print(
        f"[limaml] recipe {args.recipe}: {ship.recipe_summary(recipe)}",
        file=sys.stderr,
        flush=True,
    )
    summary = ship.train_recipe(
        spec, args.tasks, recipe, args.model_dir, seed=args.seed, progress=progress
    )
    print(json.dumps({**summary, "recipe": args.recipe}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tf_limaml import training  # noqa: PLC0415

    if args.recipe:
        return cmd_train_recipe(args)
    if not args.features:
        raise CommandError(
            "--features SPEC.json is required (or --recipe FILE with --tasks, the "
            "make-tasks directory that holds spec.json)"
        )
    for name, default in TRAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    strategy = _strategy(args)
    spec = _load_spec(args.features)
    meta_config = _meta_config(args)
    architecture = config.Architecture.from_dict(_given(args, config.Architecture))
    _check_tasks(args.tasks, spec)
    if args.validation_tasks:
        _check_tasks(args.validation_tasks, spec)
    progress = Progress()
    spec = _complete_spec(spec, args.tasks, args.model_dir, progress)
    with progress.phase(
        f"meta-train ({meta_config.inner_steps} inner steps of rate "
        f"{meta_config.inner_lr}, "
        f"{'first' if meta_config.first_order else 'second'} order, strategy "
        f"{args.strategy}: {strategy.num_replicas_in_sync} replica(s))"
    ):
        _, history = training.train(
            args.tasks,
            spec,
            args.model_dir,
            meta_config,
            epochs=args.epochs,
            batch_tasks=args.batch_tasks,
            max_support=args.max_support,
            max_query=args.max_query,
            seed=args.seed,
            learning_rate=args.learning_rate,
            validation_tasks=args.validation_tasks,
            tensorboard=args.tensorboard,
            checkpoint_every=args.checkpoint_every,
            strategy=strategy,
            model_kwargs=architecture,
        )
    final = {k: round(v[-1], 4) for k, v in history.items()}
    print(json.dumps({"model_dir": args.model_dir, "final": final}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tensorflow as tf  # noqa: PLC0415

    from tf_limaml import data, evaluation  # noqa: PLC0415
    from tf_limaml.saving import load_model  # noqa: PLC0415

    _check_tasks(args.tasks)
    model = load_model(args.model_dir)
    _check_tasks(args.tasks, model.spec)
    sizes = evaluation.query_set_sizes(args.tasks, model.spec)
    # Every query row by default: the longest query set sets the padding.
    max_query = args.max_query or max(sizes, default=1) or 1
    coverage = evaluation.query_coverage(sizes, max_query)
    batches = data.task_dataset(
        args.tasks, model.spec, args.batch_tasks, args.max_support, max_query
    )
    with Progress().phase("evaluate"):
        metrics = evaluation.evaluate_model(model, batches)
    metrics["query_rows"] = coverage
    if coverage["left_out"]:
        print(
            f"[limaml] evaluate: scored {coverage['scored']} of "
            f"{coverage['in_files']} query rows, {coverage['left_out']} left out: "
            f"{coverage['why']}",
            file=sys.stderr,
            flush=True,
        )
    text = json.dumps(metrics, indent=2, default=float)
    print(text)
    if args.output:
        with tf.io.gfile.GFile(args.output, "w") as f:
            f.write(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tf_limaml.experiments import demo  # noqa: PLC0415

    args.strategy = _strategy(args)
    return demo.run(args, Progress())


def cmd_tune(args: argparse.Namespace) -> int:
    from tf_limaml.experiments import tune  # noqa: PLC0415
    from tf_limaml.experiments.protocol import (  # noqa: PLC0415
        Protocol,
        records_from_dir,
    )
    from tf_limaml.experiments.recipes import Recipe  # noqa: PLC0415
    from tf_limaml.features import ENTITY_ID_KEY  # noqa: PLC0415

    spec_path = os.path.join(args.tasks, "spec.json")
    if not os.path.isdir(args.tasks):
        raise CommandError(
            f"--tasks {args.tasks!r} is not a directory; pass the --output "
            "directory of `limaml make-tasks`"
        )
    spec = _load_spec(spec_path)
    progress = Progress()
    protocol = Protocol()
    with progress.phase(f"load tasks from {args.tasks}"):
        records = records_from_dir(args.tasks)
        splits = tune.tuning_splits(records, spec, protocol)
    if args.recipe and args.fast:
        raise CommandError(
            "--fast and --recipe both set the starting recipe; give one of them "
            "(a recipe with fewer epochs is a fast one)"
        )
    if args.recipe:
        from tf_limaml.experiments import ship  # noqa: PLC0415

        # Tune picks the adapt-time knobs itself: a recipe's own are dropped.
        recipe = dataclasses.replace(
            ship.load_recipe(args.recipe),
            adapt_inner_steps=None,
            adapt_inner_lr=None,
            adapt_support_prior=None,
        )
    else:
        recipe = Recipe.fast() if args.fast else Recipe()
    with progress.phase(
        f"tune: {args.budget} trained candidate(s) + the global fallback, scored "
        f"on a held-out fold of {len(splits.test[ENTITY_ID_KEY])} train entities"
    ):
        result = tune.tune(
            spec,
            splits,
            recipe,
            budget=args.budget,
            seed=args.seed,
            ks=protocol.support_ks,
            report_line=lambda text: print(text, file=sys.stderr, flush=True),
        )
        paths = tune.write_outputs(result, args.output)
    trial = result["trials"][result["chosen"]]
    print(
        json.dumps(
            {
                **paths,
                "chosen": result["chosen_name"],
                "is_fallback": bool(trial["fallback"]),
                "val_mean_lift": round(trial["mean_lift"], 4),
            }
        )
    )
    return 0


def cmd_make_tasks(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from beam_pipelines import make_tasks  # noqa: PLC0415

    _load_spec(args.features)
    progress = Progress()
    with progress.phase(f"make-tasks {args.input} -> {args.output}"):
        make_tasks.run(list(args.argv), on_pass=progress.step("make-tasks"))
    stats_path = os.path.join(args.output, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        summary = {
            k: stats[k]
            for k in ("rows_read", "rows_rejected", "rows_cold", "rows_dropped_by_caps")
            if k in stats
        }
        print(json.dumps({"stats": stats_path, **summary}))
    return 0


def cmd_embed(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from beam_pipelines import generate_embeddings  # noqa: PLC0415
    from tf_limaml import export  # noqa: PLC0415

    # A wrong file or records of another spec fail here, in a line, rather
    # than after the whole job has dead-lettered every record.
    metadata = export.read_metadata(args.export)
    _check_tasks(args.tasks, metadata["spec"])
    progress = Progress()
    with progress.phase(
        f"embed {args.tasks} with model version {metadata['model_version']} "
        f"-> {args.output}"
    ):
        generate_embeddings.run(list(args.argv), on_pass=progress.step("embed"))
    import tensorflow as tf  # noqa: PLC0415 - gfile reads gs:// outputs too

    summary_path = os.path.join(args.output, "summary.json")
    with tf.io.gfile.GFile(summary_path) as f:
        summary = json.load(f)
    keys = (
        "entities_in",
        "entities_out",
        "entities_cold_start",
        "entities_support_truncated",
        "records_rejected",
    )
    print(json.dumps({"summary": summary_path, **{k: summary[k] for k in keys}}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tf_limaml import export  # noqa: PLC0415

    with Progress().phase("export"):
        path = export.export_from_model_dir(
            args.model_dir,
            args.export_base,
            version=args.version,
            max_support=args.max_support,
        )
    print(path)
    return 0


def cmd_serve_command(args: argparse.Namespace) -> int:
    from tf_limaml.export import commands as export_commands  # noqa: PLC0415

    try:
        commands = export_commands.serve_commands(
            args.export, model_name=args.model_name
        )
    except ValueError as err:
        # Its ValueErrors all name a bad --model-name or a directory with no
        # export version in it: user errors, in a TensorFlow-free function.
        raise CommandError(str(err)) from None
    print(commands)
    return 0


# -------------------------------------------------------------------- parser
def _strategy_arguments(parser: argparse.ArgumentParser, choices) -> None:
    parser.add_argument(
        "--strategy",
        choices=choices,
        default="none",
        help="tf.distribute strategy: none (one device), mirrored (this "
        "machine's GPUs, or its CPU)"
        + (
            ", multi_worker (MultiWorkerMirroredStrategy; the cluster comes from "
            "TF_CONFIG, and every worker runs the same command)"
            if "multi_worker" in choices
            else ""
        )
        + ".",
    )
    parser.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="With --strategy mirrored: replicas, the first N GPUs, or N logical "
        "CPU devices on a machine without GPUs (for testing).",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _widths(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _converter(hint: Any) -> tuple[Callable[[str], Any], str]:
    """(text -> value, what the text should be) for a config field's type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        hint = args[0]  # X | None: a flag always gives an X
    if hint is int:
        return int, "an integer"
    if hint is float:
        return float, "a number"
    if typing.get_origin(hint) is tuple:
        return _widths, "comma-separated integers, such as 64,32"
    return str, "a string"


def _field_type(cls: type, name: str, hint: Any) -> Callable[[str], Any]:
    """An argparse type that converts a flag's text and validates it as `cls` does.

    A bad value fails while parsing (before TensorFlow is imported), as
    `argument --inner-lr: MetaConfig.inner_lr must be a number >= 0, got -1.0`.
    """
    convert, what = _converter(hint)

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            cls(**{name: value})
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def _config_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str, description: str
) -> None:
    """One flag per field of the config dataclass `cls`, in its own help group.

    The flag is the field's name (`inner_lr` -> `--inner-lr`), the help its
    description in the class docstring, and the default shown is the field's.
    Flags left out stay None, so that a file's value or the field's default
    applies (see `_given`); booleans take `--x` / `--no-x`.
    """
    group = parser.add_argument_group(title, description)
    hints = typing.get_type_hints(cls)
    docs = config.field_docs(cls)
    for field in dataclasses.fields(cls):
        text = f"{docs[field.name]} (default: {_shown(field.default)})"
        kwargs = {"dest": field.name, "default": None, "help": text.replace("%", "%%")}
        if hints[field.name] is bool:
            group.add_argument(
                _flag(field.name), action=argparse.BooleanOptionalAction, **kwargs
            )
            continue
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        else:
            kwargs["metavar"] = field.name.upper()
        group.add_argument(
            _flag(field.name),
            type=_field_type(cls, field.name, hints[field.name]),
            **kwargs,
        )


def build_parser() -> argparse.ArgumentParser:
    from beam_pipelines.options import (
        embed_arguments,
        make_tasks_arguments,
    )  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="limaml",
        description="Meta-learned per-member personalization (LiMAML) for TensorFlow "
        "recommenders.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Log at INFO level."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser(
        "train",
        help="Meta-train on task records, or train a recipe of `limaml tune`.",
        epilog="With --recipe FILE (the tune_config.json of `limaml tune`, or a "
        "Recipe JSON), the recipe runs whole on --tasks, the make-tasks directory: "
        "its warm start (the global network, or pretraining with member IDs), "
        "meta-training, and its adapt-time knobs, saved with the model "
        "(config.json, adapt_options); --features defaults to TASKS/spec.json. "
        "Only --tasks, --features, --model-dir and --seed go with it: the "
        "inner-loop, architecture, epoch, batch, support, learning-rate, "
        "validation, checkpoint and strategy flags are refused, since the recipe "
        "sets them. Tune's fallback recipe ships exactly the global network.",
    )
    train.add_argument(
        "--tasks",
        required=True,
        help="File pattern of training tasks (with --recipe: the make-tasks "
        "output directory).",
    )
    train.add_argument(
        "--features",
        help="FeatureSpec JSON file (required without --recipe; with it, default "
        "TASKS/spec.json).",
    )
    train.add_argument(
        "--model-dir", required=True, help="Output (and resume) directory."
    )
    train.add_argument(
        "--recipe",
        help="Train this recipe whole: a tune_config.json of `limaml tune` or a "
        "Recipe JSON (see below).",
    )
    train.add_argument(
        "--meta-config",
        help="MetaConfig JSON file (its keys are the inner-loop flags' names, "
        "such as inner_lr); a flag given on the command line wins.",
    )
    defaults = TRAIN_DEFAULTS
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"Epochs (default {defaults['epochs']}).",
    )
    train.add_argument(
        "--batch-tasks",
        type=_positive_int,
        default=None,
        help="Tasks per meta-batch; the global batch under a --strategy "
        f"(default {defaults['batch_tasks']}).",
    )
    train.add_argument(
        "--max-support",
        type=_positive_int,
        default=None,
        help=f"Support rows per task, the latest (default {defaults['max_support']}).",
    )
    train.add_argument(
        "--max-query",
        type=_positive_int,
        default=None,
        help=f"Query rows per task, the earliest (default {defaults['max_query']}).",
    )
    train.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=None,
        help=f"Outer Adam learning rate (default {defaults['learning_rate']:g}).",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--validation-tasks", help="File pattern of validation tasks.")
    train.add_argument("--tensorboard", help="TensorBoard log directory.")
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help="Checkpoint every N steps (default: every epoch).",
    )
    _strategy_arguments(train, ("none", "mirrored", "multi_worker"))
    _config_arguments(
        train,
        config.MetaConfig,
        "inner loop (tf_limaml.MetaConfig)",
        "Saved with the model in MODEL_DIR/config.json, under meta_config.",
    )
    _config_arguments(
        train,
        config.Architecture,
        "architecture (tf_limaml.config.Architecture)",
        "The widths and options of the meta and global blocks.",
    )
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="Query AUC and loss, adapted and unadapted."
    )
    evaluate.add_argument("--tasks", required=True)
    evaluate.add_argument("--model-dir", required=True)
    evaluate.add_argument("--output", help="Write the metrics JSON here too.")
    evaluate.add_argument("--batch-tasks", type=_positive_int, default=64)
    evaluate.add_argument("--max-support", type=_positive_int, default=32)
    evaluate.add_argument(
        "--max-query",
        type=_positive_int,
        default=None,
        help="Score the first N query rows of each task (default: every row; "
        "the output's query_rows says how many were scored and left out).",
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    demo = sub.add_parser("demo", help="Build tasks, train, evaluate and report.")
    demo.add_argument(
        "--dataset",
        choices=("synthetic", "movielens"),
        default=None,
        help="Embedded dataset (default: movielens, or the --input file).",
    )
    demo.add_argument("--input", help="Interactions file (instead of --dataset).")
    demo.add_argument("--format", choices=("csv", "parquet"), default="csv")
    demo.add_argument("--features", help="FeatureSpec JSON of --input.")
    demo.add_argument(
        "--workdir", default=None, help="Output directory (default runs/demo)."
    )
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="Number of seeds (default 3 for movielens, 1 for synthetic).",
    )
    demo.add_argument("--epochs", type=_positive_int, default=None)
    demo.add_argument("--fast", action="store_true", help="A smaller, quicker run.")
    demo.add_argument(
        "--extra-models",
        default=None,
        help="Comma list of the models beyond the paper to add: sequence "
        "(limaml_sequence), multi_entity (limaml_multi_entity, needs "
        "--item-feature); 'none' for neither (default: both on MovieLens, "
        "none on --input).",
    )
    demo.add_argument(
        "--item-feature",
        default=None,
        help="The request feature that names the item (default: the dataset's, "
        "item_id on MovieLens): query rows are bucketed by how often it was "
        "rated in training, and multi_entity personalizes it.",
    )
    demo.add_argument(
        "--tune-budget",
        type=_non_negative_int,
        default=None,
        help="With --input: trained candidates of `limaml tune` (default 4, "
        "2 with --fast); 0 skips tuning and keeps the default recipe.",
    )
    # Not multi_worker: every worker would run the whole demo (Beam jobs,
    # baselines, reports), not only the training it shares.
    _strategy_arguments(demo, ("none", "mirrored"))
    demo.set_defaults(handler=cmd_demo)

    tune = sub.add_parser(
        "tune",
        help="Choose LiMAML's recipe on the val entities (never worse than global).",
    )
    tune.add_argument(
        "--tasks",
        required=True,
        help="make-tasks output directory (records + spec.json).",
    )
    tune.add_argument(
        "--output",
        required=True,
        help="Writes tune_config.json, tune_trials.json and tune_trials.md here.",
    )
    tune.add_argument(
        "--budget",
        type=_positive_int,
        default=6,
        help="Trained candidates (meta-training runs); the global fallback and "
        "test-time knobs come on top (default 6).",
    )
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--fast", action="store_true", help="Fewer epochs per trial.")
    tune.add_argument(
        "--recipe",
        help="The starting recipe (a Recipe JSON, or an earlier tune_config.json): "
        "the first candidate trained, and the fields outside the search space "
        "(architecture, epochs) for every candidate (default: the MovieLens "
        "recipe, or its --fast version).",
    )
    tune.set_defaults(handler=cmd_tune)

    make_tasks = sub.add_parser(
        "make-tasks",
        help="Beam: interactions -> per-entity task records.",
        epilog="Any other flag goes to Beam's PipelineOptions (--runner, "
        "--direct_running_mode, --direct_num_workers, Dataflow flags).",
    )
    make_tasks_arguments(make_tasks)
    make_tasks.set_defaults(handler=cmd_make_tasks, takes_extra=True)

    export = sub.add_parser("export", help="Write a SavedModel for TF Serving.")
    export.add_argument("--model-dir", required=True)
    export.add_argument(
        "--export-base",
        required=True,
        help="Versions are written to EXPORT_BASE/<version>/.",
    )
    export.add_argument(
        "--version",
        type=_positive_int,
        default=None,
        help="Version number (default: latest + 1).",
    )
    export.add_argument(
        "--max-support",
        type=_positive_int,
        default=None,
        help="Longest support set the adaptation signatures accept.",
    )
    export.set_defaults(handler=cmd_export)

    embed = sub.add_parser(
        "embed",
        help="Beam: adapted meta embeddings for every entity.",
        epilog="Any other flag goes to Beam's PipelineOptions.",
    )
    embed_arguments(embed)
    embed.set_defaults(handler=cmd_embed, takes_extra=True)

    serve = sub.add_parser(
        "serve-command", help="Print the TF Serving command lines for an export."
    )
    serve.add_argument("export", help="Export base directory or a version directory.")
    serve.add_argument("--model-name", default="limaml")
    serve.set_defaults(handler=cmd_serve_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        # Named by its command, as every other user error (not "limaml: error").
        return _fail(args.command, f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_tensorflow()
    if not args.verbose:
        _import_quietly(args.command)
    # Pipelines re-parse their own flags (Beam style), so hand them the argv
    # after the subcommand name.
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    try:
        if getattr(args, "takes_extra", False):
            return args.handler(args, extra)
        return args.handler(args)
    except TrainingFailedError as err:
        # A non-finite loss or a model that failed its health check: a problem
        # of the data or the settings that the message explains.
        _fail(args.command, str(err))
        return EXIT_FAILED
    except (LimamlError, FileNotFoundError, FileExistsError) as err:
        # Explained by the library, or a path the user gave. Anything else
        # (a ValueError or KeyError included) is a bug: it keeps its traceback.
        return _fail(args.command, str(err))
    except KeyboardInterrupt:
        _fail(args.command, "interrupted")
        return EXIT_INTERRUPTED


def _fail(command: str, message: str) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"limaml {command}: error: {first_line}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
