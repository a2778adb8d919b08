"""The plumbing of bench/scale.py and bench/storage.py (not their thresholds)."""

import csv
import glob
import json
import os
import sys

import pytest

from bench import scale, storage


def test_write_interactions_gives_unique_members_across_chunks(tmp_path):
    out = scale.write_interactions(
        str(tmp_path), entities=25, min_rows=2, max_rows=3, chunk_entities=10
    )
    paths = sorted(glob.glob(out["pattern"]))
    assert len(paths) == 3
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    members = {row["member_id"] for row in rows}
    assert (out["entities"], out["rows"]) == (25, len(rows))
    assert len(members) == 25
    assert 2 * 25 <= len(rows) <= 3 * 25


def test_measure_reports_the_child_and_its_descendants(tmp_path):
    # The child holds 64 MiB and starts a grandchild that holds 96 MiB; both
    # stay alive long enough for several samples.
    grandchild = "b = bytearray(96 << 20); import time; time.sleep(1.0)"
    child = (
        "import subprocess, sys, time\n"
        "a = bytearray(64 << 20)\n"
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "p.wait()\n"
        "print('done')\n"
    )
    run = scale.measure([sys.executable, "-c", child])
    assert run["returncode"] == 0 and "done" in run["output_tail"]
    # wait4's maxrss covers the reaped grandchild; the samples split them.
    assert run["peak_rss_mb"] >= 96
    assert run["peak_main_rss_mb"] >= 64
    assert run["peak_worker_rss_mb"] >= 96
    assert run["peak_tree_rss_mb"] >= 64 + 96
    assert run["cpu_s"] >= 0 and run["wall_s"] > 0


def test_measure_reports_a_failing_child():
    run = scale.measure([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert run["returncode"] == 3
    with pytest.raises(RuntimeError, match="exited with 3"):
        scale._checked(run, "the child")


def test_marginal_rate_and_ratio_leave_start_up_out():
    runs = [
        {"entities": 100, "embed": {"wall_s": 12.0, "peak_rss_mb": 500.0}},
        {"entities": 400, "embed": {"wall_s": 18.0, "peak_rss_mb": 550.0}},
    ]
    assert scale._marginal(runs, "embed", "entities", "wall_s") == 50.0
    assert scale._ratio(runs, "embed", "peak_rss_mb") == 1.1
    assert scale._marginal(runs[:1], "embed", "entities", "wall_s") is None


def test_storage_costs_by_hand():
    counts = {"meta_dim": 32, "adaptable_params": 5728, "id_embedding_params": 33}
    out = storage.costs(1000.0, counts=counts, entity_counts=(10**6,), id_bytes=8)
    assert out["bytes_per_entity"] == {
        "offline_embedding": 32 * 4 + 8,
        "per_entity_weights": 5728 * 4 + 8,
        "id_embedding": 33 * 4 + 8,
    }
    assert out["total_gb"]["1000000"]["per_entity_weights"] == 22.92
    # 1e8 entities / 1000 per CPU-second = 27.8 CPU hours.
    assert out["refresh"]["cpu_hours_per_day"] == 27.8
    assert "refresh" not in storage.costs(None, counts=counts)


def test_parameter_counts_come_from_the_built_model(synthetic_spec, small_model_kwargs):
    from tf_limaml.model import LiMAMLModel, MetaConfig

    model = LiMAMLModel(synthetic_spec, MetaConfig(), **small_model_kwargs)
    # Meta input: segment (dim 8) + activity (1) = 9; MLP 9 -> 16 -> 8.
    assert storage.parameter_counts(model) == {
        "meta_dim": 8,
        "adaptable_params": 9 * 16 + 16 + 16 * 8 + 8,
        "id_embedding_params": 8 + 1,
    }


@pytest.mark.slow
def test_scale_bench_end_to_end_small(tmp_path):
    results = tmp_path / "results.jsonl"
    out = scale.main(
        [
            "--entities",
            "200,400",
            "--refresh-entities",
            "40",
            "--workdir",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ]
    )
    assert [r["entities"] for r in out["runs"]] == [200, 400]
    for run in out["runs"]:
        assert run["embed_balanced"] and run["make_tasks_conservation_holds"]
        assert run["embed_entities_out"] == run["entities"]
        assert run["make_tasks"]["peak_rss_mb"] > 0
    assert out["rss_ratio"]["make_tasks"]["peak_rss_mb"] > 0
    assert out["storage"]["refresh"]["cpu_hours_per_day"] > 0
    # Noise can hide the marginal rate of 10 vs 40 entities: the projection
    # then uses the larger run's whole rate, and says so.
    refresh = out["refresh"]
    marginal = refresh["marginal_entities_per_cpu_s"]
    expected = marginal or refresh["runs"][-1]["entities_per_cpu_s"]
    assert out["storage"]["refresh"]["entities_per_cpu_s"] == expected
    assert refresh["projection_basis"] == ("marginal" if marginal else "whole_run")
    (line,) = results.read_text().splitlines()
    assert json.loads(line)["bench"] == "scale"
    assert os.path.isdir(tmp_path / "work")


def test_passes_keep_about_entities_per_pass():
    assert scale.passes_for(50_000, 25_000) == 2
    assert scale.passes_for(200_000, 25_000) == 8
    assert scale.passes_for(200_001, 25_000) == 9
    assert scale.passes_for(10, 25_000) == 1
    assert scale.passes_for(200_000, 0) == 1
