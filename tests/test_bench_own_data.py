"""`bench/own_data.py`: the held-out proxies' tables are what their docs say."""

from bench.own_data import (
    NEGATIVE_RATING,
    POSITIVE_RATING,
    SHORT_HISTORY_ROWS,
    _member_sample,
    item_only_labels,
    short_history_length,
)


def _rows(members: int, per_member: int) -> list[dict]:
    return [
        {"user_id": str(m), "item_id": str(i % 7), "rating": 1 + (m + i) % 5}
        for m in range(members)
        for i in range(per_member)
    ]


def test_short_history_lengths_are_stable_and_in_range():
    lengths = [short_history_length(str(m)) for m in range(500)]
    low, high = SHORT_HISTORY_ROWS
    assert min(lengths) == low and max(lengths) == high
    assert lengths == [short_history_length(str(m)) for m in range(500)]


def test_member_sample_keeps_whole_histories_of_a_stable_subset():
    rows = _rows(members=30, per_member=4)
    assert _member_sample(rows, None) is rows
    sample = _member_sample(rows, 10)
    kept = {r["user_id"] for r in sample}
    assert len(kept) == 10 and len(sample) == 40
    assert sample == _member_sample(list(reversed(rows)), 10)[::-1]


def test_item_only_labels_carry_the_item_s_rate_and_nothing_of_the_member():
    # Item "x": member a always likes it, member b never does (share 0.5).
    rows = [{"user_id": "a", "item_id": "x", "rating": 5} for _ in range(2000)]
    rows += [{"user_id": "b", "item_id": "x", "rating": 2} for _ in range(2000)]
    rows += [{"user_id": "a", "item_id": "liked", "rating": 4} for _ in range(50)]
    rows += [{"user_id": "b", "item_id": "disliked", "rating": 3} for _ in range(50)]
    redrawn = item_only_labels(rows, seed=0)
    assert {r["rating"] for r in redrawn} == {POSITIVE_RATING, NEGATIVE_RATING}

    def liked(member, item):
        ratings = [
            r["rating"] == POSITIVE_RATING
            for r in redrawn
            if r["user_id"] == member and r["item_id"] == item
        ]
        return sum(ratings) / len(ratings)

    # The member no longer decides: both near the item's 0.5.
    assert 0.45 < liked("a", "x") < 0.55 and 0.45 < liked("b", "x") < 0.55
    assert liked("a", "liked") == 1.0 and liked("b", "disliked") == 0.0
    assert redrawn == item_only_labels(rows, seed=0)
    assert [r["user_id"] for r in redrawn] == [r["user_id"] for r in rows]
