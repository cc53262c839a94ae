"""Condensed 2-D convolution without patches: the C++ kernel ``srigl_condensed_conv2d`` (CPU, XLA FFI) and its
portable XLA counterpart.

A condensed conv layer is a :class:`~srigl_jax.inference.ops.CondensedLinear` over the flattened Flax HWIO kernel
(kh*kw*C_in -> C_out): flat index ``i`` of a neuron's tap addresses ``dy = i // (kw*C_in)``,
``dx = (i // C_in) % kw``, ``c = i % C_in``. :func:`condensed_conv2d` gathers those taps straight from the NHWC
input inside the kernel (implicit im2col: no (N, H', W', kh*kw*C_in) patch tensor; layout and loop order in
srigl_jax/csrc/condensed_conv.h). The kernel lives in the same shared library as the condensed product and
follows its settings (srigl_jax._ffi_kernels: SRIGL_JAX_CONDENSED_MAX_THREADS, _MIN_THREAD_WORK, _ISA).

>>> import numpy as np
>>> from srigl_jax.inference import condense_kernel
>>> kernel = np.zeros((3, 3, 2, 1), np.float32); kernel[1, 1, 0, 0] = 2.0  # centre tap of channel 0
>>> layer = condense_kernel(kernel.reshape(18, 1), kernel.reshape(18, 1) != 0)
>>> x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
>>> np.asarray(condensed_conv2d(x, layer, (3, 3), padding="SAME"))[0, :, :, 0]
array([[ 0.,  4.],
       [ 8., 12.]], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import _ffi_kernels
from srigl_jax.inference.ops import CondensedLinear, condensed_linear_xla, extract_patches, require_layer

CONV_TARGET_NAME = "srigl_condensed_conv2d"
Padding = Union[str, Sequence[tuple[int, int]]]
Pads = tuple[tuple[int, int], tuple[int, int]]
_MAX_XLA_OFFSET = 2**31 - 1  # the XLA formulation's tap offsets are int32


# ---------------------------------------------------------------------------------------------------- geometry
def conv_padding(padding: Padding, in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int]) -> Pads:
    """((top, bottom), (left, right)) zero padding for 'SAME', 'VALID' or explicit pairs, as
    ``lax.conv_general_dilated`` pads (negative explicit padding is not supported).

    >>> conv_padding("SAME", (16, 16), (3, 3), (2, 2))
    ((0, 1), (0, 1))
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or ((top, bottom), (left, right)), got {padding!r}")
        pads = jax.lax.padtype_to_pads(tuple(in_hw), tuple(window), tuple(strides), padding.upper())
    else:
        pads = [tuple(p) for p in padding]
        if len(pads) != 2 or any(len(p) != 2 for p in pads):
            raise ValueError(f"explicit padding must be ((top, bottom), (left, right)), got {padding!r}")
    out = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(v < 0 for pair in out for v in pair):
        raise ValueError(f"padding must be non-negative, got {out}")
    return out  # type: ignore[return-value]


def conv_output_hw(in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int], pads: Pads) -> tuple[int, int]:
    """Output rows and columns of the convolution (0 when the padded input is smaller than the window)."""
    return tuple((n + lo + hi - w) // s + 1 if n + lo + hi >= w else 0  # type: ignore[return-value]
                 for n, w, s, (lo, hi) in zip(in_hw, window, strides, pads))


def _check_geometry(x, layer: CondensedLinear, window, strides) -> tuple[tuple[int, int], tuple[int, int]]:
    window = tuple(int(w) for w in window)
    strides = tuple(int(s) for s in strides)
    if len(window) != 2 or len(strides) != 2 or min(window) < 1 or min(strides) < 1:
        raise ValueError(f"window and strides must be two positive ints, got {window}, {strides}")
    if x.ndim != 4:
        raise ValueError(f"condensed_conv2d: expected NHWC input (4-D), got shape {x.shape}")
    if window[0] * window[1] * x.shape[3] != layer.in_features:
        raise ValueError(f"condensed_conv2d: window {window} x {x.shape[3]} input channels = "
                         f"{window[0] * window[1] * x.shape[3]} taps, layer expects {layer.in_features}")
    return window, strides  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- XLA
