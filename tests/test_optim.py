"""The optax side: exact masking, optimizer-state reset for any optimizer, one sparse step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax as sj


def tiny_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"Dense_0": {"kernel": jax.random.normal(k1, (5, 4)), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jax.random.normal(k2, (4, 3)), "bias": jnp.zeros(3)}}


def random_masks(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5) if x.ndim == 2 else jnp.ones(x.shape, bool), params)


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-3),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "schedule_sgd": lambda: optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_reset_zeroes_state_of_grown_weights_only(name):
    tx = optax.chain(OPTIMIZERS[name](), sj.apply_masks())
    params = tiny_params()
    old = random_masks(params, 1)
    state = tx.init(params)
    for i in range(3):  # make every statistic nonzero
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(10 + i), x.shape), params)
        updates, state = tx.update(grads, state, params, masks=old)
        params = optax.apply_updates(params, updates)
    new = random_masks(params, 2)
    reset = sj.reset_optimizer_state(tx, state, old, new)
    # Kernels have distinct shapes, so a state leaf's shape says which parameter it belongs to.
    kept_by_shape = {params[n]["kernel"].shape: np.asarray(old[n]["kernel"] & new[n]["kernel"])
                     for n in ("Dense_0", "Dense_1")}
    checked = 0
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(reset)):
        before, after = np.asarray(before), np.asarray(after)
        kept = kept_by_shape.get(before.shape)
        if kept is not None:  # a per-parameter statistic of a kernel
            checked += 1
            assert (after[~kept] == 0).all()
            np.testing.assert_array_equal(after[kept], before[kept])
            assert (before[~kept] != 0).any()  # the test would notice a reset that did nothing
        else:
            np.testing.assert_array_equal(after, before)  # counts, hyperparameters, biases (all active)
    assert checked >= 2


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "lion"])
def test_masked_training_is_exact(name):
    """After every optimizer step inactive weights are exactly 0, weight decay and momentum included."""
    tx = optax.chain(OPTIMIZERS[name](), sj.apply_masks())
    params = tiny_params()
    masks = random_masks(params, 3)
    params = jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, masks)
    state = tx.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), params)
        updates, state = tx.update(grads, state, params, masks=masks)
        params = optax.apply_updates(params, updates)
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
            assert (np.asarray(p)[~np.asarray(m)] == 0.0).all()
            assert (np.asarray(p)[np.asarray(m)] != 0.0).all()


def test_apply_masks_zeroes_nonzero_inactive_params_and_requires_masks():
    tx = optax.chain(optax.sgd(0.1), sj.apply_masks())
    params = {"w": jnp.array([1.5, -2.0, 3.0])}
    masks = {"w": jnp.array([True, False, False])}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params, masks=masks)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], np.float32([1.4, 0.0, 0.0]))
    with pytest.raises(ValueError, match="masks"):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params, masks={"v": masks["w"]})


def mse_grads(params, seed):
    x = jax.random.normal(jax.random.key(seed), (8, 5))
    y = jax.random.normal(jax.random.key(seed + 1), (8, 3))

    def loss(p):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    return jax.grad(loss)(params)


def test_sparse_apply_step_compiles_once_and_keeps_invariants():
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=2, t_end=10, gamma_sal=0.3)
    tx = optax.chain(optax.adam(1e-2), sj.apply_masks())
    key = jax.random.key(0)
    params = tiny_params()
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    state = tx.init(params)
    step_fn = jax.jit(lambda p, s, m, g, k, t: sj.sparse_apply(algo, tx, p, s, m, g, k, t))
    updated = []
    for t in range(1, 8):
        res = step_fn(params, state, masks, mse_grads(params, t), jax.random.fold_in(key, t), jnp.int32(t))
        updated.append(bool(res.info.updated))
        params, state, masks = res.params, res.opt_state, res.masks
        k = np.asarray(masks["Dense_0"]["kernel"]).sum(axis=0)
        assert len(set(k[k > 0].tolist())) == 1
        assert (np.asarray(params["Dense_0"]["kernel"])[~np.asarray(masks["Dense_0"]["kernel"])] == 0).all()
    assert updated == [False, True, False, True, False, True, False]
    assert step_fn._cache_size() == 1  # step is traced: one compilation for every step


def test_sparse_apply_skips_nonfinite_steps():
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=1, t_end=10)
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), sj.apply_masks())
    key = jax.random.key(0)
    params = tiny_params()
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    state = tx.init(params)
    grads = mse_grads(params, 0)
    grads["Dense_1"]["kernel"] = jnp.full_like(grads["Dense_1"]["kernel"], jnp.nan)
    res = sj.sparse_apply(algo, tx, params, state, masks, grads, key, jnp.int32(1))
    assert bool(res.info.nonfinite) and not bool(res.info.updated)   # a skipped step updated nothing
    jax.tree.map(np.testing.assert_array_equal, (res.params, res.masks, res.opt_state), (params, masks, state))
    # Without skipping, the NaN reaches the params but masks remain valid constant-fan-in masks.
    res = sj.sparse_apply(algo, tx, params, state, masks, grads, key, jnp.int32(1), skip_nonfinite=False)
    k = np.asarray(res.masks["Dense_0"]["kernel"]).sum(axis=0)
    assert len(set(k[k > 0].tolist())) == 1
    assert np.isnan(np.asarray(res.params["Dense_1"]["kernel"])).any()


def test_growth_gradient_averaging_window():
    algo = sj.SRigL(sparsity=0.5, delta_t=5, t_end=100, grad_accumulation_steps=3)
    params = {"w": jnp.zeros(2)}
    acc = algo.init_grad_accumulator(params)
    for step in range(1, 11):
        acc = algo.accumulate_grads(acc, {"w": jnp.full(2, float(step))}, step)
        if step == 5:
            np.testing.assert_allclose(algo.averaged_grads(acc)["w"], [4.0, 4.0])  # mean of steps 3, 4, 5
    np.testing.assert_allclose(algo.averaged_grads(acc)["w"], [9.0, 9.0])  # mean of 8, 9, 10


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw", "chain_clip_adam"])
def test_grown_weights_leave_the_update_step_at_zero_with_zero_state(name):
    """Spec step 9: grown weights start at 0 and their optimizer state is reset, even though the optimizer
    also steps on the update step; inactive positions never reach the optimizer (clipping sees the sparse
    gradient)."""
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=1, t_end=10, gamma_sal=None)
    tx = optax.chain(OPTIMIZERS[name](), sj.apply_masks())
    key = jax.random.key(0)
    params = tiny_params()
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    state = tx.init(params)
    res = sj.sparse_apply(algo, tx, params, state, masks, mse_grads(params, 1), key, jnp.int32(1))
    old, new = np.asarray(masks["Dense_0"]["kernel"]), np.asarray(res.masks["Dense_0"]["kernel"])
    grown = new & ~old
    assert grown.any()
    assert (np.asarray(res.params["Dense_0"]["kernel"])[grown] == 0).all()
    for leaf in jax.tree.leaves(res.opt_state):
        if np.shape(leaf) == old.shape:
            assert (np.asarray(leaf)[grown] == 0).all()


def test_step_lands_grown_weights_on_zero_even_if_params_were_not():
    """The update step of ``sparse_step`` (behind both ``sparse_optimizer`` and ``sparse_apply``) with params that
    hold nonzero values off the mask (e.g. dense weights loaded under sparse masks): grown weights come out exactly
    0 (they start at 0 and SGD gives them no gradient on this step), dropped and inactive ones exactly 0, kept ones
    p - lr * g. Growing onto the stale value would leave p there."""
    lr = 0.1
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=1, t_end=10, gamma_sal=None)
    key = jax.random.key(0)
    params = jax.tree.map(lambda p: p + 3.0, tiny_params())     # nonzero everywhere, on and off the mask
    masks = algo.init_masks(params, key)
    grads = mse_grads(params, 1)
    res = sj.sparse_apply(algo, optax.sgd(lr), params, optax.sgd(lr).init(params), masks, grads, key, jnp.int32(1))
    assert bool(res.info.updated)
    for layer in ("Dense_0", "Dense_1"):
        p, g = np.asarray(params[layer]["kernel"]), np.asarray(grads[layer]["kernel"])
        old, new = np.asarray(masks[layer]["kernel"]), np.asarray(res.masks[layer]["kernel"])
        assert (new & ~old).any()
        want = np.where(new & old, p - np.float32(lr) * g, 0.0)
        np.testing.assert_allclose(res.params[layer]["kernel"], want, rtol=1e-6, atol=0)


def test_clipping_sees_only_active_gradients():
    algo = sj.Static(sparsity=0.5, distribution="uniform")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0), sj.apply_masks())
    params = {"w": {"kernel": jnp.zeros((4, 2))}}
    masks = {"w": {"kernel": jnp.array([[True, False]] * 4)}}
    grads = {"w": {"kernel": jnp.array([[0.3, 100.0]] * 4)}}  # huge gradients only where inactive
    res = sj.sparse_apply(algo, tx, params, tx.init(params), masks, grads, jax.random.key(0), jnp.int32(1))
    # active gradient norm 0.6 < 1: no clipping, so the active weights move by exactly -0.3
    np.testing.assert_allclose(np.asarray(res.params["w"]["kernel"])[:, 0], -0.3, rtol=1e-6)
    assert (np.asarray(res.params["w"]["kernel"])[:, 1] == 0).all()
