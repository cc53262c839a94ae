"""Selection primitives shared by every sparse method (SRigL, RigL, SET, init).

All scores are non-negative float32; ineligible entries never get selected. Ties are broken
deterministically by position: lower (row-major) index first. Layers are viewed as 2-D
(fan_in, n_neurons) matrices (a free reshape of Dense/Conv kernels): one column per neuron. Everything
has static shapes, so the primitives run under ``jit`` with traced counts.

Where it runs: on CPU, when the C++ kernel library is built, every selection is one call of
``srigl_top_select`` (srigl_jax/_ffi_select.py): the selected set is unique, so it is the same mask, and one
custom call compiles in a fraction of the time of the XLA formulation below (~70 and ~160 fused kernels per
call site for the global and per-column selections), which dominated the compile time of ``update_masks``.
On other backends, or without the library, the XLA formulation runs. The choice is made when lowering (a JAX
primitive with a CPU lowering and a default one, ``_CpuKernelOrXla``), so code traced once runs on any backend.

Algorithm (XLA): no sort. The bit patterns of non-negative float32 read as int32 are ordered like the floats,
so "the n largest scores" is "the n largest int32 keys" (ineligible entries get key -1). A radix select
finds the threshold T, the n-th largest key: each pass histograms one digit of the keys inside the
current window (one scatter-add over the layer; keys above the window go to one extra bin, keys below
it are dropped), and the suffix sums of that histogram are the counts count(keys >= bin edge), which
give the bin that holds T; the next pass refines that bin with the next digit. A pass costs a few
plain counting passes on XLA:CPU but settles 10-16 bits instead of one.

* ``top_n_mask`` (one global threshold): 16-bit digits over one 2**16-bin table, so at most two
  passes over the layer for 31-bit keys.
* ``column_top_count_mask`` (one threshold per column): per-column tables of 2**10 bins (a
  (bins, columns) table must stay cache-sized), so at most four passes; on continuous scores nearly
  every column is resolved after two, and once few columns are left the remaining passes run on a
  gathered slab of just those columns instead of the whole layer.

A group (column, or the whole layer) is resolved as soon as the bin holding T is taken entirely
(count(keys >= its lower edge) is exactly n) or is a single key value. In the latter case more entries
may equal T than are needed, and only the ones at the lowest positions are kept. Per column that is
again a selection of the largest keys, with the reversed row as key (the same radix select); over the
whole layer, one pass counts the ties per row and the boundary row is resolved alone. Both run only
if some tie is cut, which float32 scores of large layers do now and then.
"""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch  # apply_primitive: a primitive's eager (un-jitted) call
from jax.interpreters import batching, mlir

_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
# Non-negative float32 bit patterns (largest: float32 max, 0x7F7FFFFF) are below 2**31.
_SCORE_KEY_BITS = 31
_GLOBAL_DIGIT_BITS = 16  # one 2**16-bin table (256 KiB): two passes for any 31-bit key
_COLUMN_DIGIT_BITS = 10  # (2**10 + 1, n_columns) tables: ~12 MiB for 3072 columns
_SLAB_COLUMNS = 256  # passes run on a gathered slab of the unresolved columns once at most this many are
_NEVER = jnp.iinfo(jnp.int32).max  # a threshold above every key: selects nothing


def magnitude_score(x: jax.Array) -> jax.Array:
    """|x| as float32 with NaN -> 0 and +-Inf -> float32 max, so scores are always finite."""
    return jnp.nan_to_num(jnp.abs(x.astype(jnp.float32)), nan=0.0, posinf=_FLOAT32_MAX)


def perturb_ties(score: jax.Array, key: jax.Array) -> jax.Array:
    """Seeded tiny perturbation (a few ulps, plus an additive 1e-30 for exact zeros) to break ties randomly."""
    u = jax.random.uniform(key, score.shape, jnp.float32)
    return score * (1.0 + 2.0**-20 * u) + 1e-30 * u


