"""The signature names: defined once (tf_limaml/signatures.py), TensorFlow-free."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_signature_names_import_without_tensorflow():
    # A fresh interpreter: this test process may have imported TensorFlow already.
    code = (
        "import sys\n"
        "from tf_limaml import signatures\n"
        "from serving import client\n"
        "assert 'tensorflow' not in sys.modules, 'importing them imported TensorFlow'\n"
        "print(','.join(signatures.SIGNATURE_NAMES))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "serving_default,adapt_and_predict,meta_embedding,predict_examples"
    )


def test_export_and_client_use_the_same_names():
    from serving import client
    from tf_limaml import export, signatures

    for name in (
        "SERVING_DEFAULT",
        "ADAPT_AND_PREDICT",
        "META_EMBEDDING",
        "PREDICT_EXAMPLES",
        "SIGNATURE_NAMES",
        "SCORE_KEY",
        "EMBEDDING_KEY",
        "EXAMPLES_KEY",
        "SUPPORT_LABEL_KEY",
        "SUPPORT_MASK_KEY",
    ):
        assert getattr(export, name) is getattr(signatures, name), name
    assert client.OUTPUT_NAMES is signatures.OUTPUT_NAMES
    assert (client.SCORE, client.EMBEDDING) == (
        signatures.SCORE_KEY,
        signatures.EMBEDDING_KEY,
    )
    assert set(signatures.OUTPUT_NAMES) == set(signatures.SIGNATURE_NAMES)


def test_per_interaction_input_names():
    from tf_limaml import signatures

    assert signatures.support_key("item_id") == "support_item_id"
    assert signatures.query_key("item_id") == "query_item_id"
    assert signatures.SUPPORT_LABEL_KEY == "support_label"
    assert signatures.SUPPORT_MASK_KEY == "support_mask"
