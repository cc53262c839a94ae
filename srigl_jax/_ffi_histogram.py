"""The radix-select histogram pass on the C++ kernel (``srigl_radix_histogram``, CPU, XLA FFI).

One pass of :mod:`srigl_jax.selection`'s exact radix select counts the sortable keys of (score, eligible) per bin
of a window. XLA:CPU runs that pass as a serial scatter-add; the kernel computes the same integer counts on
XLA's CPU thread pool, so a selection gives bit-identical masks either way (tests/test_selection_kernel.py).
It lives in the condensed kernels' shared library and follows its settings (``srigl_jax._ffi_kernels``:
``SRIGL_JAX_CONDENSED_FORCE_XLA=1`` uses XLA's scatter instead, ``SRIGL_JAX_CONDENSED_MAX_THREADS``). Off CPU,
or without the built library, the selection uses XLA's scatter-add.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import _ffi_kernels  # imported by selection.py only when it first selects: no import cycle

TARGET_NAME = "srigl_radix_histogram"


def _smoke_result() -> None:
    score = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], np.float32)
    eligible = np.array([[True, True], [False, True], [True, True]])
    keys = np.where(eligible, score.view(np.int32), -1)
    lo, shift = np.array([1.0], np.float32).view(np.int32), np.array([20], np.int32)  # 0.0 and 2.0 dropped
    got = np.asarray(jax.jit(_ffi_call, static_argnums=(4, 5))(score, eligible, lo, shift, 4, False))
    want = np.bincount(np.minimum((keys[keys >= lo[0]] - lo[0]) >> 20, 16), minlength=17)  # bins 0, 12, 16, 16
    if not np.array_equal(got, want):
        raise RuntimeError(f"histogram smoke test gave {got.tolist()}, expected {want.tolist()}")


_TARGET = _ffi_kernels.LibraryTarget(TARGET_NAME, "SriglRadixHistogram", _smoke_result, "histogram kernel")


def usable() -> bool:
    """True if selections should run their histogram passes on the kernel (built, registered, not forced off)."""
    return not _ffi_kernels.forced_off() and bool(_TARGET.load()["ok"])


def _ffi_call(score, eligible, lo, shift, digit_bits: int, per_column: bool):
    groups = score.shape[1] if per_column else 1
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((((1 << digit_bits) + 1) * groups,), jnp.int32),
                            vmap_method="sequential")
    return call(score.astype(jnp.float32), eligible.astype(bool), lo.astype(jnp.int32), shift.astype(jnp.int32),
                digit_bits=np.int64(digit_bits), per_column=np.int64(per_column),
                max_threads=np.int64(_ffi_kernels._max_threads()))


def window_histogram_table(score, eligible, lo, shift, digit_bits: int, per_column: bool) -> jax.Array:
    """The flat ((2**digit_bits + 1) * groups,) int32 table of one radix pass over the keys of (score, eligible)
    (layout and semantics: ``selection._window_histogram``). CPU only: callers dispatch per platform."""
    groups = score.shape[1] if per_column else 1
    return _ffi_call(score, jnp.broadcast_to(eligible, score.shape), jnp.broadcast_to(lo, (groups,)),
                     jnp.broadcast_to(shift, (groups,)), digit_bits, per_column)
