"""Row validation and the support/query split of one entity's history.

These pure-Python functions are the single implementation of the task rules.
The Beam pipeline (`beam_pipelines/make_tasks.py`) calls them inside its DoFns,
and `build_tasks` calls them in-process for notebooks, tests and small data.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from tf_limaml.errors import UserInputError
from tf_limaml.features import (
    CATEGORICAL,
    EPOCH_MILLIS,
    EPOCH_SECONDS,
    ISO8601,
    NUMERIC,
    REJECT,
    TIME_AUTO,
    Feature,
    FeatureSpec,
)
from tf_limaml.selection import Ranked, rank_window

# Dead-letter reasons; stable strings, counted by name.
REASON_MISSING_ENTITY = "missing_entity"
REASON_MISSING_TIME = "missing_time"
REASON_BAD_TIME = "bad_time"
REASON_MISSING_LABEL = "missing_label"
REASON_BAD_LABEL = "bad_label"
REASON_BAD_NUMERIC = "bad_numeric"
REASON_MISSING_FEATURE = "missing_feature"
REASON_OUT_OF_VOCABULARY = "out_of_vocabulary"
# A record the reader could not turn into a row (wrong field count, bad UTF-8).
REASON_MALFORMED_ROW = "malformed_row"
REJECT_REASONS = (
    REASON_MISSING_ENTITY,
    REASON_MISSING_TIME,
    REASON_BAD_TIME,
    REASON_MISSING_LABEL,
    REASON_BAD_LABEL,
    REASON_BAD_NUMERIC,
    REASON_MISSING_FEATURE,
    REASON_OUT_OF_VOCABULARY,
    REASON_MALFORMED_ROW,
)
SPLITS = ("train", "val", "test")
# What make-tasks does with rows equal in every column (`--duplicates`).
KEEP = "keep"
DROP = "drop"
DUPLICATE_POLICIES = (KEEP, DROP)
# A history longer than this is split in passes over its rows, holding about
# this many of them at once (plus the rows its task keeps), not all of them.
MAX_ROWS_IN_MEMORY = 4096


class RowError(ValueError):
    """A row that cannot become part of a task; `reason` is a REJECT_REASONS key.

    Attributes:
        reason: Why (a REJECT_REASONS key).
        detail: What was wrong, with the value.
        feature: The feature whose cell broke a rule (None for the entity,
            time and label columns).
    """

    def __init__(self, reason: str, detail: str, feature: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.feature = feature


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _is_datetime(value: Any) -> bool:
    """A typed date or time (Parquet timestamp or date, numpy datetime64)."""
    return isinstance(value, datetime.date) or type(value).__name__ == "datetime64"


def _typed_seconds(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    if isinstance(value, datetime.date):
        return float(
            datetime.datetime(
                value.year, value.month, value.day, tzinfo=datetime.timezone.utc
            ).timestamp()
        )
    # numpy.datetime64, recognized without importing numpy here.
    if str(value) == "NaT":
        return None
    return float(value.astype("datetime64[us]").astype("int64")) / 1e6


def _iso_seconds(text: str) -> float | None:
    """Seconds since the epoch of ISO-8601 text; naive times are UTC."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return _typed_seconds(when)


_FORMAT_WORDS = {
    ISO8601: "an ISO-8601 date/time",
    EPOCH_SECONDS: "a number of seconds since the epoch",
    EPOCH_MILLIS: "a number of milliseconds since the epoch",
    TIME_AUTO: "a number of seconds or an ISO-8601 date/time",
}


