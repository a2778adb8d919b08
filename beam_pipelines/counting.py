"""Counts that travel as elements: what a job saw, summed without runner metrics.

Not every runner reports Beam metrics back to the launching program (a
template launch, some portable runners), and a metric may be counted twice
when a bundle is retried. So the pipelines carry their counts as data: a
`CountingDoFn` sums {key tuple: count} over a bundle and emits it once, on
its `stats` output, when the bundle finishes; `SumStats` adds every bundle's
counts into one dict with a `CombineGlobally`. The job writes its summary
(make-tasks' stats.json, embed's summary.json) from that element. The same
totals also go to `Metrics.counter`, for the runner's UI.

Example:

    class CountRows(CountingDoFn):
        namespace = "my.job"

        def process(self, row):
            self.count("rows")
            yield row

    out = rows | beam.ParDo(CountRows()).with_outputs(STATS, main="rows")
    totals = out[STATS] | SumStats()      # one dict: {("rows",): n}
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

# The output tag of the per-bundle counts, in every CountingDoFn.
STATS = "stats"


def windowed(value: Any) -> WindowedValue:
    """`value` in the global window, as `finish_bundle` must emit it."""
    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


class CountingDoFn(beam.DoFn):
    """A DoFn that sums its counts per bundle and emits them once per bundle.

    Subclasses call `count(*key, n=1)` (or update `self._counts`, a Counter of
    key tuples) and, if they override `start_bundle` or `finish_bundle`, call
    the base's. One stats element per bundle, not per row, keeps the counts
    almost free at a million rows.

    Attributes:
        namespace: The Metrics namespace of the counters.
        unmetered: First key parts that are not copied to Metrics (e.g.
            histogram buckets, which would flood the UI).
    """

    namespace = "limaml"
    unmetered: tuple[str, ...] = ()

    def start_bundle(self):
        self._counts = collections.Counter()

    def count(self, *key: str, n: int = 1) -> None:
        """Adds `n` to the count of `key`."""
        self._counts[key] += n

    def finish_bundle(self) -> Iterable[Any]:
        if not self._counts:
            return
        for key, value in self._counts.items():
            if key[0] not in self.unmetered:
                Metrics.counter(self.namespace, ".".join(key)).inc(value)
        yield beam.pvalue.TaggedOutput(STATS, windowed(dict(self._counts)))
        self._counts = collections.Counter()


class SumCounts(beam.CombineFn):
    """Sums dicts of {key tuple: count}."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, accumulator, element):
        accumulator.update(element)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for accumulator in accumulators:
            merged.update(accumulator)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


class SumStats(beam.PTransform):
    """The `stats` outputs of CountingDoFns -> one dict of the summed counts.

    Takes a PCollection or a tuple of them. The result always holds exactly
    one element (`{}` when nothing was counted).
    """

    def expand(self, stats):
        if isinstance(stats, (tuple, list)):
            stats = tuple(stats) | "FlattenStats" >> beam.Flatten()
        return stats | "SumCounts" >> beam.CombineGlobally(SumCounts())
