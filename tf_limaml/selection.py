"""Order statistics of a long re-iterable sequence, in bounded memory.

make-tasks keeps a window of each entity's time-sorted history: the most
recent `max_support` support rows and the first `max_query` query rows. A
history can be far longer than that window (a bot, a crawler, a decade of
activity), so `rank_window` finds the window in a few passes over the rows
(the values of a Beam GroupByKey can be iterated again) and holds at most
about `capacity` of them at a time, whatever the length of the history.

Items are compared as `Ranked`: a cheap primary key, and a costly secondary
key computed only when two primary keys tie.

Example:

    def passes():
        return (Ranked(row["time"], row, content_key) for row in rows)

    newest_ten = rank_window(passes, n, n - 10, n, capacity=1024)
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Items drawn per bucket to split it in the next pass: each pass cuts the
# bucket holding the wanted rank about this many times.
SAMPLES_PER_BUCKET = 16
_UNSET = object()


class Ranked:
    """An item ordered by `primary`, then by `secondary(item)` where primaries tie.

    Args:
        primary: The sort key (e.g. time and tie-break).
        item: The payload (e.g. the row).
        secondary: Item -> key that breaks ties of `primary` (e.g. the row's
            whole content); computed at most once, and only on a tie.
    """

    __slots__ = ("primary", "item", "_secondary_fn", "_secondary")

    def __init__(self, primary: Any, item: Any, secondary: Callable[[Any], Any]):
        self.primary = primary
        self.item = item
        self._secondary_fn = secondary
        self._secondary = _UNSET

    def secondary(self) -> Any:
        if self._secondary is _UNSET:
            self._secondary = self._secondary_fn(self.item)
        return self._secondary

    def __lt__(self, other: Ranked) -> bool:
        if self.primary != other.primary:
            return self.primary < other.primary
        return self.secondary() < other.secondary()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ranked):
            return NotImplemented
        return self.primary == other.primary and self.secondary() == other.secondary()

    __hash__ = None  # type: ignore[assignment]


Passes = Callable[[], Iterable[Ranked]]


def _inside(item: Ranked, low: Ranked | None, high: Ranked | None) -> bool:
    """low < item < high; None is unbounded."""
    return (low is None or low < item) and (high is None or item < high)


def _sample(reservoir: list, item: Ranked, seen: int, size: int, rng) -> None:
    """Reservoir sampling: after `seen` items, each is kept with equal chance."""
    if len(reservoir) < size:
        reservoir.append(item)
        return
    index = rng.randrange(seen)
    if index < size:
        reservoir[index] = item


def _distinct(items: list[Ranked]) -> list[Ranked]:
    out: list[Ranked] = []
    for item in sorted(items):
        if not out or out[-1] < item:
            out.append(item)
    return out


def select_rank(
    passes: Passes,
    rank: int,
    capacity: int,
    samples: int = SAMPLES_PER_BUCKET,
    seed: int = 0,
) -> tuple[Ranked, int]:
    """The item of sorted rank `rank` (0-based), in passes of bounded memory.

    Each pass counts the items between pivots sampled in the previous pass and
    keeps the bucket that holds `rank`, until the bucket fits in `capacity`
    items (or `rank` falls on a pivot). The answer is exact; the seed only
    changes how many passes it takes (about log(n) / log(samples)).

    Args:
        passes: Returns a fresh iterable of the items, in the same multiset
            every time.
        rank: The wanted rank; must be below the number of items.
        capacity: Most items held to sort a bucket.
        samples: Pivots drawn per bucket for the next pass.
        seed: Seed of the sampling.

    Returns:
        (item, number of items strictly smaller than it).

    Raises:
        ValueError: `rank` is not below the number of items.
    """
    rng = random.Random(seed)
    low = high = None  # exclusive bounds of the bucket holding `rank`
    below = 0  # items <= low
    size = None  # items in the bucket; None until counted
    pivots: list[Ranked] = []
    while True:
        if size is not None and size <= capacity:
            inside = sorted(x for x in passes() if _inside(x, low, high))
            found = inside[rank - below]
            return found, below + bisect.bisect_left(inside, found)
        opened = [0] * (len(pivots) + 1)
        equal = [0] * len(pivots)
        reservoirs: list[list[Ranked]] = [[] for _ in opened]
        for item in passes():
            if not _inside(item, low, high):
                continue
            j = bisect.bisect_left(pivots, item)
            if j < len(pivots) and not item < pivots[j]:
                equal[j] += 1
                continue
            opened[j] += 1
            _sample(reservoirs[j], item, opened[j], samples, rng)
        count = below
        for j, in_bucket in enumerate(opened):
            if rank < count + in_bucket:
                low = pivots[j - 1] if j > 0 else low
                high = pivots[j] if j < len(pivots) else high
                below, size = count, in_bucket
                # Pivots are items of the bucket, so the next bucket is
                # smaller by at least one: the loop ends.
                pivots = _distinct(reservoirs[j])
                break
            count += in_bucket
            if j < len(pivots):
                if rank < count + equal[j]:
                    return pivots[j], count
                count += equal[j]
        else:
            raise ValueError(f"rank {rank} is not below the item count {count}")


def rank_window(
    passes: Passes, n: int, start: int, stop: int, capacity: int
) -> list[Ranked]:
    """The items of sorted ranks [start, stop), ascending, in bounded memory.

    Holds at most about max(capacity, 2 * (stop - start), SAMPLES_PER_BUCKET**2)
    items at once. A window at either end takes one pass (a bounded heap);
    one in the middle takes `select_rank`'s passes and one more.

    Args:
        passes: Returns a fresh iterable of the items, the same multiset
            every time.
        n: The number of items.
        start: First rank kept (0-based).
        stop: One past the last rank kept.
        capacity: Most items held to sort a bucket (see `select_rank`).
    """
    start, stop = max(start, 0), min(stop, n)
    width = stop - start
    if width <= 0:
        return []
    if stop <= capacity:
        return heapq.nsmallest(stop, passes())[start:]
    if n - start <= capacity:
        return heapq.nlargest(n - start, passes())[::-1][:width]
    pivot, smaller = select_rank(passes, start, capacity)
    # The window: the copies of `pivot` from rank `start` on, then the
    # smallest items above it. Equal items are interchangeable.
    equal: list[Ranked] = []
    n_equal = 0

    def above() -> Iterator[Ranked]:
        nonlocal n_equal
        for item in passes():
            if pivot < item:
                yield item
            elif not item < pivot:
                n_equal += 1
                if len(equal) < width:
                    equal.append(item)

    greater = heapq.nsmallest(width, above())
    copies = min(smaller + n_equal - start, width)
    return equal[:copies] + greater[: width - copies]
