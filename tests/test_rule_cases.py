"""Hand-computed cases and reference-model properties of the update rule, through the public API.

Expected results are worked by hand below, or come from ``ref_srigl`` / ``ref_rigl``: a plain numpy
transcription of the spec ("One mask update of one layer", /work/shared/SRIGL_SPEC.md; README "The update
rule") with sort-based selection, written independently of ``srigl_jax.selection``. Everything goes through
``sj.SRigL/RigL/SET(...).update_masks(_with_info)``, ``sj.sparse_apply`` (only via ``one_sparse_step``) and
``sj.sparsity_metrics``, so the tests keep their meaning when the internals are refactored.

One-line mutations, each applied, seen failing the listed tests (all of them), then reverted:
1. salience gradients over inactive positions only (``top_n_mask(g_score, ~mask, n_prune)``): test_salient_gradients_count_active_positions_too, test_gamma_sal_one_is_an_absolute_count_of_one, test_grown_weights_start_at_zero_even_if_params_were_not, test_srigl_matches_reference_model
2. ``gamma_sal == 1`` not an absolute count (``if gamma_sal > 1:`` in ``salience_threshold``): test_gamma_sal_one_is_an_absolute_count_of_one, test_grown_weights_start_at_zero_even_if_params_were_not, test_srigl_matches_reference_model
3. mask update also at ``step == t_end`` (``step <= t_end`` in ``schedule.is_update_step``): test_no_update_at_t_end, test_update_steps_stop_strictly_before_t_end
4. grown weights keep what ``params`` held there (``jnp.where(new_m, ws[j], 0)``): test_grown_weights_start_at_zero_even_if_params_were_not, test_set_growth_differs_between_identical_layers, test_random_tie_break_differs_between_identical_layers, test_srigl_matches_reference_model, test_rigl_matches_reference_model
5. one random key for every layer (``layer_key = key``): test_set_growth_differs_between_identical_layers, test_random_tie_break_differs_between_identical_layers
6. ``sparse_apply``'s skip blind to NaN/Inf in params (only grads checked): test_step_with_nonfinite_params_is_skipped (all 6 cases)
7. ``active_neuron_fraction`` counting dense layers (``if not plan.is_dense`` removed): test_active_neuron_fraction_counts_sparse_layers_only
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import srigl_jax as sj

# ------------------------------------------------------------------------------------------------ helpers


def rows(n_neurons, fan_in, **active):
    """Boolean (n_neurons, fan_in) matrix, one ROW PER NEURON: rows(4, 8, n0=(0, 1)) -> neuron 0 has
    fan-in positions 0 and 1. The kernel (fan_in, neurons) is its transpose."""
    out = np.zeros((n_neurons, fan_in), bool)
    for name, cols in active.items():
        out[int(name[1:]), list(cols)] = True
    return out


def values(n_neurons, fan_in, **entries):
    """Float32 (n_neurons, fan_in) matrix from {"n<r>": {c: value}} (one row per neuron)."""
    out = np.zeros((n_neurons, fan_in), np.float32)
    for name, cols in entries.items():
        for c, v in cols.items():
            out[int(name[1:]), c] = v
    return out


def kernel(x):
    return jnp.asarray(np.ascontiguousarray(np.asarray(x).T))


def as_rows(x):
    return np.asarray(x).T


def one_sparse_step(algo, tx, params, opt_state, masks, grads, key, step):
    """One full sparse training step through the public step API; returns (params, state, masks, nonfinite).

    The only place that calls the step API: point it at ``sj.sparse_optimizer`` once ``sparse_apply``
    becomes a wrapper over it (``state`` is then that transformation's whole state)."""
    res = _jitted_sparse_apply(algo, tx, params, opt_state, masks, grads, key, jnp.int32(step))
    return res.params, res.opt_state, res.masks, res.info.nonfinite


_jitted_sparse_apply = jax.jit(sj.sparse_apply, static_argnums=(0, 1))  # step traced: one compile per (algo, tx)


# -------------------------------------------- a 4-neuron x fan-in-8 layer (S = 0.75: T = 8, k0 = 2)
# min_active = min(4, floor(T / F) + 1) = 2. Schedule alpha = 1, t_end = 5, step 3:
# d = 1/2 (1 + cos(0.6 pi)) = 0.3455 -> n_prune = floor(8 * 0.3455) = floor(2.76) = 2, n_keep = 6.
N8, F8 = 4, 8
W8 = values(N8, F8, n0={0: 5, 1: 4}, n1={2: 6, 3: 3}, n2={4: 7, 5: 2}, n3={6: 0.1, 7: 0.2})
M8 = W8 != 0  # every neuron at k0 = 2; neuron 3 holds the two smallest |w|
STEP8 = 3


def srigl8(gamma_sal, **kw):
    return sj.SRigL(sparsity=0.75, distribution="uniform", delta_t=1, t_end=5, alpha=1.0,
                    gamma_sal=gamma_sal, ablation_exempt=(), **kw)


@functools.lru_cache(maxsize=None)
def _update8_fn(gamma_sal):
    return jax.jit(srigl8(gamma_sal).update_masks_with_info)  # one compile per gamma_sal


def update8(gamma_sal, w_rows, g_rows, m_rows=M8, step=STEP8):
    """SRigL update of the 8-wide layer; returns (new weights, new mask) one row per neuron, and the info."""
    new_p, new_m, info = _update8_fn(gamma_sal)(
        {"kernel": kernel(w_rows)}, {"kernel": kernel(g_rows)}, {"kernel": kernel(m_rows)},
        jax.random.key(0), jnp.int32(step))
    return as_rows(new_p["kernel"]), as_rows(new_m["kernel"]), info


def test_worked_schedule_of_the_8_wide_layer():
    algo = srigl8(0.5)
    plan = algo.layer_plans({"kernel": kernel(W8)})["kernel"]
    assert (plan.nnz_budget, plan.k0, plan.min_active) == (8, 2, 2)
    assert bool(algo.is_update_step(STEP8))
    assert math.floor(8 * float(algo.drop_fraction(STEP8))) == 2


def test_salient_gradients_count_active_positions_too():
    # Top-2 |grad| over ALL positions = neuron 3's two active positions (9, 8); the inactive positions
    # n0c5 (1) and n1c0 (0.5) come next. Salient: top-6 |w| (neurons 0-2, two each) + n3c6, n3c7, so
    # counts (2, 2, 2, 2) >= theta = max(1, floor(0.5 * 2)) = 1: nobody is ablated, k' = 2.
    # Drop keeps the 6 largest |w| (neurons 0-2); neuron 3 regrows its best-|grad| positions c6, c7:
    # dropped and regrown, so they keep 0.1, 0.2. The layer comes out exactly as it went in.
    # (Salience over inactive positions only would count n0c5, n1c0: neuron 3 at 0 would be ablated.)
    g = values(N8, F8, n3={6: 9, 7: 8}, n0={5: 1}, n1={0: 0.5})
    new_w, new_m, info = update8(0.5, W8, g)
    assert bool(info.updated)
    np.testing.assert_array_equal(new_m, M8)
    np.testing.assert_array_equal(new_w, W8)


def test_gamma_sal_one_is_an_absolute_count_of_one():
    # Top-2 |grad| over all positions: n3c6 (9, active) and n0c5 (8, inactive). Salient counts
    # n0 = 3, n1 = 2, n2 = 2, n3 = 1 (only c6; c7 is not among the 6 largest |w|).
    g = values(N8, F8, n3={6: 9}, n0={5: 8})
    # gamma_sal = 1 is the absolute count 1 (not floor(1 * k0) = 2): neuron 3 survives, k' = 8 // 4 = 2.
    # It was dropped entirely (n_keep = 6 goes to neurons 0-2) and regrows c6 (|g| 9, keeps 0.1) and then
    # the zero-gradient tie at the lowest fan-in index, c0 (new: starts at 0).
    expected_m = M8.copy()
    expected_m[3] = rows(N8, F8, n3=(0, 6))[3]
    expected_w = W8.copy()
    expected_w[3] = values(N8, F8, n3={6: 0.1})[3]
    new_w, new_m, _ = update8(1.0, W8, g)
    np.testing.assert_array_equal(new_m, expected_m)
    np.testing.assert_array_equal(new_w, expected_w)
    # gamma_sal = 2 is the absolute count 2: neuron 3 (1 salient) is ablated (3 survivors >= min_active),
    # k' = 8 // 3 = 2: neurons 0-2 keep their weights, neuron 3 is empty.
    new_w, new_m, _ = update8(2.0, W8, g)
    expected_m = M8.copy()
    expected_m[3] = False
    np.testing.assert_array_equal(new_m, expected_m)
    np.testing.assert_array_equal(new_w, np.where(expected_m, W8, 0))


def test_grown_weights_start_at_zero_even_if_params_were_not():
    # Same case as above (gamma_sal = 1), but params hold garbage off the mask: the rule must ignore it
    # (only active |w| are scored) and neuron 3's newly grown c0 must start at 0, not at the garbage.
    g = values(N8, F8, n3={6: 9}, n0={5: 8})
    garbage = np.where(M8, W8, np.float32(50.0) + np.arange(N8 * F8, dtype=np.float32).reshape(N8, F8))
    new_w, new_m, _ = update8(1.0, garbage, g)
    expected_m = M8.copy()
    expected_m[3] = rows(N8, F8, n3=(0, 6))[3]
    np.testing.assert_array_equal(new_m, expected_m)
    np.testing.assert_array_equal(new_w, np.where(expected_m & M8, W8, 0))


# ----------------------------------------------------------------------------------------- schedule
def test_no_update_at_t_end():
    # Neuron 0 holds 3 weights, neuron 1 one: any SRigL update (even with d = 0) makes them 2 and 2
    # (T = 4, k' = k0 = 2). delta_t = 5 divides t_end = 10: step 5 updates, step 10 = t_end must not.
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=5, t_end=10, gamma_sal=None)
    update = jax.jit(algo.update_masks_with_info)
    w = values(2, 4, n0={0: 1, 1: 2, 2: 3}, n1={3: 4})
    g = np.ones((2, 4), np.float32)
    params, grads, masks = {"kernel": kernel(w)}, {"kernel": kernel(g)}, {"kernel": kernel(w != 0)}
    p, m, info = update(params, grads, masks, jax.random.key(0), jnp.int32(5))
    assert bool(info.updated)
    np.testing.assert_array_equal(as_rows(m["kernel"]).sum(axis=1), [2, 2])
    for step in (10, 15, 20):
        p, m, info = update(params, grads, masks, jax.random.key(0), jnp.int32(step))
        assert not bool(info.updated), step
        np.testing.assert_array_equal(as_rows(m["kernel"]), w != 0)
        np.testing.assert_array_equal(as_rows(p["kernel"]), w)


