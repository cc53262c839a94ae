"""srigl-jax: SRigL (Structured RigL) dynamic sparse training in JAX.

Masks are boolean pytrees alongside params; ``update_masks`` is pure and jit-able; ``sparse_optimizer`` is one
optax transformation that owns masks, step, growth window and key (drop-in for optax, Flax ``TrainState`` and
``nnx.Optimizer``); ``apply_masks`` and ``reset_optimizer_state`` are its public pieces.
"""

from srigl_jax import analysis  # noqa: F401  (plotting is imported separately: it selects a backend)
from srigl_jax import layout, rules  # noqa: F401
from srigl_jax.algorithms import (
    NM,
    SET,
    DynamicSparsity,
    MaskUpdateInfo,
    RigL,
    SRigL,
    Static,
    any_nonfinite,
)
from srigl_jax.inference import (
    CondensedConv,
    CondensedModel,
    CondensedDense,
    CondensedLinear,
    condense,
    condensed_conv,
    condensed_linear,
    export_condensed,
    export_structured,
)
from srigl_jax.metrics import init_itop, itop_rate, sparsity_metrics, update_itop
from srigl_jax.optim import (
    SparseApplyResult,
    SparseState,
    SparseStepResult,
    apply_masks,
    get_masks,
    get_sparse_state,
    reset_optimizer_state,
    sparse_apply,
    sparse_optimizer,
    sparse_step,
)
from srigl_jax.paths import path_str
from srigl_jax.layout import Layout, infer_layouts
from srigl_jax.plans import DEFAULT_DENSE_PATHS, DEFAULT_SPARSE_PATTERN, FanIn, LayerPlan, layer_sparsities

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "CondensedConv",
    "CondensedDense",
    "CondensedLinear",
    "CondensedModel",
    "condense",
    "condensed_conv",
    "condensed_linear",
    "export_condensed",
    "export_structured",
    "DEFAULT_DENSE_PATHS",
    "DEFAULT_SPARSE_PATTERN",
    "DynamicSparsity",
    "FanIn",
    "Layout",
    "LayerPlan",
    "NM",
    "MaskUpdateInfo",
    "RigL",
    "SET",
    "SRigL",
    "SparseApplyResult",
    "SparseState",
    "SparseStepResult",
    "Static",
    "any_nonfinite",
    "apply_masks",
    "get_masks",
    "get_sparse_state",
    "infer_layouts",
    "init_itop",
    "itop_rate",
    "layer_sparsities",
    "layout",
    "path_str",
    "reset_optimizer_state",
    "rules",
    "sparse_apply",
    "sparse_optimizer",
    "sparse_step",
    "sparsity_metrics",
    "update_itop",
]
