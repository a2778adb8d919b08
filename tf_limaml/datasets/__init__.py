"""Dataset loaders: synthetic tasks (tests, demo) and MovieLens-100K."""

import importlib

__all__ = ["movielens", "synthetic"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f"tf_limaml.datasets.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tf_limaml.datasets' has no attribute {name!r}")
