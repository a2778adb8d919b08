"""FeatureSpec: the one definition of columns, feature types and the task schema.

A FeatureSpec names the entity, time and label columns of an interactions table
and declares every feature the model reads:

* meta features are entity-level (who the member is) and feed the meta block;
* request features are per interaction (item, context) and feed the global block.

Everything else (the Beam pipeline, the task encoder, the tf.data parser, the
model's input layers and the export signatures) reads names and types from here.

Example:

    spec = FeatureSpec.from_json('''{
        "entity": "member_id", "time": "timestamp",
        "label": {"column": "rating", "threshold": 4},
        "meta_features": [{"name": "age", "type": "numeric"}],
        "request_features": [
            {"name": "item_id", "type": "categorical", "hash_buckets": 10000}]}''')
    spec.meta_features, spec.request_features

The task record built from a spec (its TFRecord schema and the one encoder)
lives in `tf_limaml.data`. The two key spellings stay here, TensorFlow-free,
because the serving clients and the signatures need them without TensorFlow:
`sequence_key` names a list in a record ("support/item_id"), `batch_key` a
tensor of a parsed batch and a signature input ("support_item_id").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tf_limaml.errors import UserInputError

NUMERIC = "numeric"
CATEGORICAL = "categorical"
MULTI_HOT = "multi_hot"
FEATURE_TYPES = (NUMERIC, CATEGORICAL, MULTI_HOT)

# Names the task records and model inputs use beside the feature names.
ENTITY_ID_KEY = "entity_id"
SUPPORT = "support"
QUERY = "query"
PARTS = (SUPPORT, QUERY)
LABEL_KEY = "label"
TIME_KEY = "time"
MASK_KEY = "mask"
RESERVED_NAMES = frozenset({ENTITY_ID_KEY, LABEL_KEY, TIME_KEY, MASK_KEY, "n_support"})

_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_DEFAULT_EMBEDDING_DIM = 8
_DEFAULT_MAX_VALUES = 8
# `"vocabulary": "auto"`: the vocabulary is computed from the training data.
AUTO = "auto"
LOG1P = "log1p"
TRANSFORMS = (None, LOG1P)
# How the time column is read (`"time": {"column": ..., "format": ...}`).
TIME_AUTO = "auto"
ISO8601 = "iso8601"
EPOCH_SECONDS = "epoch_seconds"
EPOCH_MILLIS = "epoch_millis"
TIME_FORMATS = (TIME_AUTO, ISO8601, EPOCH_SECONDS, EPOCH_MILLIS)
# What a blank cell of a feature becomes (`"missing": ...`).
IMPUTE = "impute"
REJECT = "reject"
MISSING_POLICIES = (IMPUTE, REJECT)
# The 0/1 feature `"missing_indicator": true` adds, named after its column.
INDICATOR_SUFFIX = "_missing"
# Label values read as negative when `positive` is given without `negative`.
DEFAULT_NEGATIVE = ("no", "false", "0")


class FeatureSpecError(UserInputError):
    """Raised for an invalid FeatureSpec; the message names the field and value."""


def _fail(field: str, value: Any, why: str) -> FeatureSpecError:
    return FeatureSpecError(f"Invalid feature spec: `{field}` = {value!r}: {why}")


def _check_keys(where: str, obj: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _fail(
            f"{where}.{unknown[0]}",
            obj[unknown[0]],
            f"unknown key; allowed keys are {sorted(allowed)}",
        )


def _check_name(field: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise _fail(
            field,
            name,
            "must be a string of letters, digits, '_', '.' or '-' that starts "
            "with a letter or '_' (at most 128 characters)",
        )
    return name


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(field, value, "must be a positive integer")
    return value


def _finite_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(field, value, "must be a number")
    if not math.isfinite(value):
        raise _fail(field, value, "must be finite")
    return float(value)


def _optional_number(field: str, value: Any) -> float | None:
    return None if value is None else _finite_number(field, value)


def _number_or_vector(
    field: str, value: Any, size: int | None
) -> float | tuple[float, ...] | None:
    """A mean or std: None, a number, or (for a vector feature) a list of `size`."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if size is None:
            raise _fail(field, value, "must be a number on a scalar feature")
        if len(value) != size:
            raise _fail(field, value, f"must be a number or a list of {size} numbers")
        return tuple(_finite_number(field, v) for v in value)
    return _finite_number(field, value)


