"""MkDocs hook: the measured tables of the docs, generated at build time.

A page asks for a table with a marker on a line of its own:

    <!-- table: meta_train_reference -->

and the build replaces it with a markdown table rendered from the records of
`bench/results.jsonl` (the latest record that fits, unless the table says
otherwise) or from the demo's output committed under `docs/results/`. Every
table is preceded by a line that names its source: the file and line, the
commit and the machine. An unknown marker, or a table whose record is missing,
fails the build.

The module needs only the standard library, so `make docs` runs it in the docs
environment, without TensorFlow. `python docs/hooks.py NAME` prints one table.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results.jsonl")
MOVIELENS = os.path.join(REPO, "docs", "results", "movielens")
MARKER = re.compile(r"^<!-- table: (?P<name>[\w.-]+) -->[ \t]*$", re.MULTILINE)

Record = dict[str, Any]


class TableError(Exception):
    """A marker names no table, or its table has no record to render."""


def load_records(path: str = RESULTS) -> list[Record]:
    """The records of `bench/results.jsonl`, each with its 1-based `_line`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                record = json.loads(line)
                record["_line"] = number
                records.append(record)
    return records


def kind(record: Record) -> str:
    """The benchmark's name: older records say `bench`, newer `benchmark`."""
    return str(record.get("benchmark") or record.get("bench") or "")


def select(records: Iterable[Record], name: str, **fields: Any) -> list[Record]:
    """The records of benchmark `name` whose `fields` equal the given values."""
    return [
        r
        for r in records
        if kind(r) == name and all(r.get(k) == v for k, v in fields.items())
    ]


def latest(records: Iterable[Record], name: str, **fields: Any) -> Record:
    """The last record (in file order) of `select(...)`; raises TableError if none."""
    found = select(records, name, **fields)
    if not found:
        raise TableError(f"bench/results.jsonl has no {name!r} record with {fields}")
    return found[-1]


def machine(record: Record) -> str:
    """'AMD EPYC, 2 cores, load 3.1' from a record's `machine` dict."""
    m = record.get("machine") or {}
    parts = [str(m.get("cpu", "unknown CPU"))]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    load = m.get("load_avg_1m", m.get("load_average_1m"))
    if load is not None:
        parts.append(f"load {load:.1f}")
    return ", ".join(parts)


def commit(record: Record) -> str:
    value = record.get("git_commit") or record.get("commit")
    return f"commit `{value}`" if value else "commit not recorded"


def when(record: Record) -> str:
    return str(record.get("recorded_at") or record.get("time") or record.get("date"))


def source(*records: Record) -> str:
    """The line above a table: where each of its records came from."""
    cites = [
        f"line {r['_line']} ({kind(r)}, {commit(r)}, {machine(r)}, {when(r)[:10]})"
        for r in records
    ]
    return f"*Generated from `bench/results.jsonl`, {'; '.join(cites)}.*"


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: Any, digits: int = 1, unit: str = "") -> str:
    """`1,632.0`-style numbers; '' for a missing value."""
    if value is None:
        return ""
    return f"{value:,.{digits}f}{unit}"


def mean_std(cell: dict[str, float] | None, digits: int = 4) -> str:
    if not cell:
        return ""
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


# --- performance -----------------------------------------------------------

_REFERENCE_VARIANTS = (
    ("xla", "(a) production step: vectorized, XLA"),
    ("no_xla", "(b) same, no XLA"),
    ("first_order", "(c) first order, XLA"),
    ("per_task_loop", "(d) per-task loop (`tf.range` over tasks in `tf.function`)"),
    ("plain_step", "(e) plain training step, same network, T·(S+Q) rows"),
    ("xla@{base}", "(a) as of `{base}`"),
    ("per_task_loop@{base}", "(d) as of `{base}`"),
)


