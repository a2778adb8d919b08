"""A bounded soak of one loaded export (bench/soak.py): 4 callers, zero errors.

The default run is short (a few seconds per phase); the 60 s soak the issue
asks for is marked slow. Both go through the TF1 loader in-process and through
the loopback gRPC fixture on 127.0.0.1.
"""

import json
import os
import sys

import numpy as np
import pytest
from serving_fixture import SessionSignatures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import soak  # noqa: E402

CALLERS = 4


def _check(result, seconds):
    assert result["zero_errors"], json.dumps(result, indent=1)
    for phase in ("in_process", "grpc"):
        stats = result[phase]
        assert (
            stats["errors"] == stats["wrong_answers"] == stats["stuck_callers"] == 0
        ), stats
        assert stats["callers"] == CALLERS
        # Bounded in time: the phase ends at its deadline (plus the calls in flight).
        assert seconds <= stats["seconds"] < seconds + 30
        assert stats["calls"] >= CALLERS * 2, stats
        assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        # Every caller alternates both signatures.
        assert set(stats["by_signature"]) == {"serving_default", "adapt_and_predict"}
    assert result["grpc"]["target"].startswith("127.0.0.1:")


def test_short_soak_zero_errors_and_one_json_line(exported, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    result = soak.main(
        [
            "--export",
            exported["export_dir"],
            "--tasks",
            exported["tasks"]["test"],
            "--seconds",
            "3",
            "--callers",
            str(CALLERS),
            "--results",
            str(results),
        ]
    )
    _check(result, 3)
    printed = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert len(printed) == 1 and json.loads(printed[0]) == json.loads(
        results.read_text()
    )
    assert json.loads(printed[0])["machine"]["cores"] == os.cpu_count()


def test_callers_stop_at_max_calls_and_wrong_answers_count_as_errors(exported):
    requests = soak.make_requests(exported["export_dir"], exported["tasks"]["test"], 2)
    model = SessionSignatures(exported["export_dir"])
    try:
        expected = [[model.run(s, inputs) for s, inputs in mine] for mine in requests]
        bounded = soak.soak(
            lambda _: (model.run, lambda: None),
            requests,
            expected,
            seconds=60,
            max_calls=5,
        )
        assert bounded["calls"] == 10 and bounded["errors"] == 0
        assert bounded["seconds"] < 60
        # A caller answered with another caller's results: counted, never hidden.
        swapped = [expected[1], expected[0]]
        wrong = soak.soak(
            lambda _: (model.run, lambda: None),
            requests,
            swapped,
            seconds=60,
            max_calls=3,
        )
        assert wrong["wrong_answers"] == wrong["errors"] == 6
        assert "wrong `score`" in wrong["error_samples"][0]
        # Exceptions are counted too, and the callers carry on.

        def failing(signature, inputs):
            raise RuntimeError("backend down")

        failed = soak.soak(
            lambda _: (failing, lambda: None),
            requests,
            expected,
            seconds=60,
            max_calls=2,
        )
        assert failed["errors"] == 4 and failed["calls"] == 0
        assert "RuntimeError: backend down" in failed["error_samples"][0]
    finally:
        model.close()
    assert np.isfinite(bounded["p99_ms"])


@pytest.mark.slow
def test_sixty_second_soak(exported):
    result = soak.run_soak(
        exported["export_dir"], exported["tasks"]["test"], seconds=60, callers=CALLERS
    )
    _check(result, 60)