def _sortable_keys(score: jax.Array, eligible: jax.Array) -> jax.Array:
    """int32 keys ordered like the non-negative float32 scores; ineligible entries get -1."""
    return jnp.where(eligible, lax.bitcast_convert_type(score.astype(jnp.float32), jnp.int32), -1)


def _suffix_sum(x: jax.Array) -> jax.Array:
    """out[b] = sum(x[b:]) along a short axis 0, as one fused masked reduction: (m, m, groups) work, but
    XLA:CPU's cumsum is far slower than that at these sizes."""
    m = x.shape[0]
    from_b = jnp.arange(m)[None, :] >= jnp.arange(m)[:, None]  # from_b[b, b'] = b' >= b
    return jnp.sum(jnp.where(from_b[:, :, None], x[None], 0), axis=1)


def _window_histogram(keys, lo, shift, digit_bits: int, per_column: bool):
    """Histogram of the keys in the window of 2**digit_bits bins of width 2**shift starting at lo.

    Returns ``(hist, above)``: hist (bins, groups) counts the keys in each bin (bin 0 lowest), above
    (groups,) the keys at or above the window's top. Keys below lo are dropped (out-of-range scatter
    index). A group is a column (per_column) or the whole matrix; lo and shift are per group.
    """
    n_bins = 1 << digit_bits
    groups = keys.shape[1] if per_column else 1
    bins = jnp.minimum((keys - lo) >> shift, n_bins)  # keys >= -1, 0 <= lo < 2**31: no overflow
    index = bins * groups + jnp.arange(groups) if per_column else bins
    index = jnp.where(bins >= 0, index, (n_bins + 1) * groups)
    table = jnp.zeros((n_bins + 1) * groups, jnp.int32).at[index.ravel()].add(1, mode="drop")
    table = table.reshape(n_bins + 1, groups)
    return table[:n_bins], table[n_bins]


