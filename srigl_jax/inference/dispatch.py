"""The condensed product with a backend choice: the C++ FFI kernel on CPU when it is built, else pure XLA.

Environment: ``SRIGL_JAX_CONDENSED_FORCE_XLA=1`` makes ``backend="auto"`` use XLA (read when traced).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax

from srigl_jax import _ffi_conv, _ffi_kernels
from srigl_jax._ffi_kernels import FORCE_XLA_ENV
from srigl_jax.inference.ops import CondensedLinear, condensed_linear_xla, require_layer

Array = jax.Array
BACKENDS = ("auto", "xla", "ffi")


def use_ffi_kernel(x: Array, layer: CondensedLinear) -> bool:
    """True when the C++ kernel is built, not disabled, and supports these dtypes on this backend."""
    if _ffi_kernels.forced_off():
        return False
    return _ffi_kernels.supports(x, layer.values, layer.indices)


def condensed_linear(x: Array, layer: CondensedLinear, *, backend: str = "auto") -> Array:
    """y = x @ W_masked + bias for a condensed layer; x (..., in) -> (..., out).

    backend: "auto" (the FFI kernel on CPU when available, else XLA), "xla", or "ffi" (error if unavailable).
    Set the environment variable SRIGL_JAX_CONDENSED_FORCE_XLA=1 to make "auto" use XLA.
    """
    require_layer(layer, "condensed_linear")
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"condensed_linear: x has {x.shape[-1]} features, layer expects {layer.in_features}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), layer.in_features)  # not -1: in_features may be 0
    if backend == "ffi" or (backend == "auto" and use_ffi_kernel(x2, layer)):
        y = _ffi_kernels.condensed_matmul_ffi(x2, layer.values, layer.indices, layer.bias, layer.active,
                                              layer.out_features)
    else:
        y = condensed_linear_xla(x2, layer)
    return y.reshape(*lead, layer.out_features)


def condensed_conv(x: Array, layer: CondensedLinear, window: tuple[int, int], strides: tuple[int, int] = (1, 1),
                   padding: str | Sequence[tuple[int, int]] = "SAME", *, backend: str = "auto") -> Array:
    """A 2-D NHWC convolution with a condensed (kh*kw*in -> out) kernel, without patches
    (:func:`srigl_jax._ffi_conv.condensed_conv2d`: the C++ implicit-im2col kernel on CPU, else XLA).

    ``padding``: 'SAME', 'VALID' or one (low, high) pair per spatial axis.
    """
    return _ffi_conv.condensed_conv2d(x, layer, window, strides, padding, backend=backend)
