"""Flax linen modules that hold a condensed layer: params {values, indices, bias, active} from
:func:`~srigl_jax.inference.export.export_condensed`. For an unchanged model, prefer :func:`srigl_jax.condense`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from srigl_jax.inference.dispatch import condensed_conv, condensed_linear
from srigl_jax.inference.ops import CondensedLinear, index_dtype_for

Array = jax.Array


class CondensedDense(nn.Module):
    """Dense layer stored in condensed form: params {values, indices, bias, active} from :func:`export_condensed`.

    Shapes come from the params it is applied with (a structured export may have changed the widths), so
    ``features`` (output width), ``fan_in`` and ``n_active`` only shape a fresh ``init`` (zero weights).
    """

    features: int
    fan_in: int | None = None
    n_active: int | None = None
    backend: str = "auto"

    def _layer(self, in_features: int) -> CondensedLinear:
        k = self.fan_in or in_features
        n_act = self.n_active or self.features
        dtype = index_dtype_for(in_features)
        # self.variable (not self.param): no check against these init shapes when applied with exported params
        values = self.variable("params", "values", lambda: jnp.zeros((n_act, k), jnp.float32)).value
        indices = self.variable("params", "indices", lambda: jnp.zeros((n_act, k), dtype)).value
        bias = self.variable("params", "bias", lambda: jnp.zeros((self.features,), jnp.float32)).value
        active = self.variable("params", "active", lambda: jnp.arange(n_act, dtype=jnp.int32)).value
        return CondensedLinear(values, indices, bias, active, in_features, int(bias.shape[0]))

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return condensed_linear(x, self._layer(x.shape[-1]), backend=self.backend)


class CondensedConv(CondensedDense):
    """2-D NHWC convolution stored in condensed form (patches + condensed product); params as CondensedDense."""

    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        patch_features = self.kernel_size[0] * self.kernel_size[1] * x.shape[-1]
        return condensed_conv(x, self._layer(patch_features), tuple(self.kernel_size), tuple(self.strides),
                              self.padding, backend=self.backend)
