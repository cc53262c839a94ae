"""Unstructured baselines: RigL (magnitude drop, gradient growth), SET (random growth) and static masks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from srigl_jax import layer_updates as lu
from srigl_jax.rules.base import LayerView, scores


def _random_layer_mask(key, plan):
    """Exactly T positions anywhere in the slice, uniformly at random."""
    return lu.uniform_random_mask(key, plan.n_neurons, plan.fan_in, plan.nnz_budget)


@dataclasses.dataclass(frozen=True)
class RigLRule:
    """RigL (Evci et al. 2020): drop the smallest |w|, grow the largest |dense grad|, nnz per layer kept."""

    random_tie_break: bool = False
    updates: bool = True

    def init_mask(self, key, plan):
        return _random_layer_mask(key, plan)

    def update_mask(self, layer: LayerView, plan, key):
        w_score, g_score = scores(layer, key, self.random_tie_break)
        return lu.unstructured_layer_mask(w_score, g_score, layer.mask, layer.drop_fraction)


@dataclasses.dataclass(frozen=True)
class SETRule:
    """Sparse Evolutionary Training: magnitude drop, growth at uniformly random positions."""

    random_tie_break: bool = False
    updates: bool = True

    def init_mask(self, key, plan):
        return _random_layer_mask(key, plan)

    def update_mask(self, layer: LayerView, plan, key):
        kw, kg = jax.random.split(key)
        w_score, _ = scores(layer, kw, self.random_tie_break)
        random_score = jax.random.uniform(kg, layer.mask.shape, jnp.float32)
        return lu.unstructured_layer_mask(w_score, random_score, layer.mask, layer.drop_fraction)


@dataclasses.dataclass(frozen=True)
class StaticRule:
    """The initial random mask, never changed."""

    updates: bool = False

    def init_mask(self, key, plan):
        return _random_layer_mask(key, plan)

    def update_mask(self, layer: LayerView, plan, key):
        return layer.mask
