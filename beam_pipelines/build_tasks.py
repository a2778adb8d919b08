"""The logic of make-tasks between reading and writing: rows in, task records out.

`BuildTasks` validates each row (`tf_limaml.tasks.validate_row`), groups the
rows by entity (joined with the entity table if one is given), cuts each
history into support and query rows, assigns the entity to train/val/test by
a stable hash and encodes its task with `tf_limaml.data.encode_task`. Rows it
cannot use go to the dead letter (`beam_pipelines.dead_letter`), and every
DoFn counts what it saw as elements (`beam_pipelines.counting`), which become
stats.json (`beam_pipelines.task_stats`).

Example:

    with beam.Pipeline() as p:
        outputs = (p | beam.Create(rows)
                     | BuildTasks(spec, SplitRule.parse("last:2")))
        outputs["tasks"]     # (split, entity_id, serialized SequenceExample)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam

from beam_pipelines import data_guard
from beam_pipelines.analyze import AnalyzeFeatures, CountValues, analysis_inputs
from beam_pipelines.counting import STATS, CountingDoFn, SumStats
from beam_pipelines.dead_letter import REJECTED, dead_letter_record
from beam_pipelines.imputation import FillMissing
from beam_pipelines.reading import MalformedRow
from beam_pipelines.shards import Partition
from beam_pipelines.task_stats import HISTOGRAMS, finalize_stats, size_bucket
from tf_limaml import data as task_data
from tf_limaml import tasks as task_rules
from tf_limaml.features import FeatureSpec
from tf_limaml.tasks import RowError, SplitRule

NAMESPACE = "limaml.make_tasks"
SOURCE_INTERACTIONS = "interactions"
SOURCE_ENTITIES = "entities"
# Output tags of the DoFns, besides the main output, REJECTED and STATS.
COLD = "cold"
# Inputs of the feature analyzers, emitted for train entities only.
ANALYSIS = "analysis"
# Records with blank numeric cells, waiting for the training means:
# (split or COLD, entity_id, record).
NEEDS_FILL = "needs_fill"
# Tags of the values grouped by entity when there is an entity table.
_ROWS = "rows"
_META = "meta"
_NONE = object()


class TaggedValues:
    """The values of one tag among a group's (tag, value) pairs, re-iterable and lazy.

    Beam's CoGroupByKey copies each key's values into lists; this view reads
    them from the grouped iterable on every iteration instead, so a long
    history is never copied whole (see `tf_limaml.tasks.split_history`).
    """

    def __init__(self, tagged: Iterable[tuple[str, Any]], tag: str):
        self.tagged = tagged
        self.tag = tag

    def __iter__(self) -> Iterator[Any]:
        return (value for tag, value in self.tagged if tag == self.tag)

    def __bool__(self) -> bool:
        return next(iter(self), _NONE) is not _NONE


def _tag(tag: str):
    def tagged(entity_id: str, value: Any) -> tuple[str, tuple[str, Any]]:
        return entity_id, (tag, value)

    return tagged


class _TaskCountingDoFn(CountingDoFn):
    """make-tasks' counters: its namespace; histogram buckets stay out of Metrics."""

    namespace = NAMESPACE
    unmetered = HISTOGRAMS


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What `_check` found: a result, or why the row was rejected."""

    result: Any
    reason: str | None
    detail: str
    row: Any
    feature: str | None = None


def _entity_key(spec: FeatureSpec, element: Any) -> str | None:
    """The entity id of a read element, or None when it has no usable one.

    The same function (`tf_limaml.tasks.entity_id_of`) gives a valid row its
    entity id, so a pass can drop another pass's rows before validating them.
    """
    if isinstance(element, MalformedRow):
        return None
    row = element._asdict() if hasattr(element, "_asdict") else element  # beam.Row
    if not isinstance(row, Mapping):
        return None
    try:
        return task_rules.entity_id_of(spec, row)
    except Exception:  # noqa: BLE001 - a row without one keys by its dead letter
        return None


@data_guard.guarded
def _check(element: Any, check: Any) -> _Checked:
    """Runs `check(row)` on one read element without ever raising.

    Returns:
        reason is None when the row passed; otherwise a REJECT_REASONS key,
        what was wrong, and the feature whose cell broke a rule (if one did).
    """
    if isinstance(element, MalformedRow):
        return _Checked(
            None, task_rules.REASON_MALFORMED_ROW, element.detail, element.row
        )
    row = element._asdict() if hasattr(element, "_asdict") else element  # beam.Row
    if not isinstance(row, Mapping):
        return _Checked(
            None,
            task_rules.REASON_MALFORMED_ROW,
            f"expected a mapping of column to value, got {type(row).__name__}",
            row,
        )
    try:
        return _Checked(check(row), None, "", row)
    except RowError as err:
        return _Checked(None, err.reason, err.detail, row, err.feature)
    except Exception as err:  # noqa: BLE001 - one odd value must not fail the job
        return _Checked(
            None, task_rules.REASON_MALFORMED_ROW, f"{type(err).__name__}: {err}", row
        )


class ValidateRows(_TaskCountingDoFn):
    """Validates interaction rows: (entity_id, clean row), or the dead letter.

    A rejected row goes out as (shard key, dead-letter line): the key is the
    row's entity id when it has one, else the line itself, so an entity's
    rejected rows share its shard.

    Args:
        spec: The FeatureSpec.
        partition: In a run of several passes, this pass
            (`beam_pipelines.shards.Partition`): rows of other passes are
            dropped uncounted, before they are validated when their entity
            id says so.
    """

    source = SOURCE_INTERACTIONS
    prefix: tuple[str, ...] = ()

    def __init__(self, spec: FeatureSpec, partition: Partition | None = None):
        super().__init__()
        self.spec = spec
        self.partition = partition

    def _validate(self, row: Mapping[str, Any]) -> Any:
        return task_rules.validate_row(self.spec, row)

    def _clean(self, entity_id: str, result: Any) -> Any:
        return entity_id, result

    def _features(self):
        return self.spec.features

    def _count_valid(self, row: Mapping[str, Any], clean: Any) -> None:
        """Counts a valid row's blank (imputed) cells and its label."""
        counts, prefix = self._counts, self.prefix
        blanks = task_rules.blank_features(self._features(), row)
        for name in blanks:
            counts[prefix + ("imputed_by_feature", name)] += 1
        if blanks:
            counts[prefix + ("rows_with_imputed_values",)] += 1
        if not prefix:
            label = "positive" if clean["label"] else "negative"
            counts[("labels", label)] += 1

    def process(self, element: Any):
        partition = self.partition
        key = _entity_key(self.spec, element)
        if partition is not None and key is not None and not partition.keeps(key):
            return
        checked = _check(element, self._validate)
        counts, prefix = self._counts, self.prefix
        if checked.reason is None:
            counts[prefix + ("rows_read",)] += 1
            self._count_valid(checked.row, checked.result)
            yield self._clean(key, checked.result)
            return
        line = dead_letter_record(
            checked.row, checked.reason, checked.detail, self.source
        )
        key = line if key is None else key
        if partition is not None and not partition.keeps(key):
            return
        counts[prefix + ("rows_read",)] += 1
        counts[prefix + ("rows_rejected",)] += 1
        counts[prefix + ("rejected_by_reason", checked.reason)] += 1
        if checked.feature is not None:
            counts[prefix + ("rejected_by_feature", checked.feature)] += 1
        yield beam.pvalue.TaggedOutput(REJECTED, (key, line))


