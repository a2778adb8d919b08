"""Unstable model changes, not yet measured well enough to join the library.

A change to `tf_limaml.model` or `tf_limaml.layers` is prototyped here as a
subclass, measured with the protocol of `tf_limaml.experiments`, and proposed
for the core with its numbers. Names here may change or go without notice;
the core modules never import this package.

* `prototypes`: `ShrunkSupportModel` (support-loss shrinkage, recency weights,
  adapting a subset of the meta block).
"""

import importlib
from typing import TYPE_CHECKING

__all__ = ["prototypes"]

if TYPE_CHECKING:  # Static tools see the names that __getattr__ imports lazily.
    from tf_limaml.experimental import prototypes  # noqa: F401


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f"tf_limaml.experimental.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tf_limaml.experimental' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
