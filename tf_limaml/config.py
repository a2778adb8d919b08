"""Configuration of the inner loop, free of TensorFlow.

`MetaConfig` is what a model is meta-trained with; it is saved with the model
and never changes after construction. `AdaptOptions` holds the adapt-time
knobs (steps, rate, prior) that a call, or a deployed model, may set apart
from training: each field left `None` keeps the trained value.
`Architecture` holds the widths and options of the library's blocks.

Each parses from a JSON object and validates every field with a
`tf_limaml.errors.ConfigError` that names it, so the command line builds its
flags from their fields (and their help from `field_docs`) without importing
TensorFlow.

Example:

    config = MetaConfig(inner_steps=1, inner_lr=0.3, support_prior=10.0)
    options = AdaptOptions(inner_steps=3)
    options.resolve(config)   # MetaConfig(inner_steps=3, inner_lr=0.3, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

from tf_limaml.errors import ConfigError, UserInputError

ADAPT_CHOICES = ("meta_block", "all")
# How the global block meets the meta embedding (`Architecture.interaction`).
INTERACTIONS = ("concat", "product")

_Config = TypeVar("_Config", bound="_JsonConfig")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_steps(owner: str, value: Any, name: str = "inner_steps") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{owner}.{name} must be an integer >= 0, got {value!r}", name, value
        )


def _check_positive(owner: str, name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0  # also refuses NaN
        or value == float("inf")
    ):
        raise ConfigError(
            f"{owner}.{name} must be a finite number > 0, got {value!r}", name, value
        )


def _check_number(owner: str, name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0  # also refuses NaN
    ):
        raise ConfigError(
            f"{owner}.{name} must be a number >= 0, got {value!r}", name, value
        )


def _check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{owner}.{name} must be true or false, got {value!r}", name, value
        )


def _read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file's object; local paths without TensorFlow, URLs through tf.io."""
    path = str(path)
    if "://" in path:
        import tensorflow as tf  # noqa: PLC0415  (remote files only)

        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{what} {path} is not valid JSON ({err})") from None


