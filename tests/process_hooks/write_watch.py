"""Every path a process writes, from an audit hook (test-only, no dependencies).

`sys.addaudithook` sees each "open" (with the os-level flags, so a write
shows as O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND, whichever call or
library opened the file), "os.rename" (also `os.replace`), "os.remove",
"os.mkdir", "os.rmdir", "os.truncate", "os.link", "os.symlink" and
"shutil.rmtree". A hook cannot be removed, so one is installed per process
and records into the sinks that are on. Paths are made absolute against the
working directory of the moment; a file descriptor (an already open file)
is not a path and is skipped.

Used in the test process by `tests/guarantees.py::watch_writes`, and in the
processes a test starts by `sitecustomize.py` beside this file.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Events that change the file system: (path argument, its dir_fd argument or
# None) for each path. A path with a dir_fd (as `shutil.rmtree` removes) is
# relative to that directory, not to the working directory.
PATH_ARGS = {
    "os.rename": ((0, 2), (1, 3)),
    "os.remove": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.rmdir": ((0, 1),),
    "os.truncate": ((0, None),),
    "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),),
    "shutil.rmtree": ((0, None),),
}

_sinks: list[Callable[[str, str], None]] = []
_installed = False
_lock = threading.Lock()
_quiet = threading.local()


def _absolute(path, dir_fd=None) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        path = os.fsdecode(os.fspath(path))
    except (TypeError, ValueError):
        return None
    if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
        try:
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            base = f"<dir_fd {dir_fd}>"
        return os.path.normpath(os.path.join(base, path))
    return os.path.abspath(path)


def written_paths(event: str, args: tuple) -> list[str]:
    """The paths an audit event writes (empty for reads and other events)."""
    if event == "open":
        path, _, flags = args
        if not isinstance(flags, int) or not flags & WRITE_FLAGS:
            return []
        found = [_absolute(path)]
    elif event in PATH_ARGS:
        found = [
            _absolute(args[i], args[fd] if fd is not None and fd < len(args) else None)
            for i, fd in PATH_ARGS[event]
            if i < len(args)
        ]
    else:
        return []
    return [p for p in found if p is not None]


def _hook(event: str, args: tuple) -> None:
    if not _sinks or getattr(_quiet, "on", False):
        return
    if event != "open" and event not in PATH_ARGS:
        return
    paths = written_paths(event, args)
    if not paths:
        return
    _quiet.on = True  # a sink that writes must not see its own write
    try:
        for sink in list(_sinks):
            for path in paths:
                sink(event, path)
    finally:
        _quiet.on = False


def start(sink: Callable[[str, str], None]) -> None:
    """Calls sink(event, absolute path) for every write from now on."""
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True
        _sinks.append(sink)


def stop(sink: Callable[[str, str], None]) -> None:
    with _lock:
        if sink in _sinks:
            _sinks.remove(sink)


def leaking_shard_writer(write_shard: Callable, leak_dir: str) -> Callable:
    """A sabotage: `write_shard` that first writes and deletes a file in leak_dir."""

    def leaky(*args, **kwargs):
        leak = os.path.join(leak_dir, f"leak-{os.getpid()}-{threading.get_ident()}")
        with open(leak, "w", encoding="utf-8") as f:
            f.write("outside --output")
        os.remove(leak)
        return write_shard(*args, **kwargs)

    return leaky
