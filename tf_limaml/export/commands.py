"""The TF Serving command lines for an export (`limaml serve-command`).

Kept free of TensorFlow so the command answers instantly: it only looks at the
directory layout (`EXPORT/<version>/saved_model.pb`) and formats commands.

TF Serving's request batching (`--enable_batching`) concatenates concurrent
requests along the first axis of every input, and rejects requests whose
inputs differ in that axis or are scalars. That suits `serving_default`,
`predict_examples` and `meta_embedding`, but not `adapt_and_predict` (scalar
meta features, support and query of different lengths). So the commands come
in two forms: with batching, for the online path, and without, for
`adapt_and_predict`. The batching parameters file they name,
`batching_parameters.txt`, ships beside this module.

Example:

    print(serve_commands("exports/limaml", model_name="recs"))
"""

from __future__ import annotations

import os
import re
import shlex

GRPC_PORT = 8500
REST_PORT = 8501
DOCKER_IMAGE = "tensorflow/serving"
BATCHING_FILE = "batching_parameters.txt"
# Where the docker image serves models from: /models/${MODEL_NAME}.
DOCKER_MODELS_DIR = "/models"
_VERSION = re.compile(r"^[0-9]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def export_base_of(export: str | os.PathLike) -> str:
    """The export base (TF Serving's `--model_base_path`) of a base or version dir.

    Local paths are made absolute (TF Serving needs that) and checked; URIs
    such as gs://bucket/exports are passed through.

    Raises:
        FileNotFoundError: A local path that does not exist.
        ValueError: A local base without any numeric version directory.
    """
    path = str(export).rstrip("/")
    remote = "://" in path
    if not remote:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Export not found: {path}; write one with `limaml export --model-dir "
                f"MODEL --export-base {path}`"
            )
    if _VERSION.match(os.path.basename(path)) and (
        remote or os.path.exists(os.path.join(path, "saved_model.pb"))
    ):
        path = os.path.dirname(path)
    if not remote and not versions_of(path):
        raise ValueError(
            f"{path} holds no version directory (EXPORT/<number>/saved_model.pb); pass "
            "the --export-base given to `limaml export`, or its version directory"
        )
    return path


def versions_of(export_base: str) -> list[int]:
    """Numeric version directories holding a SavedModel, ascending (local paths)."""
    if not os.path.isdir(export_base):
        return []
    return sorted(
        int(name)
        for name in os.listdir(export_base)
        if _VERSION.match(name)
        and os.path.exists(os.path.join(export_base, name, "saved_model.pb"))
    )


def default_batching_file() -> str | None:
    """The batching parameters file shipped beside this module (package data).

    The core ships the file it points TF Serving at, so the command never has
    to find the top-level `serving` package.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), BATCHING_FILE)
    return path if os.path.exists(path) else None


def serve_commands(
    export: str | os.PathLike,
    model_name: str = "limaml",
    batching_parameters: str | None = None,
) -> str:
    """The `tensorflow_model_server` and `docker run` lines that serve an export.

    Args:
        export: The export base or one of its version directories. TF Serving
            always gets the base, and serves its latest version.
        model_name: The name clients use (`model_spec.name`, `/v1/models/NAME`).
        batching_parameters: A TF Serving batching parameters file; default
            the `batching_parameters.txt` shipped in `tf_limaml.export`.

    Returns:
        Shell commands with comments, one per line, ready to print.
    """
    if not _MODEL_NAME.match(model_name or ""):
        raise ValueError(
            f"--model-name {model_name!r}: use letters, digits, '_', '.' or '-'"
        )
    base = export_base_of(export)
    batching = batching_parameters or default_batching_file()
    versions = versions_of(base) if "://" not in base else []
    quote = shlex.quote
    server = (
        f"tensorflow_model_server --port={GRPC_PORT} --rest_api_port={REST_PORT} "
        f"--model_name={quote(model_name)} --model_base_path={quote(base)}"
    )
    docker = (
        f"docker run --rm -p {GRPC_PORT}:{GRPC_PORT} -p {REST_PORT}:{REST_PORT} "
        f"--mount type=bind,source={quote(base)},"
        f"target={DOCKER_MODELS_DIR}/{model_name} -e MODEL_NAME={quote(model_name)}"
    )
    found = (
        f" (versions {', '.join(map(str, versions))}; the latest is served)"
        if (versions)
        else ""
    )
    lines = [
        f"# Serve {base}{found}: gRPC on port {GRPC_PORT}, REST on port {REST_PORT}."
    ]
    if batching:
        in_docker = f"{DOCKER_MODELS_DIR}/{BATCHING_FILE}"
        lines += [
            "# Online scoring (serving_default, predict_examples), with request batching:",
            f"{server} --enable_batching=true --batching_parameters_file={quote(batching)}",
            f"{docker} --mount type=bind,source={quote(batching)},target={in_docker} "
            f"{DOCKER_IMAGE} --enable_batching=true --batching_parameters_file={in_docker}",
            "# adapt_and_predict needs a server without batching (TF Serving's batching "
            "rejects scalar inputs and inputs of different lengths):",
        ]
    else:
        lines.append(
            "# Without request batching (every signature, adapt_and_predict "
            "included):"
        )
    lines += [server, f"{docker} {DOCKER_IMAGE}"]
    return "\n".join(lines)
