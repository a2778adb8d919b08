"""tf-limaml: per-entity personalization of deep recommenders by meta-learning.

Follows LiMAML (Wang et al., KDD 2024, arXiv 2403.00803): MAML on a small meta
block that turns entity-level features into a meta embedding, and a shared
global block that scores requests given that embedding.

Public names are imported on first use, so `import tf_limaml` (and the
`limaml --help` command) stays fast and TensorFlow-free until a model, layer
or dataset is touched.

The comparison with baselines, its report, `limaml demo` and `limaml tune`
live beside the library in `tf_limaml.experiments`, and unstable prototypes in
`tf_limaml.experimental`; the core modules never import either.
"""

import importlib
from typing import TYPE_CHECKING

from tf_limaml._env import use_legacy_keras

use_legacy_keras()

__version__ = "0.1.0"

_PUBLIC = {
    "Feature": "tf_limaml.features",
    "FeatureSpec": "tf_limaml.features",
    "FeatureSpecError": "tf_limaml.features",
    "LabelSpec": "tf_limaml.features",
    "FeatureEmbedding": "tf_limaml.layers",
    "FunctionalCross": "tf_limaml.layers",
    "GlobalBlock": "tf_limaml.layers",
    "MetaBlock": "tf_limaml.layers",
    "SequenceMetaBlock": "tf_limaml.sequence",
    "LiMAMLModel": "tf_limaml.model",
    "MetaConfig": "tf_limaml.config",
    "AdaptOptions": "tf_limaml.config",
    "Architecture": "tf_limaml.config",
    "LimamlError": "tf_limaml.errors",
    "UserInputError": "tf_limaml.errors",
    "load_model": "tf_limaml.saving",
    "save_model": "tf_limaml.saving",
    "LazyAdam": "tf_limaml.optimizers",
}
_SUBMODULES = (
    "blocks",
    "config",
    "data",
    "datasets",
    "entities",
    "errors",
    "distribute",
    "evaluation",
    "features",
    "intervals",
    "layers",
    "maml",
    "model",
    "newton",
    "sequence",
    "optimizers",
    "saving",
    "signatures",
    "statistics",
    "step",
    "tasks",
    "training",
    "export",
)

# Beside the library, not part of it: reachable as attributes (and listed by
# dir()) but left out of __all__, so `from tf_limaml import *` stays the core.
_BESIDE = ("experiments", "experimental")

__all__ = sorted(_PUBLIC) + list(_SUBMODULES)

if TYPE_CHECKING:  # Static tools see the names that __getattr__ imports lazily.
    from tf_limaml import (  # noqa: F401
        blocks,
        config,
        data,
        datasets,
        distribute,
        entities,
        errors,
        evaluation,
        export,
        features,
        intervals,
        layers,
        maml,
        model,
        newton,
        optimizers,
        saving,
        sequence,
        signatures,
        statistics,
        step,
        tasks,
        training,
    )
    from tf_limaml.config import AdaptOptions, Architecture, MetaConfig  # noqa: F401
    from tf_limaml.errors import LimamlError, UserInputError  # noqa: F401
    from tf_limaml.features import (  # noqa: F401
        Feature,
        FeatureSpec,
        FeatureSpecError,
        LabelSpec,
    )
    from tf_limaml.layers import (  # noqa: F401
        FeatureEmbedding,
        FunctionalCross,
        GlobalBlock,
        MetaBlock,
    )
    from tf_limaml.model import LiMAMLModel  # noqa: F401
    from tf_limaml.optimizers import LazyAdam  # noqa: F401
    from tf_limaml.saving import load_model, save_model  # noqa: F401
    from tf_limaml.sequence import SequenceMetaBlock  # noqa: F401


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _SUBMODULES or name in _BESIDE:
        value = importlib.import_module(f"tf_limaml.{name}")
    else:
        raise AttributeError(f"module 'tf_limaml' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_BESIDE))
