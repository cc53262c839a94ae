"""N:M constant fan-in: every active neuron keeps exactly N of each block of M consecutive fan-in positions
(e.g. 2:4, 1:8), with SRigL's magnitude drop, per-neuron gradient regrowth and neuron ablation.

Blocks run along a slice's fan-in rows, so for a Dense ``(in, out)`` kernel they are M consecutive inputs, and
for a Conv ``(kh, kw, c_in, out)`` kernel M consecutive input channels of one tap (``c_in % M == 0`` keeps
blocks inside a tap). The fan-in is fixed at k = N * fan_in / M, so an ablated neuron's weights are not
given to the survivors (the layer simply gets sparser); the salience threshold is SRigL's with k0 = k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from srigl_jax import layer_updates as lu
from srigl_jax.rules.base import LayerView, scores
from srigl_jax.selection import column_top_count_mask


def to_blocks(x: jax.Array, m: int) -> jax.Array:
    """(fan_in, n_neurons) -> (M, blocks * n_neurons): one column per (block, neuron)."""
    fan_in, n = x.shape
    return x.reshape(fan_in // m, m, n).transpose(1, 0, 2).reshape(m, (fan_in // m) * n)


def from_blocks(x: jax.Array, fan_in: int) -> jax.Array:
    """Inverse of :func:`to_blocks`."""
    m = x.shape[0]
    return x.reshape(m, fan_in // m, -1).transpose(1, 0, 2).reshape(fan_in, -1)


@dataclasses.dataclass(frozen=True)
class NMRule:
    """Per-layer N:M rule (see the module docstring)."""

    n: int
    m: int
    gamma_sal: float | None = 0.3
    random_tie_break: bool = False
    updates: bool = True

    def init_mask(self, key, plan):
        scores_ = jax.random.uniform(key, (self.m, plan.fan_in // self.m * plan.n_neurons))
        per_block = jnp.full((scores_.shape[1],), self.n)
        return from_blocks(column_top_count_mask(scores_, jnp.ones_like(scores_, bool), per_block), plan.fan_in)

    def update_mask(self, layer: LayerView, plan, key):
        w_score, g_score = scores(layer, key, self.random_tie_break)
        active, keep = lu.srigl_survivors_and_keep(w_score, g_score, layer.mask, layer.drop_fraction, plan,
                                                   self.gamma_sal)
        # Every (block, neuron) of a surviving neuron regrows its largest-|grad| free positions up to N.
        keep_b = to_blocks(keep, self.m)
        alive = jnp.tile(active, plan.fan_in // self.m)   # column b * n_neurons + j is neuron j
        need = jnp.where(alive, self.n - keep_b.sum(axis=0, dtype=jnp.int32), 0)
        grow = column_top_count_mask(to_blocks(g_score, self.m), ~keep_b, need)
        return from_blocks(keep_b | grow, plan.fan_in)
