"""Experiments beside the library: the comparison of LiMAML with its baselines.

Nothing here is the library's API. The core modules of `tf_limaml` (features,
tasks, data, layers, maml, model, training, evaluation, export, statistics,
signatures) never import this package; it imports them, and it is what
`limaml demo` and `limaml tune` run.

* `protocol`: how members are split, how supports are cut, how models are
  scored (`Protocol`, `Splits`, task batches, the support-size sweep);
* `recipes`: every training choice of the comparison (`Recipe`, `Architecture`);
* `baselines`: the models compared and their trainers (global, ID embedding,
  fine-tuning, full MAML, LiMAML);
* `tune`: `limaml tune`, a budgeted recipe search that never loses to global;
* `ship`: `limaml train --recipe`, the recipe tune chose trained whole into a
  model directory that `limaml export` exports;
* `report`: report.json, report.md and lift.png;
* `multi_entity`: the member and the item personalized together (item
  embeddings as a request feature of the member model);
* `demo`, `movielens_demo`: `limaml demo` on synthetic members, MovieLens-100K
  or an interactions file of your own.

Modules are imported on first use, so `import tf_limaml.experiments` stays
TensorFlow-free.
"""

import importlib
from typing import TYPE_CHECKING

_SUBMODULES = (
    "baselines",
    "demo",
    "movielens_demo",
    "multi_entity",
    "protocol",
    "recipes",
    "report",
    "ship",
    "tune",
)

__all__ = list(_SUBMODULES)

if TYPE_CHECKING:  # Static tools see the names that __getattr__ imports lazily.
    from tf_limaml.experiments import (  # noqa: F401
        baselines,
        demo,
        movielens_demo,
        multi_entity,
        protocol,
        recipes,
        report,
        ship,
        tune,
    )


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"tf_limaml.experiments.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tf_limaml.experiments' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