def meta_train_reference(records: list[Record]) -> str:
    r = latest(records, "meta_train", config="reference")
    base = r.get("baseline", "")
    rows = []
    for key, label in _REFERENCE_VARIANTS:
        key, label = key.format(base=base), label.format(base=base)
        if key in r["tasks_per_s"]:
            rows.append(
                [
                    label,
                    num(r["tasks_per_s"][key], 0),
                    num(r["step_ms"][key], 1),
                    num(r["first_call_s"].get(key), 1),
                ]
            )
    ratios = r.get("ratios", {})
    summary = [
        [
            "(a) / (d): vectorized over the per-task loop",
            num(ratios.get("xla_over_per_task_loop"), 2, "×"),
            "≥ 5×",
        ],
        [
            "(a) / (e): cost per task over a plain step",
            num(ratios.get("xla_cost_over_plain_step"), 2, "×"),
            "≤ 4×",
        ],
        [
            f"roofline: {num(r['gflops_per_s'])} of {num(r['matmul_peak_gflops_per_s'])} GFLOP/s "
            f"(matmul peak), {r['step_gflop']} GFLOP a step",
            f"{r['roofline_fraction']:.0%}",
            "≥ 20 %",
        ],
    ]
    if base:
        summary.append(
            [
                f"(a) over (a) as of `{base}`",
                num(ratios.get(f"xla_over_xla@{base}"), 2, "×"),
                "",
            ]
        )
    return "\n\n".join(
        [
            source(r),
            table(["variant", "tasks/s", "ms/step", "first call, s"], rows),
            table(["ratio", "measured", "target"], summary),
        ]
    )


def meta_train_small(records: list[Record]) -> str:
    r = latest(records, "meta_train", config="small")
    base = r.get("baseline", "")
    labels = {"scalars": "64 scalar features", "vector": "one [64] feature"}
    rows = []
    for key in r["tasks_per_s"]:
        plain, _, rev = key.partition("@")
        label = labels.get(plain, plain) + (f", as of `{rev}`" if rev else "")
        rows.append(
            [
                label,
                num(r["tasks_per_s"][key], 0),
                num(r["step_ms"][key], 2),
                f"{r['gflops_per_s'][key]:.0f} ({r['roofline_fraction'][key]:.0%})",
            ]
        )
    speedups = ", ".join(
        f"{labels.get(k, k)} **{v:.2f}×**"
        for k, v in r.get("speedup_over_baseline", {}).items()
    )
    text = [
        source(r),
        table(["small", "tasks/s", "ms/step", "GFLOP/s (% of peak)"], rows),
    ]
    if speedups:
        text.append(f"Speed-up over `{base}`: {speedups} (target ≥ 2×).")
    return "\n\n".join(text)


_PEERS = (
    ("torch_loop", "torch.func, per-task loop"),
    ("torch_vmap", "torch.func.vmap"),
    ("jax_vmap", "JAX: one `jax.jit`, `jax.vmap` over tasks, optax Adam"),
    ("tf_limaml", "**tf-limaml** (`LiMAMLModel`'s Keras train function)"),
)


def _rate(cell: dict[str, Any] | None) -> str:
    """'9,826 (9,100–10,300)': the median over rounds and its spread."""
    if not cell:
        return ""
    return (
        f"{num(cell['tasks_per_s'], 0)} "
        f"({num(cell['min'], 0)}–{num(cell['max'], 0)})"
    )


def peers(records: list[Record]) -> str:
    r = latest(records, "peers")
    results = r["results"]
    base = r.get("baseline")
    peers_ = list(_PEERS)
    per_call = r.get("config", {}).get("steps_per_execution", 1)
    if per_call > 1:
        peers_.append(
            (
                f"tf_limaml_spe{per_call}",
                f"**tf-limaml**, `compile(steps_per_execution={per_call})`",
            )
        )
    if base:
        peers_.append((f"tf_limaml@{base}", f"tf-limaml as of `{base}`"))
    rows = [
        [label, _rate(results.get(f"{key}/second")), _rate(results.get(f"{key}/first"))]
        for key, label in peers_
        if f"{key}/second" in results or f"{key}/first" in results
    ]
    ratios = r.get("ratios", {})
    targets = {"jax_vmap": ("≥ 1.5×", "≥ 1.0×"), "torch_loop": ("≥ 10×", "≥ 10×")}
    summary = []
    for key, label in _PEERS[:3]:
        second = ratios.get(f"tf_limaml_over_{key}/second")
        first = ratios.get(f"tf_limaml_over_{key}/first")
        if second is None and first is None:
            continue
        target = targets.get(key, ("", ""))
        summary.append(
            [
                f"tf-limaml / {label.split(':')[0]}",
                num(second, 2, "×"),
                target[0],
                num(first, 2, "×"),
                target[1],
            ]
        )
    if per_call > 1:
        summary.append(
            [
                f"tf-limaml, {per_call} steps per call / JAX",
                num(
                    ratios.get(f"tf_limaml_spe{per_call}_over_jax_vmap/second"), 2, "×"
                ),
                targets["jax_vmap"][0],
                num(ratios.get(f"tf_limaml_spe{per_call}_over_jax_vmap/first"), 2, "×"),
                targets["jax_vmap"][1],
            ]
        )
    if base:
        summary.append(
            [
                f"tf-limaml / tf-limaml as of `{base}`",
                num(ratios.get("tf_limaml_over_baseline/second"), 2, "×"),
                "",
                num(ratios.get("tf_limaml_over_baseline/first"), 2, "×"),
                "",
            ]
        )
    config = r.get("config", {})
    steps = config.get("steps_per_round", {})
    note = (
        f"*{config.get('rounds')} alternated rounds; per round "
        f"{steps.get('tf_limaml/second', '')} steps of tf-limaml and JAX, "
        f"{steps.get('torch_vmap/second', '')} of torch.func.vmap and "
        f"{steps.get('torch_loop/second', '')} of the loop. Tasks/s: the median "
        "over rounds (min–max). Peers: "
        + ", ".join(f"{k} {v}" for k, v in r.get("peer_versions", {}).items())
        + ".*"
    )
    return "\n\n".join(
        [
            source(r),
            table(["implementation", "2nd order, tasks/s", "1st order, tasks/s"], rows),
            table(
                ["ratio", "2nd order", "target", "1st order", "target"],
                summary,
            ),
            note,
        ]
    )


