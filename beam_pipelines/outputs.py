"""Output-directory hygiene shared by the pipelines."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from apache_beam.io.filesystems import FileSystems

from tf_limaml.errors import UserInputError

logger = logging.getLogger(__name__)


def prepare_output(output_dir: str, patterns: Sequence[str], overwrite: bool) -> None:
    """Refuses to mix a new run's shards with an earlier run's, or deletes the old ones.

    Args:
        output_dir: The --output directory (any Beam file system).
        patterns: Globs, relative to output_dir, of the files a run writes.
        overwrite: Delete the earlier run's files instead of refusing.

    Raises:
        ValueError: Files of an earlier run are there and overwrite is False.
    """
    stale = []
    for pattern in patterns:
        result = FileSystems.match([FileSystems.join(output_dir, pattern)])[0]
        stale += [m.path for m in result.metadata_list]
    if not stale:
        return
    if not overwrite:
        raise UserInputError(
            f"--output {output_dir} already holds the output of a run "
            f"({len(stale)} files, e.g. {sorted(stale)[0]}); a new run would mix with "
            "them. Pass --overwrite, or a new --output."
        )
    logger.info("Deleting %d files of an earlier run in %s", len(stale), output_dir)
    FileSystems.delete(stale)
