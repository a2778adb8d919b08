"""Shared fixtures: small synthetic task files and a tiny model configuration."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

SMALL_MODEL = {
    "meta_units": [16, 8],
    "global_units": [32, 16],
    "cross_layers": 1,
    "interaction": "product",
}


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
