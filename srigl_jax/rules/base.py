"""The per-layer rule protocol: what one sparse-training method does to ONE layer slice.

A rule sees one layer slice as ``(fan_in, n_neurons)`` matrices (one column per neuron; see
:mod:`srigl_jax.layout`) and returns a boolean mask of the same shape. Everything else (walking the pytree,
slicing stacked kernels, batching layers of equal shape, the update schedule, growth-gradient averaging,
zeroing grown weights, checks) is done once by the driver, :class:`srigl_jax.DynamicSparsity`.

A rule is a small frozen dataclass with:

* ``updates``: False for a rule whose masks never change (the driver then skips the update entirely);
* ``init_mask(key, plan) -> mask``: the initial mask of one slice (``plan`` gives fan_in, n_neurons, the
  budget T = ``plan.nnz_budget`` and k0);
* ``update_mask(layer, plan, key) -> mask``: the new mask at an update step, from a :class:`LayerView`.

Rules must be pure and jit-able with ``plan`` static (plain Python ints); the driver calls them once per slice
with that slice's own key.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import jax

from srigl_jax.plans import LayerPlan
from srigl_jax.selection import magnitude_score, perturb_ties


class LayerView(NamedTuple):
    """One layer slice at an update step, all ``(fan_in, n_neurons)`` except ``drop_fraction`` (a scalar)."""

    weights: jax.Array
    grads: jax.Array          # dense gradients (or their window mean): the growth signal
    mask: jax.Array           # bool, the current mask
    drop_fraction: jax.Array  # float32 d(step) of the cosine schedule


@runtime_checkable
class LayerRule(Protocol):
    """See the module docstring."""

    updates: bool

    def init_mask(self, key: jax.Array, plan: LayerPlan) -> jax.Array: ...

    def update_mask(self, layer: LayerView, plan: LayerPlan, key: jax.Array) -> jax.Array: ...


def scores(layer: LayerView, key: jax.Array, random_tie_break: bool) -> tuple[jax.Array, jax.Array]:
    """(|w|, |g|) as non-negative float32 scores; with ``random_tie_break`` ties are broken by a seeded tiny
    perturbation instead of lower index first."""
    w_score, g_score = magnitude_score(layer.weights), magnitude_score(layer.grads)
    if random_tie_break:
        kw, kg = jax.random.split(key)
        w_score, g_score = perturb_ties(w_score, kw), perturb_ties(g_score, kg)
    return w_score, g_score