def test_update_steps_stop_strictly_before_t_end():
    algo = sj.SRigL(sparsity=0.5, delta_t=10, t_end=30)
    assert [s for s in range(0, 50) if bool(algo.is_update_step(jnp.int32(s)))] == [10, 20]


# ------------------------------------------------------------------- independent randomness per layer
def two_identical_layers(seed=0):
    """Two (16, 8) layers with the same weights and mask (rows 0-7 of every column active); params also
    hold nonzero garbage off the mask, which grown weights must not inherit."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32) + 3.0)  # nonzero everywhere
    m = jnp.asarray(np.tile(np.arange(16)[:, None] < 8, (1, 8)))
    params = {"a": {"kernel": w}, "b": {"kernel": w}}
    masks = {"a": {"kernel": m}, "b": {"kernel": m}}
    return params, masks


def check_kept_keep_value_and_grown_start_at_zero(params, masks, new_params, new_masks):
    for name in params:
        w, old_m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        new_m = np.asarray(new_masks[name]["kernel"])
        assert (new_m & ~old_m).any()
        np.testing.assert_array_equal(new_params[name]["kernel"], np.where(new_m & old_m, w, 0))


@functools.lru_cache(maxsize=None)
def jitted_update_masks(kind):
    common = dict(sparsity=0.5, distribution="uniform", delta_t=1, t_end=10, alpha=0.9)
    if kind == "set":
        algo = sj.SET(**common)
    else:
        algo = sj.SRigL(gamma_sal=None, random_tie_break=True, **common)
    return jax.jit(algo.update_masks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_growth_differs_between_identical_layers(seed):
    # Two layers with the same shape, weights and mask: SET's random growth must be drawn independently
    # per layer (the same draw for both has probability ~ 1 / C(~100, ~50)).
    update = jitted_update_masks("set")
    params, masks = two_identical_layers(seed)
    zero = jax.tree.map(jnp.zeros_like, params)
    new_p, new = update(params, zero, masks, jax.random.key(seed), jnp.int32(1))
    a, b = np.asarray(new["a"]["kernel"]), np.asarray(new["b"]["kernel"])
    assert a.sum() == b.sum() == 64
    assert (a != b).any()
    check_kept_keep_value_and_grown_start_at_zero(params, masks, new_p, new)
    _, again = update(params, zero, masks, jax.random.key(seed), jnp.int32(1))
    np.testing.assert_array_equal(again["a"]["kernel"], a)  # but seeded: same key, same masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tie_break_differs_between_identical_layers(seed):
    # Zero gradients: which positions regrow is decided by the tie-break alone; identical layers must
    # not break their ties identically.
    update = jitted_update_masks("srigl_random_ties")
    params, masks = two_identical_layers(seed)
    zero = jax.tree.map(jnp.zeros_like, params)
    new_p, new = update(params, zero, masks, jax.random.key(seed), jnp.int32(1))
    a, b = np.asarray(new["a"]["kernel"]), np.asarray(new["b"]["kernel"])
    assert (a.sum(axis=0) == 8).all() and (b.sum(axis=0) == 8).all()
    assert (a != b).any()
    check_kept_keep_value_and_grown_start_at_zero(params, masks, new_p, new)


# ----------------------------------------------------------------------------- non-finite step skip
@functools.lru_cache(maxsize=None)
def nonfinite_setup():
    """One (algorithm, optimizer) pair for every case, so the jitted step compiles once."""
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=2, t_end=10, ablation_exempt=())
    return algo, optax.chain(optax.sgd(0.1, momentum=0.9), sj.apply_masks())


@pytest.mark.parametrize("where, bad", [("kernel", np.nan), ("kernel", np.inf), ("bias", -np.inf)])
@pytest.mark.parametrize("step", [1, 2])  # delta_t = 2: step 2 is also a mask-update step
def test_step_with_nonfinite_params_is_skipped(where, bad, step):
    algo, tx = nonfinite_setup()
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32)), "bias": jnp.ones(4)}}
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)  # finite everywhere
    state = tx.init(params)
    # A finite step first, so the optimizer state (momentum) is nonzero and would visibly change.
    params, state, masks, nonfinite = one_sparse_step(algo, tx, params, state, masks, grads, key, 1)
    assert not bool(nonfinite)
    # Poison one active parameter.
    leaf = params["Dense_0"][where]
    flat_idx = int(np.flatnonzero(np.asarray(masks["Dense_0"][where]))[0])
    params["Dense_0"][where] = leaf.reshape(-1).at[flat_idx].set(bad).reshape(leaf.shape)
    new_params, new_state, new_masks, nonfinite = one_sparse_step(
        algo, tx, params, state, masks, grads, jax.random.key(1), step)
    assert bool(nonfinite)
    # Params (the bad value included), state and masks untouched.
    jax.tree.map(np.testing.assert_array_equal, (new_params, new_state, new_masks), (params, state, masks))


# ------------------------------------------------------------------------------------------ metrics
def test_active_neuron_fraction_counts_sparse_layers_only():
    # "a/kernel" (8 in, 4 neurons) is sparse with neuron 2 ablated; "b/kernel" (4 in, 6 neurons) is a
    # dense candidate (not in the sparsity dict). Fraction over sparse layers: 3 / 4 (not 9 / 10).
    params = {"a": {"kernel": jnp.zeros((8, 4))}, "b": {"kernel": jnp.zeros((4, 6))}}
    algo = sj.SRigL(sparsity={"a/kernel": 0.5}, t_end=10)
    plans = algo.layer_plans(params)
    assert plans["b/kernel"].is_dense and not plans["a/kernel"].is_dense
    a = np.zeros((8, 4), bool)
    a[:5, [0, 1, 3]] = True  # k' = floor(16 / 3) = 5 for the 3 survivors
    masks = {"a": {"kernel": jnp.asarray(a)}, "b": {"kernel": jnp.ones((4, 6), bool)}}
    metrics = jax.jit(lambda m: sj.sparsity_metrics(m, plans))(masks)
    assert float(metrics["active_neuron_fraction"]) == 0.75
    assert int(metrics["active_neurons/a/kernel"]) == 3 and int(metrics["active_neurons/b/kernel"]) == 6
    assert int(metrics["fan_in/a/kernel"]) == int(metrics["fan_in_min/a/kernel"]) == 5
    # global sparsity over all candidates: 1 - (15 + 24) / (32 + 24)
    assert float(metrics["global_sparsity"]) == pytest.approx(1 - 39 / 56)


# ------------------------------------------------------------------ the spec as a plain numpy model
def ref_top_n(score, eligible, n):
    """The n highest scores among eligible entries; ties to the lower flat (row-major) index."""
    idx = np.flatnonzero(eligible.ravel())
    order = idx[np.argsort(-score.ravel()[idx], kind="stable")]
    out = np.zeros(score.size, bool)
    out[order[: max(int(n), 0)]] = True
    return out.reshape(score.shape)


def ref_per_neuron_top(score, eligible, counts):
    """Per column (neuron) j, the counts[j] highest eligible scores; ties to the lower fan-in index."""
    return np.stack([ref_top_n(score[:, j], eligible[:, j], counts[j]) for j in range(score.shape[1])], axis=1)


def ref_salience_threshold(gamma, k0):
    return int(gamma) if gamma >= 1 else max(1, math.floor(gamma * k0))


def ref_srigl(w, g, m, d, T, gamma, ablatable):
    """Spec steps 1-9 on (fan_in, neurons) matrices. Returns (new weights, new mask)."""
    F, N = m.shape
    ws, gs = np.abs(w), np.abs(g)
    nnz = int(m.sum())
    n_prune = int(np.floor(np.float32(nnz) * np.float32(d)))  # float32, as computed under jit
    n_keep = nnz - n_prune
    if gamma is None or not ablatable:
        active = np.ones(N, bool)
    else:
        salient = ref_top_n(ws, m, n_keep) | ref_top_n(gs, np.ones_like(m), n_prune)
        counts = salient.sum(axis=0)
        min_active = min(N, T // F + 1)
        theta = min(ref_salience_threshold(gamma, T // N), sorted(counts, reverse=True)[min_active - 1])
        active = counts >= theta
    k = T // int(active.sum())
    keep = ref_top_n(ws, m & active[None, :], n_keep)
    keep = ref_per_neuron_top(ws, keep, np.minimum(keep.sum(axis=0), k))
    grow = ref_per_neuron_top(gs, ~keep, np.where(active, k - keep.sum(axis=0), 0))
    new_m = keep | grow
    return np.where(new_m & m, w, 0).astype(w.dtype), new_m


def ref_rigl(w, g, m, d):
    nnz = int(m.sum())
    n_prune = int(np.floor(np.float32(nnz) * np.float32(d)))
    keep = ref_top_n(np.abs(w), m, nnz - n_prune)
    new_m = keep | ref_top_n(np.abs(g), ~keep, n_prune)
    return np.where(new_m & m, w, 0).astype(w.dtype), new_m


def test_reference_model_reproduces_the_hand_worked_4x6_example():
    # The worked example of tests/test_update_rule.py (d = 0.5, gamma_sal = 0.5), checked against the
    # reference model itself so that the model is known to implement the documented rule.
    W = np.array([[5, 4, 3, 0, 0, 0], [6, 0.1, 0.2, 0, 0, 0], [0, 0, 0, 7, 0.3, 2], [0.01, 0.02, 0.03, 0, 0, 0]],
                 np.float32)
    G = np.array([[0, 0, 0, 1, 2, 0.5], [0, 0, 0, 0.3, 0, 0], [3, 0, 0, 0, 0, 0], [0] * 6], np.float32)
    _, m = ref_srigl(W.T, G.T, (W != 0).T, 0.5, 12, 0.5, True)
    np.testing.assert_array_equal(m.T, rows(4, 6, n0=(0, 1, 2, 4), n1=(0, 1, 2, 3), n2=(0, 1, 3, 5)))
    _, m = ref_srigl(W.T, G.T, (W != 0).T, 0.5, 12, None, True)
    np.testing.assert_array_equal(m.T, rows(4, 6, n0=(0, 1, 2), n1=(0, 1, 3), n2=(0, 3, 5), n3=(0, 1, 2)))
    _, m = ref_rigl(W.T, G.T, (W != 0).T, 0.5)
    np.testing.assert_array_equal(m.T, rows(4, 6, n0=range(6), n1=(0, 3), n2=(0, 3, 5), n3=(0,)))


# Two sparse layers (kept few: each one adds to the compile time): a Conv (2x2x3 -> 4) and a Dense (4 -> 3)
# exempt from ablation, plus a dense candidate and biases that must pass through untouched.
# T = floor(numel * (1 - S)): b 48 * 0.25 = 12 (k0 = 3, min_active = 2), c 12 * 0.5 = 6 (k0 = 2).
LAYERS = {"b": ((2, 2, 3, 4), 0.75, 12), "c": ((4, 3), 0.5, 6)}
DENSE = {"d": (3, 3)}
# With b's k0 = 3, gamma_sal 1.0 gives theta = 1 (as any gamma_sal < 2/3 would) and 2.0 gives theta = 2. No
# ablation (gamma_sal=None) is the exempt layer c's rule, so it needs no compilation of its own.
GAMMAS = [1.0, 2.0]
T_END = 100


@functools.lru_cache(maxsize=None)
def compiled_update(kind, gamma_idx):
    common = dict(sparsity={f"{n}/kernel": s for n, (_, s, _) in LAYERS.items()}, delta_t=1, t_end=T_END,
                  alpha=0.9, ablation_exempt=(r"^c/",))
    if kind == "srigl":
        algo = sj.SRigL(gamma_sal=GAMMAS[gamma_idx], **common)
    else:
        algo = sj.RigL(**common)
    return algo, jax.jit(algo.update_masks_with_info)


def random_problem(seed, with_ties, kind):
    """Params (garbage off the mask), grads and masks. SRigL masks: constant fan-in k = T // a over a
    random number a of surviving neurons (so revival and re-ablation both occur); RigL: any T positions."""
    rng = np.random.default_rng(seed)

    def draw(shape):
        if with_ties:
            return rng.integers(-2, 3, size=shape).astype(np.float32)
        return rng.normal(size=shape).astype(np.float32)

    params, grads, masks = {}, {}, {}
    for name, (shape, _, T) in LAYERS.items():
        F, N = int(np.prod(shape[:-1])), shape[-1]
        m = np.zeros((F, N), bool)
        if kind == "srigl":
            min_active = min(N, T // F + 1)
            n_alive = N if name == "c" else int(rng.integers(min_active, N + 1))
            k = T // n_alive
            for j in rng.permutation(N)[:n_alive]:
                m[rng.permutation(F)[:k], j] = True
        else:
            m.ravel()[rng.permutation(F * N)[:T]] = True
        w = np.where(m, draw((F, N)), rng.normal(size=(F, N)).astype(np.float32) + 10.0)
        params[name] = {"kernel": jnp.asarray(w.reshape(shape)), "bias": jnp.asarray(draw((N,)))}
        grads[name] = {"kernel": jnp.asarray(draw(shape)), "bias": jnp.asarray(draw((N,)))}
        masks[name] = {"kernel": jnp.asarray(m.reshape(shape)), "bias": jnp.ones(N, bool)}
    for name, shape in DENSE.items():
        params[name] = {"kernel": jnp.asarray(draw(shape))}
        grads[name] = {"kernel": jnp.asarray(draw(shape))}
        masks[name] = {"kernel": jnp.ones(shape, bool)}
    return params, grads, masks


def check_against_reference(kind, gamma, params, grads, masks, new_p, new_m, info, step):
    d = float(info.drop_fraction)
    assert d == pytest.approx(0.45 * (1 + math.cos(math.pi * step / T_END)), abs=1e-6)
    assert bool(info.updated)
    for name, (shape, _, T) in LAYERS.items():
        F, N = int(np.prod(shape[:-1])), shape[-1]
        w = np.asarray(params[name]["kernel"]).reshape(F, N)
        g = np.asarray(grads[name]["kernel"]).reshape(F, N)
        m = np.asarray(masks[name]["kernel"]).reshape(F, N)
        if kind == "srigl":
            exp_w, exp_m = ref_srigl(w, g, m, d, T, gamma, ablatable=name != "c")
        else:
            exp_w, exp_m = ref_rigl(w, g, m, d)
        np.testing.assert_array_equal(np.asarray(new_m[name]["kernel"]).reshape(F, N), exp_m, err_msg=name)
        np.testing.assert_array_equal(np.asarray(new_p[name]["kernel"]).reshape(F, N), exp_w, err_msg=name)
        np.testing.assert_array_equal(new_p[name]["bias"], params[name]["bias"])
        assert np.asarray(new_m[name]["bias"]).all()
    for name in DENSE:
        np.testing.assert_array_equal(new_p[name]["kernel"], params[name]["kernel"])
        assert np.asarray(new_m[name]["kernel"]).all()


@given(gamma_idx=st.integers(0, len(GAMMAS) - 1), seed=st.integers(0, 2**31 - 1),
       step=st.integers(1, T_END - 1), with_ties=st.booleans())
def test_srigl_matches_reference_model(gamma_idx, seed, step, with_ties):
    _, update = compiled_update("srigl", gamma_idx)
    params, grads, masks = random_problem(seed, with_ties, "srigl")
    new_p, new_m, info = update(params, grads, masks, jax.random.key(seed), jnp.int32(step))
    check_against_reference("srigl", GAMMAS[gamma_idx], params, grads, masks, new_p, new_m, info, step)


@given(seed=st.integers(0, 2**31 - 1), step=st.integers(1, T_END - 1), with_ties=st.booleans())
def test_rigl_matches_reference_model(seed, step, with_ties):
    _, update = compiled_update("rigl", 0)
    params, grads, masks = random_problem(seed, with_ties, "rigl")
    new_p, new_m, info = update(params, grads, masks, jax.random.key(seed), jnp.int32(step))
    check_against_reference("rigl", None, params, grads, masks, new_p, new_m, info, step)