def parse_time(value: Any, time_format: str = TIME_AUTO) -> float:
    """Seconds since the epoch of one time cell, read as `time_format` says.

    * "iso8601": text such as "2024-03-01T12:00:00Z", "2024-03-01 12:00:00+02:00"
      or "2024-03-01" (no zone means UTC), and typed date/time values.
    * "epoch_seconds" / "epoch_millis": a number (or its text).
    * "auto" (a spec make-tasks has not resolved): numbers are seconds, text
      is a number or ISO-8601, typed values are themselves.

    Raises:
        ValueError: The cell is not what the format says; the message says so.
    """
    seconds: float | None = None
    if _is_datetime(value):
        if time_format in (ISO8601, TIME_AUTO):
            seconds = _typed_seconds(value)
    elif time_format == ISO8601:
        if isinstance(value, str):
            seconds = _iso_seconds(value)
    elif time_format in (EPOCH_SECONDS, EPOCH_MILLIS):
        seconds = None if isinstance(value, bool) else _to_float(value)
        if seconds is not None and time_format == EPOCH_MILLIS:
            seconds /= 1000.0
    else:
        seconds = None if isinstance(value, bool) else _to_float(value)
        if seconds is None and isinstance(value, str):
            seconds = _iso_seconds(value)
    if seconds is None or not math.isfinite(seconds) or abs(seconds) >= 2**62:
        raise ValueError(f"{value!r} is not {_FORMAT_WORDS[time_format]}")
    return seconds


# A number this large is milliseconds: 1e11 seconds is the year 5138, 1e11
# milliseconds is 1973.
_MILLIS_FROM = 1e11


