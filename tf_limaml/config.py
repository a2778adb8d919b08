"""Configuration of the inner loop, free of TensorFlow.

`MetaConfig` is what a model is meta-trained with; it is saved with the model
and never changes after construction. `AdaptOptions` holds the adapt-time
knobs (steps, rate, prior) that a call, or a deployed model, may set apart
from training: each field left `None` keeps the trained value.

Both parse from JSON objects and validate every field with a message that
names it, so the command line can build its flags from their fields without
importing TensorFlow.

Example:

    config = MetaConfig(inner_steps=1, inner_lr=0.3, support_prior=10.0)
    options = AdaptOptions(inner_steps=3)
    options.resolve(config)   # MetaConfig(inner_steps=3, inner_lr=0.3, ...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

ADAPT_CHOICES = ("meta_block", "all")

_Config = TypeVar("_Config", bound="_JsonConfig")


def _check_steps(owner: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.inner_steps must be an integer >= 0, got {value!r}")


def _check_number(owner: str, name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0  # also refuses NaN
    ):
        raise ValueError(f"{owner}.{name} must be a number >= 0, got {value!r}")


def _check_flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")


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
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from None


class _JsonConfig:
    """from_dict / load / to_dict for a frozen dataclass of options."""

    @classmethod
    def from_dict(cls: type[_Config], obj: Mapping[str, Any]) -> _Config:
        """Builds the options from a JSON object; unknown keys are an error."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {obj!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} key {unknown[0]!r}; known keys are "
                f"{sorted(known)}"
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
    """

    inner_steps: int = 1
    inner_lr: float = 0.1
    learn_inner_lr: bool = False
    first_order: bool = False
    adapt: str = "meta_block"
    adapt_embeddings: bool = False
    jit_compile: bool = True
    support_prior: float = 0.0

    # The fields that shape a model's weights: fixed once the model exists.
    WEIGHT_SHAPING = ("adapt", "learn_inner_lr", "adapt_embeddings")

    def __post_init__(self):
        _check_steps("MetaConfig", self.inner_steps)
        _check_number("MetaConfig", "inner_lr", self.inner_lr)
        if self.adapt not in ADAPT_CHOICES:
            raise ValueError(
                f"MetaConfig.adapt must be one of {ADAPT_CHOICES}, got "
                f"{self.adapt!r}"
            )
        _check_number("MetaConfig", "support_prior", self.support_prior)
        for name in (
            "learn_inner_lr",
            "first_order",
            "adapt_embeddings",
            "jit_compile",
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
    """

    inner_steps: int | None = None
    inner_lr: float | None = None
    support_prior: float | None = None
    first_order: bool | None = None

    def __post_init__(self):
        if self.inner_steps is not None:
            _check_steps("AdaptOptions", self.inner_steps)
        for name in ("inner_lr", "support_prior"):
            if getattr(self, name) is not None:
                _check_number("AdaptOptions", name, getattr(self, name))
        if self.first_order is not None:
            _check_flag("AdaptOptions", "first_order", self.first_order)

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


def as_meta_config(value: MetaConfig | Mapping[str, Any] | None) -> MetaConfig:
    """A MetaConfig from itself, its dict, or None (the defaults)."""
    if value is None:
        return MetaConfig()
    if isinstance(value, Mapping):
        return MetaConfig.from_dict(value)
    if not isinstance(value, MetaConfig):
        raise ValueError(
            f"`meta_config` must be a MetaConfig or its dict, got {value!r}"
        )
    return value


def as_adapt_options(
    value: AdaptOptions | Mapping[str, Any] | None,
) -> AdaptOptions:
    """AdaptOptions from itself, its dict, or None (no override)."""
    if value is None:
        return AdaptOptions()
    if isinstance(value, Mapping):
        return AdaptOptions.from_dict(value)
    if not isinstance(value, AdaptOptions):
        raise ValueError(f"`options` must be AdaptOptions or their dict, got {value!r}")
    return value


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
            f"Per-call keywords {sorted(legacy)} are deprecated; pass "
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
