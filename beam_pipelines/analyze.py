"""Beam analyzers: feature statistics of the training entities, and the completed spec.

The make-tasks job computes, the way tf.Transform analyzers do, what a spec
leaves to the data: the mean and std of numeric features and the `"auto"`
vocabularies. Only TRAIN entities feed them: `SplitEntities` emits analysis
inputs for an entity only after its split is known to be "train", and only from
the rows that went into its task (support + query, after caps). Meta features
count once per entity.

The arithmetic is `tf_limaml.statistics` (the same accumulators `limaml train`
runs in-process); this module only wraps it in plain combiners:

* numeric: `beam.CombinePerKey(MomentsCombineFn())` over per-entity partial
  moments keyed by feature name (exact merges of partial results);
* vocabularies: `beam.combiners.Count.PerElement()` on (feature, value), then
  per feature `beam.CombinePerKey(VocabularyCombineFn())`: the deterministic
  selection (count descending, value ascending, `min_count`, `top_k`) as a
  bounded combiner. With `top_k` set, no accumulator holds more than
  2 * `top_k` (value, count) pairs and two totals, so no worker holds every
  distinct value of a feature (the old `GroupByKey` did; `bounded=False`
  keeps it, for the bench and the tests that compare the two). A `--passes`
  run counts each pass's values (`CountValues`) and selects after the last
  pass, in bounded memory too (`beam_pipelines.value_counts`).

Everything meets in one element, the completed `FeatureSpec` as JSON, which
`WriteTaskFiles` writes to DIR/spec.json in the same job as the records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam

from tf_limaml import statistics
from tf_limaml.features import FeatureSpec

# Kinds of analysis elements, (kind, feature name, payload).
MOMENTS = "moments"
VALUE = "value"


def analysis_inputs(
    spec: FeatureSpec, meta: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]
) -> list[tuple[str, str, Any]]:
    """The analysis elements of one TRAIN entity.

    Numeric features give one partial `Moments` per entity (its rows in task
    order, so the partial is the same on every runner); vocabulary features
    one element per value occurrence. Only features that need statistics are
    analyzed.

    Args:
        spec: The feature spec.
        meta: The entity's meta feature values (counted once).
        rows: The rows that went into its task (support + query, after caps).
    """
    entity_stats = statistics.SpecStatistics(spec)
    if not entity_stats.numeric and not entity_stats.vocab:
        return []
    entity_stats.add_entity(meta, rows)
    out: list[tuple[str, str, Any]] = [
        (MOMENTS, name, moments)
        for name, moments in sorted(entity_stats.numeric.items())
        if moments.count
    ]
    for name, counter in sorted(entity_stats.vocab.items()):
        for value, count in sorted(counter.items()):
            out.extend([(VALUE, name, value)] * count)
    return out


class MomentsCombineFn(beam.CombineFn):
    """Merges partial `tf_limaml.statistics.Moments` of one feature (exactly)."""

    def create_accumulator(self) -> statistics.Moments | None:
        # The size of a feature is only known from its first input.
        return None

    def add_input(self, accumulator, element: statistics.Moments):
        return self._merge(accumulator, element)

    def merge_accumulators(self, accumulators):
        merged = None
        for accumulator in accumulators:
            merged = self._merge(merged, accumulator)
        return merged

    @staticmethod
    def _merge(accumulator, other):
        if other is None:
            return accumulator
        if accumulator is None:
            accumulator = statistics.Moments(other.size)
        return accumulator.merge(other)

    def extract_output(self, accumulator):
        return accumulator


class VocabularyCombineFn(beam.CombineFn):
    """(feature, value, count) of one feature -> its `VocabularyCounts`.

    The same result as `statistics.VocabularyCounts.of` on every value's
    count, in bounded memory when the feature has a `top_k`: the accumulator
    is [values seen, distinct values, feature name, candidates], where the
    candidates are (value, count) pairs reaching `min_count`, cut to the best
    `top_k` (count descending, value ascending: a total order, as each value
    comes once) whenever they reach twice that. A value cut there can never
    come back: every value arrives once, with its total count, after
    `Count.PerElement`.

    Args:
        limits: {feature name: (top_k or None, min_count)}.
    """

    def __init__(self, limits: Mapping[str, tuple[int | None, int]]):
        super().__init__()
        self.limits = dict(limits)

    def create_accumulator(self):
        return [0, 0, None, []]

    def _prune(self, accumulator, force: bool = False):
        name, candidates = accumulator[2], accumulator[3]
        top_k = self.limits[name][0] if name is not None else None
        if top_k is not None and (force or len(candidates) >= 2 * top_k + 2):
            candidates.sort(key=_rank)
            del candidates[top_k:]
        return accumulator

    def add_input(self, accumulator, element):
        name, value, n = element
        accumulator[0] += int(n)
        accumulator[1] += 1
        accumulator[2] = name
        if n >= self.limits[name][1]:
            accumulator[3].append((value, int(n)))
        return self._prune(accumulator)

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            merged[0] += accumulator[0]
            merged[1] += accumulator[1]
            merged[2] = merged[2] if accumulator[2] is None else accumulator[2]
            merged[3].extend(accumulator[3])
            self._prune(merged)
        return merged

    def compact(self, accumulator):
        return self._prune(accumulator, force=True)

    def extract_output(self, accumulator):
        values_seen, distinct, name, candidates = self._prune(accumulator, True)
        ranked = sorted(candidates, key=_rank)
        return statistics.VocabularyCounts(
            values_seen=values_seen,
            distinct=distinct,
            kept={value: n for value, n in ranked},
        )


def vocabulary_limits(spec: FeatureSpec) -> dict[str, tuple[int | None, int]]:
    """{feature name: (top_k, min_count)} of the `"auto"` vocabularies to select."""
    return {
        name: (spec.feature(name).top_k, spec.feature(name).min_count)
        for name in statistics.SpecStatistics(spec).vocab
    }


class CountValues(beam.PTransform):
    """Analysis elements -> (feature, value, count) of every vocabulary value.

    A pass of a `--passes` run writes these (`value_counts.WriteValueCounts`)
    instead of holding them in its partial statistics.
    """

    def expand(self, inputs):
        return (
            inputs
            | "VocabularyInputs"
            >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == VALUE else [])
            | "CountValues" >> beam.combiners.Count.PerElement()
            | "ValueCountTriples"
            >> beam.MapTuple(lambda name_value, n: (name_value[0], name_value[1], n))
        )


def _rank(value_count: tuple[str, int]) -> tuple[int, str]:
    # `statistics.select_vocabulary`'s order: count descending, value ascending.
    return -value_count[1], value_count[0]


def _vocabulary_counts(
    element: tuple[str, Iterable[tuple[str, int]]], spec: FeatureSpec
) -> tuple[str, statistics.VocabularyCounts]:
    name, pairs = element
    feature = spec.feature(name)
    return name, statistics.VocabularyCounts.of(
        dict(pairs), feature.top_k, feature.min_count
    )


# The key of the JSON object the analyzer writes instead of a spec when it
# cannot complete one; `make_tasks.run` turns it into one line after the job.
ERROR_KEY = "make_tasks_error"


def imputed_names(counts: Mapping[tuple, int] | None) -> list[str]:
    """The features with blank cells imputed, from make-tasks' counts."""
    return sorted(
        key[1]
        for key, n in (counts or {}).items()
        if len(key) == 2 and key[0] == "imputed_by_feature" and n
    )


