"""A long history is split in passes, holding only about what its caps keep.

`tf_limaml.tasks.split_history` (and make-tasks' `SplitEntities`, which hands
it the grouped rows as they are) must give the same task as sorting the whole
history in memory, while never holding more than about `max_rows_in_memory`
rows plus the caps. `LiveRows` counts the rows alive at once: a copy of the
whole history into a list shows up as a peak of every row.
"""

import random

import pytest

from beam_pipelines.build_tasks import SplitEntities
from beam_pipelines.counting import STATS
from tf_limaml import data, tasks
from tf_limaml.datasets import synthetic
from tf_limaml.selection import Ranked, rank_window, select_rank
from tf_limaml.tasks import SplitRule, split_history, validate_row

SPEC = synthetic.synthetic_spec()
RULES = ("fraction:0.5", "fraction:0.9", "last:3", "cutoff:40")
LONG = 20_000


class Row(dict):
    """A row that tells its history when it dies."""

    __slots__ = ("history",)

    def __del__(self):
        self.history.alive -= 1


class LiveRows:
    """A re-iterable history of `n` clean rows, made afresh on every pass.

    Every 8th row repeats the time of the row before it, so the split meets
    ties on time (identical rows: the random-history test). `peak` is the
    most rows alive at once since the last `reset`.
    """

    def __init__(self, n: int, seed: int = 0, tag: str | None = None):
        self.n = n
        self.seed = seed
        self.tag = tag
        self.alive = 0
        self.peak = 0

    def reset(self):
        self.peak = self.alive

    def _row(self, i: int) -> dict:
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        # Cheap arithmetic "randomness": the rows are made on every pass.
        mix = (i * 2654435761 + self.seed) % 1000003
        tie = i % 8 == 0
        row = Row(
            member_id="e",
            timestamp=float(i - tie),
            label=mix % 2,
            segment=f"seg_{mix % 3}",
            activity=float(mix % 5 == 0),
            item_id=str(mix % 2 if tie else i),
            topics=["news"],
            f0=0.0,
            f1=0.0,
            f2=0.0,
            f3=float(mix % 3),
        )
        row.history = self
        return row

    def __iter__(self):
        for i in range(self.n):
            row = self._row(i)
            yield row if self.tag is None else (self.tag, row)


def in_memory(rows, rule, **kwargs):
    """The reference: the whole history sorted in memory."""
    return split_history(
        SPEC, "e", list(rows), SplitRule.parse(rule), max_rows_in_memory=None, **kwargs
    )


def test_rank_window_equals_slicing_the_sorted_items():
    rng = random.Random(1)
    for _ in range(60):
        values = [rng.randrange(rng.choice([3, 50, 10_000])) for _ in range(400)]

        def passes(values=values):
            # Primary ties (v // 7) are broken by the value itself.
            return (Ranked(v // 7, v, lambda v: v) for v in values)

        start = rng.randrange(len(values))
        stop = start + rng.choice([1, 5, 40])
        window = rank_window(passes, len(values), start, stop, capacity=16)
        assert [r.item for r in window] == sorted(values)[start:stop]
        pivot, smaller = select_rank(passes, start, capacity=16)
        assert pivot.item == sorted(values)[start]
        assert smaller == sum(v < pivot.item for v in values)


def test_select_rank_rejects_a_rank_past_the_end():
    with pytest.raises(ValueError, match="rank 5"):
        select_rank(lambda: (Ranked(v, v, int) for v in range(5)), 5, capacity=2)


def test_split_in_passes_equals_split_in_memory_on_random_histories():
    rng = random.Random(0)
    raw = synthetic.generate_interactions(
        num_entities=1, min_interactions=50, max_interactions=50
    )
    for _ in range(300):
        rows = []
        for _ in range(rng.randrange(0, 200)):
            row = dict(rng.choice(raw))
            row.update(
                timestamp=rng.randrange(60),
                item_id=str(rng.randrange(5)),
                clicked=rng.randrange(2),
                segment=rng.choice(["seg_1", "seg_2"]),
            )
            rows.append(validate_row(SPEC, row))
            if rng.random() < 0.2:
                rows.append(dict(rows[-1]))  # an identical row
        rule = rng.choice(RULES)
        kwargs = {
            "min_support": rng.randrange(3),
            "min_query": rng.randrange(3),
            "max_support": rng.choice([None, 1, 5, 40]),
            "max_query": rng.choice([None, 1, 4, 30]),
        }
        expected = in_memory(rows, rule, **kwargs)
        got = split_history(
            SPEC,
            "e",
            rows,
            SplitRule.parse(rule),
            max_rows_in_memory=rng.choice([2, 8, 20]),
            **kwargs,
        )
        assert got == expected, (rule, kwargs, len(rows))


@pytest.mark.parametrize("rule", RULES)
def test_long_history_holds_only_what_the_caps_keep(rule):
    history = LiveRows(LONG)
    expected = in_memory(history, rule, max_support=16, max_query=16)
    history.reset()
    got = split_history(
        SPEC,
        "e",
        history,
        SplitRule.parse(rule),
        max_support=16,
        max_query=16,
        max_rows_in_memory=256,
    )
    assert got == expected
    assert not got.cold and got.dropped_by_caps > LONG - 40
    # max_rows_in_memory + 1 looked at before switching, or a bucket of
    # `select_rank` with its samples; never the whole history.
    assert history.peak <= 600, history.peak


def _split_entities(history, with_table=False, **kwargs):
    fn = SplitEntities(
        SPEC, SplitRule.parse("fraction:0.5"), with_table=with_table, **kwargs
    )
    fn.start_bundle()
    out = [o for o in fn.process(("e", history)) if not hasattr(o, "tag")]
    stats = list(fn.finish_bundle())
    assert stats and stats[0].tag == STATS
    return out


@pytest.mark.parametrize("with_table", [False, True])
def test_make_tasks_split_entities_never_copies_the_grouped_rows(with_table):
    caps = {"max_support": 8, "max_query": 8}
    history = LiveRows(3 * tasks.MAX_ROWS_IN_MEMORY, tag="rows" if with_table else None)
    expected = in_memory(LiveRows(history.n), "fraction:0.5", **caps)
    record = data.encode_task(
        SPEC, "e", expected.meta, expected.support, expected.query
    ).SerializeToString(deterministic=True)
    history.reset()
    out = _split_entities(history, with_table, **caps)
    assert [o[1:] for o in out] == [("e", record)]
    assert history.peak <= tasks.MAX_ROWS_IN_MEMORY + 400, history.peak


@pytest.mark.slow
def test_a_million_row_history_is_split_in_bounded_memory():
    history = LiveRows(1_000_000)
    got = split_history(
        SPEC,
        "e",
        history,
        SplitRule.parse("fraction:0.5"),
        max_support=32,
        max_query=32,
    )
    assert (len(got.support), len(got.query)) == (32, 32)
    assert got.dropped_by_caps == 1_000_000 - 64
    assert history.peak <= tasks.MAX_ROWS_IN_MEMORY + 400, history.peak
