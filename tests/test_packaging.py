"""The wheel, as users install it: built from the repo, installed into a fresh venv.

The wheel is built from a clean copy of the repository (a stale `build/` could
hide a file the wheel lacks), installed without `-e` into a new virtual
environment, and `limaml demo` runs from a directory outside the repository,
so nothing can be read from the checkout.

The new venv reuses the installed dependencies instead of downloading them (the
TensorFlow wheel alone is 572 MB): a `.pth` file puts this interpreter's
site-packages after the venv's own. Only the path is added, not that
directory's `.pth` files, so the checkout's editable install stays out and
`import tf_limaml` can only find the installed wheel.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tf_limaml", "beam_pipelines", "serving")
# What a copy of the checkout leaves out: git, environments, outputs, caches.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "build",
    "dist",
    "tmp",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    ".ipynb_checkpoints",
    ".whl",
    ".gl",
)


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"--- stdout (tail)\n{result.stdout[-3000:]}\n"
        f"--- stderr (tail)\n{result.stderr[-5000:]}"
    )
    return result


def _data_files() -> list[str]:
    """Every file of the packages that is not Python source: all must ship."""
    found = []
    for package in PACKAGES:
        for path in glob.glob(os.path.join(REPO, package, "**", "*"), recursive=True):
            relative = os.path.relpath(path, REPO)
            if os.path.isfile(path) and not relative.endswith((".py", ".pyc")):
                if "__pycache__" not in relative.split(os.sep):
                    found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def _user_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points into the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS", "VIRTUAL_ENV")
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.heavy  # 108 s: builds and installs the wheel; `make test-all` only
def test_wheel_installs_and_runs_the_demo_outside_the_repo(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    wheels = tmp_path / "wheels"
    # No build isolation: this environment has setuptools and wheel already.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
        ],
        cwd=source,
        timeout=600,
    )
    (wheel,) = glob.glob(str(wheels / "tf_limaml-*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in _data_files() if name not in shipped]
    assert not missing, f"data files missing from the wheel: {missing}"
    for package in PACKAGES:
        assert f"{package}/__init__.py" in shipped, package
    assert not any(name.startswith("tests/") for name in shipped)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=600)
    python = str(venv / "bin" / "python")
    venv_site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=_user_env(),
    ).stdout.strip()
    here = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    with open(os.path.join(venv_site, "_reuse_installed_dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(here)) + "\n")
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", wheel],
        env=_user_env(),
        timeout=600,
    )

    user = tmp_path / "user"
    user.mkdir()
    where = _run(
        [
            python,
            "-c",
            "import beam_pipelines, serving, tf_limaml; "
            "print(tf_limaml.__file__, serving.__file__, beam_pipelines.__file__)",
        ],
        cwd=user,
        env=_user_env(),
    ).stdout.split()
    for path in where:
        assert path.startswith(venv_site), f"imported from {path}, not the wheel"

    limaml = str(venv / "bin" / "limaml")
    _run([limaml, "--help"], cwd=user, env=_user_env(), timeout=120)
    result = _run(
        [limaml, "demo", "--dataset", "synthetic", "--fast"],
        cwd=user,
        env=_user_env(),
        timeout=1800,
    )
    with open(user / "runs" / "synthetic" / "report.json") as f:
        report = json.load(f)
    assert report["dataset"] == "synthetic"
    assert set(report["models"]) == {"limaml", "global"}
    assert not report["failed"], report["failed"]
    assert "LiMAML query-AUC lift" in result.stdout
