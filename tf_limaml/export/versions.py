"""TF Serving's layout: numbered versions, each written whole or not at all.

TF Serving polls an export base (`--model_base_path`) for numeric directories
and loads the highest. A version is written under a hidden temporary name in
the base and renamed to `<version>` when complete (`staged_version`), so the
poller never sees a partial version (on POSIX file systems, where a rename is
atomic; on GCS or S3 a rename is a copy). An export killed midway leaves only
its temporary directory, which the next export removes
(`remove_abandoned_exports`).

Example:

    with staged_version("exports/limaml", next_version("exports/limaml")) as temp:
        tf.saved_model.save(module, temp)
    # exports/limaml/<version> now exists, complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator

import tensorflow as tf

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".tmp-export-"
_VERSION_PATTERN = re.compile(r"^[0-9]+$")
# .tmp-export-<version>-<host>-<pid>-<uuid hex>: who wrote it, so that a later
# export can tell an abandoned one (its process is gone) from a running one.
_TEMP_PATTERN = re.compile(
    rf"^{re.escape(_TEMP_PREFIX)}([0-9]+)-([A-Za-z0-9._]+)-([0-9]+)-([0-9a-f]{{32}})$"
)
# A temporary export of another host (or an unrecognized name) is only
# removed once it is this old: its writer cannot be asked whether it still runs.
ABANDONED_AFTER_S = 24 * 3600


def list_versions(export_base: str | os.PathLike) -> list[int]:
    """Numeric version directories under an export base, ascending."""
    export_base = str(export_base)
    if not tf.io.gfile.isdir(export_base):
        return []
    versions = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        if _VERSION_PATTERN.match(name) and tf.io.gfile.isdir(
            os.path.join(export_base, name)
        ):
            versions.append(int(name))
    return sorted(versions)


def resolve_version_dir(path: str | os.PathLike) -> str:
    """A SavedModel version directory from itself or from its export base.

    Args:
        path: `EXPORT/<version>` or `EXPORT` (then the latest version).

    Raises:
        FileNotFoundError: Neither a SavedModel nor a base with versions.
    """
    path = str(path).rstrip("/")
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = list_versions(path)
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel at {path}: expected EXPORT/<version>/saved_model.pb. Write "
            "one with `limaml export --model-dir MODEL --export-base EXPORT`."
        )
    latest = os.path.join(path, str(versions[-1]))
    logger.info("Using the latest version of %s: %s", path, latest)
    return latest


def is_version_name(name: str) -> bool:
    """Whether a directory name is one TF Serving loads as a version (a number)."""
    return bool(_VERSION_PATTERN.match(name))


def next_version(export_base: str | os.PathLike) -> int:
    """One more than the latest version under `export_base` (1 if none)."""
    existing = list_versions(export_base)
    return existing[-1] + 1 if existing else 1


# ------------------------------------------------------- temporary exports
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _temp_name(version: int) -> str:
    return f"{_TEMP_PREFIX}{version}-{_host()}-{os.getpid()}-{uuid.uuid4().hex}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _is_abandoned(name: str, path: str, now: float) -> bool:
    match = _TEMP_PATTERN.match(name)
    if match and match.group(2) == _host():
        return not _process_exists(int(match.group(3)))
    try:
        modified = tf.io.gfile.stat(path).mtime_nsec / 1e9
    except tf.errors.OpError:  # e.g. an object store without directory entries
        return False
    return now - modified > ABANDONED_AFTER_S


def remove_abandoned_exports(export_base: str | os.PathLike) -> list[str]:
    """Deletes the temporary directories of exports that were killed midway.

    An export writes `.tmp-export-<version>-<host>-<pid>-<id>/` and renames it
    to `<version>/` when complete; a killed export leaves the temporary
    directory behind. TF Serving never loads it (the name is not a number),
    and `export_model` calls this first, so it is removed by the next export:
    at once when its process (on this host) no longer exists, otherwise once
    it is `ABANDONED_AFTER_S` old. A running export's directory is left alone.

    Args:
        export_base: The export base directory.

    Returns:
        The directories removed.
    """
    export_base = str(export_base)
    if not tf.io.gfile.isdir(export_base):
        return []
    now = time.time()
    removed = []
    for name in tf.io.gfile.listdir(export_base):
        name = name.rstrip("/")
        path = os.path.join(export_base, name)
        if not name.startswith(_TEMP_PREFIX) or not _is_abandoned(name, path, now):
            continue
        try:
            tf.io.gfile.rmtree(path)
        except tf.errors.OpError as err:  # cleaning up must never fail an export
            logger.warning("Could not remove the abandoned export %s: %s", path, err)
            continue
        logger.info("Removed the abandoned (killed midway) export %s", path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staged_version(export_base: str | os.PathLike, version: int) -> Iterator[str]:
    """Yields a hidden temporary directory that becomes `export_base/<version>`.

    Removes abandoned temporary exports first. When the block completes, the
    directory is renamed to `<version>`; when it raises (or the version
    appeared meanwhile), the directory is removed and nothing is renamed.

    Args:
        export_base: The export base directory (created if missing).
        version: The version number to write.

    Raises:
        FileExistsError: `<version>` appeared while the block ran.
    """
    export_base = str(export_base)
    final = os.path.join(export_base, str(version))
    tf.io.gfile.makedirs(export_base)
    remove_abandoned_exports(export_base)
    # Hidden and non-numeric, so TF Serving's version poller ignores it.
    temp = os.path.join(export_base, _temp_name(version))
    try:
        yield temp
        if tf.io.gfile.exists(final):
            raise FileExistsError(
                f"Export version {final} appeared while exporting "
                "(another export?); pass another --version."
            )
        tf.io.gfile.rename(temp, final, overwrite=False)
    except BaseException:
        if tf.io.gfile.exists(temp):
            tf.io.gfile.rmtree(temp)
        raise
