"""Per-layer rules of the sparse-training methods (see :mod:`srigl_jax.rules.base` for the protocol)."""

from srigl_jax.rules.base import LayerRule, LayerView, scores
from srigl_jax.rules.nm import NMRule
from srigl_jax.rules.rigl import RigLRule, SETRule, StaticRule
from srigl_jax.rules.srigl import SRigLRule

__all__ = ["LayerRule", "LayerView", "NMRule", "RigLRule", "SETRule", "SRigLRule", "StaticRule", "scores"]