def _json_mapping(field: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(field, value, "must be a JSON object (written by the analyzer)")
    # A round trip through JSON keeps the spec serializable and the copy private.
    try:
        return json.loads(json.dumps(dict(value), sort_keys=True))
    except (TypeError, ValueError):
        raise _fail(field, value, "must hold only JSON values") from None


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature column.

    Attributes:
        name: Column name in the interactions table and key in every tensor dict.
        type: One of "numeric", "categorical" or "multi_hot".
        vocabulary: Closed vocabulary of a categorical or multi-hot feature
            (None while an "auto" vocabulary is not computed yet).
        hash_buckets: Number of hash buckets, instead of a vocabulary.
        dim: Embedding size of a categorical or multi-hot feature.
        separator: Separator of the values of a multi-hot cell, e.g. "A|B".
        max_values: Most values one multi-hot cell holds; extra values are cut.
        allow_oov: Whether a value outside `vocabulary` maps to an OOV bucket
            (True) or makes the row invalid (False, the default).
        mean: Numeric features are fed as (transform(x) - mean) / std. None
            means not known yet (the analyzer of make-tasks computes it). A
            vector feature may give one number or one per component.
        std: See `mean`.
        default: Value a blank numeric cell becomes. None: the training mean,
            which make-tasks computes and writes here in the completed spec
            (only for a feature that had blanks).
        normalize: Whether a numeric feature is standardized (False: fed raw).
        transform: None or "log1p" (sign(x) * log1p(|x|)), applied before
            standardizing and before statistics are computed.
        clip: Clip the standardized value to [-clip, clip] (None: no clip).
        shape: () for a scalar numeric feature, (n,) for a dense vector.
        auto_vocabulary: The vocabulary comes from the training data
            (`"vocabulary": "auto"`); `vocabulary` is None until it is computed.
        top_k: Most values an auto vocabulary keeps (None: no limit).
        min_count: Fewest training occurrences for a value to enter an auto
            vocabulary.
        statistics: Provenance written by the analyzer (counts, min, max,
            source); informative only.
        missing: What a blank cell does: "impute" (the default: a numeric
            cell becomes `default`, a categorical one its own bucket, a
            multi-hot one the empty set) or "reject" (the row goes to the dead
            letter as `missing_feature`).
        missing_indicator: On a numeric feature, also feed the model a 0/1
            feature `<name>_missing` that says the cell was blank.
        indicator_of: Set on that derived 0/1 feature: the feature it
            describes. Derived features are not columns of the input and are
            not written in the spec's JSON (the source's
            `missing_indicator` brings them back).
    """

    name: str
    type: str
    vocabulary: tuple[str, ...] | None = None
    hash_buckets: int | None = None
    dim: int = _DEFAULT_EMBEDDING_DIM
    separator: str = "|"
    max_values: int | None = None
    allow_oov: bool = False
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    default: float | tuple[float, ...] | None = None
    normalize: bool = True
    transform: str | None = None
    clip: float | None = None
    shape: tuple[int, ...] = ()
    auto_vocabulary: bool = False
    top_k: int | None = None
    min_count: int = 1
    statistics: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    missing: str = IMPUTE
    missing_indicator: bool = False
    indicator_of: str | None = None

    _KEYS = (
        "name",
        "type",
        "vocabulary",
        "hash_buckets",
        "dim",
        "separator",
        "max_values",
        "allow_oov",
        "mean",
        "std",
        "default",
        "normalize",
        "transform",
        "clip",
        "shape",
        "top_k",
        "min_count",
        "statistics",
        "missing",
        "missing_indicator",
    )
    _NUMERIC_ONLY = (
        "mean",
        "std",
        "default",
        "normalize",
        "transform",
        "clip",
        "shape",
        "missing_indicator",
    )
    _VOCABULARY_ONLY = ("top_k", "min_count")

    @property
    def is_numeric(self) -> bool:
        return self.type == NUMERIC

    @property
    def is_derived(self) -> bool:
        """Whether make-tasks computes the feature instead of reading a column."""
        return self.indicator_of is not None

    @property
    def imputes_mean(self) -> bool:
        """Whether a blank numeric cell becomes the training mean (not known yet)."""
        return (
            self.type == NUMERIC
            and self.missing == IMPUTE
            and self.default is None
            and not self.is_derived
        )

    def indicator(self) -> Feature:
        """The derived 0/1 feature of `"missing_indicator": true`."""
        return Feature(
            name=f"{self.name}{INDICATOR_SUFFIX}",
            type=NUMERIC,
            normalize=False,
            indicator_of=self.name,
        )

    @property
    def size(self) -> int:
        """Numbers per row of a numeric feature: 1 (scalar) or n (shape [n])."""
        return self.shape[0] if self.shape else 1

    @property
    def needs_statistics(self) -> bool:
        """Whether the feature lacks a value the analyzer computes from data.

        A normalized numeric feature without mean or std, or an "auto"
        vocabulary not computed yet.
        """
        if self.type == NUMERIC:
            return self.normalize and (self.mean is None or self.std is None)
        return self.auto_vocabulary and self.vocabulary is None

    @property
    def num_ids(self) -> int:
        """Size of the id space of a categorical or multi-hot feature.

        Vocabulary features reserve id 0 for out-of-vocabulary values.
        """
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        return int(self.hash_buckets or 0)

    @property
    def values_per_row(self) -> int:
        """Fixed width of a multi-hot feature after padding (1 for the others)."""
        if self.type != MULTI_HOT:
            return 1
        if self.max_values is not None:
            return self.max_values
        # An auto vocabulary is only known after the records are written, so
        # the width cannot depend on it.
        if self.vocabulary is not None and not self.auto_vocabulary:
            return len(self.vocabulary)
        return _DEFAULT_MAX_VALUES

    def transform_value(self, value: float) -> float:
        """`transform` of one number, in Python (the analyzer's side)."""
        if self.transform == LOG1P:
            return math.copysign(math.log1p(abs(value)), value)
        return value

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Feature:
        if not isinstance(obj, Mapping):
            raise _fail(where, obj, "each feature must be a JSON object")
        _check_keys(where, obj, cls._KEYS)
        name = _check_name(f"{where}.name", obj.get("name"))
        where = f"{where}[{name}]"
        ftype = obj.get("type")
        if ftype not in FEATURE_TYPES:
            raise _fail(f"{where}.type", ftype, f"must be one of {list(FEATURE_TYPES)}")
        vocabulary = obj.get("vocabulary")
        hash_buckets = obj.get("hash_buckets")
        kwargs: dict[str, Any] = {"name": name, "type": ftype}
        kwargs["statistics"] = _json_mapping(
            f"{where}.statistics", obj.get("statistics")
        )
        missing = obj.get("missing", IMPUTE)
        if missing not in MISSING_POLICIES:
            raise _fail(
                f"{where}.missing", missing, f"must be one of {list(MISSING_POLICIES)}"
            )
        kwargs["missing"] = missing
        if ftype == NUMERIC:
            return cls._numeric_from_dict(obj, where, kwargs)
        for key in cls._NUMERIC_ONLY:
            if key in obj:
                raise _fail(
                    f"{where}.{key}", obj[key], "only allowed on a numeric feature"
                )
        if (vocabulary is None) == (hash_buckets is None):
            raise _fail(
                where,
                {"vocabulary": vocabulary, "hash_buckets": hash_buckets},
                "a categorical or multi_hot feature needs exactly one of "
                "`vocabulary` or `hash_buckets`",
            )
        # A resolved auto vocabulary is written as its list plus `min_count`.
        auto = vocabulary == AUTO or "min_count" in obj or "top_k" in obj
        if auto and vocabulary is None:
            raise _fail(
                f"{where}.top_k/min_count",
                {k: obj[k] for k in cls._VOCABULARY_ONLY if k in obj},
                'only allowed with `"vocabulary": "auto"`',
            )
        if vocabulary is not None and vocabulary != AUTO:
            if (
                not isinstance(vocabulary, (list, tuple))
                or not vocabulary
                or not all(isinstance(v, str) and v for v in vocabulary)
            ):
                raise _fail(
                    f"{where}.vocabulary",
                    vocabulary,
                    'must be "auto" or a non-empty list of non-empty strings',
                )
            if len(set(vocabulary)) != len(vocabulary):
                dup = next(v for v in vocabulary if vocabulary.count(v) > 1)
                raise _fail(f"{where}.vocabulary", dup, "appears more than once")
            kwargs["vocabulary"] = tuple(vocabulary)
        elif vocabulary is None:
            kwargs["hash_buckets"] = _positive_int(
                f"{where}.hash_buckets", hash_buckets
            )
        kwargs["dim"] = _positive_int(
            f"{where}.dim", obj.get("dim", _DEFAULT_EMBEDDING_DIM)
        )
        allow_oov = obj.get("allow_oov", auto)
        if not isinstance(allow_oov, bool):
            raise _fail(f"{where}.allow_oov", allow_oov, "must be true or false")
        if auto:
            if not allow_oov:
                raise _fail(
                    f"{where}.allow_oov",
                    allow_oov,
                    "an auto vocabulary always has an OOV bucket (values unseen "
                    "in training land there); drop `allow_oov` or set it true",
                )
            kwargs["auto_vocabulary"] = True
            if obj.get("top_k") is not None:
                kwargs["top_k"] = _positive_int(f"{where}.top_k", obj["top_k"])
            kwargs["min_count"] = _positive_int(
                f"{where}.min_count", obj.get("min_count", 1)
            )
        kwargs["allow_oov"] = allow_oov
        if ftype == MULTI_HOT:
            separator = obj.get("separator", "|")
            if not isinstance(separator, str) or not separator:
                raise _fail(
                    f"{where}.separator", separator, "must be a non-empty string"
                )
            kwargs["separator"] = separator
            if obj.get("max_values") is not None:
                kwargs["max_values"] = _positive_int(
                    f"{where}.max_values", obj["max_values"]
                )
        else:
            for key in ("separator", "max_values"):
                if key in obj:
                    raise _fail(
                        f"{where}.{key}",
                        obj[key],
                        "only allowed on a multi_hot feature",
                    )
        return cls(**kwargs)

    @classmethod
    def _numeric_from_dict(
        cls, obj: Mapping[str, Any], where: str, kwargs: dict[str, Any]
    ) -> Feature:
        for key in (
            "vocabulary",
            "hash_buckets",
            "dim",
            "separator",
            "max_values",
            "allow_oov",
            "top_k",
            "min_count",
        ):
            if key in obj:
                raise _fail(
                    f"{where}.{key}", obj[key], "not allowed on a numeric feature"
                )
        shape = obj.get("shape")
        if shape is not None and shape not in ([], ()):
            if (
                not isinstance(shape, (list, tuple))
                or len(shape) != 1
                or isinstance(shape[0], bool)
                or not isinstance(shape[0], int)
                or shape[0] <= 0
            ):
                raise _fail(
                    f"{where}.shape",
                    shape,
                    "must be [n] with n a positive integer (a dense vector), or "
                    "omitted for a scalar",
                )
            kwargs["shape"] = (shape[0],)
        size = kwargs["shape"][0] if kwargs.get("shape") else None
        normalize = obj.get("normalize", True)
        if not isinstance(normalize, bool):
            raise _fail(f"{where}.normalize", normalize, "must be true or false")
        kwargs["normalize"] = normalize
        for key in ("mean", "std"):
            kwargs[key] = _number_or_vector(f"{where}.{key}", obj.get(key), size)
        if not normalize and (kwargs["mean"] is not None or kwargs["std"] is not None):
            raise _fail(
                f"{where}.normalize",
                normalize,
                "a feature fed raw has no mean or std; drop them or drop "
                "`normalize: false`",
            )
        std = kwargs["std"]
        if std is not None and min(std if isinstance(std, tuple) else (std,)) <= 0:
            raise _fail(f"{where}.std", obj.get("std"), "must be > 0")
        transform = obj.get("transform")
        if transform not in TRANSFORMS:
            raise _fail(f"{where}.transform", transform, f"must be one of {TRANSFORMS}")
        kwargs["transform"] = transform
        clip = _optional_number(f"{where}.clip", obj.get("clip"))
        if clip is not None and clip <= 0:
            raise _fail(f"{where}.clip", obj.get("clip"), "must be > 0 (or null)")
        kwargs["clip"] = clip
        if obj.get("default") is not None:
            if kwargs["missing"] == REJECT:
                raise _fail(
                    f"{where}.default",
                    obj["default"],
                    'a feature with `"missing": "reject"` never uses a default; '
                    "drop one of them",
                )
            kwargs["default"] = _number_or_vector(
                f"{where}.default", obj["default"], size
            )
        indicator = obj.get("missing_indicator", False)
        if not isinstance(indicator, bool):
            raise _fail(
                f"{where}.missing_indicator", indicator, "must be true or false"
            )
        if indicator and kwargs["missing"] == REJECT:
            raise _fail(
                f"{where}.missing_indicator",
                indicator,
                'a feature with `"missing": "reject"` has no blank cell to flag',
            )
        kwargs["missing_indicator"] = indicator
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == NUMERIC:
            if self.shape:
                out["shape"] = list(self.shape)
            if not self.normalize:
                out["normalize"] = False
            if self.transform is not None:
                out["transform"] = self.transform
            for key in ("mean", "std"):
                value = getattr(self, key)
                if value is not None:
                    out[key] = list(value) if isinstance(value, tuple) else value
            if self.clip is not None:
                out["clip"] = self.clip
            if self.default is not None:
                out["default"] = (
                    list(self.default)
                    if isinstance(self.default, tuple)
                    else self.default
                )
            if self.missing_indicator:
                out["missing_indicator"] = True
        else:
            if self.vocabulary is not None:
                out["vocabulary"] = list(self.vocabulary)
            elif self.auto_vocabulary:
                out["vocabulary"] = AUTO
            else:
                out["hash_buckets"] = self.hash_buckets
            if self.auto_vocabulary:
                if self.top_k is not None:
                    out["top_k"] = self.top_k
                out["min_count"] = self.min_count
            out["dim"] = self.dim
            if self.allow_oov:
                out["allow_oov"] = True
            if self.type == MULTI_HOT:
                out["separator"] = self.separator
                if self.max_values is not None:
                    out["max_values"] = self.max_values
        if self.missing != IMPUTE:
            out["missing"] = self.missing
        if self.statistics is not None:
            out["statistics"] = self.statistics
        return out

    def parse_values(self, raw: Any) -> list[str]:
        """Splits a multi-hot cell ("A|B" or a list) into its values."""
        if raw is None:
            return []
        if isinstance(raw, (list, tuple)):
            values = [str(v) for v in raw]
        else:
            values = str(raw).split(self.separator)
        return [v for v in (v.strip() for v in values) if v]


def label_text(value: Any) -> str:
    """A label cell as the text its `positive`/`negative` lists are matched on.

    Case and surrounding blanks do not count; a boolean is "true"/"false" and
    a whole number read as 1.0 is "1".
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().casefold()


def _label_values(field: str, values: Any) -> tuple[str, ...]:
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(v, (str, int, float)) and label_text(v) for v in values)
    ):
        raise _fail(field, values, "must be a non-empty list of values (strings)")
    return tuple(dict.fromkeys(label_text(v) for v in values))


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The label column and how a cell becomes 0 or 1.

    Three forms:

    * plain: the cell is 0 or 1;
    * `threshold`: a number, 1 when >= threshold;
    * `positive` (and optionally `negative`): a list of values read as 1 (and
      as 0); case does not count. Without `negative`, the negatives are
      `DEFAULT_NEGATIVE` ("no", "false", "0"). A value in neither list is
      rejected (`bad_label`).
    """

    column: str
    threshold: float | None = None
    positive: tuple[str, ...] | None = None
    negative: tuple[str, ...] | None = None

    @property
    def negatives(self) -> tuple[str, ...]:
        return self.negative if self.negative is not None else DEFAULT_NEGATIVE

    def describe(self) -> str:
        """The rule, in words, for messages."""
        if self.positive is not None:
            return (
                f"1 when `{self.column}` is one of {list(self.positive)}, 0 when "
                f"one of {list(self.negatives)}"
            )
        if self.threshold is not None:
            return f"1 when `{self.column}` >= {self.threshold:g}"
        return f"`{self.column}` is 0 or 1"

    def binarize(self, value: Any) -> int:
        """Returns the 0/1 label of a raw cell.

        Raises:
            ValueError: The value is missing, not a number (without
                `positive`), not 0 or 1 (plain form), or in neither list.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"label `{self.column}` is missing")
        if self.positive is not None:
            text = label_text(value)
            if text in self.positive:
                return 1
            if text in self.negatives:
                return 0
            raise ValueError(
                f"label `{self.column}` = {value!r} is neither a positive value "
                f"{list(self.positive)} nor a negative one {list(self.negatives)}"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"label `{self.column}` = {value!r} is not a number (for labels "
                'such as "yes"/"no", give `"positive": [...]` in the spec)'
            ) from None
        if not math.isfinite(number):
            raise ValueError(f"label `{self.column}` = {value!r} is not finite")
        if self.threshold is not None:
            return int(number >= self.threshold)
        if number not in (0.0, 1.0):
            raise ValueError(f"label `{self.column}` = {value!r} is not 0 or 1")
        return int(number)

    @classmethod
    def from_json_value(cls, obj: Any) -> LabelSpec:
        """The spec's `label`: a column name or an object."""
        if isinstance(obj, str):
            return cls(_check_name("label", obj))
        if not isinstance(obj, Mapping):
            raise _fail(
                "label",
                obj,
                'must be a column name, {"column": ..., "threshold": ...} or '
                '{"column": ..., "positive": [...]}',
            )
        _check_keys("label", obj, ("column", "threshold", "positive", "negative"))
        column = _check_name("label.column", obj.get("column"))
        threshold = obj.get("threshold")
        if threshold is not None:
            threshold = _finite_number("label.threshold", threshold)
        positive = negative = None
        if obj.get("positive") is not None:
            if threshold is not None:
                raise _fail(
                    "label.positive",
                    obj["positive"],
                    "give either `threshold` or `positive`, not both",
                )
            positive = _label_values("label.positive", obj["positive"])
        if obj.get("negative") is not None:
            if positive is None:
                raise _fail(
                    "label.negative",
                    obj["negative"],
                    "needs `positive` (the values read as 1)",
                )
            negative = _label_values("label.negative", obj["negative"])
            both = sorted(set(positive) & set(negative))
            if both:
                raise _fail(
                    "label.negative", obj["negative"], f"{both[0]!r} is also positive"
                )
        elif positive is not None:
            both = sorted(set(positive) & set(DEFAULT_NEGATIVE))
            if both:
                raise _fail(
                    "label.positive",
                    obj["positive"],
                    f"{both[0]!r} is one of the default negatives "
                    f"{list(DEFAULT_NEGATIVE)}; give `negative` too",
                )
        return cls(column, threshold, positive, negative)

    def to_json_value(self) -> Any:
        if self.positive is not None:
            out: dict[str, Any] = {
                "column": self.column,
                "positive": list(self.positive),
            }
            if self.negative is not None:
                out["negative"] = list(self.negative)
            return out
        if self.threshold is not None:
            return {"column": self.column, "threshold": self.threshold}
        return self.column


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Columns, features and the TFRecord task schema of one problem.

    Attributes:
        entity: Entity id column (member, advertiser, job, ...).
        time: Time column; histories are ordered by it.
        label: The label column and its binarization rule.
        meta_features: Entity-level features fed to the meta block. May be empty.
            Includes the derived `<name>_missing` features of
            `"missing_indicator": true`, right after their source.
        request_features: Per-interaction features fed to the global block.
        tie_break: Column that orders interactions with equal time (optional).
        time_format: How the time column is read: "iso8601" (ISO-8601 text
            with or without a zone, naive meaning UTC, and typed timestamp or
            date values such as Parquet's), "epoch_seconds", "epoch_millis",
            or "auto" (make-tasks detects it from the first rows and writes it
            into the completed spec). JSON: `"time": {"column": "ts",
            "format": "iso8601"}`; `"time": "ts"` means "auto".
    """

    entity: str
    time: str
    label: LabelSpec
    meta_features: tuple[Feature, ...]
    request_features: tuple[Feature, ...]
    tie_break: str | None = None
    time_format: str = TIME_AUTO

    _KEYS = (
        "entity",
        "time",
        "label",
        "meta_features",
        "request_features",
        "tie_break",
    )

    # ----------------------------------------------------------------- JSON I/O
    @classmethod
    def from_dict(cls, obj: Any) -> FeatureSpec:
        """Builds and validates a spec from its JSON object form."""
        if not isinstance(obj, Mapping):
            raise _fail("<spec>", obj, "the spec must be a JSON object")
        _check_keys("<spec>", obj, cls._KEYS)
        for key in ("entity", "time", "label", "request_features"):
            if key not in obj:
                raise _fail(key, None, "is required")
        entity = _check_name("entity", obj["entity"])
        time_obj = obj["time"]
        time_format = TIME_AUTO
        if isinstance(time_obj, Mapping):
            _check_keys("time", time_obj, ("column", "format"))
            time = _check_name("time.column", time_obj.get("column"))
            time_format = time_obj.get("format", TIME_AUTO)
            if time_format not in TIME_FORMATS:
                raise _fail(
                    "time.format", time_format, f"must be one of {list(TIME_FORMATS)}"
                )
        else:
            time = _check_name("time", time_obj)
        label = LabelSpec.from_json_value(obj["label"])
        features = {}
        for part in ("meta_features", "request_features"):
            items = obj.get(part, [])
            if not isinstance(items, (list, tuple)):
                raise _fail(part, items, "must be a list of features")
            parsed = []
            for i, item in enumerate(items):
                feature = Feature.from_dict(item, f"{part}[{i}]")
                parsed.append(feature)
                if feature.missing_indicator:
                    parsed.append(feature.indicator())
            features[part] = tuple(parsed)
        if not features["request_features"]:
            raise _fail("request_features", [], "needs at least one feature")
        tie_break = obj.get("tie_break")
        if tie_break is not None:
            tie_break = _check_name("tie_break", tie_break)
        spec = cls(
            entity,
            time,
            label,
            features["meta_features"],
            features["request_features"],
            tie_break,
            time_format,
        )
        spec._check_names()
        return spec

    def _check_names(self) -> None:
        seen: dict[str, str] = {}
        columns = [
            ("entity", self.entity),
            ("time", self.time),
            ("label.column", self.label.column),
        ]
        columns += [(f"meta_features[{f.name}]", f.name) for f in self.meta_features]
        columns += [
            (f"request_features[{f.name}]", f.name) for f in self.request_features
        ]
        for field, name in columns:
            if name in seen:
                raise _fail(field, name, f"is already used by `{seen[name]}`")
            seen[name] = field
        for feature in self.features:
            if feature.name in RESERVED_NAMES:
                raise _fail(
                    f"feature {feature.name}",
                    feature.name,
                    f"is reserved; rename it (reserved: {sorted(RESERVED_NAMES)})",
                )

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise FeatureSpecError(
                f"Invalid feature spec: not valid JSON ({err})"
            ) from None
        return cls.from_dict(obj)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSpec:
        """Reads a spec from a JSON file (any path tf.io.gfile reads)."""
        import tensorflow as tf  # noqa: PLC0415 - keeps `limaml --help` TF-free

        if not tf.io.gfile.exists(str(path)):
            raise FileNotFoundError(f"Feature spec not found: {path}")
        with tf.io.gfile.GFile(str(path), "r") as f:
            return cls.from_json(f.read())

    def to_dict(self) -> dict[str, Any]:
        time: Any = self.time
        if self.time_format != TIME_AUTO:
            time = {"column": self.time, "format": self.time_format}
        out = {
            "entity": self.entity,
            "time": time,
            "label": self.label.to_json_value(),
            "meta_features": [
                f.to_dict() for f in self.meta_features if not f.is_derived
            ],
            "request_features": [
                f.to_dict() for f in self.request_features if not f.is_derived
            ],
        }
        if self.tie_break is not None:
            out["tie_break"] = self.tie_break
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> None:
        import tensorflow as tf  # noqa: PLC0415

        with tf.io.gfile.GFile(str(path), "w") as f:
            f.write(self.to_json())

    # ------------------------------------------------------------ derived views
    @property
    def features(self) -> tuple[Feature, ...]:
        return self.meta_features + self.request_features

    def missing_statistics(self) -> list[str]:
        """Names of the features that still need statistics from the data.

        A normalized numeric feature without `mean`/`std`, or an `"auto"`
        vocabulary not computed yet. make-tasks writes the completed spec to
        DIR/spec.json; `tf_limaml.statistics.complete_spec_from_tasks` computes
        it from task records.
        """
        return [f.name for f in self.features if f.needs_statistics]

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(
            f"No feature named {name!r}; the spec has "
            f"{[f.name for f in self.features]}"
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column an interactions row is read for."""
        cols = [self.entity, self.time, self.label.column]
        cols += [f.name for f in self.features if not f.is_derived]
        if self.tie_break and self.tie_break not in cols:
            cols.append(self.tie_break)
        return tuple(cols)

    @staticmethod
    def sequence_key(part: str, name: str) -> str:
        """Key of a per-interaction list in a task record, e.g. "support/item_id"."""
        return f"{part}/{name}"

    @staticmethod
    def batch_key(part: str, name: str) -> str:
        """Key of a per-interaction tensor in a task batch, e.g. "support_item_id"."""
        return f"{part}_{name}"


def check_statistics(features: Iterable[Feature]) -> None:
    """Refuses features that still need statistics from the data.

    A model built on them would train on raw scales (or without a vocabulary),
    which diverges on columns such as a year or a price in thousands.

    Raises:
        FeatureSpecError: Names the features and says how to get the statistics.
    """
    missing = [f for f in features if f.needs_statistics]
    if not missing:
        return
    what = ", ".join(
        f"`{f.name}` ({'mean/std' if f.type == NUMERIC else 'auto vocabulary'})"
        for f in missing
    )
    raise FeatureSpecError(
        f"Invalid feature spec: feature(s) {what} need statistics computed from "
        "the training data. Use the spec that `limaml make-tasks` writes beside the "
        "records (DIR/spec.json), or complete it with "
        "`tf_limaml.statistics.complete_spec_from_tasks(spec, 'DIR/train-*')`; "
        'or write `mean` and `std` (or a vocabulary list, or `"normalize": false`) '
        "in the spec"
    )


def load_spec(
    spec: FeatureSpec | str | os.PathLike | Mapping[str, Any],
) -> FeatureSpec:
    """Accepts a FeatureSpec, a JSON object, or a path to a JSON file."""
    if isinstance(spec, FeatureSpec):
        return spec
    if isinstance(spec, Mapping):
        return FeatureSpec.from_dict(spec)
    return FeatureSpec.load(spec)


def feature_names(features: Sequence[Feature]) -> list[str]:
    return [f.name for f in features]
