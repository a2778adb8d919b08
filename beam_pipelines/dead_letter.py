"""The dead letter: rejected inputs with a stable reason, never dropped silently.

Both pipelines route what they cannot use to a `rejected` output, one JSON
object per input: `reason` (a stable key), `detail` (what was wrong),
`source` (which input it came from) and `row` (the input as read, made
JSON-safe). They are written as JSON lines, `DIR/rejected-SSSSS-of-NNNNN.jsonl`.

Example:

    line = dead_letter_record(row, "bad_label", "label 'x' is not a number", "interactions")
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

# The output tag of rejected inputs, in every DoFn that rejects any.
REJECTED = "rejected"


def _text(value: str) -> str:
    # Undecodable bytes (surrogates) cannot be written as UTF-8; escape them.
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any, _depth: int = 0) -> Any:
    """A JSON-serializable copy of any row value (NaN, bytes, dates, numpy, ...).

    Non-finite floats become the strings "nan", "inf", "-inf"; anything
    unknown becomes its repr, so a dead-letter record can always be written.
    """
    if _depth > 16:
        return _text(repr(value))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Mapping):
        return {
            (_text(k) if isinstance(k, str) else _text(repr(k))): json_safe(
                v, _depth + 1
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v, _depth + 1) for v in value), key=repr)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        try:
            return json_safe(value.tolist(), _depth + 1)
        except Exception:  # noqa: BLE001 - an odd object still gets written, as repr
            pass
    return _text(repr(value))


def dead_letter(row: Any, reason: str, detail: str, source: str) -> dict[str, Any]:
    """One dead-letter record: reason, detail, source and the row, all JSON-safe."""
    return {
        "reason": reason,
        "detail": _text(detail),
        "source": source,
        "row": json_safe(row),
    }


def dead_letter_line(record: Mapping[str, Any]) -> str:
    """A dead-letter record as one line of JSON (keys sorted, UTF-8 kept)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, sort_keys=True)


def dead_letter_record(row: Any, reason: str, detail: str, source: str) -> str:
    """One line of the dead letter: JSON with reason, detail, source and the row."""
    return dead_letter_line(dead_letter(row, reason, detail, source))
