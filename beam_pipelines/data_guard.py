"""A runtime guard: nothing on the data path unpickles or evaluates what it reads.

Beside the static scan of the source
(`tests/test_reliability.py::test_nothing_on_the_data_path_unpickles_or_evaluates_input`),
which a `getattr(pickle, "loads")` or an alias slips past, this guard watches
what the process does while it parses records. It is off unless the
environment variable LIMAML_DATA_GUARD is "1" (the test suite sets it in
tests/conftest.py; child processes, such as `limaml make-tasks` started by a
test or the DirectRunner's multi_processing workers, inherit it).

When on, while a guarded function runs on a thread:

* an audit hook (`sys.addaudithook`) raises `DataIsCodeError` on the events
  "pickle.find_class" (every unpickling of a class or function, whichever
  name or module called the unpickler: `pickle`, `_pickle`, `dill`,
  `cloudpickle`), "marshal.loads"/"marshal.load" and "exec" (both `exec` and
  `eval`, of strings or code objects). Imports are exempt: a module imported
  there runs `exec` and `marshal.loads` from `importlib`'s bootstrap, which
  the hook recognizes on the stack;
* `pickle.loads` and `pickle.load` (the module's attributes, patched once,
  so `getattr(pickle, "loads")` and later aliases get the patch) raise even
  for plain data, which fires no event. Not caught: plain data (no class, no
  function) unpickled through `_pickle.loads`, a `pickle.Unpickler` (a C
  type that cannot be patched) or an alias taken before the guard was first
  entered; plain data cannot run code.

A guarded function that swallows the error (a row validator's `except
Exception` turns any error into a dead-letter reason) still fails: the guard
remembers the violation and raises it again when the function returns.

What is guarded (the data path: where input bytes become values):

* make-tasks: `beam_pipelines.reading.read_csv_file` (each step of parsing a
  CSV file) and `beam_pipelines.build_tasks._check` (validating one row or
  entity-table row, Parquet rows included);
* embed: `EmbedTasksFn._compute` (parsing a batch of task records and
  embedding it, on the DoFn's helper thread).

Not guarded: pipeline construction and Beam's own machinery (the
DirectRunner pickles DoFns with cloudpickle/dill and decodes elements with
its coders between steps), TensorFlow's C++ (it raises no audit events), and
code outside these functions.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

ENV = "LIMAML_DATA_GUARD"
EVENTS = frozenset({"pickle.find_class", "marshal.loads", "marshal.load", "exec"})

_state = threading.local()
_installed = False
_lock = threading.Lock()


class DataIsCodeError(RuntimeError):
    """Something on the data path unpickled or evaluated (LIMAML_DATA_GUARD=1)."""


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _active() -> bool:
    return getattr(_state, "depth", 0) > 0


def _importing() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _violation(what: str) -> DataIsCodeError:
    err = DataIsCodeError(f"{what} on the data path (LIMAML_DATA_GUARD=1)")
    if _state.violation is None:
        _state.violation = err
    return err


def _hook(event: str, args: tuple, events: frozenset[str] = EVENTS) -> None:
    # `events` is bound at definition: audit events still fire while the
    # interpreter shuts down, after module globals have been set to None.
    if event in events and _active() and not _importing():
        raise _violation(f"{event}{args[:2]!r}")


def _refusing(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def refuse(*args, **kwargs):
        if _active():
            raise _violation(name)
        return original(*args, **kwargs)

    return refuse


def install() -> None:
    """Adds the audit hook and patches pickle's loaders, once per process."""
    global _installed
    with _lock:
        if _installed:
            return
        sys.addaudithook(_hook)
        pickle.loads = _refusing("pickle.loads", pickle.loads)
        pickle.load = _refusing("pickle.load", pickle.load)
        _installed = True


def _enter() -> None:
    install()
    if not _active():
        _state.violation = None
    _state.depth = getattr(_state, "depth", 0) + 1


def _exit(failed: bool) -> None:
    _state.depth -= 1
    if not _active() and _state.violation is not None and not failed:
        err, _state.violation = _state.violation, None
        raise err


def guarded(fn: Callable) -> Callable:
    """`fn` with the guard on while it runs (when LIMAML_DATA_GUARD=1)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not enabled():
            return fn(*args, **kwargs)
        _enter()
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            _exit(failed)

    return run


def guarded_iter(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """A generator function with the guard on during each of its steps."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not enabled():
            yield from fn(*args, **kwargs)
            return
        iterator = guarded(fn)(*args, **kwargs)
        step = guarded(next)
        while True:
            try:
                value = step(iterator)
            except StopIteration:
                return
            yield value

    return run


if enabled():
    # Patched before any other module takes an alias of the loaders.
    install()
