"""The exact top-n selection (``srigl_top_select``) and per-column counts (``srigl_column_counts``) on the C++
kernels (CPU, XLA FFI).

:func:`srigl_jax.selection.top_n_mask` and ``column_top_count_mask`` select the n largest sortable keys of
(score, eligible), ties to the lower position: one well-defined set, which the kernel computes in one call instead
of XLA's while loop of radix passes. The masks are identical either way (tests/test_selection_kernel.py); what
changes is that every call site compiles to one custom call instead of 70-160 fused kernels, which dominated the
compile time of ``update_masks`` (bench/compile_update.py). Likewise for the per-column counts of a boolean mask
(fan-in, kept weights), which XLA:CPU compiles into four kernels each. Both live in the condensed kernels' shared library
and follows its settings (``srigl_jax._ffi_kernels``: ``SRIGL_JAX_CONDENSED_FORCE_XLA=1`` uses the XLA
formulation instead, ``SRIGL_JAX_CONDENSED_MAX_THREADS``). Off CPU, or without the built library, both use
their XLA formulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import _ffi_kernels  # imported by selection.py only when it first selects: no import cycle

TARGET_NAME = "srigl_top_select"


def reference_select(score: np.ndarray, eligible: np.ndarray, n, per_column: bool) -> np.ndarray:
    """The selection's definition in numpy (lexsort): the n largest keys (n clipped to [0, #eligible]; keys < 0,
    i.e. ineligible entries and negative scores, never), ties to the lower position."""
    keys = np.where(eligible, np.asarray(score, np.float32).view(np.int32), -1).astype(np.int64)
    out = np.zeros(keys.shape, bool)
    if per_column:
        rows = np.arange(keys.shape[0])
        for c in range(keys.shape[1]):
            order = np.lexsort((rows, -keys[:, c]))
            chosen = order[: max(int(n[c]), 0)]
            out[chosen[keys[chosen, c] >= 0], c] = True
    else:
        flat = keys.ravel()
        order = np.lexsort((np.arange(flat.size), -flat))[: max(int(np.ravel(n)[0]), 0)]
        out.ravel()[order[flat[order] >= 0]] = True
    return out


def _smoke_result() -> None:
    score = np.array([[0.0, 1.0, 3.0], [2.0, 3.0, 3.0], [4.0, 5.0, 0.5]], np.float32)
    eligible = np.array([[True, True, True], [False, True, True], [True, True, True]])
    run = jax.jit(_ffi_call, static_argnums=3)
    for n, per_column in ((np.array([4], np.int32), False), (np.array([2, 1, 2], np.int32), True)):
        got = np.asarray(run(score, eligible, n, per_column))
        want = reference_select(score, eligible, n, per_column)
        if not np.array_equal(got, want):
            raise RuntimeError(f"selection smoke test gave {got.tolist()}, expected {want.tolist()}")


def _smoke_counts() -> None:
    mask = np.array([[True, False, True], [True, True, False]])
    got = np.asarray(jax.jit(column_counts)(mask))
    if not np.array_equal(got, mask.sum(axis=0)):
        raise RuntimeError(f"column-count smoke test gave {got.tolist()}, expected {mask.sum(axis=0).tolist()}")


_TARGET = _ffi_kernels.LibraryTarget(TARGET_NAME, "SriglTopSelect", _smoke_result, "selection kernel")
COUNTS_TARGET_NAME = "srigl_column_counts"
_COUNTS_TARGET = _ffi_kernels.LibraryTarget(COUNTS_TARGET_NAME, "SriglColumnCounts", _smoke_counts,
                                            "column-count kernel")


def usable() -> bool:
    """True if selections and column counts should run on the kernels (built, registered, not forced off)."""
    return (not _ffi_kernels.forced_off() and bool(_TARGET.load()["ok"])
            and bool(_COUNTS_TARGET.load()["ok"]))


def _ffi_call(score, eligible, n, per_column: bool):
    call = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct(score.shape, jnp.bool_), vmap_method="sequential")
    return call(score.astype(jnp.float32), eligible.astype(bool), n.astype(jnp.int32),
                per_column=np.int64(per_column), max_threads=np.int64(_ffi_kernels._max_threads()))


def select_mask(score: jax.Array, eligible: jax.Array, n: jax.Array, per_column: bool) -> jax.Array:
    """The (R, C) mask of the n largest eligible scores per column (``n`` (C,)) or overall (``n`` (1,)); semantics
    of ``selection._select``. CPU only: callers dispatch per platform."""
    return _ffi_call(score, jnp.broadcast_to(eligible, score.shape), n, per_column)


def column_counts(mask: jax.Array) -> jax.Array:
    """int32 count of True per column of a 2-D boolean ``mask``. CPU only: callers dispatch per platform."""
    call = jax.ffi.ffi_call(COUNTS_TARGET_NAME, jax.ShapeDtypeStruct(mask.shape[1:], jnp.int32),
                            vmap_method="sequential")
    return call(mask.astype(bool), max_threads=np.int64(_ffi_kernels._max_threads()))
