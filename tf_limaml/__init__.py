"""tf-limaml: per-entity personalization of deep recommenders by meta-learning.

Follows LiMAML (Wang et al., KDD 2024, arXiv 2403.00803): MAML on a small meta
block that turns entity-level features into a meta embedding, a shared global
block that scores requests given that embedding.
"""

from tf_limaml._env import use_legacy_keras

use_legacy_keras()

# pylint: disable=wrong-import-position
from tf_limaml import data  # noqa: E402
from tf_limaml.features import Feature, FeatureSpec, FeatureSpecError, LabelSpec  # noqa: E402
from tf_limaml.layers import (  # noqa: E402
    FeatureEmbedding, FunctionalCross, GlobalBlock, MetaBlock,
)
from tf_limaml.model import LiMAMLModel, MetaConfig, load_model, save_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Feature", "FeatureEmbedding", "FeatureSpec", "FeatureSpecError", "FunctionalCross",
    "GlobalBlock", "LabelSpec", "LiMAMLModel", "MetaBlock", "MetaConfig", "data",
    "load_model", "save_model",
]
