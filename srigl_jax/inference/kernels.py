"""Per-layer kernels that :func:`srigl_jax.condense` chooses from, and the call description they run on.

A kernel turns one layer's (kernel, mask, bias) into its own variables (host-side, once) and runs the layer's
call on them (jit-able). ``prepare`` sees one layer slice in the layout its module computes with (neurons on the
last axis; a stacked layer's slices one at a time, padded to a common shape, then stacked by ``condense``). Built in:

==================  ======  ==========================================================================
name                op      what runs
==================  ======  ==========================================================================
dense               both    the layer as it is (the model's own module; timed as the same lax op)
structured          both    the dense op on the active neurons only, output scattered to full width
condensed_ffi       linear  the C++ condensed product (CPU, float32; :mod:`srigl_jax._ffi_kernels`)
condensed_xla       linear  the pure-XLA condensed product
conv_patches_ffi    conv    patches (im2col) then the C++ condensed product
conv_patches_xla    conv    patches then the pure-XLA condensed product
conv_direct_ffi     conv    the C++ implicit-im2col conv kernel: no patches (:mod:`srigl_jax._ffi_conv`)
conv_direct_xla     conv    tap by tap gathers of the channel-major input, no patches (XLA)
==================  ======  ==========================================================================

Another formulation (e.g. an implicit-im2col conv kernel) plugs in with :func:`register_kernel`; ``condense``
measures every registered kernel that supports a layer. Ablated neurons (all-False mask columns) are never
computed by the non-dense kernels: their output is the bias (zero-skipping).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import _ffi_conv, _ffi_kernels
from srigl_jax.inference.dispatch import condensed_linear
from srigl_jax.inference.export import condense_kernel, condensed_variables
from srigl_jax.inference.layers import as_matrix
from srigl_jax.inference.ops import CondensedLinear, conv_padding_pairs, extract_patches, scatter_active

Array = jax.Array
LINEAR, CONV = "linear", "conv"


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What one call of a layer computes, besides its weights (static, hashable).

    op: "linear" (``x (..., *in) @ kernel (*in, out)``, contracting the last ``n_in_axes`` axes of x) or
    "conv" (2-D NHWC convolution with an HWIO kernel, no dilation, one feature group).
    padding: for convs, "SAME", "VALID" or one (low, high) pair per spatial axis.
    """

    op: str
    n_in_axes: int = 1
    window: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: str | tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """A layer's mask, summarised: the kernel shape one call computes with, fan-in k (None: not constant
    fan-in), active (non-ablated) neurons. For a stacked layer (``n_slices`` > 1), one slice: k and n_active are
    the largest over slices (the others are padded exactly to them)."""

    kernel_shape: tuple[int, ...]
    fan_in: int | None
    n_active: int
    n_out: int
    dense_mask: bool
    n_slices: int = 1


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One way to run a layer.

    unsupported(call, stats, x_dtype) -> '' if this kernel runs such a layer, else why not.
    prepare(kernel, mask, bias, call) -> the kernel's variables (a dict of arrays; host-side).
    apply(variables, x, call) -> y, the layer's output (jit-able).
    """

    name: str
    unsupported: Callable[[LayerCall, LayerStats, Any], str]
    prepare: Callable[[np.ndarray, np.ndarray, np.ndarray | None, LayerCall], dict[str, Array]]
    apply: Callable[[dict[str, Array], Array, LayerCall], Array]


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Make ``kernel`` a candidate of :func:`srigl_jax.condense` (and a name for its ``kernels=`` override)."""
    if not kernel.name or not isinstance(kernel.name, str):
        raise ValueError(f"a kernel needs a non-empty name, got {kernel.name!r}")
    KERNELS[kernel.name] = kernel
    return kernel


# --------------------------------------------------------------------------------------------------------------
# The dense ops (for the dense and structured kernels)
# --------------------------------------------------------------------------------------------------------------
def _flat_in(x: Array, call: LayerCall) -> Array:
    """Linear input (..., *in) -> (..., prod(in)) (the kernel's matrix view flattens its fan-in axes alike)."""
    if call.n_in_axes == 1:
        return x
    return x.reshape(*x.shape[:-call.n_in_axes], math.prod(x.shape[-call.n_in_axes:]))


def _nhwc(x: Array, call: LayerCall) -> tuple[Array, tuple[int, ...]]:
    """Conv input with any number of batch axes -> (N, H, W, C) and the batch axes to restore."""
    batch = x.shape[:-3]
    return x.reshape(math.prod(batch), *x.shape[-3:]), batch


def _conv(x: Array, kernel: Array, call: LayerCall) -> Array:
    x4, batch = _nhwc(x, call)
    padding = call.padding if isinstance(call.padding, str) else list(call.padding)
    y = jax.lax.conv_general_dilated(x4, kernel.astype(x.dtype), call.strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(*batch, *y.shape[1:])


def _dense_op(x: Array, kernel: Array, call: LayerCall) -> Array:
    if call.op == CONV:
        return _conv(x, kernel, call)
    return _flat_in(x, call) @ kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype)