def large_ids(records: list[Record]) -> str:
    found = select(records, "large_ids")
    if not found:
        raise TableError("bench/results.jsonl has no 'large_ids' record")
    variants = ("dense", "keras-sparse", "lazy", "floor")
    rows = []
    for r in found:
        ms, rss = r["step_ms"], r["peak_rss_mb"]
        rows.append(
            [f"`{r.get('git_commit', '?')}`, load {machine(r).rsplit('load ', 1)[-1]}"]
            + [f"{ms[v]:.1f} ms, {rss[v] / 1000:.2f} GB" for v in variants]
            + [f"{r['keras_sparse_over_lazy']:.1f}× / {r['dense_over_lazy']:.1f}×"]
        )
    header = [
        "run",
        "dense gradient, Keras Adam",
        "sparse gradient, Keras Adam",
        "sparse gradient, `LazyAdam` (default)",
        "1,000-row table (floor)",
        "LazyAdam faster than sparse / dense",
    ]
    return "\n\n".join([source(*found), table(header, rows)])


def other_benchmarks(records: list[Record]) -> str:
    startup = latest(records, "startup")
    memory = latest(records, "train_memory")
    serving = latest(records, "serving")
    tasks = latest(records, "make_tasks")
    soak = latest(records, "soak")
    s, mt = startup["median_s"], tasks
    sd, ap = serving["serving_default_b100"], serving["adapt_and_predict_s50_q100"]
    ge, naive = serving["generate_embeddings"], serving["naive_adapt_and_predict_loop"]
    inp, grpc = soak["in_process"], soak["grpc"]
    rows = [
        [
            "`limaml --help` / argument error / `train --help` (`bench/startup.py`)",
            f"{s['help']:.3f} s / {s['argument_error']:.3f} s / {s['train_help']:.3f} s "
            f"(target ≤ {startup['target_help_s']} s; `import tensorflow` alone "
            f"{s['import_tensorflow']:.1f} s)",
            f"line {startup['_line']}, {machine(startup)}",
        ],
        [
            f"Peak RSS of `limaml train`, ML-100K, {memory['tasks']} tasks, "
            f"S=Q={memory['max_support']}, {memory['epochs']} epochs (`bench/train_memory.py`)",
            f"{memory['peak_rss_gb']:.2f} GB (target ≤ {memory['target_gb']:.0f} GB)",
            f"line {memory['_line']}, {machine(memory)}",
        ],
        [
            "`serving_default`, B=100, TF1 session as TF Serving runs it (`bench/serving.py`)",
            f"p50 {sd['p50_ms']:.2f} ms, p99 {sd['p99_ms']:.2f} ms",
            f"line {serving['_line']}, {commit(serving)}, {machine(serving)}",
        ],
        [
            "`adapt_and_predict`, S=50, Q=100",
            f"p50 {ap['p50_ms']:.2f} ms, p99 {ap['p99_ms']:.2f} ms",
            f"line {serving['_line']}",
        ],
        [
            f"`limaml embed` vs a per-entity `adapt_and_predict` loop, "
            f"{ge['runs'][0]['entities']:,} entities, {len(ge['runs'])} rounds, medians",
            f"{ge['entities_per_s']:,.0f} vs {naive['end_to_end_entities_per_s']:,.0f} "
            f"entities/s: **{serving['throughput_ratio']:.1f}×** (target "
            f"{serving['target_ratio']:.0f}×); "
            f"{serving['throughput_ratio_vs_calls_only']:.1f}× against the loop's "
            "signature calls alone",
            f"line {serving['_line']}",
        ],
        [
            f"make-tasks, {mt['rows']:,} rows / {mt['entities']:,} entities "
            "(`bench/make_tasks.py`)",
            f"pandas in-process floor {mt['pandas_floor']['rows_per_s']:,} rows/s; "
            f"DirectRunner in memory {mt['direct_in_memory']['rows_per_s']:,} rows/s "
            f"({mt['direct_in_memory']['speed_vs_floor']:.2f}× floor); multi_processing ×"
            f"{mt['direct_multi_processing']['workers']} "
            f"{mt['direct_multi_processing']['rows_per_s']:,} rows/s "
            f"({mt['direct_multi_processing']['speed_vs_floor']:.2f}×); records identical: "
            f"{mt['direct_in_memory']['records_match_floor']}",
            f"line {mt['_line']}, {machine(mt)}",
        ],
        [
            f"Soak: {soak['callers']} callers × {soak['seconds_per_phase']:.0f} s "
            "(`bench/soak.py`)",
            f"in-process {inp['calls_per_s']:.0f} calls/s, p50 {inp['p50_ms']:.1f} ms, "
            f"p99 {inp['p99_ms']:.1f} ms; loopback gRPC {grpc['calls_per_s']:.0f} calls/s, "
            f"p50 {grpc['p50_ms']:.1f} ms, p99 {grpc['p99_ms']:.1f} ms; "
            f"{soak['errors']} errors, "
            f"{inp['wrong_answers'] + grpc['wrong_answers']} wrong answers",
            f"line {soak['_line']}, {machine(soak)}",
        ],
    ]
    return "\n\n".join(
        [
            "*Generated from `bench/results.jsonl`, the latest record of each "
            "benchmark; the last column names the line and the machine.*",
            table(["benchmark", "result", "record"], rows),
        ]
    )