class _JsonConfig:
    """from_dict / load / to_dict for a frozen dataclass of options."""

    @classmethod
    def coerce(cls: type[_Config], value: Any, argument: str) -> _Config:
        """The options from themselves, their dict, or None (the defaults).

        Raises:
            ConfigError: `value` is none of those; the message names `argument`.
        """
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if not isinstance(value, cls):
            raise ConfigError(
                f"`{argument}` must be {cls.__name__} or its dict, got {value!r}",
                argument,
                value,
            )
        return value

    @classmethod
    def from_dict(cls: type[_Config], obj: Mapping[str, Any]) -> _Config:
        """Builds the options from a JSON object; unknown keys are an error."""
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {obj!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ConfigError(
                f"Unknown {cls.__name__} key {unknown[0]!r}; known keys are "
                f"{sorted(known)}",
                unknown[0],
                obj[unknown[0]],
            )
        return cls(**obj)

    @classmethod
    def load(cls: type[_Config], path: str | os.PathLike) -> _Config:
        """Reads the options from a JSON file."""
        return cls.from_dict(_read_json(path, cls.__name__))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MetaConfig(_JsonConfig):
    """Options of the inner loop and the meta-train step.

    Attributes:
        inner_steps: k, gradient steps on the support set (0 disables adaptation).
        inner_lr: Inner learning rate; the initial value when learned.
        learn_inner_lr: Learn one rate per adapted parameter (Meta-SGD).
        first_order: Drop the second-order term (FOMAML).
        adapt: "meta_block" (LiMAML) or "all" (full-network MAML: every dense
            weight of both blocks adapts; embedding tables never do).
        adapt_embeddings: Also adapt the looked-up meta-feature embedding rows.
        jit_compile: Compile the meta-train step with XLA.
        support_prior: c, pseudo-rows added to each task's support count in the
            inner loop: the support loss is sum(mask * loss) / (sum(mask) + c),
            so an entity with n support rows moves n / (n + c) as far as with
            the plain mean (0, the default, keeps sum / max(sum(mask), 1)).
        embedding_steps: Damped Newton steps that fit each entity's meta
            embedding to its support rows after the gradient steps
            (`tf_limaml.newton`; 0, the default, fits nothing). The fit is
            first order whatever `first_order` says (see
            `differentiate_fit`): meta-training reaches the default
            embedding and the prior through it, not its Jacobian.
        embedding_prior: Prior precision of that fit per embedding dimension
            (> 0): how strongly an entity's embedding stays at the default;
            the shrinkage then grows with the support size by construction.
        learn_embedding_prior: Meta-learn the prior precision, one per
            embedding dimension, starting from `embedding_prior`.
        differentiate_fit: Meta-train through the fit's Jacobian as well
            (second order in the fit): what the block projects the support
            through is then learned for the fit, not only for the score.
            Needs a global block that hands over its affine form
            (`GlobalBlock.fitted_logit_terms`, the personal residual).
    """

    inner_steps: int = 1
    inner_lr: float = 0.1
    learn_inner_lr: bool = False
    first_order: bool = False
    adapt: str = dataclasses.field(
        default="meta_block", metadata={"choices": ADAPT_CHOICES}
    )
    adapt_embeddings: bool = False
    jit_compile: bool = True
    support_prior: float = 0.0
    embedding_steps: int = 0
    embedding_prior: float = 1.0
    learn_embedding_prior: bool = False
    differentiate_fit: bool = False

    # The fields that shape a model's weights: fixed once the model exists.
    WEIGHT_SHAPING = (
        "adapt",
        "learn_inner_lr",
        "adapt_embeddings",
        "learn_embedding_prior",
    )

    def __post_init__(self):
        _check_steps("MetaConfig", self.inner_steps)
        _check_number("MetaConfig", "inner_lr", self.inner_lr)
        if self.adapt not in ADAPT_CHOICES:
            raise ConfigError(
                f"MetaConfig.adapt must be one of {ADAPT_CHOICES}, got "
                f"{self.adapt!r}",
                "adapt",
                self.adapt,
            )
        _check_number("MetaConfig", "support_prior", self.support_prior)
        _check_steps("MetaConfig", self.embedding_steps, "embedding_steps")
        _check_positive("MetaConfig", "embedding_prior", self.embedding_prior)
        for name in (
            "learn_inner_lr",
            "first_order",
            "adapt_embeddings",
            "jit_compile",
            "learn_embedding_prior",
            "differentiate_fit",
        ):
            _check_flag("MetaConfig", name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class AdaptOptions(_JsonConfig):
    """Adapt-time knobs: what a call (or a deployed model) runs the inner loop with.

    Each field left `None` keeps the value of the model's `MetaConfig`. The
    names are `MetaConfig`'s, so one knob has one name from the command line
    (`--inner-lr`) to `tf_limaml.maml.adapt`.

    Attributes:
        inner_steps: Inner steps.
        inner_lr: Scalar inner learning rate (a model's learned Meta-SGD rates,
            when it has them, win).
        support_prior: The support prior c.
        first_order: Drop the second-order term in `adapt` (scoring and
            embedding never differentiate through the inner loop).
        embedding_steps: Newton steps of the embedding fit.
        embedding_prior: Its prior precision (a model's learned precisions,
            when it has them, win).
    """

    inner_steps: int | None = None
    inner_lr: float | None = None
    support_prior: float | None = None
    first_order: bool | None = None
    embedding_steps: int | None = None
    embedding_prior: float | None = None

    def __post_init__(self):
        if self.inner_steps is not None:
            _check_steps("AdaptOptions", self.inner_steps)
        for name in ("inner_lr", "support_prior"):
            if getattr(self, name) is not None:
                _check_number("AdaptOptions", name, getattr(self, name))
        if self.first_order is not None:
            _check_flag("AdaptOptions", "first_order", self.first_order)
        if self.embedding_steps is not None:
            _check_steps("AdaptOptions", self.embedding_steps, "embedding_steps")
        if self.embedding_prior is not None:
            _check_positive("AdaptOptions", "embedding_prior", self.embedding_prior)

    @property
    def overrides(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def resolve(self, config: MetaConfig) -> MetaConfig:
        """`config` with these overrides applied."""
        overrides = self.overrides
        return dataclasses.replace(config, **overrides) if overrides else config

    def merged(self, other: AdaptOptions | None) -> AdaptOptions:
        """These options, with `other`'s set fields on top."""
        if other is None:
            return self
        return dataclasses.replace(self, **other.overrides)


@dataclasses.dataclass(frozen=True)
class Architecture(_JsonConfig):
    """Widths and options of the library's meta and global blocks.

    The architecture arguments of `LiMAMLModel` (saved in its config); the
    defaults are the ones `limaml train` builds its model with.

    Attributes:
        meta_units: Widths of the meta block's dense layers; the last is d, the
            size of the meta embedding.
        global_units: Widths of the global block's dense layers before the logit.
        cross_layers: DCN-v2 cross layers of the global block (0: none).
        projection_dim: Rank of the low-rank cross kernels (None: full rank).
        interaction: How the meta embedding meets the request features:
            "product" also multiplies it with a learned projection of them, so
            a member's vector changes how each item is scored; "concat" only
            concatenates it.
        l2: L2 penalty on the kernels of both blocks (0: none).
        residual_dim: The personal residual: the meta embedding gains
            residual_dim + 1 dimensions that are zero by default (an entity
            with no support scores exactly as the network without them) and
            that the embedding fit moves: a vector scored against a learned
            projection of the request features, and a logit offset. None:
            no residual; 0: the offset only.
    """

    meta_units: tuple[int, ...] = (64, 32)
    global_units: tuple[int, ...] = (256, 128)
    cross_layers: int = 2
    projection_dim: int | None = None
    interaction: str = dataclasses.field(
        default="product", metadata={"choices": INTERACTIONS}
    )
    l2: float = 0.0
    residual_dim: int | None = None

    def __post_init__(self):
        for name in ("meta_units", "global_units"):
            value = getattr(self, name)
            units = tuple(value) if isinstance(value, (list, tuple)) else ()
            if not units or not all(_is_int(u) and u > 0 for u in units):
                raise ConfigError(
                    f"Architecture.{name} must be a non-empty list of positive "
                    f"integers, got {value!r}",
                    name,
                    value,
                )
            object.__setattr__(self, name, units)  # JSON lists become tuples
        if not _is_int(self.cross_layers) or self.cross_layers < 0:
            raise ConfigError(
                f"Architecture.cross_layers must be an integer >= 0, got "
                f"{self.cross_layers!r}",
                "cross_layers",
                self.cross_layers,
            )
        if self.projection_dim is not None and (
            not _is_int(self.projection_dim) or self.projection_dim <= 0
        ):
            raise ConfigError(
                f"Architecture.projection_dim must be a positive integer or null, "
                f"got {self.projection_dim!r}",
                "projection_dim",
                self.projection_dim,
            )
        if self.interaction not in INTERACTIONS:
            raise ConfigError(
                f"Architecture.interaction must be one of {INTERACTIONS}, got "
                f"{self.interaction!r}",
                "interaction",
                self.interaction,
            )
        _check_number("Architecture", "l2", self.l2)
        if self.residual_dim is not None and (
            not _is_int(self.residual_dim) or self.residual_dim < 0
        ):
            raise ConfigError(
                "Architecture.residual_dim must be an integer >= 0 or null, got "
                f"{self.residual_dim!r}",
                "residual_dim",
                self.residual_dim,
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as `LiMAMLModel` keyword arguments (widths as lists)."""
        config = super().to_dict()
        for name in ("meta_units", "global_units"):
            config[name] = list(config[name])
        return config


def field_docs(cls: type) -> dict[str, str]:
    """The one-paragraph description of each field, from the class docstring.

    Reads the Google-style `Attributes:` section, so the command line's help
    and the API reference say the same thing.

    Args:
        cls: A dataclass documented with an `Attributes:` section.

    Returns:
        {field name: its description, joined into one line}.
    """
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return docs
    name = None
    for line in lines[start:]:
        if not line.strip():
            break
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            docs[name] = match.group(2).strip()
        elif name is not None and line.startswith("        "):
            docs[name] += " " + line.strip()
        else:
            break
    return docs


def as_meta_config(value: MetaConfig | Mapping[str, Any] | None) -> MetaConfig:
    """A MetaConfig from itself, its dict, or None (the defaults)."""
    return MetaConfig.coerce(value, "meta_config")


def as_adapt_options(
    value: AdaptOptions | Mapping[str, Any] | None,
) -> AdaptOptions:
    """AdaptOptions from themselves, their dict, or None (no override)."""
    return AdaptOptions.coerce(value, "options")


# What a call may set apart from the model's options (the deprecated keywords
# of the per-call methods map onto these fields).
_LEGACY_KEYWORDS = {
    "steps": "inner_steps",
    "inner_lr": "inner_lr",
    "support_prior": "support_prior",
    "first_order": "first_order",
}


def call_options(
    options: AdaptOptions | Mapping[str, Any] | None, legacy: Mapping[str, Any]
) -> AdaptOptions:
    """One call's AdaptOptions, from `options` and the deprecated keywords
    (`steps`, `inner_lr`, `support_prior`, `first_order`) of the model's
    per-call methods, which warn."""
    options = as_adapt_options(options)
    unknown = sorted(set(legacy) - set(_LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"Unexpected keyword argument(s) {unknown}")
    given = {_LEGACY_KEYWORDS[k]: v for k, v in legacy.items() if v is not None}
    if given:
        warnings.warn(
            f"Per-call keywords {sorted(k for k, v in legacy.items() if v is not None)} "
            "are deprecated; pass "
            f"options=tf_limaml.AdaptOptions({', '.join(sorted(given))}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        options = options.merged(AdaptOptions(**given))
    return options


def deprecated_alias(name: str, replacement: str, fn):
    """A thin alias of `fn` that warns once per call site."""

    @functools.wraps(fn)
    def alias(*args, **kwargs):
        warnings.warn(
            f"LiMAMLModel.{name} is deprecated; use {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        return fn(*args, **kwargs)

    alias.__name__ = name
    alias.__doc__ = f"Deprecated: use `{replacement}`."
    return alias