class ValidateEntities(ValidateRows):
    """Validates entity-table rows: (entity_id, meta), or the dead letter.

    Args:
        spec: The FeatureSpec.
        partition: This pass, as in `ValidateRows`.
    """

    source = SOURCE_ENTITIES
    prefix = ("entity_table",)

    def _validate(self, row: Mapping[str, Any]) -> Any:
        return task_rules.validate_meta_row(self.spec, row)

    def _clean(self, entity_id: str, result: Any) -> Any:
        return result

    def _features(self):
        return self.spec.meta_features


class SplitEntities(_TaskCountingDoFn):
    """One entity's rows -> its task record (split, entity_id, bytes), or cold.

    Uses `tf_limaml.tasks.split_history` (sort, split, caps, cold, meta merge),
    `tf_limaml.tasks.assign_split` and `tf_limaml.data.encode_task`, the same
    functions as the in-process `tf_limaml.tasks.build_tasks`.

    Its input is (entity_id, rows) from a GroupByKey, or with `with_table`
    (entity_id, (tag, value) pairs) of rows and entity-table metas. The rows
    are never copied into a list here: `split_history` holds a long history
    only as far as the caps need it.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        rule: SplitRule,
        min_support: int = 1,
        min_query: int = 1,
        max_support: int | None = None,
        max_query: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        with_table: bool = False,
        duplicates: str = task_rules.KEEP,
    ):
        super().__init__()
        self.spec = spec
        self.rule = rule
        self.with_table = with_table
        self.duplicates = duplicates
        self._blank_names = [f.name for f in spec.features if f.imputes_mean]
        self.min_support = min_support
        self.min_query = min_query
        self.max_support = max_support
        self.max_query = max_query
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def _table_meta(self, metas: list[dict]) -> dict | None:
        if not metas:
            return None
        self._counts[("entity_table", "entities_used")] += 1
        if len(metas) == 1:
            return metas[0]
        # The table has no time to say which duplicate is latest; the greatest by
        # content wins, so every runner picks the same one.
        distinct = {task_rules.content_key(m) for m in metas}
        if len(distinct) > 1:
            self._counts[("entity_table", "conflicts")] += 1
        return max(metas, key=task_rules.content_key)

    def process(self, element: tuple[str, Any]):
        entity_id, grouped = element
        if self.with_table:  # (tag, value) pairs: rows and entity-table metas
            rows = TaggedValues(grouped, _ROWS)
            metas = list(TaggedValues(grouped, _META))
            if not rows:
                self._counts[("entity_table", "entities_without_interactions")] += 1
                return
        else:
            # The grouped values go to split_history as they are: a long
            # history is split in passes over them, never copied whole.
            rows, metas = grouped, []
        history = task_rules.split_history(
            self.spec,
            entity_id,
            rows,
            self.rule,
            min_support=self.min_support,
            min_query=self.min_query,
            max_support=self.max_support,
            max_query=self.max_query,
            meta=self._table_meta(metas),
            duplicates=self.duplicates,
        )
        self._counts[("meta_conflicts",)] += history.meta_conflicts
        self._counts[("duplicate_rows",)] += history.duplicates
        self._counts[("rows_dropped_as_duplicates",)] += history.duplicates_dropped
        record = task_data.encode_task(
            self.spec, entity_id, history.meta, history.support, history.query
        ).SerializeToString(deterministic=True)
        blank = self._has_blanks(history)
        if history.cold:
            self._counts[("entities_cold",)] += 1
            self._counts[("rows_cold",)] += history.n_rows
            if blank:
                yield beam.pvalue.TaggedOutput(NEEDS_FILL, (COLD, entity_id, record))
            else:
                yield beam.pvalue.TaggedOutput(COLD, (entity_id, record))
            return
        split = task_rules.assign_split(
            entity_id, self.seed, self.val_fraction, self.test_fraction
        )
        n_support, n_query = len(history.support), len(history.query)
        counts = self._counts
        counts[("entities",)] += 1
        counts[("rows_in_tasks",)] += n_support + n_query
        counts[("rows_dropped_by_caps",)] += history.dropped_by_caps
        counts[("splits", split, "entities")] += 1
        counts[("splits", split, "interactions")] += n_support + n_query
        counts[("splits", split, "support_rows")] += n_support
        counts[("splits", split, "query_rows")] += n_query
        counts[("support_size_histogram", size_bucket(n_support))] += 1
        counts[("query_size_histogram", size_bucket(n_query))] += 1
        if split == "train":
            # Statistics come from the training entities only, from exactly the
            # rows of their tasks: a value seen only in val or test never
            # reaches a mean or a vocabulary.
            for item in analysis_inputs(
                self.spec, history.meta, history.support + history.query
            ):
                yield beam.pvalue.TaggedOutput(ANALYSIS, item)
        if blank:
            yield beam.pvalue.TaggedOutput(NEEDS_FILL, (split, entity_id, record))
        else:
            yield split, entity_id, record

    def _has_blanks(self, history: task_rules.EntityHistory) -> bool:
        """Whether a numeric cell waits for the training mean (see `imputation`)."""
        names = self._blank_names
        if not names:
            return False
        if any(task_rules.is_imputed(history.meta.get(n)) for n in names):
            return True
        return any(
            task_rules.is_imputed(row.get(n))
            for row in itertools.chain(history.support, history.query)
            for n in names
        )


class BuildTasks(beam.PTransform):
    """Row dicts -> task records, cold records, dead letter and statistics.

    The logic of the pipeline between reading and writing: validate each row
    (`tf_limaml.tasks.validate_row`), group by entity (joined with the entity
    table if given), split each history and encode it.

    Args:
        spec: The FeatureSpec.
        rule: How a history is cut into support and query (or its text form).
        min_support: Entities with fewer support rows are cold.
        min_query: Entities with fewer query rows are cold.
        max_support: Keep each entity's most recent N support rows.
        max_query: Keep each entity's first N query rows.
        seed: Seed of the train/val/test hash.
        val_fraction: Share of entities in val.
        test_fraction: Share of entities in test.
        entities: Optional PCollection of entity-table rows (entity id and meta
            features); an entity found there takes its meta features from it.
        options: Extra fields recorded under "options" in the statistics.
        partition: In a run of several passes (`beam_pipelines.passes`), this
            pass: only its entities' rows and its dead-letter lines are kept,
            and "partial" replaces "stats" and "spec".

    Returns (from `expand`): a dict of PCollections:
        "tasks": (split, entity_id, serialized SequenceExample);
        "cold": (entity_id, serialized SequenceExample) of cold entities;
        "rejected": (shard key, dead-letter JSON line) of the rows of the
            interactions and the entity table that were rejected; the key is
            the row's entity id, or the line when the row has none;
        "stats": one dict, the content of stats.json;
        "spec": one string, the JSON of the spec completed with statistics of
            the train entities (`beam_pipelines.analyze.AnalyzeFeatures`);
        "partial" (instead of "stats" and "spec", with a partition): one
            JSON-able dict, the pass's counts and partial moments, which
            `beam_pipelines.task_files.finish_passes` merges;
        "value_counts" (with a partition): (feature, value, count) of the
            pass's `"auto"` vocabulary values.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        rule: SplitRule | str = "fraction:0.5",
        min_support: int = 1,
        min_query: int = 1,
        max_support: int | None = None,
        max_query: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        entities: beam.PCollection | None = None,
        options: Mapping[str, Any] | None = None,
        partition: Partition | None = None,
        duplicates: str = task_rules.KEEP,
    ):
        super().__init__()
        self.spec = spec
        self.partition = partition
        if duplicates not in task_rules.DUPLICATE_POLICIES:
            raise ValueError(
                f"`duplicates` must be one of {task_rules.DUPLICATE_POLICIES}, got "
                f"{duplicates!r}"
            )
        self.rule = SplitRule.parse(rule) if isinstance(rule, str) else rule
        for name, value in (("min_support", min_support), ("min_query", min_query)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        for name, value in (("max_support", max_support), ("max_query", max_query)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer or None, got " f"{value!r}"
                )
        for name, value in (
            ("val_fraction", val_fraction),
            ("test_fraction", test_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if val_fraction + test_fraction > 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction} "
                "is more than 1; lower one of them"
            )
        self.split_fn = SplitEntities(
            spec,
            self.rule,
            min_support,
            min_query,
            max_support,
            max_query,
            seed,
            val_fraction,
            test_fraction,
            with_table=entities is not None,
            duplicates=duplicates,
        )
        self.entities = entities
        self.options = {
            "split": str(self.rule),
            "min_support": min_support,
            "min_query": min_query,
            "max_support": max_support,
            "max_query": max_query,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "duplicates": duplicates,
            **dict(options or {}),
        }

    def expand(self, rows):
        validated = rows | "ValidateRows" >> beam.ParDo(
            ValidateRows(self.spec, self.partition)
        ).with_outputs(REJECTED, STATS, main="clean")
        rejected = [validated[REJECTED]]
        stats = [validated[STATS]]
        if self.entities is None:
            grouped = validated.clean | "GroupByEntity" >> beam.GroupByKey()
        else:
            table = self.entities | "ValidateEntities" >> beam.ParDo(
                ValidateEntities(self.spec, self.partition)
            ).with_outputs(REJECTED, STATS, main="meta")
            rejected.append(table[REJECTED])
            stats.append(table[STATS])
            # CoGroupByKey would copy every entity's rows into a list; a
            # GroupByKey of tagged values and a lazy view of each tag do not.
            grouped = (
                (
                    validated.clean | "TagRows" >> beam.MapTuple(_tag(_ROWS)),
                    table.meta | "TagMeta" >> beam.MapTuple(_tag(_META)),
                )
                | "FlattenTagged" >> beam.Flatten()
                | "GroupByEntityWithTable" >> beam.GroupByKey()
            )
        split = grouped | "SplitEntities" >> beam.ParDo(self.split_fn).with_outputs(
            COLD, STATS, ANALYSIS, NEEDS_FILL, main="tasks"
        )
        stats.append(split[STATS])
        options, with_table = self.options, self.entities is not None
        names = [f.name for f in self.spec.features]
        counts = tuple(stats) | "SumStats" >> SumStats()
        outputs = {
            "tasks": split.tasks,
            "cold": split[COLD],
            "rejected": tuple(rejected) | "FlattenRejected" >> beam.Flatten(),
        }
        if self.partition is not None:
            # A pass cannot know the training means: its records keep their
            # blanks, which `task_files.finish_passes` fills after the last pass.
            outputs["tasks"], outputs["cold"] = _rejoin(
                outputs["tasks"], outputs["cold"], split[NEEDS_FILL]
            )
            analysis = split[ANALYSIS] | "AnalyzeFeatures" >> AnalyzeFeatures(
                self.spec, partial=True
            )
            # Each value's count in this pass, written to sorted shards and
            # selected after the last pass (`beam_pipelines.value_counts`).
            outputs["value_counts"] = split[ANALYSIS] | "CountValues" >> CountValues()
            outputs["partial"] = counts | "Partial" >> beam.Map(
                _pass_partial,
                beam.pvalue.AsSingleton(analysis),
                options,
                with_table,
                names,
            )
            return outputs
        outputs["stats"] = counts | "FinalizeStats" >> beam.Map(
            finalize_stats, options, with_table, names
        )
        outputs["spec"] = split[ANALYSIS] | "AnalyzeFeatures" >> AnalyzeFeatures(
            self.spec, counts=counts
        )
        filled = split[NEEDS_FILL] | "FillMissing" >> FillMissing(outputs["spec"])
        outputs["tasks"], outputs["cold"] = _rejoin(
            outputs["tasks"], outputs["cold"], filled
        )
        return outputs


def _rejoin(tasks, cold, filled):
    """Puts (split or COLD, entity_id, record) items back among tasks and cold."""
    parts = filled | "SplitFilled" >> beam.Partition(
        lambda item, _: int(item[0] == COLD), 2
    )
    cold_items = parts[1] | "ColdPairs" >> beam.Map(lambda item: (item[1], item[2]))
    return (
        (tasks, parts[0]) | "RejoinTasks" >> beam.Flatten(),
        (cold, cold_items) | "RejoinCold" >> beam.Flatten(),
    )


def _pass_partial(
    counts: Mapping[tuple, int],
    analysis: Mapping[str, Any],
    options: Mapping[str, Any],
    with_table: bool,
    feature_names: list[str],
) -> dict[str, Any]:
    """One pass's partial: its counts and statistics, with what finishing needs."""
    return {
        "counts": sorted([list(key), int(n)] for key, n in counts.items()),
        "analysis": dict(analysis),
        "options": dict(options),
        "with_entity_table": with_table,
        "feature_names": list(feature_names),
    }