def _crossing_bin(hist: jax.Array, above: jax.Array, n: jax.Array):
    """Per group, the highest bin b with count(keys >= lower edge of b) >= n, that count and count(keys
    >= upper edge of b). Requires count(keys >= lowest edge) >= n > above.

    Suffix sums in two levels, over sqrt(bins) blocks and then over the bins of the one block that
    crosses n, so the work stays about one read of the table.
    """
    n_bins, groups = hist.shape
    inner = 1 << ((n_bins.bit_length() - 1) // 2)
    blocks = hist.reshape(n_bins // inner, inner, groups)
    block_ge = above + _suffix_sum(jnp.sum(blocks, axis=1))  # count(>= lower edge of each block)
    j = jnp.maximum(jnp.sum(block_ge >= n, axis=0) - 1, 0)
    in_j = jnp.arange(n_bins // inner)[:, None] == j  # one-hot picks: cheaper than gathers on XLA:CPU
    block = jnp.sum(jnp.where(in_j[:, None, :], blocks, 0), axis=0)  # (inner, groups): the bins of block j
    bin_ge = _pick(block_ge, in_j) - jnp.sum(block, axis=0) + _suffix_sum(block)
    i = jnp.maximum(jnp.sum(bin_ge >= n, axis=0) - 1, 0)
    in_i = jnp.arange(inner)[:, None] == i
    at = _pick(bin_ge, in_i)
    return j * inner + i, at, at - _pick(block, in_i)


def _pick(x: jax.Array, one_hot: jax.Array) -> jax.Array:
    """x[k, g] at the one k per group g where one_hot[k, g]."""
    return jnp.sum(jnp.where(one_hot, x, 0), axis=0)


def _threshold(keys_of, operands: tuple, n: jax.Array, key_bits: int, per_column: bool):
    """Radix select of the n-th largest key, per column or over the whole matrix.

    The keys are ``keys_of(*operands)``, (R, C) int32 in [-1, 2**key_bits) (-1: ineligible, never
    counted); they are recomputed inside every pass, where they fuse into the histogram's index
    computation, instead of being written out once and read back each pass. The operands' last axis
    is the column axis ((R, C) arrays or per-column (C,) vectors), so a slab of columns is
    ``x[..., cols]``. ``n`` (C,) per column or (1,), with 0 <= n <= #eligible.

    Returns ``(t, surplus, n_above)`` per group: count(keys >= t) is n + surplus; if surplus > 0, t is
    the n-th largest key itself and n_above = count(keys > t). n == 0 gives t above every key.
    """
    digit_bits = _COLUMN_DIGIT_BITS if per_column else _GLOBAL_DIGIT_BITS
    zeros = jnp.zeros_like(n)
    init = (
        jnp.where(n > 0, 0, _NEVER),  # lo: the window's (and at the end the threshold's) lower edge
        jnp.full_like(n, max(key_bits - digit_bits, 0)),  # shift: log2 of the bin width
        zeros,  # count(keys >= lo) once resolved
        zeros,  # count(keys >= the upper edge of lo's bin)
        n == 0,  # resolved
    )

    def refine(operands, n, state):
        """One pass: narrow each unresolved group's window to the bin holding the n-th largest key."""
        lo, shift, c_at, c_above, done = state
        hist, above = _window_histogram(keys_of(*operands), lo, shift, digit_bits, per_column)
        b, at, above_bin = _crossing_bin(hist, above, n)
        resolved = (at == n) | (shift == 0)
        new_state = (
            jnp.where(done, lo, lo + (b << shift)),
            jnp.where(done, shift, jnp.maximum(shift - digit_bits, 0)),
            jnp.where(done, c_at, at),
            jnp.where(done, c_above, above_bin),
            done | resolved,
        )
        # Sums of int32 counts are int64 under jax_enable_x64; the loop carry keeps the state's dtypes.
        return tuple(x.astype(old.dtype) for x, old in zip(new_state, state))

    def refine_all(state):
        return refine(operands, n, state)

    def refine_slab(state):
        """The same pass on only the unresolved columns, gathered (padded with column 0, whose
        recomputed state is unchanged if resolved and identical to its real slot if not)."""
        cols = jnp.nonzero(~state[-1], size=_SLAB_COLUMNS, fill_value=0)[0]
        sub = refine([x[..., cols] for x in operands], n[cols], [s[cols] for s in state])
        return tuple(s.at[cols].set(t) for s, t in zip(state, sub))

    def step(state):
        if not (per_column and n.shape[0] > 2 * _SLAB_COLUMNS):
            return refine_all(state)
        few_left = jnp.sum(~state[-1]) <= _SLAB_COLUMNS
        return lax.cond(few_left, refine_slab, refine_all, state)

    lo, _, c_at, c_above, _ = lax.while_loop(lambda s: jnp.any(~s[-1]), step, init)
    return lo, c_at - n, c_above


def _select(score: jax.Array, eligible: jax.Array, n: jax.Array, per_column: bool) -> jax.Array:
    """The n highest eligible scores of a 2-D ``score`` per column or over the matrix; ties go to the
    lower row / row-major index; ``n`` ((C,) per column, else (1,)) is clipped to [0, #eligible]. On CPU one
    call of the C++ kernel (srigl_jax._ffi_select: the same set, and one custom call to compile instead of a
    while loop of radix passes), elsewhere the XLA radix select."""
    return _SELECT.bind(score, eligible, n, per_column=per_column)


class _CpuKernelOrXla:
    """A primitive that lowers to a C++ kernel call on CPU and to its XLA formulation on every other platform,
    when the kernel library is usable (else the XLA formulation is called directly).

    The XLA formulation is traced only when lowering for a non-CPU platform: with ``lax.platform_dependent``
    every call site traced both, and tracing the unused radix selects was two thirds of the trace time of
    ``update_masks`` on ResNet-50. Operands may carry leading batch axes (vmap); the lowerings map over them.
    The outputs are integer or boolean: no gradient flows through, and the operands' gradients are stopped, so
    functions that select stay differentiable.
    """

    def __init__(self, name, cpu, xla, out_aval, core_rank: int):
        self._xla, self._core_rank = xla, core_rank
        self.primitive = jax.extend.core.Primitive(name)
        self.primitive.def_impl(functools.partial(dispatch.apply_primitive, self.primitive))
        self.primitive.def_abstract_eval(out_aval)
        mlir.register_lowering(self.primitive, mlir.lower_fun(self._over_batch(xla), multiple_results=False))
        mlir.register_lowering(self.primitive, mlir.lower_fun(self._over_batch(cpu), multiple_results=False),
                               platform="cpu")
        batching.primitive_batchers[self.primitive] = self._batch

    def _over_batch(self, fn):
        def run(*operands, **params):
            f = functools.partial(fn, **params)
            for _ in range(operands[0].ndim - self._core_rank):
                f = jax.vmap(f)
            return f(*operands)
        return run

    def _batch(self, operands, dims, **params):
        size = next(x.shape[d] for x, d in zip(operands, dims) if d is not None)
        operands = [jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
                    for x, d in zip(operands, dims)]
        return self.primitive.bind(*operands, **params), 0

    def bind(self, *operands, **params):
        from srigl_jax import _ffi_select  # loads the kernel library on first use

        if not _ffi_select.usable():
            return self._xla(*operands, **params)
        return self.primitive.bind(*(lax.stop_gradient(x) for x in operands), **params)


def _select_xla(score: jax.Array, eligible: jax.Array, n: jax.Array, per_column: bool) -> jax.Array:
    """``_select`` as an XLA radix select (any backend)."""
    # The radix select needs 0 <= n <= #eligible (the kernel clips on its own: no reductions to compile there).
    n_eligible = jnp.sum(eligible, axis=0 if per_column else None, dtype=jnp.int32)
    n = jnp.clip(n, 0, n_eligible)
    t, surplus, n_above = _threshold(_sortable_keys, (score, eligible), n, _SCORE_KEY_BITS, per_column)
    n_rows, n_cols = score.shape
    rows = jnp.arange(n_rows, dtype=jnp.int32)[:, None]
    position = rows if per_column else rows * n_cols + jnp.arange(n_cols, dtype=jnp.int32)
    keys = _sortable_keys(score, eligible)
    tie = keys == t
    quota = n - n_above  # ties to keep where surplus > 0

    def last_kept_tie_per_column():
        """Per column, the row of the quota-th tie: the quota largest reversed rows among the ties."""
        cut = surplus > 0

        def reversed_rows_of_ties(score, eligible, t, cut):
            return jnp.where((_sortable_keys(score, eligible) == t) & cut, n_rows - 1 - rows, -1)

        t_row, _, _ = _threshold(
            reversed_rows_of_ties, (score, eligible, t, cut), jnp.where(cut, quota, 0),
            (n_rows - 1).bit_length(), per_column=True,
        )
        return jnp.where(cut, n_rows - 1 - t_row, n_rows - 1)

    def last_kept_tie_overall():
        """Flat position of the quota-th tie in row-major order: one pass of per-row tie counts, then
        the boundary row alone."""
        upto_row = jnp.cumsum(jnp.sum(tie, axis=1, dtype=jnp.int32))
        row = jnp.sum(upto_row < quota, dtype=jnp.int32)  # the row holding the quota-th tie
        in_row = quota - (upto_row[row] - jnp.sum(tie[row], dtype=jnp.int32))
        col = jnp.sum(jnp.cumsum(tie[row], dtype=jnp.int32) < in_row, dtype=jnp.int32)
        return (row * n_cols + col).reshape(1)

    keep_all_ties = jnp.full_like(n, n_rows - 1 if per_column else n_rows * n_cols - 1)
    last_kept_tie = last_kept_tie_per_column if per_column else last_kept_tie_overall
    last_kept = lax.cond(
        jnp.any(surplus > 0),
        lambda: last_kept_tie().astype(keep_all_ties.dtype),  # int sums widen under jax_enable_x64
        lambda: keep_all_ties,
    )
    # n == 0 leaves t at _NEVER, which a NaN bit pattern (0x7FFFFFFF) could still equal: select nothing there.
    return ((keys > t) | (tie & (position <= last_kept))) & (n > 0)


def column_counts(mask: jax.Array) -> jax.Array:
    """int32 number of True entries per column of a 2-D boolean ``mask`` (e.g. the fan-in of every neuron).

    On CPU one call of the C++ kernel (srigl_jax._ffi_select): XLA:CPU compiles a boolean column sum into four
    kernels (a convert and a tree of reduce-windows), and a mask update has several per distinct layer shape.

    >>> import jax.numpy as jnp
    >>> column_counts(jnp.array([[True, False], [True, True], [False, False]])).tolist()
    [2, 1]
    """
    return _COLUMN_COUNTS.bind(jnp.asarray(mask, bool))


def _column_counts_xla(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask, axis=0, dtype=jnp.int32)


def _select_on_kernel(score, eligible, n, per_column):
    from srigl_jax import _ffi_select

    return _ffi_select.select_mask(score, eligible, n, per_column)


def _column_counts_on_kernel(mask):
    from srigl_jax import _ffi_select

    return _ffi_select.column_counts(mask)


# Lowered per call site: through jit, the XLA formulation is traced once per shape (jit's cache) instead.
_SELECT = _CpuKernelOrXla(
    "select_top_n", _select_on_kernel, jax.jit(_select_xla, static_argnames="per_column"),
    lambda score, eligible, n, per_column: jax.core.ShapedArray(score.shape, jnp.bool_), core_rank=2)
_COLUMN_COUNTS = _CpuKernelOrXla(
    "count_per_column", _column_counts_on_kernel, _column_counts_xla,
    lambda mask: jax.core.ShapedArray(mask.shape[:-2] + mask.shape[-1:], jnp.int32), core_rank=2)


def _as_matrix(x: jax.Array) -> jax.Array:
    """Any shape -> 2-D, keeping row-major order."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def top_n_mask(score: jax.Array, eligible: jax.Array, n: jax.Array) -> jax.Array:
    """Boolean mask of the ``n`` highest-scoring eligible entries of ``score`` (any shape).

    ``n`` may be traced; it is clipped to [0, #eligible]. Exactly ``min(n, #eligible)`` entries are
    selected; ties go to the lower flat (row-major) index. On CPU one call of the C++ kernel; elsewhere two
    histogram passes over the layer (see the module docstring), plus two more only if a tie has to be cut.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.5, 2.0, 2.0], [1.0, 2.0, 0.0]])
    >>> top_n_mask(s, jnp.ones_like(s, bool), 2).astype(int).tolist()
    [[0, 1, 1], [0, 0, 0]]
    """
    if score.size == 0:  # nothing to select (and no row to index when cutting ties)
        return jnp.zeros(score.shape, bool)
    n = jnp.asarray(n, jnp.int32).reshape(1)
    return _select(_as_matrix(score), _as_matrix(eligible), n, per_column=False).reshape(score.shape)


def column_top_count_mask(score: jax.Array, eligible: jax.Array, counts: jax.Array) -> jax.Array:
    """Per column ``j`` of a 2-D ``score`` (one column per neuron), select the ``counts[j]``
    highest-scoring eligible entries.

    ``counts`` may be traced; each is clipped to the column's number of eligible entries. Ties go to
    the lower row (fan-in) index.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, 0.0]]).T
    >>> column_top_count_mask(s, s >= 0, jnp.array([2, 2])).T.astype(int).tolist()
    [[1, 0, 1, 0], [1, 0, 1, 0]]
    """
    return _select(score, eligible, counts.astype(jnp.int32), per_column=True)


def kth_largest(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry (1-based, static k) of a 1-D array."""
    return lax.top_k(values, k)[0][k - 1]
