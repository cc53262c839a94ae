"""``sj.sparse_optimizer`` as a drop-in optax transformation (run in a fresh process by test_sparse_optimizer.py): plain optax, Flax ``TrainState``, ``nnx.Optimizer``,
``optax.MultiSteps``, Orbax round trips, non-finite steps and clear errors. (Bit-identity with the old
``sparse_apply`` on every method is in test_golden.py; multi-device runs in test_multidevice.py.)"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import srigl_jax as sj

DELTA_T = 2
N_STEPS = 7   # mask updates at steps 2, 4, 6


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(nn.relu(nn.Dense(24, name="hidden")(x)))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(12, 24, rngs=rngs)
        self.out = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def batch(i: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(i)
    x = rng.normal(size=(16, 12)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray((x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0))


def make_algo(**kw) -> sj.SRigL:
    return sj.SRigL(**{"sparsity": 0.7, "distribution": "uniform", "delta_t": DELTA_T, "t_end": 100, "alpha": 0.4,
                       "gamma_sal": 0.3, "random_tie_break": True, **kw})


def linen_setup(algo=None, inner=None):
    algo = algo or make_algo()
    model = LinenMLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
    masks = algo.init_masks(params, jax.random.key(1))
    params = algo.init_params(params, masks, jax.random.key(2))
    tx = sj.sparse_optimizer(inner or optax.sgd(0.1, momentum=0.9), algo, masks=masks, key=jax.random.key(3))
    return model, params, tx


def linen_loss(model):
    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()
    return loss


def plain_optax_run(model, params, tx, n_steps=N_STEPS):
    loss = linen_loss(model)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for i in range(n_steps):
        params, opt_state = step(params, opt_state, *batch(i))
    return params, opt_state


def assert_trees_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def assert_sparse_invariants(params, masks):
    for path in ("hidden", "out"):
        m = np.asarray(masks[path]["kernel"])
        fan_in = m.sum(axis=0)
        assert len(set(fan_in[fan_in > 0].tolist())) == 1, fan_in      # constant fan-in
        assert (np.asarray(params[path]["kernel"])[~m] == 0).all()        # inactive weights exactly 0


@pytest.fixture(params=[True, pytest.param(False, marks=pytest.mark.slow)], ids=["jit", "eager"])
def compiled(request) -> bool:
    """Whether the loops below compile their steps (CI) or call the transformation eagerly (slow: an eager update
    re-traces and re-compiles its conditionals on every call, minutes on 2 cores). Same assertions either way."""
    return request.param


@pytest.fixture(scope="module")
def plain_run():
    model, params, tx = linen_setup()
    initial_masks = sj.get_masks(tx.init(params))
    final_params, opt_state = plain_optax_run(model, params, tx)
    return final_params, opt_state, initial_masks


def test_plain_optax_loop_trains_sparse(plain_run):
    params, opt_state, initial_masks = plain_run
    sparse = sj.get_sparse_state(opt_state)
    assert int(sparse.step) == N_STEPS
    assert_sparse_invariants(params, sparse.masks)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(sparse.masks), jax.tree.leaves(initial_masks)))
    assert not bool(sparse.info.nonfinite) and bool(sparse.info.updated)   # the last call ran at step 6
    np.testing.assert_allclose(float(sparse.info.drop_fraction), float(make_algo().drop_fraction(N_STEPS - 1)))


def test_flax_train_state_loop_is_unchanged_and_identical(plain_run):
    model, params, tx = linen_setup()
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    loss = linen_loss(model)

    @jax.jit
    def step(state, x, y):
        return state.apply_gradients(grads=jax.grad(loss)(state.params, x, y))

    for i in range(N_STEPS):
        state = step(state, *batch(i))
    want_params, want_opt_state, _ = plain_run
    assert_trees_bitwise_equal(state.params, want_params)
    assert_trees_bitwise_equal(sj.get_masks(state), sj.get_masks(want_opt_state))   # TrainState searched too
    assert int(state.step) == N_STEPS


def test_nnx_optimizer_loop_is_unchanged_and_identical(compiled):
    """nnx.Optimizer keeps its state as OptVariables; the transformation sees plain arrays and gives, bit for
    bit, what a plain optax loop gives on the same gradients."""
    algo = make_algo()
    model = NNXMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = algo.init_masks(params, jax.random.key(1))   # nnx.State masks (Param-wrapped) are fine
    nnx.update(model, algo.init_params(params, masks, jax.random.key(2)))
    make_tx = lambda: sj.sparse_optimizer(optax.adam(1e-2), algo, masks=masks, key=jax.random.key(3))  # noqa: E731
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    def loss(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def user_step(model, optimizer, x, y):   # the user's unchanged NNX step
        grads = nnx.grad(loss)(model, x, y)
        optimizer.update(model, grads)
        return grads

    tx = make_tx()
    reference_update = tx.update
    if compiled:   # the user's step under nnx.jit, the reference update under jax.jit
        user_step, reference_update = nnx.jit(user_step), jax.jit(tx.update)
    reference = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state = tx.init(reference)
    for i in range(N_STEPS):
        grads = user_step(model, optimizer, *batch(i))
        updates, opt_state = reference_update(nnx.to_pure_dict(grads), opt_state, reference)
        reference = optax.apply_updates(reference, updates)
        assert_trees_bitwise_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), reference)
    got_masks = sj.get_masks(optimizer.opt_state)
    assert_trees_bitwise_equal(got_masks, sj.get_masks(opt_state))
    assert_sparse_invariants(reference, got_masks)
    assert int(sj.get_sparse_state(optimizer).step) == N_STEPS
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(got_masks), jax.tree.leaves(masks)))
    # The pieces work on an nnx.Optimizer's state too (they used to raise a pytree structure error).
    inner_state = optimizer.opt_state.inner_state
    reset = sj.reset_optimizer_state(optax.adam(1e-2), inner_state, masks, got_masks)
    assert jax.tree.structure(reset) == jax.tree.structure(inner_state)


def test_multisteps_counts_real_optimizer_steps(compiled):
    """optax.MultiSteps(tx, k): the mask schedule (delta_t) counts real optimizer steps, not mini-batches."""
    k = 3
    model, params, tx = linen_setup()
    multi = optax.MultiSteps(tx, every_k_schedule=k)
    loss = linen_loss(model)
    opt_state = multi.init(params)
    update = jax.jit(multi.update) if compiled else multi.update
    updated_at, real_steps = [], 0
    for i in range(k * 5):
        grads = jax.grad(loss)(params, *batch(i))
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        sparse = sj.get_sparse_state(opt_state)
        if int(sparse.step) != real_steps:   # the wrapped transformation ran on this mini-batch
            real_steps = int(sparse.step)
            if bool(sparse.info.updated):
                updated_at.append((i + 1, real_steps))
    assert int(sj.get_sparse_state(opt_state).step) == 5
    # updates on the 3rd and 5th real steps (steps already taken 2 and 4), i.e. mini-batches 9 and 15
    assert updated_at == [(9, 3), (15, 5)]
    assert_sparse_invariants(params, sj.get_masks(opt_state))


def test_nonfinite_step_changes_nothing_and_reports_it(compiled):
    model, params, tx = linen_setup(make_algo(delta_t=1))   # every step is an update step
    update = jax.jit(tx.update) if compiled else tx.update
    opt_state = tx.init(params)
    grads = jax.grad(linen_loss(model))(params, *batch(0))
    params, opt_state = jax.tree.map(jnp.asarray, (params, opt_state))
    for bad in ("grads", "params"):
        g, p = grads, params
        if bad == "grads":
            g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
        else:
            p = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), params)
        before = opt_state._replace(step=jnp.int32(3))
        updates, after = update(g, before, p)
        assert all((np.asarray(u) == 0).all() for u in jax.tree.leaves(updates))
        info = after.info
        assert bool(info.nonfinite) and not bool(info.updated), bad
        assert_trees_bitwise_equal((after.masks, after.inner_state, after.grad_acc),
                                   (before.masks, before.inner_state, before.grad_acc))
        assert int(after.step) == 4   # a skipped step still counts: the schedule stays aligned with the data
    updates, after = update(grads, opt_state._replace(step=jnp.int32(3)), params)
    assert bool(after.info.updated) and not bool(after.info.nonfinite)


def test_growth_window_is_automatic():
    algo = make_algo(grad_accumulation_steps=2)
    model, params, tx = linen_setup(algo)
    state = tx.init(params)
    assert state.grad_acc is not None and jax.tree.structure(state.grad_acc) == jax.tree.structure(params)
    assert linen_setup()[2].init(params).grad_acc is None
    grads = jax.grad(linen_loss(model))(params, *batch(0))
    with pytest.raises(ValueError, match="grad_acc"):   # the old silent ignore is now an error
        sj.sparse_apply(algo, optax.sgd(0.1), params, optax.sgd(0.1).init(params), sj.get_masks(state), grads,
                        jax.random.key(0), jnp.int32(2))


def test_orbax_round_trip_continues_bit_identically(tmp_path):
    model, params, tx = linen_setup(make_algo(grad_accumulation_steps=2))
    loss = linen_loss(model)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    step = jax.jit(lambda s, x, y: s.apply_gradients(grads=jax.grad(loss)(s.params, x, y)))
    for i in range(3):
        state = step(state, *batch(i))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    assert_trees_bitwise_equal(restored, state)
    for i in range(3, N_STEPS):
        state, restored = step(state, *batch(i)), step(restored, *batch(i))
    assert_trees_bitwise_equal(restored, state)


def test_clear_errors():
    model, params, tx = linen_setup()
    masks = sj.get_masks(tx.init(params))
    algo = make_algo()
    with pytest.raises(ValueError, match="missing from masks.*hidden/kernel"):
        sj.sparse_optimizer(optax.sgd(0.1), algo, masks={"out": masks["out"]}, key=jax.random.key(0)).init(params)
    float_masks = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
    with pytest.raises(TypeError, match="boolean"):
        sj.sparse_optimizer(optax.sgd(0.1), algo, masks=float_masks, key=jax.random.key(0)).init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="found 0"):
        sj.get_masks(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="found 2"):
        sj.get_masks((tx.init(params), tx.init(params)))
