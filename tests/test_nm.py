"""N:M constant fan-in (srigl_jax.rules.nm): exactly N of each block of M consecutive fan-in positions per active
neuron, through init and updates; SRigL's ablation at neuron level; hand-checked regrowth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import srigl_jax as sj
from srigl_jax.plans import LayerPlan
from srigl_jax.rules import LayerView, NMRule
from srigl_jax.rules.nm import from_blocks, to_blocks


def per_block(mask: np.ndarray, m: int) -> np.ndarray:
    """(fan_in, neurons) -> active count of every (block, neuron)."""
    fan_in, n = mask.shape
    return mask.reshape(fan_in // m, m, n).sum(axis=1)


@given(n_blocks=st.integers(1, 5), neurons=st.integers(1, 6), m=st.sampled_from([4, 8]))
def test_block_view_round_trips(n_blocks, neurons, m):
    x = jnp.arange(n_blocks * m * neurons).reshape(n_blocks * m, neurons)
    b = to_blocks(x, m)
    assert b.shape == (m, n_blocks * neurons)
    # column b * neurons + j holds rows b*m .. b*m+m-1 of neuron j
    np.testing.assert_array_equal(b[:, 1 * neurons + 0] if n_blocks > 1 else b[:, 0],
                                  x[m:2 * m, 0] if n_blocks > 1 else x[:m, 0])
    np.testing.assert_array_equal(from_blocks(b, n_blocks * m), x)


@pytest.mark.parametrize("n,m", [(2, 4), pytest.param(1, 8, marks=pytest.mark.slow)])
@settings(max_examples=3)   # every example compiles its own shapes
@given(n_blocks=st.integers(1, 4), neurons=st.integers(3, 8), seed=st.integers(0, 1000),
       gamma=st.sampled_from([None, 0.3, 0.9]))
def test_exactly_n_per_block_per_active_neuron(n, m, n_blocks, neurons, seed, gamma):
    fan_in = n_blocks * m
    params = {"Dense_0": {"kernel": jnp.ones((fan_in, neurons))}, "Dense_1": {"kernel": jnp.ones((neurons, 4))}}
    algo = sj.NM(n=n, m=m, delta_t=1, t_end=10, alpha=0.6, gamma_sal=gamma, ablation_exempt=("Dense_1",),
                 dense_paths=("Dense_1",))
    key = jax.random.key(seed)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    kernel = np.asarray(masks["Dense_0"]["kernel"])
    assert (per_block(kernel, m) == n).all()
    rng = np.random.default_rng(seed)
    for step in (1, 2, 3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        params, masks = jax.jit(algo.update_masks)(params, grads, masks, jax.random.fold_in(key, step), step)
        kernel = np.asarray(masks["Dense_0"]["kernel"])
        counts = per_block(kernel, m)
        active = kernel.sum(axis=0) > 0
        assert (counts[:, active] == n).all() and (counts[:, ~active] == 0).all()
        assert active.sum() >= algo.layer_plans(params)["Dense_0/kernel"].min_active
        w = np.asarray(params["Dense_0"]["kernel"])
        assert (w[~kernel] == 0).all()


def test_regrowth_by_hand():
    """One neuron, 2:4 over 8 inputs; d = 0.5 drops 2 of its 4 weights (the 2 smallest |w|, one per block),
    then each block regrows the free position with the largest |grad|."""
    w = jnp.array([[3.0, 0, 0.1, 0, 0, 2.0, 0, 0.2]]).T     # block 0: rows 0,2 active; block 1: rows 5,7
    mask = w != 0
    g = jnp.array([[0, 9.0, 0, 1.0, 5.0, 0, 0.5, 0]]).T
    plan = LayerPlan("kernel", (8, 1), 0.5, ablatable=False)
    new = NMRule(2, 4, gamma_sal=None).update_mask(LayerView(w, g, mask, jnp.float32(0.5)), plan, jax.random.key(0))
    # kept: rows 0 (3.0) and 5 (2.0); block 0 regrows row 1 (|g| 9), block 1 regrows row 4 (|g| 5)
    assert np.flatnonzero(np.asarray(new[:, 0])).tolist() == [0, 1, 4, 5]


def test_ablated_neuron_is_emptied_and_survivors_keep_n_per_block_by_hand():
    """2:4 over 8 inputs, 4 neurons (k = 4, T = 16, theta = max(1, floor(0.3 * 4)) = 1, at least
    T // 8 + 1 = 3 survivors). d = 0.5: n_prune = 8, n_keep = 8. Neuron 3 holds the 4 smallest |w| (none among the
    8 kept) and zero gradient (none among the 8 largest |g|): 0 salient weights < theta, so it is ablated and
    regrows nothing, while neurons 0-2 each keep their top weights and refill every block to exactly 2."""
    mask = np.zeros((8, 4), bool)
    mask[[0, 1, 4, 5], :] = True                       # 2 per block for every neuron
    w = np.where(mask, 1.0 + np.arange(32, dtype=np.float32).reshape(8, 4), 0.0)
    w[:, 3] = np.where(mask[:, 3], 0.01, 0.0)         # neuron 3: the smallest weights
    g = np.zeros((8, 4), np.float32)
    g[[2, 3, 6, 7], :3] = 10.0 + np.arange(12, dtype=np.float32).reshape(4, 3)   # free positions of neurons 0-2
    plan = LayerPlan("kernel", (8, 4), 0.5, ablatable=True)
    assert (plan.nnz_budget, plan.k0, plan.min_active) == (16, 4, 3)
    view = LayerView(jnp.asarray(w), jnp.asarray(g), jnp.asarray(mask), jnp.float32(0.5))
    new = np.asarray(NMRule(2, 4, gamma_sal=0.3).update_mask(view, plan, jax.random.key(0)))
    assert not new[:, 3].any()                                  # ablated: empty, nothing regrown
    assert (per_block(new[:, :3], 4) == 2).all()                # survivors: exactly N per block
    # survivors keep 8 of their 12 weights (the largest |w|: rows 4, 5 of every survivor, and rows 0-1 of
    # neurons 1-2 / row 1 of neuron 0, by value), and regrow the rest of each block from the largest |grad|
    assert new[[4, 5], :3].all()
    assert int(new[:, :3].sum()) == 12
    # with ablation off, the same layer keeps neuron 3 (it refills it to 2 per block)
    new_off = np.asarray(NMRule(2, 4, gamma_sal=None).update_mask(view, plan, jax.random.key(0)))
    assert (per_block(new_off, 4) == 2).all()


def test_errors():
    with pytest.raises(ValueError, match="n must be < m"):
        sj.NM(n=4, m=4, t_end=10)
    with pytest.raises(ValueError, match="do not pass sparsity"):
        sj.NM(n=2, m=4, t_end=10, sparsity=0.5)
    with pytest.raises(ValueError, match="fan-in 6, not a multiple of m=4"):
        sj.NM(n=2, m=4, t_end=10).layer_plans({"Dense_0": {"kernel": jnp.ones((6, 3))}})


def test_rule_configuration_errors():
    with pytest.raises(TypeError, match="needs rule="):
        sj.DynamicSparsity(sparsity=0.9, t_end=10)
    with pytest.raises(TypeError, match="must implement"):
        sj.DynamicSparsity(sparsity=0.9, t_end=10, rule=object())
    with pytest.raises(TypeError, match="builds its own rule"):
        sj.SRigL(sparsity=0.9, t_end=10, rule=sj.rules.RigLRule())
    # dataclasses.replace rebuilds the rule from the new fields
    import dataclasses
    assert dataclasses.replace(sj.SRigL(sparsity=0.9, t_end=10), gamma_sal=None).layer_rule.gamma_sal is None
    assert sj.DynamicSparsity(sparsity=0.9, t_end=10, rule=NMRule(1, 4)).layer_rule == NMRule(1, 4)