def _plane_geometry(in_hw, window, strides, pads) -> tuple[int, int]:
    """(Hq, Wq): rows and columns of the stride phases of the padded input (srigl_jax/csrc/condensed_conv.h)."""
    (h, w), (kh, kw), (sh, sw) = in_hw, window, strides
    oh, ow = conv_output_hw(in_hw, window, strides, pads)
    return (max(oh + (kh - 1) // sh, -(-(h + pads[0][0]) // sh)),
            max(ow + (kw - 1) // sw, -(-(w + pads[1][0]) // sw)))


def condensed_conv2d_xla(x, layer: CondensedLinear, window: Sequence[int], strides: Sequence[int] = (1, 1),
                         padding: Padding = "SAME"):
    """Portable (CPU/GPU) condensed convolution in XLA, without patches (the formulation the FFI kernel falls back
    to off CPU and differentiates through).

    The zero-padded input is split into its stride phases and laid out channel-major, as the kernel packs it
    (planes (sh, sw, C) of (B, Hq, Wq) positions, flattened): every tap of a neuron is then one constant offset,
    so tap j of all neurons is one gather of n_active contiguous slices, accumulated over the k taps
    (memory O(n_active * B * Hq * Wq); the patch tensor would be kh*kw*C_in / n_active times larger). Positions
    in the padding rows and columns are computed and dropped.
    """
    window, strides = _check_geometry(x, layer, window, strides)
    pads = conv_padding(padding, x.shape[1:3], window, strides)
    (kh, kw), (sh, sw) = window, strides
    batch, h, w, c_in = x.shape
    oh, ow = conv_output_hw((h, w), window, strides, pads)
    dtype = jnp.result_type(x, layer.values)
    if oh == 0 or ow == 0:  # the padded input is smaller than the window
        return jnp.zeros((batch, oh, ow, layer.out_features), dtype)
    hq, wq = _plane_geometry((h, w), window, strides, pads)
    plane = batch * hq * wq
    last_shift = ((kh - 1) // sh) * wq + (kw - 1) // sw
    if min(sh, kh) * min(sw, kw) * c_in * plane + last_shift > _MAX_XLA_OFFSET:  # int32 offsets; such inputs go through patches
        return _patches_conv_xla(x, layer, window, strides, pads)
    xp = jnp.pad(x, [(0, 0), (pads[0][0], hq * sh - h - pads[0][0]), (pads[1][0], wq * sw - w - pads[1][0]), (0, 0)])
    ph, pw = min(sh, kh), min(sw, kw)  # phases some tap reads (a 1x1 stride-2 window reads one of four)
    planes = xp.reshape(batch, hq, sh, wq, sw, c_in)[:, :, :ph, :, :pw].transpose(2, 4, 5, 0, 1, 3)
    # planes: (ph, pw, C, B, Hq, Wq)
    flat = jnp.pad(planes.reshape(-1), (0, last_shift))  # every slice [offset, offset + plane) stays inside
    i = layer.indices.astype(jnp.int32)
    dy, dx, c = i // (kw * c_in), (i // c_in) % kw, i % c_in
    offsets = (((dy % sh) * pw + dx % sw) * c_in + c) * plane + (dy // sh) * wq + dx // sw  # (n_active, k)
    rows = jax.vmap(lambda start: jax.lax.dynamic_slice(flat, (start,), (plane,)))  # one gather of n_active slices

    def step(j, acc):
        return acc + layer.values[:, j, None].astype(dtype) * rows(offsets[:, j])

    acc = jax.lax.fori_loop(0, layer.fan_in, step, jnp.zeros((layer.n_active, plane), dtype), unroll=4)
    y = acc.reshape(-1, batch, hq, wq)[:, :, :oh, :ow].transpose(1, 2, 3, 0)  # (B, OH, OW, n_active)
    bias = layer.bias.astype(dtype)
    if layer.n_active == layer.out_features:
        return y + bias  # active is arange(out) here (sorted, all neurons)
    return jnp.broadcast_to(bias, (batch, oh, ow, layer.out_features)).at[..., layer.active].add(y)


def _patches_conv_xla(x, layer: CondensedLinear, window, strides, pads: Pads):
    """Patches of the explicitly padded input, then the condensed product (for inputs too large for int32
    offsets)."""
    xp = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    patches = extract_patches(xp, window, strides, "VALID")
    y = condensed_linear_xla(patches.reshape(-1, patches.shape[-1]), layer)   # the product takes (rows, in)
    return y.reshape(*patches.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------------------------- FFI
def _smoke_result() -> None:
    # 1x1 conv with two taps per neuron and an ablated channel, stride 2 and SAME padding on a 3x3 image
    x = np.arange(18, dtype=np.float32).reshape(1, 3, 3, 2)
    out = np.asarray(jax.jit(_ffi_call, static_argnums=(5, 6, 7, 8))(
        x, np.array([[1.0, -1.0]], np.float32), np.array([[0, 1]], np.int16), np.array([0.5, 7.0], np.float32),
        np.array([1], np.int32), 2, (1, 1), (2, 2), ((0, 0), (0, 0))))
    if out.shape != (1, 2, 2, 2) or not np.allclose(out[..., 0], 0.5) or not np.allclose(out[..., 1], 6.0):
        raise RuntimeError(f"conv smoke test gave {out.tolist()}")


_TARGET = _ffi_kernels.LibraryTarget(CONV_TARGET_NAME, "SriglCondensedConv2d", _smoke_result, "conv kernel")


def _load() -> dict[str, object]:
    """Register the conv target of the loaded kernel library once; records why not instead of raising."""
    return _TARGET.load()


def available() -> bool:
    """True if the C++ conv kernel is built and registered with XLA."""
    return bool(_load()["ok"])


def unsupported_reason(x, layer: CondensedLinear) -> str:
    """'' if the kernel handles these operands, else why not."""
    if not available():
        return str(_load()["reason"])
    if x.ndim != 4:
        return f"expects NHWC input, got shape {x.shape}"
    if x.dtype != jnp.float32 or layer.values.dtype != jnp.float32:
        return f"kernel is float32 only (x {x.dtype}, values {layer.values.dtype})"
    if layer.indices.dtype not in (jnp.int16, jnp.int32):
        return f"kernel takes int16/int32 indices, got {layer.indices.dtype}"
    return ""


def _ffi_call(x, values, indices, bias, active, out_features: int, window, strides, pads: Pads):
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, pads
    oh, ow = conv_output_hw(x.shape[1:3], window, strides, pads)
    call = jax.ffi.ffi_call(CONV_TARGET_NAME, jax.ShapeDtypeStruct((x.shape[0], oh, ow, out_features), jnp.float32),
                            vmap_method="sequential")
    i64 = np.int64
    return call(x, values, indices, bias.astype(jnp.float32), active.astype(jnp.int32),
                kh=i64(kh), kw=i64(kw), sh=i64(sh), sw=i64(sw), pt=i64(pt), pb=i64(pb), pl=i64(pl), pr=i64(pr),
                max_threads=i64(_ffi_kernels._max_threads()), min_thread_work=i64(_ffi_kernels._min_thread_work()),
                isa=i64(_ffi_kernels._isa_level()))


def _as_layer(values, indices, bias, active, in_features: int, out_features: int) -> CondensedLinear:
    return CondensedLinear(values, indices, bias, active, in_features, out_features)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _conv_ffi(x, values, indices, bias, active, static: tuple):
    """static: (out_features, window, strides, pads), hashable."""
    return _ffi_call(x, values, indices, bias, active, *static)


@_conv_ffi.defjvp
def _conv_ffi_jvp(static, primals, tangents):
    # Differentiate through the equivalent XLA formulation (the kernel itself is forward only).
    out_features, window, strides, pads = static

    def xla(x, values, indices, bias, active):
        layer = _as_layer(values, indices, bias, active, window[0] * window[1] * x.shape[3], out_features)
        return condensed_conv2d_xla(x, layer, window, strides, pads)

    _, tangent_out = jax.jvp(xla, primals, tangents)
    return _conv_ffi(*primals, static), tangent_out


def condensed_conv2d_ffi(x, layer: CondensedLinear, window: Sequence[int], strides: Sequence[int] = (1, 1),
                         padding: Padding = "SAME"):
    """NHWC convolution with a condensed (kh*kw*C_in -> C_out) layer on the C++ kernel; ValueError if the kernel
    cannot run these operands. On a non-CPU backend this lowers to :func:`condensed_conv2d_xla`
    (lax.platform_dependent), so jit-ed code stays portable."""
    window, strides = _check_geometry(x, layer, window, strides)
    reason = unsupported_reason(x, layer)
    if reason:
        raise ValueError(f"condensed conv FFI kernel unavailable: {reason}")
    pads = conv_padding(padding, x.shape[1:3], window, strides)
    static = (layer.out_features, window, strides, pads)

    def cpu(x, values, indices, bias, active):
        return _conv_ffi(x, values, indices, bias, active, static)

    def xla(x, values, indices, bias, active):
        return condensed_conv2d_xla(x, _as_layer(values, indices, bias, active, layer.in_features,
                                                 layer.out_features), window, strides, pads)

    return jax.lax.platform_dependent(x, layer.values, layer.indices, layer.bias, layer.active, cpu=cpu,
                                      default=xla)


def condensed_conv2d(x, layer: CondensedLinear, window: Sequence[int], strides: Sequence[int] = (1, 1),
                     padding: Padding = "SAME", *, backend: str = "auto"):
    """y = conv(x, densified layer) + bias for NHWC ``x`` (B, H, W, C_in) -> (B, H', W', C_out), without patches.

    backend: "auto" (the C++ kernel on CPU when it can run these operands, else XLA), "ffi" (error if it
    cannot) or "xla". padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    """
    require_layer(layer, "condensed_conv2d")
    if backend not in ("auto", "ffi", "xla"):
        raise ValueError(f"backend must be 'auto', 'ffi' or 'xla', got {backend!r}")
    if backend == "ffi" or (backend == "auto" and unsupported_reason(x, layer) == ""
                            and not _ffi_kernels.forced_off()):
        return condensed_conv2d_ffi(x, layer, window, strides, padding)
    return condensed_conv2d_xla(x, layer, window, strides, padding)
