"""tf_limaml.config: one name, one default and one description for each knob."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from tf_limaml import config, errors
from tf_limaml.config import AdaptOptions, Architecture, MetaConfig


def test_the_config_module_imports_no_tensorflow():
    code = (
        "import sys\nimport tf_limaml.config, tf_limaml.errors\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("cls", [MetaConfig, AdaptOptions, Architecture])
def test_every_field_has_a_description(cls):
    docs = config.field_docs(cls)
    assert list(docs) == [f.name for f in dataclasses.fields(cls)]
    assert all(text and "  " not in text for text in docs.values()), docs


def test_field_docs_join_continuation_lines():
    assert config.field_docs(MetaConfig)["adapt"] == (
        '"meta_block" (LiMAML) or "all" (full-network MAML: every dense weight of '
        "both blocks adapts; embedding tables never do)."
    )


def test_adapt_options_use_meta_config_names():
    meta = {f.name for f in dataclasses.fields(MetaConfig)}
    assert {f.name for f in dataclasses.fields(AdaptOptions)} <= meta


@pytest.mark.parametrize(
    "cls, kwargs, field, message",
    [
        (
            MetaConfig,
            {"inner_lr": -1.0},
            "inner_lr",
            "MetaConfig.inner_lr must be a number >= 0, got -1.0",
        ),
        (
            MetaConfig,
            {"inner_steps": 1.5},
            "inner_steps",
            "MetaConfig.inner_steps must be an integer >= 0, got 1.5",
        ),
        (
            MetaConfig,
            {"first_order": "yes"},
            "first_order",
            "MetaConfig.first_order must be true or false, got 'yes'",
        ),
        (
            MetaConfig,
            {"adapt": "both"},
            "adapt",
            "MetaConfig.adapt must be one of ('meta_block', 'all'), got 'both'",
        ),
        (
            AdaptOptions,
            {"support_prior": float("nan")},
            "support_prior",
            "AdaptOptions.support_prior must be a number >= 0, got nan",
        ),
        (
            Architecture,
            {"meta_units": [8, 0]},
            "meta_units",
            "Architecture.meta_units must be a non-empty list of positive integers",
        ),
        (
            Architecture,
            {"global_units": "64"},
            "global_units",
            "Architecture.global_units must be a non-empty list",
        ),
        (
            Architecture,
            {"cross_layers": -1},
            "cross_layers",
            "Architecture.cross_layers must be an integer >= 0, got -1",
        ),
        (
            Architecture,
            {"projection_dim": 0},
            "projection_dim",
            "Architecture.projection_dim must be a positive integer or null, got 0",
        ),
        (
            Architecture,
            {"interaction": "sum"},
            "interaction",
            "Architecture.interaction must be one of ('concat', 'product')",
        ),
    ],
)
def test_a_bad_field_is_a_config_error_naming_it(cls, kwargs, field, message):
    with pytest.raises(errors.ConfigError, match=re.escape(message)) as err:
        cls(**kwargs)
    assert err.value.field == field
    # User errors are ValueErrors too, so `except ValueError` callers keep working.
    assert isinstance(err.value, errors.UserInputError)
    assert isinstance(err.value, ValueError)


def test_load_names_an_unknown_key(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"inner_step": 2}))
    with pytest.raises(errors.ConfigError, match="Unknown MetaConfig key 'inner_step'"):
        MetaConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(errors.UserInputError, match="is not valid JSON"):
        MetaConfig.load(path)
    with pytest.raises(FileNotFoundError, match="MetaConfig not found"):
        MetaConfig.load(tmp_path / "missing.json")


def test_architecture_round_trips_through_json():
    arch = Architecture.from_dict(
        {"meta_units": [16, 8], "projection_dim": 4, "interaction": "concat"}
    )
    assert arch.meta_units == (16, 8)
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert arch.to_dict()["meta_units"] == [16, 8]


def test_architecture_defaults_are_the_models():
    """One default for each width: the model's constructor agrees."""
    import inspect

    from tf_limaml import layers, training
    from tf_limaml.model import LiMAMLModel

    parameters = inspect.signature(LiMAMLModel.__init__).parameters
    for field in dataclasses.fields(Architecture):
        default = parameters[field.name].default
        if isinstance(field.default, tuple):
            default = tuple(default)
        assert default == field.default, field.name
    assert config.INTERACTIONS == layers.INTERACTIONS
    assert training.default_model_kwargs() == Architecture().to_dict()


def test_user_facing_errors_share_the_public_bases():
    from tf_limaml import cli, distribute, training
    from tf_limaml.features import FeatureSpecError

    for cls in (
        errors.ConfigError,
        FeatureSpecError,
        distribute.StrategyError,
        cli.CommandError,
    ):
        assert issubclass(cls, errors.UserInputError), cls
        assert issubclass(cls, ValueError), cls
    for cls in (training.NonFiniteLossError, training.ModelFailedError):
        assert issubclass(cls, errors.TrainingFailedError), cls
        assert issubclass(cls, RuntimeError), cls
    assert issubclass(errors.UserInputError, errors.LimamlError)
    assert issubclass(errors.TrainingFailedError, errors.LimamlError)
    assert not issubclass(errors.TrainingFailedError, errors.UserInputError)


def test_options_coerce_from_themselves_their_dict_or_none():
    assert config.as_meta_config(None) == MetaConfig()
    assert config.as_meta_config({"inner_lr": 0.3}) == MetaConfig(inner_lr=0.3)
    options = AdaptOptions(inner_steps=2)
    assert config.as_adapt_options(options) is options
    assert config.as_adapt_options(None).overrides == {}
    with pytest.raises(errors.ConfigError, match="`options` must be AdaptOptions"):
        config.as_adapt_options(3)


def test_adapt_options_resolve_over_the_trained_config():
    trained = MetaConfig(inner_steps=1, inner_lr=0.1, first_order=False)
    deployed = AdaptOptions(inner_lr=0.3).merged(AdaptOptions(inner_steps=3))
    assert deployed.resolve(trained) == MetaConfig(
        inner_steps=3, inner_lr=0.3, first_order=False
    )
    # Unset fields keep the trained values; set ones win, the later on top.
    assert AdaptOptions().resolve(trained) is trained
    assert deployed.merged(AdaptOptions(inner_lr=0.5)).inner_lr == 0.5


def test_deprecated_call_keywords_map_onto_adapt_options():
    with pytest.warns(DeprecationWarning, match=r"\['steps'\]"):
        options = config.call_options(None, {"steps": 2, "inner_lr": None})
    assert options == AdaptOptions(inner_steps=2)
    with pytest.raises(TypeError, match="nope"):
        config.call_options(None, {"nope": 1})
