"""Property tests (hypothesis): the invariants every mask update must keep, on random layers/data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import srigl_jax as sj
from srigl_jax.layer_updates import as_matrix


def to_rows(x):
    """One row per neuron: the transposed (fan_in, neurons) view."""
    return as_matrix(x).T

# (kernel shape, sparsity): Dense and Conv layouts, 0.5 .. 0.99. A few fixed configs keep jit caches warm;
# weights, gradients, masks, drop fractions (via the step) and NaNs vary per example.
LAYERS = [((40, 6), 0.5), ((3, 3, 4, 5), 0.9), ((200, 8), 0.99), ((12, 10), 0.8)]
GAMMAS = [None, 0.3, 0.9, 2.0]


def make_params(shape, seed, with_ties):
    rng = np.random.default_rng(seed)
    if with_ties:  # few distinct magnitudes: exercises tie-breaking
        w = rng.integers(-2, 3, size=shape).astype(np.float32)
    else:
        w = rng.normal(size=shape).astype(np.float32)
    return {"layer": {"kernel": jnp.asarray(w), "bias": jnp.zeros(shape[-1])},
            "head": {"kernel": jnp.asarray(rng.normal(size=(shape[-1], 3)).astype(np.float32))}}


@functools.lru_cache(maxsize=None)
def algorithm(kind, layer_idx, gamma_idx):
    shape, sparsity = LAYERS[layer_idx]
    common = dict(sparsity={"layer/kernel": sparsity}, delta_t=1, t_end=1000, alpha=0.9)
    if kind == "srigl":
        return sj.SRigL(gamma_sal=GAMMAS[gamma_idx], ablation_exempt=(r"^head/",), **common)
    return {"rigl": sj.RigL, "set": sj.SET}[kind](**common)


@functools.lru_cache(maxsize=None)
def jitted(kind, layer_idx, gamma_idx, method):
    """One jit wrapper per (algorithm, method), so compiled code is reused across examples."""
    return jax.jit(getattr(algorithm(kind, layer_idx, gamma_idx), method))


def check_srigl_invariants(plan, ablatable, gamma, old_w, old_m, new_w, new_m):
    m_rows, w_rows = to_rows(new_m), to_rows(new_w)
    fan_in = m_rows.sum(axis=1)
    active = fan_in > 0
    n_active = int(active.sum())
    k_new = plan.nnz_budget // n_active
    assert set(np.unique(fan_in[active]).tolist()) == {k_new}  # constant fan-in k'
    assert int(m_rows.sum()) == k_new * n_active  # nnz = k' * active
    assert n_active >= plan.min_active and k_new <= plan.fan_in
    if gamma is None or not ablatable:
        assert n_active == plan.n_neurons and k_new == plan.k0
    assert (w_rows[~m_rows] == 0).all()  # inactive (incl. ablated neurons) exactly 0
    grown = new_m & ~old_m
    assert (new_w[grown] == 0).all()  # grown weights start at 0
    kept = new_m & old_m
    np.testing.assert_array_equal(new_w[kept], old_w[kept])  # kept weights keep their value


@given(
    layer_idx=st.integers(0, len(LAYERS) - 1),
    gamma_idx=st.integers(0, len(GAMMAS) - 1),
    seed=st.integers(0, 2**31 - 1),
    steps=st.lists(st.integers(1, 999), min_size=1, max_size=3),
    with_ties=st.booleans(),
    nonfinite=st.sampled_from([None, "grad_nan", "grad_inf", "weight_nan"]),
)
def test_srigl_invariants_hold_over_consecutive_updates(layer_idx, gamma_idx, seed, steps, with_ties, nonfinite):
    algo = algorithm("srigl", layer_idx, gamma_idx)
    key = jax.random.key(seed)
    params = make_params(LAYERS[layer_idx][0], seed, with_ties)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    plans = algo.layer_plans(params)
    update = jitted("srigl", layer_idx, gamma_idx, "update_masks_with_info")
    for i, step in enumerate(sorted(steps)):
        grads = make_params(LAYERS[layer_idx][0], seed + 1 + i, with_ties)
        if nonfinite == "grad_nan":
            grads["layer"]["kernel"] = grads["layer"]["kernel"].at[0].set(jnp.nan)
        elif nonfinite == "grad_inf":
            grads["layer"]["kernel"] = grads["layer"]["kernel"].at[-1].set(-jnp.inf)
        new_params, new_masks, info = update(params, grads, masks, jax.random.fold_in(key, i), step)
        assert bool(info.updated)
        assert bool(info.nonfinite) == (nonfinite is not None and nonfinite != "weight_nan" or
                                        (nonfinite == "weight_nan" and not np.isfinite(np.asarray(params["layer"]["kernel"])).all()))
        assert jax.tree.structure(new_masks) == jax.tree.structure(params)
        for path, m in [("layer/kernel", new_masks["layer"]["kernel"]), ("head/kernel", new_masks["head"]["kernel"])]:
            assert m.dtype == jnp.bool_
        lw = np.asarray(params["layer"]["kernel"])
        check_srigl_invariants(
            plans["layer/kernel"], True, GAMMAS[gamma_idx],
            np.nan_to_num(lw), np.asarray(masks["layer"]["kernel"]),
            np.nan_to_num(np.asarray(new_params["layer"]["kernel"])), np.asarray(new_masks["layer"]["kernel"]),
        )
        # the head is dense (sparsity dict): untouched
        np.testing.assert_array_equal(new_params["head"]["kernel"], params["head"]["kernel"])
        assert np.asarray(new_masks["head"]["kernel"]).all()
        params, masks = new_params, new_masks
        if nonfinite == "weight_nan" and i == 0:  # poison an active weight for the next update
            params["layer"]["kernel"] = jnp.where(masks["layer"]["kernel"], jnp.nan, params["layer"]["kernel"])


@settings(max_examples=3)  # eager mode compiles every loop body: slow
@given(layer_idx=st.integers(0, len(LAYERS) - 1), gamma_idx=st.integers(0, len(GAMMAS) - 1),
       seed=st.integers(0, 2**31 - 1), step=st.integers(1, 999))
def test_jit_equals_eager(layer_idx, gamma_idx, seed, step):
    algo = algorithm("srigl", layer_idx, gamma_idx)
    key = jax.random.key(seed)
    params = make_params(LAYERS[layer_idx][0], seed, with_ties=True)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    grads = make_params(LAYERS[layer_idx][0], seed + 1, with_ties=True)
    eager = algo.update_masks(params, grads, masks, key, step)
    compiled = jitted("srigl", layer_idx, gamma_idx, "update_masks")(params, grads, masks, key, step)
    jax.tree.map(np.testing.assert_array_equal, eager, compiled)


@given(kind=st.sampled_from(["rigl", "set"]), layer_idx=st.integers(0, len(LAYERS) - 1),
       seed=st.integers(0, 2**31 - 1), step=st.integers(1, 999))
def test_rigl_and_set_keep_layer_nnz_exactly(kind, layer_idx, seed, step):
    algo = algorithm(kind, layer_idx, 0)
    key = jax.random.key(seed)
    params = make_params(LAYERS[layer_idx][0], seed, with_ties=True)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    plan = algo.layer_plans(params)["layer/kernel"]
    assert int(masks["layer"]["kernel"].sum()) == plan.nnz_budget
    grads = make_params(LAYERS[layer_idx][0], seed + 1, with_ties=True)
    new_params, new_masks = jitted(kind, layer_idx, 0, "update_masks")(params, grads, masks, key, step)
    old_m, new_m = np.asarray(masks["layer"]["kernel"]), np.asarray(new_masks["layer"]["kernel"])
    assert int(new_m.sum()) == plan.nnz_budget
    new_w = np.asarray(new_params["layer"]["kernel"])
    assert (new_w[~new_m] == 0).all() and (new_w[new_m & ~old_m] == 0).all()


@given(layer_idx=st.integers(0, len(LAYERS) - 1), seed=st.integers(0, 2**31 - 1))
def test_initial_masks_and_params(layer_idx, seed):
    algo = algorithm("srigl", layer_idx, 1)
    key = jax.random.key(seed)
    params = make_params(LAYERS[layer_idx][0], seed, with_ties=False)
    masks = algo.init_masks(params, key)
    plan = algo.layer_plans(params)["layer/kernel"]
    rows = np.asarray(to_rows(masks["layer"]["kernel"]))
    assert (rows.sum(axis=1) == plan.k0).all()
    assert np.asarray(masks["layer"]["bias"]).all()  # non-sparse leaves are all-True
    new = algo.init_params(params, masks, key)
    w = np.asarray(to_rows(new["layer"]["kernel"]))
    assert (w[~rows] == 0).all() and (w[rows] != 0).all()
    np.testing.assert_array_equal(new["layer"]["bias"], params["layer"]["bias"])


def test_initial_weights_are_unbiased_with_one_key():
    """init_masks and init_params draw from independent streams: the same key must not give the kept
    positions the top normal draws (all-positive weights)."""
    params = {"layer": {"kernel": jnp.zeros((200, 50))}, "head": {"kernel": jnp.zeros((50, 3))}}
    algo = sj.SRigL(sparsity=0.9, distribution="uniform", t_end=10)
    key = jax.random.key(7)
    masks = algo.init_masks(params, key)
    w = np.asarray(algo.init_params(params, masks, key)["layer"]["kernel"])[np.asarray(masks["layer"]["kernel"])]
    assert 0.4 < (w > 0).mean() < 0.6  # 1000 weights: +-6 sigma
    np.testing.assert_allclose(w.std(), np.sqrt(2 / 20), rtol=0.15)  # k0 = 20 -> std sqrt(2/k)
