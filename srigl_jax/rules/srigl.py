"""SRigL's rule: constant fan-in, per-neuron regrowth, neuron ablation (spec: "One mask update of one layer")."""

from __future__ import annotations

import dataclasses

from srigl_jax import layer_updates as lu
from srigl_jax.rules.base import LayerView, scores


@dataclasses.dataclass(frozen=True)
class SRigLRule:
    """``gamma_sal``: ablate neurons with fewer than max(1, floor(gamma_sal * k0)) salient weights (>= 1: an
    absolute count); None disables ablation. Layers with ``plan.ablatable`` False are never ablated."""

    gamma_sal: float | None = 0.3
    random_tie_break: bool = False
    updates: bool = True

    def init_mask(self, key, plan):
        return lu.constant_fan_in_mask(key, plan.n_neurons, plan.fan_in, plan.k0)

    def update_mask(self, layer: LayerView, plan, key):
        w_score, g_score = scores(layer, key, self.random_tie_break)
        return lu.srigl_layer_mask(w_score, g_score, layer.mask, layer.drop_fraction, plan, self.gamma_sal)
