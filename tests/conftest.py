"""Shared fixtures: small synthetic task files and a tiny model configuration."""

import logging
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The runtime data guard (beam_pipelines/data_guard.py) is on in every test and
# in the processes they start: the make-tasks and embed data paths raise on
# unpickling, marshal and exec/eval.
os.environ["LIMAML_DATA_GUARD"] = "1"

import pytest  # noqa: E402

SMALL_MODEL = {
    "meta_units": [16, 8],
    "global_units": [32, 16],
    "cross_layers": 1,
    "interaction": "product",
}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def tensorflow_warnings():
    """The messages TensorFlow's logger warns with during the test (it does not
    propagate to the root logger, so caplog never sees them)."""
    tf_logger, handler = logging.getLogger("tensorflow"), _Messages()
    tf_logger.addHandler(handler)
    yield handler.messages
    tf_logger.removeHandler(handler)


@pytest.fixture(scope="session")
def synthetic_tasks(tmp_path_factory):
    """Train/val/test task files of 300 synthetic members (paths by split, plus spec)."""
    from tf_limaml.datasets import synthetic

    out = tmp_path_factory.mktemp("synthetic_tasks")
    return synthetic.write_tasks(str(out), num_entities=300, seed=0)


@pytest.fixture(scope="session")
def synthetic_spec(synthetic_tasks):
    from tf_limaml.features import FeatureSpec

    return FeatureSpec.load(synthetic_tasks["spec"])


@pytest.fixture
def small_model_kwargs():
    return dict(SMALL_MODEL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_tasks):
    """The shared test export (tiny seeded model), built once per session."""
    from serving_fixture import build_test_export

    return build_test_export(tmp_path_factory, synthetic_tasks)


@pytest.fixture(scope="module")
def session(exported):
    """The export loaded with the TF1 loader, as TF Serving loads it."""
    from serving_fixture import SessionSignatures

    model = SessionSignatures(exported["export_dir"])
    yield model
    model.close()


@pytest.fixture(scope="session")
def crashed_training(tmp_path_factory, synthetic_tasks, synthetic_spec):
    """A training run stopped after 5 of its steps, checkpointing every 3.

    Returns `train(model_dir, **kwargs)` (the same run again, in any directory,
    with more `training.train` arguments such as callbacks), the
    crashed run's model directory (copy it before resuming) and the steps of an
    uninterrupted run.
    """
    import math

    from guarantees import train_counting_steps

    from tf_limaml import data, training
    from tf_limaml.model import MetaConfig

    batch_tasks = 16
    steps_total = math.ceil(data.count_tasks(synthetic_tasks["train"]) / batch_tasks)

    def train(model_dir, **kwargs):
        return training.train(
            synthetic_tasks["train"],
            synthetic_spec,
            str(model_dir),
            MetaConfig(jit_compile=False),
            epochs=1,
            batch_tasks=batch_tasks,
            checkpoint_every=3,
            seed=7,
            verbose=0,
            model_kwargs={k: SMALL_MODEL[k] for k in ("meta_units", "global_units")},
            **kwargs,
        )

    model_dir = tmp_path_factory.mktemp("crashed_training") / "model"
    assert train_counting_steps(lambda: train(model_dir), crash_after=5) == 5
    return {"train": train, "model_dir": str(model_dir), "steps_total": steps_total}
