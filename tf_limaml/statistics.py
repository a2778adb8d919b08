"""Feature statistics from the data: the accumulators behind every analyzer.

Numeric features are fed as (transform(x) - mean) / std, and `"auto"`
vocabularies list the values seen in training. Both come from the TRAINING
entities only, as tf.Transform analyzers would compute them. This module is the
one pure-Python implementation (no Beam): the make-tasks pipeline
(`beam_pipelines/analyze.py`) wraps it in CombineFns, and
`complete_spec_from_tasks` runs it in-process over task records (what
`limaml train` does when a spec lacks statistics).

* `Moments`: count, mean, M2, min and max per component, from exact integer
  sums, so partial results from any split of the data, merged in any order,
  give bit-identical statistics.
* `select_vocabulary`: values by count descending, ties by value ascending, cut
  by `min_count` then `top_k`.
* `complete_spec`: fills only what the spec lacks and records provenance.

Example:

    moments = Moments.of([[1990.0], [2001.0], [1985.0]])
    spec = complete_spec(spec, {"year": moments}, {}, source="notebook")
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tf_limaml.features import (
    LOG1P,
    MULTI_HOT,
    NUMERIC,
    PARTS,
    Feature,
    FeatureSpec,
    FeatureSpecError,
    load_spec,
)

logger = logging.getLogger(__name__)

# Mean and std are written with this many significant digits, so spec.json
# reads well; the moments themselves are exact (order-independent).
SIGNIFICANT_DIGITS = 12
SOURCE_MAKE_TASKS = "make_tasks"
SOURCE_TRAIN_TASKS = "train_tasks"


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") + 0.0


class Moments:
    """Count, mean, M2 (sum of squared deviations), min and max per component.

    One accumulator per feature; a vector feature of shape [n] keeps n
    components. The sums of x and of x**2 are kept EXACTLY, as integers over a
    power of two (every finite float64 is one), so `add` and `merge` in any
    order and any split give bit-identical mean and M2: a runner merges
    partial moments in the order its bundles finish, and a float accumulator
    (Welford, Chan et al.) moves the last bits of a mean of values near 3e38
    with that order. Mean and M2 are rounded to float64 once, when read.

    Attributes:
        count: Rows added.
        sums: Per component, the integer `s` with sum(x) = s / 2**scale.
        squares: Per component, the integer with sum(x**2) = it / 4**scale.
        scales: Per component, the power of two of `sums` (the largest
            denominator of a value added so far).
        nonfinite: Per component, NaN or infinite values added (they make the
            mean NaN, so the feature is refused with the reason).
        min: Per-component minimum.
        max: Per-component maximum.
    """

    __slots__ = ("count", "sums", "squares", "scales", "nonfinite", "min", "max")

    def __init__(self, size: int = 1):
        self.count = 0
        self.sums = [0] * size
        self.squares = [0] * size
        self.scales = [0] * size
        self.nonfinite = [0] * size
        self.min = [math.inf] * size
        self.max = [-math.inf] * size

    @classmethod
    def of(cls, rows: Iterable[Sequence[float]], size: int = 1) -> Moments:
        """The moments of rows, each a sequence of `size` numbers."""
        moments = cls(size)
        for row in rows:
            moments.add(row)
        return moments

    @property
    def size(self) -> int:
        return len(self.sums)

    @property
    def mean(self) -> list[float]:
        """Per-component mean, the float64 nearest the exact one."""
        return [self._mean(i) for i in range(self.size)]

    @property
    def m2(self) -> list[float]:
        """Per-component sum of squared deviations, nearest float64 (inf if
        beyond float64)."""
        return [self._m2(i) for i in range(self.size)]

    def add(self, values: Sequence[float]) -> Moments:
        """Adds one row (a sequence of `size` numbers); returns self."""
        if len(values) != self.size:
            raise ValueError(
                f"Moments of {self.size} component(s) got a row of {len(values)}"
            )
        self.count += 1
        for i, x in enumerate(values):
            x = float(x)
            self.min[i] = min(self.min[i], x)
            self.max[i] = max(self.max[i], x)
            if not math.isfinite(x):
                self.nonfinite[i] += 1
                continue
            numerator, denominator = x.as_integer_ratio()
            scale = denominator.bit_length() - 1
            if scale > self.scales[i]:
                self._rescale(i, scale)
            shift = self.scales[i] - scale
            self.sums[i] += numerator << shift
            self.squares[i] += (numerator * numerator) << (2 * shift)
        return self

    def merge(self, other: Moments) -> Moments:
        """Merges another accumulator into this one (exact); returns self."""
        if other.count == 0:
            return self
        if self.size != other.size:
            raise ValueError(
                f"Cannot merge moments of {self.size} and {other.size} components"
            )
        for i in range(self.size):
            scale = max(self.scales[i], other.scales[i])
            self._rescale(i, scale)
            shift = scale - other.scales[i]
            self.sums[i] += other.sums[i] << shift
            self.squares[i] += other.squares[i] << (2 * shift)
            self.nonfinite[i] += other.nonfinite[i]
            self.min[i] = min(self.min[i], other.min[i])
            self.max[i] = max(self.max[i], other.max[i])
        self.count += other.count
        return self

    def std(self) -> list[float]:
        """Population standard deviation (ddof=0) per component."""
        if self.count == 0:
            return [0.0] * self.size
        return [math.sqrt(self._variance(i)) for i in range(self.size)]

    def _rescale(self, i: int, scale: int) -> None:
        shift = scale - self.scales[i]
        if shift > 0:
            self.sums[i] <<= shift
            self.squares[i] <<= 2 * shift
            self.scales[i] = scale

    def _deviations(self, i: int) -> int:
        """count**2 * 4**scale * M2, an exact integer (never negative)."""
        return self.count * self.squares[i] - self.sums[i] * self.sums[i]

    def _mean(self, i: int) -> float:
        if not self.count:
            return 0.0
        if self.nonfinite[i]:
            return math.nan
        return _nearest(self.sums[i], self.count << self.scales[i])

    def _m2(self, i: int) -> float:
        if not self.count:
            return 0.0
        if self.nonfinite[i]:
            return math.nan
        return _nearest(self._deviations(i), self.count << (2 * self.scales[i]))

    def _variance(self, i: int) -> float:
        if self.nonfinite[i]:
            return math.nan
        return _nearest(
            self._deviations(i), (self.count * self.count) << (2 * self.scales[i])
        )

    def __getstate__(self):
        return tuple(getattr(self, slot) for slot in self.__slots__)

    def __setstate__(self, state):
        for slot, value in zip(self.__slots__, state, strict=True):
            setattr(self, slot, value)

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, mean={self.mean}, std={self.std()})"


def _nearest(numerator: int, denominator: int) -> float:
    """numerator / denominator rounded once to float64 (inf beyond its range)."""
    try:
        return numerator / denominator  # int / int is correctly rounded
    except OverflowError:
        return math.inf if numerator > 0 else -math.inf


def feature_rows(feature: Feature, value: Any) -> Sequence[float]:
    """One clean numeric value as the row the accumulator adds (transformed).

    Args:
        feature: A numeric feature.
        value: A float (scalar feature) or a sequence of floats (vector).
    """
    values = value if isinstance(value, (list, tuple)) else (value,)
    return [feature.transform_value(float(v)) for v in values]


def vocabulary_values(feature: Feature, value: Any) -> list[str]:
    """The values one clean cell adds to a vocabulary count ("" never counts)."""
    if feature.type == MULTI_HOT:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [str(v) for v in values if v not in ("", None)]
    return [] if value in ("", None) else [str(value)]


def select_vocabulary(
    counts: Mapping[str, int], top_k: int | None = None, min_count: int = 1
) -> list[str]:
    """The deterministic vocabulary of value counts.

    Values sorted by count descending, ties broken by value ascending; values
    seen fewer than `min_count` times are dropped, then the first `top_k` kept.

    Args:
        counts: {value: occurrences in training}.
        top_k: Most values to keep (None: all).
        min_count: Fewest occurrences to keep a value.
    """
    ranked = sorted(
        ((value, n) for value, n in counts.items() if n >= min_count),
        key=lambda vn: (-vn[1], vn[0]),
    )
    if top_k is not None:
        ranked = ranked[:top_k]
    return [value for value, _ in ranked]


@dataclasses.dataclass(frozen=True)
class VocabularyCounts:
    """A feature's value counts, pruned to the values its vocabulary keeps.

    What a distributed analyzer ships to the one place the spec is completed:
    the totals, and the counts of the kept values only (a feature of millions
    of distinct ids with `top_k` ships `top_k` counts).

    Attributes:
        values_seen: Occurrences counted (every value).
        distinct: Distinct values seen.
        kept: {value: count} of the values `select_vocabulary` keeps.
    """

    values_seen: int
    distinct: int
    kept: dict[str, int]

    @classmethod
    def of(
        cls, counts: Mapping[str, int], top_k: int | None = None, min_count: int = 1
    ) -> VocabularyCounts:
        selected = select_vocabulary(counts, top_k, min_count)
        return cls(
            values_seen=int(sum(counts.values())),
            distinct=len(counts),
            kept={value: int(counts[value]) for value in selected},
        )


def overflowed_components(moments: Moments) -> list[int]:
    """The components of `moments` whose mean or M2 is not finite."""
    if not moments.count:
        return []
    return [
        i
        for i in range(moments.size)
        if not (math.isfinite(moments.mean[i]) and math.isfinite(moments.m2[i]))
    ]


def numeric_statistics(
    feature: Feature, moments: Moments | None, source: str
) -> dict[str, Any]:
    """(mean, std, provenance) of a numeric feature from its moments, as a dict.

    A component with std 0 (a constant column, or no rows) gets std 1, so the
    feature is centred and never divided by zero; the provenance says so.

    Raises:
        FeatureSpecError: A mean or M2 is not finite. Rows from
            `tf_limaml.tasks.validate_row` cannot do that (it rejects
            |x| > 3e38, so each squared deviation is below 4e77 and M2 stays
            finite for any count below 1e230), but moments fed other values
            can overflow; the feature is refused with the reason rather than
            fed with a made-up std.
    """
    moments = moments if moments is not None else Moments(feature.size)
    overflowed = overflowed_components(moments)
    if overflowed:
        i = overflowed[0]
        raise FeatureSpecError(
            f"Invalid feature spec: `{feature.name}`: its training statistics "
            f"overflow float64 (component {i}: mean {moments.mean[i]!r}, sum of "
            f"squared deviations {moments.m2[i]!r}, values from "
            f"{moments.min[i]!r} to {moments.max[i]!r}); scale the column, give "
            'it "transform": "log1p", or state its "mean" and "std"'
        )
    stds = moments.std()
    constant = [s <= 0.0 for s in stds]
    mean = [_round(m) for m in moments.mean]
    std = [1.0 if c else _round(s) for s, c in zip(stds, constant, strict=True)]
    provenance: dict[str, Any] = {"count": moments.count, "source": source}
    if moments.count:
        provenance["min"] = moments.min if feature.shape else moments.min[0]
        provenance["max"] = moments.max if feature.shape else moments.max[0]
    if feature.transform is not None:
        provenance["transform"] = feature.transform
    if any(constant):
        provenance["constant"] = True
    if not feature.shape:
        return {"mean": mean[0], "std": std[0], "statistics": provenance}
    return {"mean": mean, "std": std, "statistics": provenance}


def complete_spec(
    spec: FeatureSpec,
    numeric_stats: Mapping[str, Moments],
    vocab_counts: Mapping[str, Mapping[str, int] | VocabularyCounts],
    source: str,
) -> FeatureSpec:
    """Fills what the spec lacks from the statistics; keeps what the user wrote.

    Only features that need statistics change: a numeric feature gets the
    mean/std it lacks (a given one is kept), an `"auto"` vocabulary gets its
    list. Each records provenance under `statistics`.

    Args:
        spec: The spec, possibly with features that need statistics.
        numeric_stats: {feature name: Moments of its transformed values}.
        vocab_counts: {feature name: {value: count}}, or the pruned
            `VocabularyCounts` of a distributed analyzer.
        source: Where the statistics came from (e.g. "make_tasks"), recorded.

    Returns:
        The completed spec (the same object if nothing was missing).

    Raises:
        FeatureSpecError: An auto vocabulary would be empty (no training value
            reaches `min_count`).
    """
    if not spec.missing_statistics():
        return spec
    obj = spec.to_dict()
    for part in ("meta_features", "request_features"):
        # The JSON lists only the features read from columns (derived
        # `<name>_missing` indicators come back from their source).
        read = [f for f in getattr(spec, part) if not f.is_derived]
        for i, feature in enumerate(read):
            if not feature.needs_statistics:
                continue
            entry = obj[part][i]
            if feature.type == NUMERIC:
                computed = numeric_statistics(
                    feature, numeric_stats.get(feature.name), source
                )
                for key in ("mean", "std"):
                    if entry.get(key) is None:
                        entry[key] = computed[key]
                entry["statistics"] = computed["statistics"]
                if computed["statistics"]["count"] == 0:
                    logger.warning(
                        "Feature %r has no training value; fed as (x - %s) / %s",
                        feature.name,
                        entry["mean"],
                        entry["std"],
                    )
                continue
            counts = vocab_counts.get(feature.name, {})
            if not isinstance(counts, VocabularyCounts):
                counts = VocabularyCounts.of(counts, feature.top_k, feature.min_count)
            vocabulary = select_vocabulary(
                counts.kept, feature.top_k, feature.min_count
            )
            if not vocabulary:
                raise FeatureSpecError(
                    f"Invalid feature spec: `{part}[{feature.name}].vocabulary` = "
                    f"'auto': no training value occurs at least min_count = "
                    f"{feature.min_count} times ({counts.distinct} distinct values "
                    "seen); lower `min_count` or check the column"
                )
            entry["vocabulary"] = vocabulary
            entry["min_count"] = feature.min_count
            entry["statistics"] = {
                "values_seen": counts.values_seen,
                "distinct": counts.distinct,
                "kept": len(vocabulary),
                "kept_count": int(sum(counts.kept[v] for v in vocabulary)),
                "source": source,
            }
    return FeatureSpec.from_dict(obj)


def _untransform(feature: Feature, value: float) -> float:
    """The raw value whose `transform` is `value`."""
    if feature.transform == LOG1P:
        return math.copysign(math.expm1(abs(value)), value)
    return value


def fill_defaults(
    spec: FeatureSpec,
    numeric_stats: Mapping[str, Moments],
    names: Iterable[str],
    source: str,
) -> FeatureSpec:
    """Writes the training mean as `default` of the named features.

    For the numeric features whose blanks wait for the training mean
    (`Feature.imputes_mean`): the value a blank becomes is the one that
    standardizes to 0, the raw value whose transform is the feature's `mean`
    (as given, or as completed), or, for a feature fed raw, the mean of the
    training values. Call it on the spec `complete_spec` returned.

    Args:
        spec: The (completed) spec.
        numeric_stats: {feature name: Moments of its transformed TRAINING
            values}, blanks left out.
        names: The features that had blank cells.
        source: Provenance, recorded as `statistics.default_source`.

    Returns:
        The spec with those defaults (the same object if none applies).
    """
    wanted = {f.name for f in spec.features if f.imputes_mean and f.name in set(names)}
    if not wanted:
        return spec
    obj = spec.to_dict()
    for part in ("meta_features", "request_features"):
        for entry, feature in zip(
            obj[part],
            [f for f in getattr(spec, part) if not f.is_derived],
            strict=True,
        ):
            if feature.name not in wanted:
                continue
            moments = numeric_stats.get(feature.name) or Moments(feature.size)
            mean = feature.mean if feature.mean is not None else moments.mean
            means = list(mean) if isinstance(mean, (list, tuple)) else [mean]
            if feature.size > 1 and len(means) == 1:
                means = means * feature.size
            values = [_round(_untransform(feature, m)) for m in means]
            entry["default"] = values if feature.shape else values[0]
            provenance = dict(entry.get("statistics") or {})
            provenance["default_source"] = source
            provenance["default_count"] = moments.count
            entry["statistics"] = provenance
            if not moments.count and feature.mean is None:
                logger.warning(
                    "Feature %r has no training value; its blanks become %s",
                    feature.name,
                    entry["default"],
                )
    return FeatureSpec.from_dict(obj)


class SpecStatistics:
    """Accumulates what `complete_spec` and `fill_defaults` need.

    The in-process analyzer: add each training entity once with `add_entity`
    (its meta values and its support + query rows). Numeric features are
    accumulated when they need statistics or when their blanks become the
    training mean; blank (NaN) cells never count.
    """

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.numeric: dict[str, Moments] = {}
        self.vocab: dict[str, collections.Counter] = {}
        for feature in spec.features:
            if not feature.needs_statistics and not feature.imputes_mean:
                continue
            if feature.type == NUMERIC:
                self.numeric[feature.name] = Moments(feature.size)
            else:
                self.vocab[feature.name] = collections.Counter()

    def _add(self, feature: Feature, value: Any) -> None:
        if feature.name in self.numeric:
            if not _is_blank_number(value):
                self.numeric[feature.name].add(feature_rows(feature, value))
        elif feature.name in self.vocab:
            self.vocab[feature.name].update(vocabulary_values(feature, value))

    def add_entity(
        self, meta: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]
    ) -> None:
        """Adds one training entity: meta values once, request values per row."""
        for feature in self.spec.meta_features:
            if feature.name in meta and meta[feature.name] is not None:
                self._add(feature, meta[feature.name])
        for row in rows:
            for feature in self.spec.request_features:
                self._add(feature, row[feature.name])

    def complete(self, source: str) -> FeatureSpec:
        return complete_spec(self.spec, self.numeric, self.vocab, source)


def _is_blank_number(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(v, float) and math.isnan(v) for v in values)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def complete_spec_from_tasks(
    spec: FeatureSpec | str | Mapping[str, Any],
    file_pattern: str | Sequence[str],
    source: str = SOURCE_TRAIN_TASKS,
) -> FeatureSpec:
    """Completes a spec from TRAINING task records (gzipped TFRecords).

    Numeric request features are accumulated over every support and query
    row, meta features once per entity, with the same accumulators as the
    make-tasks pipeline. Point it at train records only: statistics from
    validation or test entities would leak them into training.

    Args:
        spec: The spec (or its JSON object or path).
        file_pattern: Glob(s) of training task records, e.g. "DIR/train-*".
        source: Provenance recorded in each feature's `statistics`.

    Returns:
        The completed spec (unchanged when nothing was missing).

    Raises:
        FileNotFoundError: The pattern matches no file.
    """
    import tensorflow as tf  # noqa: PLC0415 - keeps this module light to import

    from tf_limaml.data import GZIP, record_schema  # noqa: PLC0415

    spec = load_spec(spec)
    if not spec.missing_statistics():
        return spec
    patterns = [file_pattern] if isinstance(file_pattern, str) else file_pattern
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(
            f"No task records match {file_pattern!r}; pass the train records "
            "make-tasks wrote (DIR/train-*.tfrecord.gz)"
        )
    context_schema, sequence_schema = record_schema(spec)
    stats = SpecStatistics(spec)
    entities = 0
    for record in tf.data.TFRecordDataset(files, compression_type=GZIP):
        context, sequences = tf.io.parse_single_sequence_example(
            record, context_schema, sequence_schema
        )
        meta = {}
        for feature in spec.meta_features:
            value = context[feature.name]
            if isinstance(value, tf.SparseTensor):
                value = value.values
            meta[feature.name] = _to_python(feature, value.numpy())
        rows: list[dict[str, Any]] = []
        for part in PARTS:
            columns = {}
            for feature in spec.request_features:
                value = sequences[spec.sequence_key(part, feature.name)]
                if isinstance(value, tf.SparseTensor):
                    value = tf.sparse.to_dense(value, default_value=b"")
                columns[feature.name] = value.numpy()
            n = len(sequences[spec.sequence_key(part, "label")])
            for r in range(n):
                rows.append(
                    {
                        f.name: _to_python(f, columns[f.name][r])
                        for f in spec.request_features
                    }
                )
        stats.add_entity(meta, rows)
        entities += 1
    logger.info(
        "Computed statistics of %s from %d training entities in %d file(s)",
        spec.missing_statistics(),
        entities,
        len(files),
    )
    return stats.complete(source)


def _to_python(feature: Feature, value: Any) -> Any:
    """A parsed numpy value as the clean-row value the accumulators take."""
    if feature.type == NUMERIC:
        if feature.shape:
            return [float(v) for v in value]
        return float(value)
    if feature.type == MULTI_HOT:
        return [_decode(v) for v in value if v != b""]
    return _decode(value)
