"""The condensed representation and its portable (pure-XLA) product: a leaf module (imports nothing of srigl_jax).

A constant fan-in layer in condensed form stores ``values`` (n_active, k) and ``indices`` (n_active, k):
``y[b, active[n]] = sum_j values[n, j] * x[b, indices[n, j]] + bias[active[n]]``; ablated neurons (not in
``active``) output their bias alone. The C++ kernel (:mod:`srigl_jax._ffi_kernels`) and the dispatcher
(:mod:`srigl_jax.inference.dispatch`) build on this module; nothing here imports them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

# int16 indices halve the index traffic; they address inputs 0..32767.
_INT16_MAX_FAN_IN = int(np.iinfo(np.int16).max) + 1
# Batch size from which the XLA path switches from the per-sample gather to the transposed row gather.
_XLA_ROWS_FROM_BATCH = 4


@struct.dataclass
class CondensedLinear:
    """One constant fan-in layer in condensed form (a pytree; the int fields are static).

    ``values[n, j]`` multiplies input ``indices[n, j]`` for output neuron ``active[n]``; outputs of neurons not in
    ``active`` (ablated) are ``bias`` alone. ``bias`` has the full output width ``out_features``.
    """

    values: Array  # (n_active, k) float
    indices: Array  # (n_active, k) int16 if in_features <= 32768 else int32
    bias: Array  # (out_features,) float (zeros when the layer has no bias)
    active: Array  # (n_active,) int32, increasing: original index of each kept neuron
    in_features: int = struct.field(pytree_node=False)
    out_features: int = struct.field(pytree_node=False)

    @classmethod
    def from_variables(cls, variables: "Mapping[str, Array]", in_features: int) -> "CondensedLinear":
        """The layer stored as ``{values, indices, bias, active}`` (one entry of ``export_condensed``, or a
        condensed module's variables) with ``in_features`` inputs; ``out_features`` is the bias width.

        >>> v = {"values": jnp.ones((2, 3)), "indices": jnp.zeros((2, 3), jnp.int16), "bias": jnp.zeros(4),
        ...      "active": jnp.array([0, 2], jnp.int32)}
        >>> layer = CondensedLinear.from_variables(v, in_features=5)
        >>> layer.fan_in, layer.n_active, layer.out_features
        (3, 2, 4)
        """
        names = ("values", "indices", "bias", "active")
        missing = [name for name in names if name not in variables]
        if missing:
            raise KeyError(f"a condensed layer needs values, indices, bias and active; missing {missing}")
        values, indices, bias, active = (variables[name] for name in names)
        if values.ndim != 2 or indices.shape != values.shape:
            raise ValueError(f"values and indices must both be (n_active, k); got {values.shape} and {indices.shape}")
        if active.shape != values.shape[:1] or bias.ndim != 1 or bias.shape[0] < values.shape[0]:
            raise ValueError(f"active must be (n_active,) = {values.shape[:1]} and bias (out_features >= n_active,); "
                             f"got active {active.shape}, bias {bias.shape}")
        return cls(values, indices, bias, active, int(in_features), int(bias.shape[0]))

    @property
    def fan_in(self) -> int:
        """k': the number of inputs of every active neuron."""
        return int(self.values.shape[1])

    @property
    def n_active(self) -> int:
        return int(self.values.shape[0])


def require_layer(layer: object, caller: str) -> None:
    """A TypeError, with the way to build one, when ``layer`` is not a :class:`CondensedLinear` (e.g. the
    ``{values, indices, bias, active}`` dict that ``export_condensed`` stores: it lacks the input width)."""
    if not isinstance(layer, CondensedLinear):
        hint = (" (a dict of condensed variables: wrap it with CondensedLinear.from_variables(variables, "
                "in_features))" if isinstance(layer, Mapping) else "")
        raise TypeError(f"{caller}: layer must be a CondensedLinear, got {type(layer).__name__}{hint}")


def index_dtype_for(in_features: int) -> np.dtype:
    """The narrowest supported index dtype for a layer with ``in_features`` inputs (int16 or int32).

    >>> index_dtype_for(32768), index_dtype_for(32769)
    (dtype('int16'), dtype('int32'))
    """
    return np.dtype(np.int16) if in_features <= _INT16_MAX_FAN_IN else np.dtype(np.int32)


def _xla_gather_dot(x: Array, values: Array, indices: Array) -> Array:
    """(B, in) -> (B, n_active): per-sample gather then a row-wise dot. Best for tiny batches."""
    gathered = jnp.take(x, indices.astype(jnp.int32), axis=1)  # (B, n_active, k)
    return jnp.einsum("bnk,nk->bn", gathered, values)


def _xla_row_gather(x: Array, values: Array, indices: Array) -> Array:
    """(B, in) -> (B, n_active): loop over the k inputs of every neuron, gathering whole rows of x^T.

    Each step gathers n_active contiguous batch rows of x^T, so memory stays O(n_active * B) and the
    multiply-add vectorises along the batch.
    """
    x_t = x.T  # (in, B)
    idx = indices.astype(jnp.int32)

    def step(j, acc):
        return acc + values[:, j, None] * jnp.take(x_t, idx[:, j], axis=0)

    acc = jnp.zeros((values.shape[0], x.shape[0]), jnp.result_type(x, values))
    return jax.lax.fori_loop(0, values.shape[1], step, acc, unroll=4).T


def condensed_matmul_xla(x: Array, values: Array, indices: Array) -> Array:
    """Pure-XLA condensed product (B, in) -> (B, n_active); the formulation is chosen from the static batch."""
    if x.shape[0] < _XLA_ROWS_FROM_BATCH:
        return _xla_gather_dot(x, values, indices)
    return _xla_row_gather(x, values, indices)


def scatter_active(y_active: Array, active: Array, bias: Array) -> Array:
    """Full-width output (..., out) from the active neurons' outputs (..., n_active): ablated neurons output
    their bias. ``active`` is increasing; when it covers every neuron it is ``arange(out)``.

    >>> scatter_active(jnp.array([[1.0, 2.0]]), jnp.array([0, 2]), jnp.array([10.0, 20.0, 30.0])).tolist()
    [[11.0, 20.0, 32.0]]
    """
    bias = bias.astype(y_active.dtype)
    if y_active.shape[-1] == bias.shape[0]:
        return y_active + bias
    full = jnp.broadcast_to(bias, (*y_active.shape[:-1], bias.shape[0]))
    return full.at[..., active].add(y_active)


def condensed_linear_xla(x: Array, layer: CondensedLinear) -> Array:
    """The full-width condensed product (B, in) -> (B, out) in pure XLA (CPU, GPU, TPU; differentiable)."""
    return scatter_active(condensed_matmul_xla(x, layer.values, layer.indices), layer.active, layer.bias)


# --------------------------------------------------------------------------------------------------------------
# Convolution through patches
# --------------------------------------------------------------------------------------------------------------
def conv_padding_pairs(in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int],
                       padding: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Explicit (low, high) padding per spatial axis: 'SAME' / 'VALID' resolved exactly as ``lax.conv`` does.

    >>> conv_padding_pairs((5, 5), (3, 3), (2, 2), "SAME")
    [(1, 1), (1, 1)]
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}")
        return [tuple(p) for p in jax.lax.padtype_to_pads(tuple(in_hw), tuple(window), tuple(strides),
                                                          padding.upper())]
    pairs = [tuple(int(v) for v in p) for p in padding]
    if len(pairs) != len(window) or any(len(p) != 2 for p in pairs):
        raise ValueError(f"padding needs one (low, high) pair per spatial axis, got {padding!r}")
    return pairs


def extract_patches(x: Array, window: tuple[int, int], strides: tuple[int, int] = (1, 1),
                    padding: str | Sequence[tuple[int, int]] = "SAME") -> Array:
    """NHWC image -> (N, H', W', kh*kw*C) patches flattened in the (kh, kw, C) order of a Flax HWIO kernel."""
    kh, kw = window
    sh, sw = strides
    pads = conv_padding_pairs(x.shape[1:3], window, strides, padding)
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    out_h = (xp.shape[1] - kh) // sh + 1
    out_w = (xp.shape[2] - kw) // sw + 1
    taps = [xp[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.stack(taps, axis=3)  # (N, H', W', kh*kw, C)
    return patches.reshape(*patches.shape[:3], kh * kw * x.shape[3])