# --- scaling -----------------------------------------------------------------


def _scale_rows(r: Record, label: str) -> list[list[str]]:
    small, large = r["runs"][0], r["runs"][-1]
    rows = []
    for job in ("make_tasks", "embed"):
        rows.append(
            [
                f"{job.replace('_', '-')}, {label}",
                f"{small['passes'] if 'passes' in small else 1} / "
                f"{large['passes'] if 'passes' in large else 1}",
                f"{small[job]['peak_rss_mb']:,.0f} MB",
                f"{large[job]['peak_rss_mb']:,.0f} MB",
                f"**{r['rss_ratio'][job]['peak_rss_mb']:.2f}**",
                f"{small[job]['wall_s']:.0f} s / {large[job]['wall_s']:.0f} s",
            ]
        )
    return rows


def scale_passes(records: list[Record]) -> str:
    passes = [r for r in select(records, "scale") if r.get("entities_per_pass")]
    one = [r for r in select(records, "scale") if r.get("entities_per_pass") == 0]
    if not passes or not one:
        raise TableError(
            "bench/results.jsonl lacks a 'scale' record with and without passes"
        )
    p, o = passes[-1], one[-1]
    e0, e1 = (f"{n // 1000}k" for n in p["rss_ratio"]["entities"])
    header = [
        "job",
        f"passes at {e0} / {e1}",
        e0,
        e1,
        f"{e1} / {e0}",
        f"wall {e0} / {e1}",
    ]
    rows = _scale_rows(p, f"`--passes` ({p['entities_per_pass']:,} entities a pass)")
    rows += _scale_rows(o, "one pass")
    limit = p["rss_ratio"].get("limit")
    note = f"Target: peak RSS {e1} / {e0} ≤ {limit}." if limit else ""
    return "\n\n".join([source(p, o), table(header, rows), note]).strip()


def _storage_record(records: list[Record]) -> Record:
    found = [r for r in select(records, "scale") if "storage" in r]
    if not found:
        raise TableError("bench/results.jsonl has no 'scale' record with 'storage'")
    return found[-1]