def completed_json(
    spec: FeatureSpec,
    numeric: Mapping[str, statistics.Moments],
    vocab: Mapping[str, Any],
    source: str,
    imputed: Sequence[str] = (),
) -> str:
    """The completed spec as JSON, or {ERROR_KEY: why} when it cannot be completed.

    Never raises for a FeatureSpecError: a job must write its dead letter and
    stats.json before it says what went wrong, in one line.
    """
    try:
        done = statistics.complete_spec(spec, numeric, vocab, source)
        return statistics.fill_defaults(done, numeric, imputed, source).to_json()
    except statistics.FeatureSpecError as err:
        return json.dumps({ERROR_KEY: str(err)})


def _complete(
    parts: Sequence[tuple[str, str, Any]],
    spec: FeatureSpec,
    source: str,
    counts: Mapping[tuple, int] | None = None,
) -> str:
    numeric = {name: value for kind, name, value in parts if kind == MOMENTS}
    vocab = {name: value for kind, name, value in parts if kind == VALUE}
    return completed_json(spec, numeric, vocab, source, imputed_names(counts))


class AnalyzeFeatures(beam.PTransform):
    """Analysis elements of the train entities -> the completed spec as JSON.

    Args:
        spec: The spec whose missing statistics are computed; what the user
            wrote (a mean, a vocabulary list) is kept.
        source: Provenance recorded in each completed feature's `statistics`.
        partial: Stop before completing: return one pass's mergeable
            moments (`complete_from_partials` merges them), as a run of
            several passes (`beam_pipelines.passes`) needs; its vocabulary
            values are counted by `CountValues` instead.
        counts: Optional PCollection of one dict, make-tasks' summed counts:
            the features it shows blanks of get the training mean as their
            `default` (`tf_limaml.statistics.fill_defaults`).
        bounded: Select vocabularies with `VocabularyCombineFn` (bounded
            memory with `top_k`); False groups every distinct value of a
            feature on one worker first (the old path, same output).

    Returns (from `expand`): a PCollection of one string, `spec.to_json()` of
    the completed spec (the spec unchanged when it needs nothing); with
    `partial`, of one JSON-able dict {"moments": {name: moments}}.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        source: str = statistics.SOURCE_MAKE_TASKS,
        partial: bool = False,
        counts: beam.PCollection | None = None,
        bounded: bool = True,
    ):
        super().__init__()
        self.bounded = bounded
        self.spec = spec
        self.source = source
        self.partial = partial
        self.counts = counts

    def expand(self, inputs):
        numeric = (
            inputs
            | "NumericInputs"
            >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == MOMENTS else [])
            | "CombineMoments" >> beam.CombinePerKey(MomentsCombineFn())
            | "TagMoments" >> beam.MapTuple(lambda name, m: (MOMENTS, name, m))
        )
        if self.partial:
            return (
                numeric
                | "AllStatistics" >> beam.combiners.ToList()
                | "CompleteSpec" >> beam.Map(_partial)
            )
        value_counts = (
            inputs
            | "VocabularyInputs"
            >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == VALUE else [])
            | "CountValues" >> beam.combiners.Count.PerElement()
        )
        if not self.bounded:
            selected = (
                value_counts
                | "KeyByFeature"
                >> beam.MapTuple(
                    lambda name_value, n: (name_value[0], (name_value[1], n))
                )
                | "GroupByFeature" >> beam.GroupByKey()
                | "SelectVocabulary" >> beam.Map(_vocabulary_counts, self.spec)
            )
        else:
            selected = (
                value_counts
                | "KeyByFeature"
                >> beam.MapTuple(
                    lambda name_value, n: (
                        name_value[0],
                        (name_value[0], name_value[1], n),
                    )
                )
                | "SelectVocabulary"
                >> beam.CombinePerKey(VocabularyCombineFn(vocabulary_limits(self.spec)))
            )
        vocab = selected | "TagVocabulary" >> beam.MapTuple(
            lambda name, c: (VALUE, name, c)
        )
        if self.counts is not None:
            finish = beam.Map(
                _complete,
                self.spec,
                self.source,
                beam.pvalue.AsSingleton(self.counts),
            )
        else:
            finish = beam.Map(_complete, self.spec, self.source)
        return (
            (numeric, vocab)
            | "FlattenStatistics" >> beam.Flatten()
            | "AllStatistics" >> beam.combiners.ToList()
            | "CompleteSpec" >> finish
        )


def _moments_dict(moments: statistics.Moments) -> dict[str, Any]:
    return {slot: getattr(moments, slot) for slot in statistics.Moments.__slots__}


def _moments_of(obj: Mapping[str, Any]) -> statistics.Moments:
    moments = statistics.Moments(len(obj["sums"]))
    for slot in statistics.Moments.__slots__:
        setattr(moments, slot, obj[slot])
    return moments


def _partial(parts: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    return {
        "moments": {
            name: _moments_dict(value) for kind, name, value in parts if kind == MOMENTS
        },
    }


def complete_from_partials(
    spec: FeatureSpec,
    partials: Sequence[Mapping[str, Any]],
    source: str = statistics.SOURCE_MAKE_TASKS,
    imputed: Sequence[str] = (),
    vocab: Mapping[str, statistics.VocabularyCounts] | None = None,
) -> str:
    """The completed spec as JSON from every pass's partial statistics.

    As `completed_json`: {ERROR_KEY: why} when it cannot be completed; the
    `imputed` features get the training mean as their default.

    Moments merge in pass order (exact integer sums: the result is that of
    one pass, bit for bit).

    Args:
        spec: The spec as given.
        partials: `AnalyzeFeatures(partial=True)` outputs, one per pass.
        source: Provenance recorded in each completed feature.
        imputed: Features whose blanks get the training mean.
        vocab: The selected vocabularies
            (`beam_pipelines.value_counts.merge_value_counts`).
    """
    numeric: dict[str, statistics.Moments] = {}
    for partial in partials:
        for name, obj in sorted(partial["moments"].items()):
            moments = _moments_of(obj)
            numeric[name] = numeric[name].merge(moments) if name in numeric else moments
    return completed_json(spec, numeric, dict(vocab or {}), source, imputed)
