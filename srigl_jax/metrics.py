"""Jit-friendly sparsity metrics: per-layer and global sparsity, active neurons, fan-in k', ITOP."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from srigl_jax.paths import named_leaves
from srigl_jax.plans import LayerPlan

PyTree = Any


def _layer_masks(masks: PyTree, plans: Mapping[str, LayerPlan]) -> dict[str, jax.Array]:
    leaves, _ = named_leaves(masks)
    return {p: m for p, m in leaves if p in plans}


def sparsity_metrics(masks: PyTree, plans: Mapping[str, LayerPlan]) -> dict[str, jax.Array]:
    """Scalars keyed ``"<metric>/<path>"`` plus global ones, all computed from the masks.

    Per layer (a stacked leaf pooled over its slices, each slice's neurons counted separately): ``sparsity``,
    ``active_neurons`` (neurons with any active weight), ``fan_in`` (max fan-in, = k' for SRigL) and
    ``fan_in_min`` (min over active neurons; equals ``fan_in`` iff the layer has constant fan-in). Global:
    ``global_sparsity`` over all candidate layers, ``active_neuron_fraction`` over the sparse ones.
    """
    out: dict[str, jax.Array] = {}
    nnz_total, numel_total, active_total, neurons_total = 0, 0, 0, 0
    for path, m in _layer_masks(masks, plans).items():
        plan = plans[path]
        fan_in = plan.layout.neuron_fan_in(m)
        active = fan_in > 0
        nnz = jnp.sum(fan_in)
        out[f"sparsity/{path}"] = 1.0 - nnz / plan.total_numel
        out[f"active_neurons/{path}"] = jnp.sum(active, dtype=jnp.int32)
        out[f"fan_in/{path}"] = jnp.max(fan_in)
        out[f"fan_in_min/{path}"] = jnp.min(jnp.where(active, fan_in, jnp.iinfo(jnp.int32).max))
        nnz_total += nnz
        numel_total += plan.total_numel
        if not plan.is_dense:
            active_total += out[f"active_neurons/{path}"]
            neurons_total += plan.n_neurons * plan.n_slices
    out["global_sparsity"] = 1.0 - nnz_total / max(numel_total, 1)
    out["active_neuron_fraction"] = jnp.asarray(active_total / max(neurons_total, 1), jnp.float32)
    return out


def init_itop(masks: PyTree) -> PyTree:
    """ITOP state: which positions have ever been active (starts as the initial masks)."""
    return jax.tree.map(jnp.asarray, masks)


def update_itop(itop: PyTree, masks: PyTree) -> PyTree:
    """Union of the positions ever active with the current masks."""
    return jax.tree.map(jnp.logical_or, itop, masks)


def itop_rate(itop: PyTree, plans: Mapping[str, LayerPlan]) -> jax.Array:
    """In-Time Over-Parameterisation rate: fraction of the sparse layers' positions ever active."""
    ever, numel = 0, 0
    for path, m in _layer_masks(itop, plans).items():
        if not plans[path].is_dense:
            ever += jnp.sum(m, dtype=jnp.int32)
            numel += plans[path].total_numel
    return jnp.asarray(ever / max(numel, 1), jnp.float32)
