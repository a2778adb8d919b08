"""The runnable examples in examples/ run as users run them."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bring_your_own_model_runs_and_serves_like_keras(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "bring_your_own_model.py"),
            "--output",
            str(tmp_path),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(tmp_path / "export" / "1" / "saved_model.pb")
    match = re.search(r"max \|served - Keras\| = (\S+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) < 1e-5
    assert "served scores of its" in result.stdout
