"""Blank numeric cells: the training mean, filled in once it is known.

A row with a blank numeric cell is valid: the cell becomes the feature's
`default`, or, without one, the mean of the TRAIN entities' values. That mean
is only known once the analyzer has seen every train entity, after the
records are encoded. So `SplitEntities` encodes the blank as NaN and sends
the record here; `FillMissing` replaces each NaN with the completed spec's
`default` (`tf_limaml.statistics.fill_defaults` wrote it there) before the
record is written. A run of several passes fills its written files after the
last pass instead (`fill_files`), with the same function, so the bytes are
those of one pass.

Example:

    filled = needs_fill | FillMissing(spec_json)   # spec_json: one JSON string
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from tf_limaml.features import NUMERIC, PARTS, FeatureSpec


def _defaults(spec: FeatureSpec) -> dict[str, list[float]]:
    out = {}
    for feature in spec.features:
        if feature.type != NUMERIC or feature.default is None:
            continue
        default = feature.default
        out[feature.name] = (
            list(default) if isinstance(default, tuple) else [default] * feature.size
        )
    return out


def _fill(values: Any, default: list[float]) -> bool:
    """Replaces NaN in a FloatList's values in place; whether any was."""
    changed = False
    for i, value in enumerate(values):
        if math.isnan(value):
            values[i] = default[i % len(default)]
            changed = True
    return changed


def fill_record(record: bytes, spec: FeatureSpec) -> bytes:
    """A serialized task record with each blank (NaN) replaced by its default.

    A feature without a default keeps its NaN (the analyzer had no value to
    give it); a record without NaN comes back as it was.
    """
    import tensorflow as tf  # noqa: PLC0415 - only records with blanks need it

    defaults = _defaults(spec)
    example = tf.train.SequenceExample.FromString(record)
    changed = False
    context = example.context.feature
    for feature in spec.meta_features:
        if feature.name in defaults and feature.name in context:
            values = context[feature.name].float_list.value
            changed |= _fill(values, defaults[feature.name])
    lists = example.feature_lists.feature_list
    for part in PARTS:
        for feature in spec.request_features:
            key = spec.sequence_key(part, feature.name)
            if feature.name not in defaults or key not in lists:
                continue
            for cell in lists[key].feature:
                changed |= _fill(cell.float_list.value, defaults[feature.name])
    return example.SerializeToString(deterministic=True) if changed else record


def _fill_item(item: tuple[str, str, bytes], spec_json: str) -> tuple[str, str, bytes]:
    name, key, record = item
    spec = _spec_of(spec_json)
    return name, key, record if spec is None else fill_record(record, spec)


_SPECS: dict[str, FeatureSpec | None] = {}


def _spec_of(spec_json: str) -> FeatureSpec | None:
    """The completed spec of the JSON (cached), or None when the analyzer failed."""
    if spec_json not in _SPECS:
        obj = json.loads(spec_json)
        # The analyzer's error marker: make-tasks stops after the job.
        _SPECS[spec_json] = (
            None if "make_tasks_error" in obj else FeatureSpec.from_dict(obj)
        )
    return _SPECS[spec_json]


class FillMissing(beam.PTransform):
    """(name, key, record) with blanks -> the same with the training means.

    Args:
        spec_json: A PCollection of one string, the completed spec's JSON.
    """

    def __init__(self, spec_json: beam.PCollection):
        super().__init__()
        self.spec_json = spec_json

    def expand(self, items):
        return items | "FillRecord" >> beam.Map(
            _fill_item, beam.pvalue.AsSingleton(self.spec_json)
        )


def fill_files(paths: Iterable[str], spec: FeatureSpec) -> int:
    """Fills the blanks of written task files in place; returns the files rewritten.

    The files are GZIP TFRecords as `beam_pipelines.shards.WriteShards`
    writes them; a file whose records hold no blank is left untouched.
    """
    from apache_beam.io.filesystem import CompressionTypes  # noqa: PLC0415
    from apache_beam.io.tfrecordio import _TFRecordUtil  # noqa: PLC0415

    if not _defaults(spec):
        return 0
    rewritten = 0
    for path in sorted(paths):
        with FileSystems.open(path, compression_type=CompressionTypes.GZIP) as f:
            records = list(_read_records(f, _TFRecordUtil))
        filled = [fill_record(r, spec) for r in records]
        if filled == records:
            continue
        temp = f"{path}.filling"
        with FileSystems.create(temp, compression_type=CompressionTypes.GZIP) as f:
            for record in filled:
                _TFRecordUtil.write_record(f, record)
        FileSystems.delete([path])
        FileSystems.rename([temp], [path])
        rewritten += 1
    return rewritten


def _read_records(f: Any, util: Any) -> Iterable[bytes]:
    while True:
        record = util.read_record(f)
        if record is None:
            return
        yield record
