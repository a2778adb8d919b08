"""A clear stop when too little survives: make-tasks' verdict on a finished job.

The job always writes the dead letter and stats.json. Then `check_outcome`
looks at them and stops the run with one line (a `UserInputError`, which the
`limaml` command prints without a traceback, exit 2) when:

* the input holds no data row (a CSV with a header only);
* fewer than `--min-valid-fraction` of the rows passed validation (always
  when none did): the line names the top reasons with their counts, one
  example per reason from the dead letter, and the dead letter's path;
* no valid row has a positive label;
* the analyzer could not complete the spec (its own message).

The rows' problems are checked first, so a feature that is only a symptom (an
"auto" vocabulary left empty because every row was rejected) never hides the
cause. On a stop, DIR/spec.json is removed: the records are not meant for
training.

Example:

    stats = check_outcome("tasks/", spec, min_valid_fraction=0.5)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from apache_beam.io.filesystems import FileSystems

from beam_pipelines.analyze import ERROR_KEY
from tf_limaml.errors import UserInputError
from tf_limaml.features import FeatureSpec

logger = logging.getLogger(__name__)

DEAD_LETTER_PATTERN = "rejected-*.jsonl"
# Reasons named in the line, most frequent first.
TOP_REASONS = 3
_EXAMPLE_CHARS = 160


class NothingLeftError(UserInputError):
    """make-tasks stopped: too few rows passed validation, or no label is positive.

    Attributes:
        stats: The job's stats.json content.
        dead_letter: The glob of the dead-letter files.
    """

    def __init__(self, message: str, stats: Mapping[str, Any], dead_letter: str):
        super().__init__(message)
        self.stats = dict(stats)
        self.dead_letter = dead_letter


def _read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _dead_letter_paths(output_dir: str) -> list[str]:
    pattern = FileSystems.join(output_dir, DEAD_LETTER_PATTERN)
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def dead_letter_examples(
    output_dir: str, reasons: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """The first dead-letter record of each reason (files and lines in order).

    Reads only until every reason has one, so a large dead letter costs little.
    """
    wanted = set(reasons)
    found: dict[str, dict[str, Any]] = {}
    for path in _dead_letter_paths(output_dir):
        with FileSystems.open(path) as f:
            for raw in f:
                record = json.loads(raw.decode("utf-8"))
                reason = record.get("reason")
                if reason in wanted and reason not in found:
                    found[reason] = record
                    if len(found) == len(wanted):
                        return found
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 3] + "..."


def _reasons_text(stats: Mapping[str, Any], output_dir: str) -> str:
    by_reason = {r: n for r, n in stats["rejected_by_reason"].items() if n}
    top = sorted(by_reason.items(), key=lambda rn: (-rn[1], rn[0]))[:TOP_REASONS]
    examples = dead_letter_examples(output_dir, [r for r, _ in top])
    parts = []
    for reason, n in top:
        text = f"{reason} x{n:,}"
        example = examples.get(reason)
        if example is not None:
            text += f" (e.g. {example.get('detail', '')}; row {_short(example['row'])})"
        parts.append(text)
    more = len(by_reason) - len(top)
    if more > 0:
        parts.append(f"{more} more reason(s) in stats.json")
    return "; ".join(parts)


def _remove_spec(output_dir: str) -> None:
    path = FileSystems.join(output_dir, "spec.json")
    if FileSystems.exists(path):
        FileSystems.delete([path])


def check_outcome(
    output_dir: str, spec: FeatureSpec, min_valid_fraction: float = 0.5
) -> dict[str, Any]:
    """Stops the run when too little survived (see the module doc).

    Args:
        output_dir: The --output of a finished job (stats.json, dead letter
            and spec.json written).
        spec: The spec the job ran with (for the label rule in messages).
        min_valid_fraction: The least share of rows that must pass validation.

    Returns:
        The stats, when the run may go on.

    Raises:
        NothingLeftError: Too few valid rows, or no positive label.
        UserInputError: The analyzer could not complete the spec.
    """
    stats = _read_json(FileSystems.join(output_dir, "stats.json"))
    dead_letter = FileSystems.join(output_dir, DEAD_LETTER_PATTERN)
    read, valid = stats["rows_read"], stats["rows_read"] - stats["rows_rejected"]
    message = None
    if read == 0:
        message = (
            "the input holds no data row (a CSV with a header only, or empty "
            f"files); nothing to build tasks from. Dead letter: {dead_letter}"
        )
    elif valid == 0 or valid < min_valid_fraction * read:
        message = (
            f"only {valid:,} of {read:,} rows passed validation "
            f"({valid / read:.1%}; --min-valid-fraction is {min_valid_fraction:g}). "
            f"Top reasons: {_reasons_text(stats, output_dir)}. "
            f"Every rejected row and why: {dead_letter}"
        )
    elif stats.get("labels", {}).get("positive", 1) == 0:
        message = (
            f"none of the {valid:,} valid rows has a positive label "
            f"({spec.label.describe()}): there is nothing to learn. Check the "
            "label column and the spec's `label` (e.g. "
            '{"column": "clicked", "positive": ["yes"]}). '
            f"Rejected rows, if any: {dead_letter}"
        )
    if message is not None:
        _remove_spec(output_dir)
        raise NothingLeftError(f"make-tasks stopped: {message}", stats, dead_letter)
    spec_path = FileSystems.join(output_dir, "spec.json")
    if FileSystems.exists(spec_path):
        written = _read_json(spec_path)
        if isinstance(written, Mapping) and ERROR_KEY in written:
            _remove_spec(output_dir)
            raise UserInputError(
                f"{written[ERROR_KEY]} ({valid:,} of {read:,} rows valid; "
                f"rejected rows: {dead_letter})"
            )
    return stats


def remove_beam_temp(output_dir: str) -> None:
    """Deletes what Beam's sinks leave in DIR when a job fails (`beam-temp-*`).

    Beam writes a sink's files under a `beam-temp-<name>-<uuid>` folder and
    moves them into place at the end; a failed job leaves the folder behind.
    """
    patterns = [
        FileSystems.join(output_dir, "beam-temp-*"),
        FileSystems.join(output_dir, "beam-temp-*", "*"),
    ]
    try:
        found = [
            m.path
            for result in FileSystems.match(patterns)
            for m in result.metadata_list
        ]
    except Exception:  # noqa: BLE001 - a missing DIR has nothing to clean
        return
    prefix = FileSystems.join(output_dir, "beam-temp-")
    folders = {
        prefix + path[len(prefix) :].split("/", 1)[0]
        for path in found
        if path.startswith(prefix) and "/" in path[len(prefix) :]
    }
    if not found:
        return
    logger.info("Deleting %d temporary file(s) of Beam in %s", len(found), output_dir)
    FileSystems.delete(found)
    for folder in sorted(folders):
        try:
            if FileSystems.exists(folder):
                FileSystems.delete([folder])
        except Exception:  # noqa: BLE001 - object stores have no empty folders
            logger.debug("Could not delete %s", folder)
