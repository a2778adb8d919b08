"""The training choices of the comparison: `Recipe` and the shared `Architecture`.

One `Recipe` holds every choice of every model of the comparison (epochs,
learning rates, the meta-learners' inner loop and warm start, the fine-tuning
grid), tuned on MovieLens-100K's val members; `Recipe.fast()` is the quick
one of `limaml demo --fast` and the tests, and `limaml tune` searches around
it on other data. Every model is built with the same `Architecture`.

Example:

    recipe = Recipe.fast()
    recipe = Recipe.from_dict({**recipe.to_dict(), "inner_lr": 0.1})
    config = recipe.meta_config()  # LiMAML's MetaConfig
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tf_limaml.config import MetaConfig

# The outer Adam rate of the full-MAML baseline (`Recipe.full_maml`): every
# weight of the network moves, so it needs the conventional rate, not the
# faster one of the recipe, which trains only the residual's projection and
# the prior.
MAML_META_LEARNING_RATE = 1e-3
# Starting points of the meta-learners (`Recipe.warm_start`).
WARM_STARTS = ("pretrain", "global")
# The meta blocks a recipe can train: the MLP of the meta features, or
# `SequenceMetaBlock`, which also reads the support rows (`Recipe.sequence`).
META_BLOCKS = ("mlp", "sequence")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The network every model shares (the arguments of LiMAMLModel)."""

    meta_units: tuple[int, ...] = (32, 16)
    global_units: tuple[int, ...] = (64, 32)
    cross_layers: int = 1
    projection_dim: int | None = None
    interaction: str = "product"
    l2: float = 0.0
    # The personal residual LiMAML's embedding fit moves (see GlobalBlock).
    residual_dim: int | None = 8

    def kwargs(self) -> dict[str, Any]:
        return {
            "meta_units": list(self.meta_units),
            "global_units": list(self.global_units),
            "cross_layers": self.cross_layers,
            "projection_dim": self.projection_dim,
            "interaction": self.interaction,
            "l2": self.l2,
            "residual_dim": self.residual_dim,
        }


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """The sequence meta block of `limaml_sequence` (`tf_limaml.SequenceMetaBlock`).

    Its MLP widths are the Architecture's `meta_units`, so d is the same as
    LiMAML's; the inner loop is the recipe's (lr, prior, first order) with
    `inner_steps` of its own (0: pure amortized inference), and
    `support_cut`, when set, replaces the recipe's share of meta-training
    tasks cut to a random latest-k support.
    """

    model_dim: int = 32
    num_heads: int = 2
    num_layers: int = 1
    recency: bool = True
    request_embedding: str = "shared"
    adapt: tuple[str, ...] = ("output",)
    inner_steps: int = 1
    # Every meta-training task cut to a random latest-k support (the block
    # must learn short sequences): on MovieLens-100K's val members, mean AUC
    # over k and seeds 0-1, 0.7309 vs 0.7299 with the recipe's 0.5, 0.7298
    # with 3 inner steps, 0.7250 with the request tables unfrozen
    # (bench/sequence.py; chosen on val, not test).
    support_cut: float | None = 1.0

    def block_kwargs(self) -> dict[str, Any]:
        return {
            "model_dim": self.model_dim,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "recency": self.recency,
            "request_embedding": self.request_embedding,
            "adapt": tuple(self.adapt),
        }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every training choice of the comparison.

    LiMAML's (the personal residual, its embedding fit and the warm start from
    the frozen member-ID pretraining) were chosen on MovieLens-100K's tuning
    folds and val members (`bench/limaml_recipe.py`, recorded in
    `movielens_tuning.json`), never on its test members.

    Attributes:
        architecture: The network all models share.
        epochs: Most epochs of conventional training (early stopping on val).
        batch_size: Rows per step of conventional training.
        learning_rate: Adam learning rate of conventional training.
        patience: Early-stopping patience (epochs) of conventional training.
        id_l2: L2 penalty on member vectors and biases (ID-embedding baseline).
        pretrain_epochs: Epochs of the meta-learners' pretraining: the network
            with a member-ID embedding, on the train members' rows only (then
            the IDs are dropped). 0 starts meta-training from scratch.
        inner_steps: Inner steps of LiMAML and MAML.
        inner_lr: Inner learning rate (the initial one if learned).
        learn_inner_lr: Meta-SGD per-parameter inner learning rates.
        first_order: First-order MAML.
        support_prior: c of `experimental.prototypes.ShrunkSupportModel` (0:
            the library's LiMAMLModel, unchanged).
        support_half_life: Recency weighting of the inner-loop support loss
            (`experimental.prototypes.ShrunkSupportModel`): a row's weight
            halves every this many rows back in time. None weights rows equally.
        support_cut: Share of meta-training tasks whose support is cut to a
            random latest-k window.
        freeze_request_embeddings: Keep the pretrained item/genre embedding
            tables fixed while meta-training.
        freeze_global_block: Keep the whole pretrained global block fixed
            while meta-training (only the meta block and inner rates learn).
        freeze_network: Meta-train only what personalizes (the residual's
            projection, the learned prior and rates): the warm-started network
            is the unadapted model, unchanged (`LiMAMLModel.freeze_network`).
        meta_epochs: Most meta-training epochs (early stopping on val).
        meta_batch_tasks: Tasks per meta-batch.
        sequence: The sequence meta block of `limaml_sequence`.
        meta_block: "mlp" (the meta features' MLP, LiMAML's) or "sequence"
            (`SequenceMetaBlock` with `sequence`'s options, as
            `limaml_sequence`: its own meta block learns, so it is never
            frozen and only the global block is warm-started).
        meta_learning_rate: Adam learning rate of the outer step.
        meta_patience: Early-stopping patience of meta-training.
        finetune_lrs: Inner learning rates the fine-tuning baseline tries.
        finetune_steps: Inner steps the fine-tuning baseline tries.
        warm_start: What the meta-learners start from: "pretrain" (the
            member-ID pretraining, `pretrain`) or "global" (the trained global
            baseline of the same seed). With "global", meta_epochs=0 and
            inner_steps=0, LiMAML scores exactly as the global model does:
            the fallback `limaml tune` always keeps.
        adapt_inner_steps: Inner steps when scoring and exporting, if not
            `inner_steps` (test-time knobs chosen on val by `limaml tune`).
        adapt_inner_lr: Inner learning rate when scoring and exporting, if
            not `inner_lr`.
        adapt_support_prior: Support prior when scoring and exporting, if
            not `support_prior`.
        adapt_embedding_steps: Newton steps of the embedding fit when scoring
            and exporting, if not `embedding_steps`.
        adapt_embedding_prior: Its prior precision when scoring and
            exporting, if not `embedding_prior` (a learned one wins).
        embedding_steps: Newton steps of the embedding fit after the inner
            steps (`MetaConfig.embedding_steps`; 0: none).
        embedding_prior: The embedding fit's prior precision (its start when
            learned).
        learn_embedding_prior: Meta-learn that precision per dimension.
        differentiate_fit: Meta-train through the fit's Jacobian
            (`MetaConfig.differentiate_fit`).
    """

    architecture: Architecture = Architecture()
    epochs: int = 15
    batch_size: int = 1024
    learning_rate: float = 1e-3
    patience: int = 2
    id_l2: float = 0.0
    pretrain_epochs: int = 8
    inner_steps: int = 0
    inner_lr: float = 0.2
    learn_inner_lr: bool = False
    first_order: bool = True
    support_prior: float = 10.0
    support_half_life: float | None = None
    support_cut: float = 0.5
    freeze_request_embeddings: bool = True
    freeze_global_block: bool = False
    freeze_network: bool = True
    meta_epochs: int = 20
    meta_batch_tasks: int = 32
    meta_learning_rate: float = 1e-2
    meta_patience: int = 3
    finetune_lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    finetune_steps: tuple[int, ...] = (1, 3, 10)
    warm_start: str = "pretrain"
    meta_block: str = "mlp"
    adapt_inner_steps: int | None = None
    adapt_inner_lr: float | None = None
    adapt_support_prior: float | None = None
    adapt_embedding_steps: int | None = None
    adapt_embedding_prior: float | None = None
    embedding_steps: int = 2
    embedding_prior: float = 3.0
    learn_embedding_prior: bool = True
    differentiate_fit: bool = False
    sequence: SequenceOptions = SequenceOptions()

    def __post_init__(self):
        if self.meta_block not in META_BLOCKS:
            raise ValueError(
                f"Recipe.meta_block must be one of {META_BLOCKS}, got "
                f"{self.meta_block!r}"
            )
        if self.warm_start not in WARM_STARTS:
            raise ValueError(
                f"Recipe.warm_start must be one of {WARM_STARTS}, got "
                f"{self.warm_start!r}"
            )
        for name in (
            "meta_epochs",
            "pretrain_epochs",
            "inner_steps",
            "embedding_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"Recipe.{name} must be an integer >= 0, got {value!r}"
                )

    def meta_config(self, adapt: str = "meta_block") -> MetaConfig:
        return MetaConfig(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            learn_inner_lr=self.learn_inner_lr,
            first_order=self.first_order,
            adapt=adapt,
            jit_compile=True,
            embedding_steps=self.embedding_steps,
            embedding_prior=self.embedding_prior,
            learn_embedding_prior=self.learn_embedding_prior,
            differentiate_fit=self.differentiate_fit,
        )

    def full_maml(self) -> Recipe:
        """The recipe of the full-MAML baseline (`adapt="all"`): gradient steps
        on every dense weight from the member-ID pretraining, as MAML runs them
        (no frozen network, no embedding fit)."""
        return dataclasses.replace(
            self,
            warm_start="pretrain",
            freeze_network=False,
            meta_learning_rate=MAML_META_LEARNING_RATE,
            inner_steps=max(self.inner_steps, 1),
            embedding_steps=0,
            learn_embedding_prior=False,
            adapt_inner_steps=None,
            adapt_embedding_steps=None,
            adapt_embedding_prior=None,
        )

    def adaptation(self) -> dict[str, Any]:
        """The MetaConfig changes that turn the trained model into the scored
        (and exported) one: the test-time knobs, where set."""
        changes = {
            "inner_steps": self.adapt_inner_steps,
            "inner_lr": self.adapt_inner_lr,
            "support_prior": self.adapt_support_prior,
            "embedding_steps": self.adapt_embedding_steps,
            "embedding_prior": self.adapt_embedding_prior,
        }
        return {k: v for k, v in changes.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architecture"] = dataclasses.asdict(self.architecture)
        out["sequence"] = dataclasses.asdict(self.sequence)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Recipe:
        """The inverse of `to_dict` (lists become tuples).

        Raises:
            ValueError: A key that is not a Recipe field.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - fields)
        if unknown:
            raise ValueError(
                f"Unknown recipe field(s) {unknown}; expected some of {sorted(fields)}"
            )
        values = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in obj.items()
            if k not in ("architecture", "sequence")
        }
        for key, kind in (
            ("architecture", Architecture),
            ("sequence", SequenceOptions),
        ):
            if key in obj:
                values[key] = kind(
                    **{
                        k: tuple(v) if isinstance(v, list) else v
                        for k, v in obj[key].items()
                    }
                )
        return cls(**values)

    @classmethod
    def fast(cls) -> Recipe:
        """A quicker recipe (`limaml demo --fast`, tests): fewer epochs, smaller grid."""
        return cls(
            epochs=6,
            pretrain_epochs=4,
            meta_epochs=6,
            finetune_lrs=(0.01, 0.1),
            finetune_steps=(1, 3),
        )