def storage(records: list[Record]) -> str:
    r = _storage_record(records)
    s = r["storage"]
    labels = {
        "offline_embedding": "offline meta embedding (LiMAML)",
        "per_entity_weights": "per-entity adapted meta block",
        "id_embedding": "ID-embedding table (baseline)",
    }
    sizes = sorted(s["total_gb"], key=int)
    rows = [
        [label, f"{s['bytes_per_entity'][key]:,}"]
        + [f"{s['total_gb'][n][key]:,.2f} GB" for n in sizes]
        for key, label in labels.items()
    ]
    header = ["store", "bytes / entity"] + [
        f"{int(n) // 1_000_000}M entities" for n in sizes
    ]
    note = (
        f"d = {s['meta_dim']}; {s['adaptable_params']:,} adaptable weights; an id is "
        f"{s['id_bytes']} bytes. Storing adapted weights costs "
        f"**{s['weights_vs_embedding']:.0f}×** the embedding."
    )
    return "\n\n".join([source(r), table(header, rows), note])


def refresh(records: list[Record]) -> str:
    r = _storage_record(records)
    f, s = r["refresh"], r["storage"]["refresh"]
    rows = [
        [
            f"{run['entities']:,}",
            f"{run['wall_s']:.1f}",
            f"{run['cpu_s']:.1f}",
            f"{run['entities_per_cpu_s']:,.0f}",
        ]
        for run in f["runs"]
    ]
    note = (
        f"Marginal rate between the runs: {f['marginal_entities_per_cpu_s']:,.0f} entities "
        f"per CPU-second. A daily refresh of {s['entities_per_day'] / 1e6:,.0f}M entities "
        f"at that rate: **{s['cpu_hours_per_day']:.1f} CPU core-hours a day**, "
        f"{s['cores_busy_all_day']:.2f} of a core."
    )
    return "\n\n".join(
        [
            source(r),
            table(["records embedded", "wall, s", "CPU, s", "entities / CPU-s"], rows),
            note,
        ]
    )


# --- MovieLens -----------------------------------------------------------------


