"""`import tf_limaml` after `import tensorflow`: what tf.keras resolves to decides."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_tensorflow_first_then_tf_limaml_gives_keras_2():
    result = _run(
        "import tensorflow as tf\n" "import tf_limaml\n" "print(tf.keras.__name__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras"), result.stdout


@pytest.mark.parametrize("touch", ["tf.keras.layers.Dense", "tf.keras.__name__"])
def test_tf_keras_resolved_to_keras_3_first_is_refused_in_one_message(touch):
    result = _run(f"import tensorflow as tf\n{touch}\nimport tf_limaml\n")
    assert result.returncode != 0
    assert "already resolved to Keras 3" in result.stderr


def test_type_checking_block_names_every_lazy_public_name():
    import ast

    import tf_limaml

    tree = ast.parse(open(tf_limaml.__file__, encoding="utf-8").read())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    imported = {
        alias.name for node in block.body for alias in node.names  # type: ignore
    }
    assert imported == set(tf_limaml.__all__)