def _bias_or_zeros(bias: np.ndarray | None, kernel: np.ndarray) -> np.ndarray:
    return np.zeros(kernel.shape[-1], kernel.dtype) if bias is None else np.asarray(bias)


def _always(call: LayerCall, stats: LayerStats, x_dtype: Any) -> str:
    return ""


def _prepare_dense(kernel, mask, bias, call):
    return {"kernel": jnp.asarray(kernel * mask), "bias": jnp.asarray(_bias_or_zeros(bias, kernel))}


def _apply_dense(v, x, call):
    return _dense_op(x, v["kernel"], call) + v["bias"].astype(x.dtype)


def _structured_unsupported(call, stats, x_dtype):
    if stats.n_active == stats.n_out:
        return "no ablated neurons (the same as dense)"
    if stats.n_active == 0:
        return "every neuron is ablated"
    return ""


def _prepare_structured(kernel, mask, bias, call):
    active = np.flatnonzero(as_matrix(mask).any(axis=0)).astype(np.int32)
    return {"kernel": jnp.asarray((kernel * mask)[..., active]), "bias": jnp.asarray(_bias_or_zeros(bias, kernel)),
            "active": jnp.asarray(active)}


def _apply_structured(v, x, call):
    return scatter_active(_dense_op(x, v["kernel"], call), v["active"], v["bias"])


# --------------------------------------------------------------------------------------------------------------
# The condensed kernels
# --------------------------------------------------------------------------------------------------------------
def _condensed_unsupported(op: str, backend: str):
    def unsupported(call, stats, x_dtype):
        if call.op != op:
            return f"{op} layers only"
        if stats.fan_in is None:
            return "mask is not constant fan-in"
        if stats.n_active == 0:
            return "every neuron is ablated"
        if backend == "ffi":
            if not _ffi_kernels.available():
                return _ffi_kernels.unavailable_reason()
            if jnp.dtype(x_dtype) != jnp.float32:
                return f"the C++ kernel is float32 only (input {jnp.dtype(x_dtype)})"
        return ""
    return unsupported


def _prepare_condensed(kernel, mask, bias, call):
    return condensed_variables(condense_kernel(as_matrix(kernel), as_matrix(mask), bias))


def _condensed_apply(backend: str):
    def apply(v, x, call):
        if call.op == CONV:
            x4, batch = _nhwc(x, call)
            pads = conv_padding_pairs(x4.shape[1:3], call.window, call.strides, call.padding)
            patches = extract_patches(x4, call.window, call.strides, pads)
            y = condensed_linear(patches, CondensedLinear.from_variables(v, patches.shape[-1]), backend=backend)
            return y.reshape(*batch, *y.shape[1:])
        x2 = _flat_in(x, call)
        return condensed_linear(x2, CondensedLinear.from_variables(v, x2.shape[-1]), backend=backend)
    return apply


def _direct_conv_unsupported(backend: str):
    patches = _condensed_unsupported(CONV, "xla")

    def unsupported(call, stats, x_dtype):
        why = patches(call, stats, x_dtype)
        if why or backend == "xla":
            return why
        if not _ffi_conv.available():
            return "the C++ conv kernel is not available"
        if jnp.dtype(x_dtype) != jnp.float32:
            return f"the C++ kernel is float32 only (input {jnp.dtype(x_dtype)})"
        return ""
    return unsupported


def _direct_conv_apply(backend: str):
    conv = _ffi_conv.condensed_conv2d_ffi if backend == "ffi" else _ffi_conv.condensed_conv2d_xla

    def apply(v, x, call):
        x4, batch = _nhwc(x, call)
        pads = conv_padding_pairs(x4.shape[1:3], call.window, call.strides, call.padding)
        layer = CondensedLinear.from_variables(v, math.prod(call.window) * x4.shape[-1])
        y = conv(x4, layer, call.window, call.strides, pads)
        return y.reshape(*batch, *y.shape[1:])
    return apply


DENSE = register_kernel(Kernel("dense", _always, _prepare_dense, _apply_dense))
register_kernel(Kernel("structured", _structured_unsupported, _prepare_structured, _apply_structured))
for _backend in ("ffi", "xla"):
    register_kernel(Kernel(f"condensed_{_backend}", _condensed_unsupported(LINEAR, _backend), _prepare_condensed,
                           _condensed_apply(_backend)))
    register_kernel(Kernel(f"conv_patches_{_backend}", _condensed_unsupported(CONV, _backend), _prepare_condensed,
                           _condensed_apply(_backend)))
    register_kernel(Kernel(f"conv_direct_{_backend}", _direct_conv_unsupported(_backend), _prepare_condensed,
                           _direct_conv_apply(_backend)))

# Kernels defined in other modules register themselves when imported (``register_kernel(Kernel(...))``); import
# such a module here so that ``condense`` always measures it.