def detect_time_format(values: Iterable[Any]) -> str | None:
    """The format most of the given time cells are in, or None if none parses.

    Typed dates and ISO-8601 text are "iso8601"; numbers are
    "epoch_millis" when their median magnitude is at least 1e11, else
    "epoch_seconds". Blank cells do not count. Ties go to "iso8601".
    """
    iso = 0
    numbers: list[float] = []
    for value in values:
        if _is_missing(value):
            continue
        if _is_datetime(value):
            iso += 1
            continue
        number = None if isinstance(value, bool) else _to_float(value)
        if number is not None:
            numbers.append(abs(number))
        elif isinstance(value, str) and _iso_seconds(value) is not None:
            iso += 1
    if not iso and not numbers:
        return None
    if iso >= len(numbers):
        return ISO8601
    numbers.sort()
    median = numbers[len(numbers) // 2]
    return EPOCH_MILLIS if median >= _MILLIS_FROM else EPOCH_SECONDS


def resolve_time_format(
    spec: FeatureSpec, rows: Iterable[Mapping[str, Any]]
) -> FeatureSpec:
    """The spec with an "auto" time format replaced by the one the rows show.

    A spec whose format is stated, or rows with no readable time, come back
    unchanged.
    """
    if spec.time_format != TIME_AUTO:
        return spec
    found = detect_time_format(
        row.get(spec.time) for row in rows if isinstance(row, Mapping)
    )
    return spec if found is None else dataclasses.replace(spec, time_format=found)


# The largest magnitude a numeric cell may have. Task records store float32
# (largest finite 3.4e38), and keeping squares of accepted values below 1e78
# is what keeps the float64 moments finite (see `statistics.Moments`).
MAX_ABS_NUMERIC = 3.0e38


def _clean_number(feature: Feature, value: Any) -> float:
    number = _to_float(value)
    if number is None:
        raise RowError(
            REASON_BAD_NUMERIC,
            f"`{feature.name}` = {value!r} is not a finite number",
            feature.name,
        )
    if abs(number) > MAX_ABS_NUMERIC:
        raise RowError(
            REASON_BAD_NUMERIC,
            f"`{feature.name}` = {value!r} is beyond +-{MAX_ABS_NUMERIC:g}, the "
            "range a task record (float32) holds; scale the column",
            feature.name,
        )
    # + 0.0 turns -0.0 into 0.0: they compare equal when ordering rows but
    # encode to different bytes, so keeping both would make output order-dependent.
    return number + 0.0


def _clean_vector(feature: Feature, value: Any) -> list[float]:
    """A dense vector cell: "0.1|0.2|..." (CSV) or a list (Parquet)."""
    if isinstance(value, str):
        items = value.split("|")
    elif hasattr(value, "tolist"):  # a numpy array from a Parquet reader
        items = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if len(items) != feature.size:
        raise RowError(
            REASON_BAD_NUMERIC,
            f"`{feature.name}` has {len(items)} value(s), its shape is "
            f"[{feature.size}] (write n numbers separated by '|', or a list)",
            feature.name,
        )
    return [_clean_number(feature, item) for item in items]


# A blank numeric cell waiting for the training mean (see `fill_missing`).
MISSING = float("nan")


def is_blank(feature: Feature, value: Any) -> bool:
    """Whether a raw cell of the feature is missing (None, NaN, "", [])."""
    if isinstance(value, (list, tuple)):
        return not value
    return _is_missing(value)


def is_imputed(value: Any) -> bool:
    """Whether a clean numeric value is still waiting for the training mean."""
    if isinstance(value, (list, tuple)):
        return any(is_imputed(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def _clean_feature(feature: Feature, value: Any) -> Any:
    """Checks and normalizes one feature cell; see `validate_row`.

    An `"auto"` vocabulary not computed yet accepts any value: values unseen
    in training land in its OOV bucket.

    Raises:
        RowError: The cell breaks a rule of the feature (`feature` names it).
    """
    if feature.is_derived:
        return 0.0  # Set from its source by `_add_indicators`.
    if feature.type == NUMERIC:
        if is_blank(feature, value):
            if feature.missing == REJECT:
                raise RowError(
                    REASON_MISSING_FEATURE, f"`{feature.name}` is missing", feature.name
                )
            # NaN stands for "the training mean", which make-tasks fills in
            # once the train entities' statistics are known.
            fill = MISSING if feature.default is None else feature.default
            if isinstance(fill, tuple):
                return list(fill)
            return [fill] * feature.size if feature.shape else fill
        if feature.shape:
            return _clean_vector(feature, value)
        return _clean_number(feature, value)
    if is_blank(feature, value) and feature.missing == REJECT:
        raise RowError(
            REASON_MISSING_FEATURE, f"`{feature.name}` is missing", feature.name
        )
    if feature.type == CATEGORICAL:
        # A blank is "", its own bucket: the OOV id of a vocabulary (which no
        # value uses without `allow_oov`), its own hash bucket otherwise.
        text = "" if _is_missing(value) else _id_str(value)
        if (
            feature.vocabulary is not None
            and not feature.allow_oov
            and text
            and text not in feature.vocabulary
        ):
            raise RowError(
                REASON_OUT_OF_VOCABULARY,
                f"`{feature.name}` = {text!r} is not in its vocabulary",
                feature.name,
            )
        return text
    values = [] if _is_missing(value) else feature.parse_values(value)
    if feature.vocabulary is not None and not feature.allow_oov:
        unknown = [v for v in values if v not in feature.vocabulary]
        if unknown:
            raise RowError(
                REASON_OUT_OF_VOCABULARY,
                f"`{feature.name}` value {unknown[0]!r} is not in its vocabulary",
                feature.name,
            )
    return values[: feature.values_per_row]


def entity_id_of(spec: FeatureSpec, row: Mapping[str, Any]) -> str:
    """The entity id of a raw row, as `validate_row` normalizes it.

    Raises:
        RowError: The entity id is missing.
    """
    entity = row.get(spec.entity)
    if _is_missing(entity):
        raise RowError(REASON_MISSING_ENTITY, f"`{spec.entity}` is missing")
    return str(entity).strip() if isinstance(entity, str) else _id_str(entity)


def validate_row(spec: FeatureSpec, row: Mapping[str, Any]) -> dict[str, Any]:
    """Checks one interactions row against the spec and normalizes it.

    Returns:
        A clean row: entity id as str, time as a float (seconds; a date/time
        value counts as UTC), `label` as 0/1, numeric features as floats,
        categorical values as str, multi-hot values as a list of str, the
        tie-break column (if any) as str.

    Raises:
        RowError: The row breaks a rule; `reason` says which.
    """
    entity = entity_id_of(spec, row)
    raw_time = row.get(spec.time)
    if _is_missing(raw_time):
        raise RowError(REASON_MISSING_TIME, f"`{spec.time}` is missing")
    try:
        time = parse_time(raw_time, spec.time_format)
    except ValueError as err:
        stated = (
            ""
            if spec.time_format == TIME_AUTO
            else f' (the spec\'s time format is "{spec.time_format}")'
        )
        raise RowError(REASON_BAD_TIME, f"`{spec.time}` = {err}{stated}") from None
    raw_label = row.get(spec.label.column)
    if _is_missing(raw_label):
        raise RowError(REASON_MISSING_LABEL, f"`{spec.label.column}` is missing")
    try:
        label = spec.label.binarize(raw_label)
    except ValueError as err:
        raise RowError(REASON_BAD_LABEL, str(err)) from None
    clean: dict[str, Any] = {spec.entity: entity, spec.time: time + 0.0, "label": label}
    for feature in spec.features:
        clean[feature.name] = _clean_feature(feature, row.get(feature.name))
    _add_indicators(spec.features, row, clean)
    if spec.tie_break and spec.tie_break not in clean:
        tie = row.get(spec.tie_break)
        clean[spec.tie_break] = "" if _is_missing(tie) else _id_str(tie)
    return clean


def validate_meta_row(
    spec: FeatureSpec, row: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Checks one row of an entity table (entity id + meta features).

    Returns:
        (entity_id, meta): meta feature values normalized as in `validate_row`.

    Raises:
        RowError: The entity id is missing or a meta feature breaks its rule.
    """
    entity = entity_id_of(spec, row)
    meta = {f.name: _clean_feature(f, row.get(f.name)) for f in spec.meta_features}
    _add_indicators(spec.meta_features, row, meta)
    return entity, meta


def _add_indicators(
    features: Sequence[Feature], row: Mapping[str, Any], clean: dict[str, Any]
) -> None:
    """Sets each derived `<name>_missing` feature: 1.0 when its source is blank."""
    by_name = {f.name: f for f in features}
    for feature in features:
        if feature.is_derived:
            source = by_name[feature.indicator_of]
            clean[feature.name] = float(is_blank(source, row.get(source.name)))


def blank_features(features: Sequence[Feature], row: Mapping[str, Any]) -> list[str]:
    """Names of the features (read from columns) whose cell in `row` is blank.

    A valid row's blank cells are the ones imputed: a numeric value replaced by
    its default or the training mean, a categorical one kept as its own
    bucket, a multi-hot one as the empty set.
    """
    return [
        f.name for f in features if not f.is_derived and is_blank(f, row.get(f.name))
    ]


def _id_str(value: Any) -> str:
    """Renders ids read as 12.0 by a CSV/Parquet reader the same as 12."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def order_key(spec: FeatureSpec, row: Mapping[str, Any]) -> tuple:
    """Sort key of a clean row: time, then the tie-break column.

    The tie-break column sorts numerically when both values are numbers, so
    item 9 comes before item 10.
    """
    if not spec.tie_break:
        return (row[spec.time],)
    tie = row.get(spec.tie_break, "")
    number = _to_float(tie)
    return (
        (row[spec.time], 0, number, "")
        if number is not None
        else (row[spec.time], 1, 0.0, str(tie))
    )


def _rank(value: Any) -> tuple:
    """A key that orders any cell of a clean row against the same column's cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (0,)
    if isinstance(value, (int, float)):
        return (1, float(value))
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, (list, tuple)):
        return (3, tuple(str(v) for v in value))
    return (4, repr(value))


def content_key(row: Mapping[str, Any]) -> tuple:
    """Total order on the whole content of a clean row (every column, by name)."""
    return tuple((name, _rank(row[name])) for name in sorted(row))


def sort_rows(spec: FeatureSpec, rows: Iterable[Mapping[str, Any]]) -> list:
    """Sorts one entity's clean rows by `order_key`, ties broken by content.

    Rows that tie on (time, tie-break) are ordered by `content_key`, so the
    result depends only on the multiset of rows, never on the order they
    arrived in: a Beam runner, a re-sharded input or a second run all give the
    same order. Rows equal on every column are interchangeable.
    """
    keyed = sorted(((order_key(spec, r), r) for r in rows), key=lambda kr: kr[0])
    ordered = []
    # Ties are rare, so the (costlier) content key is built only inside them.
    for _, group in itertools.groupby(keyed, key=lambda kr: kr[0]):
        tied = [r for _, r in group]
        if len(tied) > 1:
            tied.sort(key=content_key)
        ordered.extend(tied)
    return ordered


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How one history is cut into support (earlier) and query (later).

    kind is "fraction" (value in (0, 1): the first fraction is support),
    "cutoff" (value is a time: rows before it are support) or "last" (value K:
    the last K rows are query).
    """

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> SplitRule:
        """Parses "fraction:0.5", "cutoff:TIME" or "last:K".

        TIME is seconds since the epoch or an ISO-8601 date/time (UTC when
        it has no zone), e.g. "cutoff:2024-03-01T00:00:00Z".
        """
        kind, _, raw = str(text).partition(":")
        number = _to_float(raw)
        if number is None and kind == "cutoff":
            number = _iso_seconds(raw)
        if kind not in ("fraction", "cutoff", "last") or number is None:
            raise UserInputError(
                f"--split {text!r}: expected fraction:F, cutoff:TIME (seconds or "
                "ISO-8601) or last:K"
            )
        if kind == "fraction" and not 0.0 < number < 1.0:
            raise UserInputError(f"--split {text!r}: the fraction must be in (0, 1)")
        if kind == "last" and (number < 1 or not float(number).is_integer()):
            raise UserInputError(f"--split {text!r}: K must be a positive integer")
        return cls(kind, number)

    def __str__(self) -> str:
        value = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{value}"

    def support_size(self, times: Sequence[float]) -> int:
        """Number of leading rows (of a time-sorted history) that are support."""
        before = sum(1 for t in times if t < self.value) if self.kind == "cutoff" else 0
        return self.support_count(len(times), before)

    def support_count(self, n: int, before_cutoff: int) -> int:
        """`support_size` from counts: n rows, `before_cutoff` of them before the cutoff."""
        if self.kind == "fraction":
            return int(math.floor(n * self.value))
        if self.kind == "last":
            return max(n - int(self.value), 0)
        return before_cutoff


@dataclasses.dataclass
class EntityHistory:
    """One entity's outcome: a task (support and query rows) or cold."""

    entity_id: str
    support: list[dict[str, Any]]
    query: list[dict[str, Any]]
    meta: dict[str, Any]
    dropped_by_caps: int = 0
    cold: bool = False
    meta_conflicts: int = 0
    duplicates: int = 0
    duplicates_dropped: int = 0

    @property
    def n_rows(self) -> int:
        return len(self.support) + len(self.query)


def merge_meta(
    spec: FeatureSpec, rows: Sequence[Mapping[str, Any]]
) -> tuple[dict, int]:
    """Meta features of an entity from its time-sorted rows: the latest value wins.

    Returns:
        (meta, conflicts): conflicts counts meta features whose rows disagree.
    """
    meta: dict[str, Any] = {}
    conflicts = 0
    for feature in spec.meta_features:
        # A blank (still waiting for the training mean) never hides a value
        # another row of the entity knows.
        values = [
            row[feature.name]
            for row in rows
            if feature.name in row and not is_imputed(row[feature.name])
        ]
        if not values:
            values = [row[feature.name] for row in rows if feature.name in row][-1:]
        if not values:
            continue
        meta[feature.name] = values[-1]
        distinct = {tuple(v) if isinstance(v, list) else v for v in values}
        conflicts += int(len(distinct) > 1)
    return meta, conflicts


def split_history(
    spec: FeatureSpec,
    entity_id: str,
    rows: Iterable[Mapping[str, Any]],
    rule: SplitRule,
    min_support: int = 1,
    min_query: int = 1,
    max_support: int | None = None,
    max_query: int | None = None,
    meta: Mapping[str, Any] | None = None,
    max_rows_in_memory: int | None = MAX_ROWS_IN_MEMORY,
    duplicates: str = KEEP,
) -> EntityHistory:
    """Sorts one entity's clean rows and cuts them into support and query.

    Rows equal in every column (after parsing) are duplicates: counted in
    `EntityHistory.duplicates` (each row equal to an earlier one counts once),
    and with `duplicates="drop"` only the first of each is kept.

    The sort is on (time, tie-break), then on the rows' content (`sort_rows`),
    so ties always fall the same way whatever order the rows arrived in. Support keeps its most recent
    `max_support` rows and query its first `max_query` rows; the rest count as
    dropped by caps. A history with fewer than `min_support` support rows or
    `min_query` query rows (before caps) is cold, and keeps all its rows.

    A history of more than `max_rows_in_memory` rows, given as a re-iterable
    collection (a list, a Beam GroupByKey's values), is never held whole: a
    few passes over it (`tf_limaml.selection.rank_window`) find the rows the
    caps keep, holding about `max_rows_in_memory` rows plus those at a time.
    The result is the same. A one-shot iterator, a cold history and uncapped
    parts are held whole, as the output needs them. None: always in memory.
    """
    if max_rows_in_memory is not None and not isinstance(rows, Iterator):
        head = list(itertools.islice(rows, max_rows_in_memory + 1))
        if len(head) > max_rows_in_memory:
            del head
            n_duplicates = _count_duplicates(rows)
            if duplicates == DROP and n_duplicates:
                rows = _Distinct(rows)
            history = _split_long_history(
                spec,
                entity_id,
                rows,
                rule,
                min_support,
                min_query,
                max_support,
                max_query,
                meta,
                max_rows_in_memory,
            )
            history.duplicates = n_duplicates
            history.duplicates_dropped = n_duplicates if duplicates == DROP else 0
            return history
        rows = head
    ordered, n_duplicates = _dedupe_sorted(
        spec, sort_rows(spec, rows), duplicates == DROP
    )
    history = _split_sorted(
        spec,
        entity_id,
        ordered,
        rule,
        min_support,
        min_query,
        max_support,
        max_query,
        meta,
    )
    history.duplicates = n_duplicates
    history.duplicates_dropped = n_duplicates if duplicates == DROP else 0
    return history


def _split_sorted(
    spec: FeatureSpec,
    entity_id: str,
    ordered: list[dict[str, Any]],
    rule: SplitRule,
    min_support: int,
    min_query: int,
    max_support: int | None,
    max_query: int | None,
    meta: Mapping[str, Any] | None,
) -> EntityHistory:
    """`split_history` of rows already sorted by `sort_rows`."""
    if meta is None:
        meta, conflicts = merge_meta(spec, ordered)
    else:
        conflicts = 0
    n_support = rule.support_size([r[spec.time] for r in ordered])
    support, query = ordered[:n_support], ordered[n_support:]
    if len(support) < min_support or len(query) < min_query:
        return EntityHistory(
            entity_id, support, query, dict(meta), cold=True, meta_conflicts=conflicts
        )
    dropped = 0
    if max_support is not None and len(support) > max_support:
        dropped += len(support) - max_support
        support = support[len(support) - max_support :]
    if max_query is not None and len(query) > max_query:
        dropped += len(query) - max_query
        query = query[:max_query]
    return EntityHistory(
        entity_id,
        support,
        query,
        dict(meta),
        dropped_by_caps=dropped,
        meta_conflicts=conflicts,
    )


def _dedupe_sorted(
    spec: FeatureSpec, ordered: list[dict[str, Any]], drop: bool
) -> tuple[list[dict[str, Any]], int]:
    """(rows, duplicates) of sorted rows: equal rows sit side by side there."""
    kept: list[dict[str, Any]] = []
    duplicates = 0
    previous: dict[str, Any] | None = None
    previous_order = previous_content = None
    for row in ordered:
        order = order_key(spec, row)
        if previous is not None and order == previous_order:
            # Ties are rare: the content key is only built inside them.
            if previous_content is None:
                previous_content = content_key(previous)
            content = content_key(row)
            if content == previous_content:
                duplicates += 1
                if drop:
                    continue
            previous_content = content
        else:
            previous_content = None
        previous, previous_order = row, order
        kept.append(row)
    return kept, duplicates


def _digest(row: Mapping[str, Any]) -> bytes:
    return hashlib.blake2b(repr(content_key(row)).encode(), digest_size=16).digest()


def _count_duplicates(rows: Iterable[Mapping[str, Any]]) -> int:
    """Rows equal to an earlier row, in one pass (16 bytes held per distinct row)."""
    seen: set[bytes] = set()
    n = 0
    for row in rows:
        seen.add(_digest(row))
        n += 1
    return n - len(seen)


class _Distinct:
    """A re-iterable view of rows without their duplicates (first one kept)."""

    def __init__(self, rows: Iterable[Mapping[str, Any]]):
        self.rows = rows

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        seen: set[bytes] = set()
        for row in self.rows:
            digest = _digest(row)
            if digest not in seen:
                seen.add(digest)
                yield row


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _split_long_history(
    spec: FeatureSpec,
    entity_id: str,
    rows: Iterable[Mapping[str, Any]],
    rule: SplitRule,
    min_support: int,
    min_query: int,
    max_support: int | None,
    max_query: int | None,
    meta: Mapping[str, Any] | None,
    capacity: int,
) -> EntityHistory:
    """`split_history` of a long re-iterable history, in passes over its rows."""

    def passes():
        return (Ranked(order_key(spec, row), row, content_key) for row in rows)

    # One pass counts the rows and merges the meta features as `merge_meta`
    # does on the sorted rows: the latest row's value, conflicts when two differ.
    n = before_cutoff = 0
    latest: dict[str, tuple[Ranked, Any]] = {}
    first: dict[str, Any] = {}
    differs: set[str] = set()
    meta_names = [f.name for f in spec.meta_features] if meta is None else []
    for ranked in passes():
        row = ranked.item
        n += 1
        if rule.kind == "cutoff" and row[spec.time] < rule.value:
            before_cutoff += 1
        for name in meta_names:
            if name not in row:
                continue
            if is_imputed(row[name]):
                # A blank counts only while no row of the entity knows the value.
                if name not in latest:
                    latest[name] = (ranked, row[name])
                continue
            if (
                name not in latest
                or latest[name][0] < ranked
                or is_imputed(latest[name][1])
            ):
                latest[name] = (ranked, row[name])
            value = _comparable(row[name])
            if name not in first:
                first[name] = value
            elif value != first[name]:
                differs.add(name)
    if meta is None:
        meta = {name: latest[name][1] for name in meta_names if name in latest}
    n_support = rule.support_count(n, before_cutoff)
    n_query = n - n_support
    if n_support < min_support or n_query < min_query:
        # A cold record keeps every row: the output itself is the history.
        ordered = sort_rows(spec, rows)
        return EntityHistory(
            entity_id,
            ordered[:n_support],
            ordered[n_support:],
            dict(meta),
            cold=True,
            meta_conflicts=len(differs),
        )
    start = n_support - max_support if max_support is not None else 0
    stop = n_support + max_query if max_query is not None else n
    window = [r.item for r in rank_window(passes, n, start, stop, capacity)]
    kept_support = n_support - max(start, 0)
    support, query = window[:kept_support], window[kept_support:]
    return EntityHistory(
        entity_id,
        support,
        query,
        dict(meta),
        dropped_by_caps=n - len(window),
        meta_conflicts=len(differs),
    )


def assign_split(
    entity_id: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> str:
    """Train/val/test by a stable hash of (seed, entity id).

    Uses SHA-256, not Python's `hash`, so the answer is the same in every
    process, run and runner.
    """
    digest = hashlib.sha256(f"{seed}:{entity_id}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    if unit < test_fraction:
        return "test"
    if unit < test_fraction + val_fraction:
        return "val"
    return "train"


def build_tasks(
    spec: FeatureSpec,
    rows: Iterable[Mapping[str, Any]],
    rule: SplitRule | str = "fraction:0.5",
    min_support: int = 1,
    min_query: int = 1,
    max_support: int | None = None,
    max_query: int | None = None,
    entities: Mapping[str, Mapping[str, Any]] | None = None,
    duplicates: str = KEEP,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> tuple[list[EntityHistory], list[tuple[dict, str]], dict[str, Any]]:
    """In-process task building: validate, group by entity, sort and split.

    The same rules as the Beam pipeline (`BuildTasks`), for data that fits
    in memory: an "auto" time format reads numbers as seconds and text as a
    number or ISO-8601 (`resolve_time_format` detects one format from rows,
    as `limaml make-tasks` does), duplicates are counted (and dropped with
    `duplicates="drop"`), and blank numeric cells
    become the mean of the entities `assign_split(seed, val_fraction,
    test_fraction)` puts in train (`impute_histories`).

    Args:
        spec: The feature spec.
        rows: Raw interaction rows (mappings of column to value).
        rule: Split rule or its text form.
        min_support: See `split_history`.
        min_query: See `split_history`.
        max_support: See `split_history`.
        max_query: See `split_history`.
        entities: Optional meta features per entity id; overrides the rows'.
        duplicates: "keep" or "drop" rows equal in every column.
        seed: Seed of the train/val/test hash, for the imputation means.
        val_fraction: Share of entities in val, likewise.
        test_fraction: Share of entities in test, likewise.

    Returns:
        (histories, rejected, counts): every entity's history (cold ones
        flagged), rejected rows as (row, reason), and counters whose
        `rows_read` equals rows in tasks + rejected + dropped by caps + cold
        + dropped as duplicates; `imputed_by_feature` counts blank cells.
    """
    if isinstance(rule, str):
        rule = SplitRule.parse(rule)
    groups: dict[str, list[dict[str, Any]]] = {}
    rejected: list[tuple[dict, str]] = []
    counts: dict[str, Any] = {"rows_read": 0, "rows_rejected": 0}
    imputed = {f.name: 0 for f in spec.features}
    for row in rows:
        counts["rows_read"] += 1
        try:
            clean = validate_row(spec, row)
        except RowError as err:
            rejected.append((dict(row), err.reason))
            counts["rows_rejected"] += 1
            continue
        for name in blank_features(spec.features, row):
            imputed[name] += 1
        groups.setdefault(clean[spec.entity], []).append(clean)
    histories = []
    for entity_id in sorted(groups):
        meta = None
        if entities is not None and entity_id in entities:
            meta = dict(entities[entity_id])
        histories.append(
            split_history(
                spec,
                entity_id,
                groups[entity_id],
                rule,
                min_support=min_support,
                min_query=min_query,
                max_support=max_support,
                max_query=max_query,
                meta=meta,
                duplicates=duplicates,
            )
        )
    train = {
        h.entity_id
        for h in histories
        if not h.cold
        and assign_split(h.entity_id, seed, val_fraction, test_fraction) == "train"
    }
    impute_histories(spec, histories, train, imputed)
    counts["imputed_by_feature"] = imputed
    counts["duplicate_rows"] = sum(h.duplicates for h in histories)
    counts["rows_dropped_as_duplicates"] = sum(h.duplicates_dropped for h in histories)
    counts["rows_in_tasks"] = sum(h.n_rows for h in histories if not h.cold)
    counts["rows_dropped_by_caps"] = sum(h.dropped_by_caps for h in histories)
    counts["rows_cold"] = sum(h.n_rows for h in histories if h.cold)
    counts["entities_cold"] = sum(1 for h in histories if h.cold)
    counts["entities"] = sum(1 for h in histories if not h.cold)
    return histories, rejected, counts


def impute_histories(
    spec: FeatureSpec,
    histories: Sequence[EntityHistory],
    train_entities: Iterable[str],
    imputed: Iterable[str] = (),
) -> FeatureSpec:
    """Replaces blank numeric cells (NaN) with the mean of the train entities.

    The in-process twin of make-tasks' analyzer and `FillMissing`: the means
    come from the histories of `train_entities` only (their meta once, their
    support and query rows), blanks left out.

    Args:
        spec: The spec the histories were validated with.
        histories: Every entity's history; changed in place.
        train_entities: Ids of the train entities.
        imputed: Names of the features that had blank cells (default: every
            feature whose blanks wait for the training mean).

    Returns:
        The spec with those means as `default` (what a blank became).
    """
    from tf_limaml import statistics  # noqa: PLC0415 - statistics imports features

    names = set(imputed) or {f.name for f in spec.features if f.imputes_mean}
    if isinstance(imputed, Mapping):
        names = {name for name, n in imputed.items() if n}
    names &= {f.name for f in spec.features if f.imputes_mean}
    if not names:
        return spec
    stats = statistics.SpecStatistics(spec)
    train = set(train_entities)
    for history in histories:
        if history.entity_id in train:
            stats.add_entity(history.meta, history.support + history.query)
    done = statistics.fill_defaults(spec, stats.numeric, names, "build_tasks")
    fills = {}
    for feature in done.features:
        if feature.name in names and feature.default is not None:
            default = feature.default
            fills[feature.name] = (
                list(default) if isinstance(default, tuple) else default
            )
    for history in histories:
        for target in [history.meta, *history.support, *history.query]:
            for name, fill in fills.items():
                value = target.get(name)
                if is_imputed(value):
                    if isinstance(value, list):
                        target[name] = [
                            (
                                (fill[i] if isinstance(fill, list) else fill)
                                if math.isnan(v)
                                else v
                            )
                            for i, v in enumerate(value)
                        ]
                    else:
                        target[name] = fill
    return done