def movielens_demo(records: list[Record]) -> str:
    """The demo's own rendering (`readme_table.py`), copied by `make docs-results`."""
    del records
    path = os.path.join(MOVIELENS, "README_table.md")
    if not os.path.exists(path):
        raise TableError(
            f"{os.path.relpath(path, REPO)} is missing: run `make docs-results`"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    provenance = os.path.join(MOVIELENS, "provenance.json")
    if os.path.exists(provenance):
        with open(provenance, encoding="utf-8") as f:
            note = json.load(f).get("note", "")
        if note:
            text = f"*{note}*\n\n{text}"
    return text


_ME_MODELS = (
    ("limaml", "LiMAML, member only"),
    ("limaml_multi_entity", "`limaml_multi_entity` (member + movie)"),
    ("limaml_multi_entity_round2", "round 2"),
)


def multi_entity(records: list[Record]) -> str:
    r = latest(records, "multi_entity")
    ks = ("1", "3", "5", "10")
    rows = []
    for key, label in _ME_MODELS:
        m = r[key]
        by_k = m["overall_auc_by_k"]
        rows.append(
            [
                label,
                mean_std(by_k["all"]),
                f"{m['logloss']['mean']:.4f}",
                f"{m['mean_member_auc']['mean']:.4f}",
            ]
            + [f"{by_k[k]['mean']:.4f}" for k in ks]
        )
    header = [
        "model",
        "overall AUC",
        "log loss",
        "mean member AUC",
        "AUC, k=1",
        "k=3",
        "k=5",
        "k=10",
    ]
    buckets = r["test_query_rows_by_movie_ratings"]
    bucket_rows = [
        [name.replace("-", "–"), f"{count:,}"]
        + [mean_std(r[key]["auc_by_movie_ratings"][name], 3) for key, _ in _ME_MODELS]
        for name, count in buckets.items()
    ]
    bucket_header = ["movie's training ratings", "test query rows"] + [
        label for _, label in _ME_MODELS
    ]
    return "\n\n".join(
        [
            source(r),
            f"{r['seeds']} seeds, mean ± std over seeds, the demo's recipe for every model.",
            table(header, rows),
            "Overall AUC of the test query rows, by the movie's number of training ratings:",
            table(bucket_header, bucket_rows),
        ]
    )


def _signed_by_k(lifts: dict[str, float]) -> str:
    """Lifts by k, the negative ones in bold, with the ks they belong to."""
    values = " / ".join(
        f"**{v:+.3f}**" if v < 0 else f"{v:+.3f}" for v in lifts.values()
    )
    return f"{values} (k = {' / '.join(lifts)})"


def own_data(records: list[Record]) -> str:
    found: dict[str, Record] = {}
    for r in select(records, "own_data"):
        members = r.get("max_members")
        found[r["experiment"] + (f"@{members}" if members else "")] = r
    rows = []
    stats = found.get("statistics")
    if stats:
        lim, glo = stats["limaml_overall_auc"], stats["global_overall_auc"]
        rows.append(
            [
                "`--experiment statistics`: types-only spec vs hand-prepared, fixed recipe",
                f"LiMAML {lim['types_only']:.4f} (types only) vs {lim['hand_prepared']:.4f} "
                f"(hand); global {glo['types_only']:.4f} vs {glo['hand_prepared']:.4f}",
                f"difference {stats['difference']:+.4f} (target within "
                f"{stats['target_abs_difference']})",
                "",
                f"{stats['_line']}, {commit(stats)}",
            ]
        )
    for name, label in (
        (
            "tuned",
            "`--experiment tuned`: types-only spec, recipe chosen by `limaml tune`",
        ),
        (
            "no_member_features",
            "`--experiment no_member_features`: no member features, tuned",
        ),
        (
            "no_member_features@400",
            "`--experiment no_member_features --max-members 400`: 400 of those members",
        ),
        (
            "short_histories",
            "`--experiment short_histories`: 20-48 rows per member, one member "
            "feature, the day as time, tuned",
        ),
        ("item_entity", "`--experiment item_entity`: the movie is the entity, tuned"),
        (
            "no_personal_signal",
            "`--experiment no_personal_signal`: labels drawn from the item alone, "
            "tuned (target: within 0.002 of global at every k)",
        ),
    ):
        r = found.get(name)
        if not r:
            continue
        strongest = r.get("lift_over_strongest_baseline_by_k")
        rows.append(
            [
                label,
                _signed_by_k(r["lift_by_k"]),
                f"tune chose {r['tune_chose']}; mean per-entity AUC lift "
                f"{r['mean_entity_auc_lift']:+.4f}",
                _signed_by_k(strongest) if strongest else "not recorded",
                f"{r['_line']}, {commit(r)}",
            ]
        )
    if not rows:
        raise TableError("bench/results.jsonl has no 'own_data' record")
    any_record = next(iter(found.values()))
    return "\n\n".join(
        [
            f"*Generated from `bench/results.jsonl` (`bench/own_data.py`, "
            f"{any_record['seeds']} seeds each, {machine(any_record)}); the last column "
            "is the record's line and commit.*",
            table(
                [
                    "experiment",
                    "LiMAML − global overall AUC",
                    "notes",
                    "LiMAML − the strongest baseline (ID embedding, fine-tuning)",
                    "line, commit",
                ],
                rows,
            ),
        ]
    )


TABLES: dict[str, Callable[[list[Record]], str]] = {
    "meta_train_reference": meta_train_reference,
    "meta_train_small": meta_train_small,
    "peers": peers,
    "large_ids": large_ids,
    "other_benchmarks": other_benchmarks,
    "scale_passes": scale_passes,
    "storage": storage,
    "refresh": refresh,
    "movielens_demo": movielens_demo,
    "multi_entity": multi_entity,
    "own_data": own_data,
}


def render(name: str, records: list[Record] | None = None) -> str:
    """The markdown of table `name`; raises TableError for an unknown name."""
    if name not in TABLES:
        raise TableError(f"unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
    return TABLES[name](load_records() if records is None else records)


def expand(markdown: str, records: list[Record] | None = None) -> str:
    """`markdown` with every `<!-- table: NAME -->` line replaced by its table."""
    if not MARKER.search(markdown):
        return markdown
    records = load_records() if records is None else records
    return MARKER.sub(lambda m: render(m.group("name"), records), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: expands the table markers of a page."""
    from mkdocs.exceptions import PluginError  # noqa: PLC0415

    try:
        return expand(markdown)
    except (TableError, KeyError, OSError, ValueError) as e:
        raise PluginError(f"{page.file.src_path}: measured table: {e!r}") from e


if __name__ == "__main__":
    for arg in sys.argv[1:] or sorted(TABLES):
        print(f"## {arg}\n\n{render(arg)}\n")
