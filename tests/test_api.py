"""The public API on the pytrees users have: plain dicts, Flax linen params, Flax NNX State."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import srigl_jax as sj


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.LayerNorm()(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(12, 16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def constant_fan_in(mask):
    fan_in = np.asarray(mask).reshape(-1, mask.shape[-1]).sum(axis=0)
    return sorted(set(fan_in[fan_in > 0].tolist()))


def train_a_few_steps(algo, loss_fn, params, n_steps=6):
    tx = optax.chain(optax.sgd(0.05, momentum=0.9), sj.apply_masks())
    key = jax.random.key(0)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, masks, t):
        grads = jax.grad(loss_fn)(params)
        return sj.sparse_apply(algo, tx, params, opt_state, masks, grads, jax.random.fold_in(key, t), t)

    for t in range(1, n_steps + 1):
        res = step(params, opt_state, masks, jnp.int32(t))
        params, opt_state, masks = res.params, res.opt_state, res.masks
    return params, masks


def test_linen_cnn_params():
    model = LinenCNN()
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
    params = model.init(jax.random.key(0), x)["params"]
    algo = sj.SRigL(sparsity=0.8, distribution="erk", delta_t=2, t_end=100, gamma_sal=0.3)
    plans = algo.layer_plans(params)
    assert set(plans) == {"Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"}
    assert plans["Conv_0/kernel"].fan_in == 27 and not plans["Dense_1/kernel"].ablatable

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), jnp.arange(4)).mean()

    new_params, masks = train_a_few_steps(algo, loss_fn, params)
    for path in ("Conv_0", "Dense_0", "Dense_1"):
        assert len(constant_fan_in(masks[path]["kernel"])) == 1
        assert (np.asarray(new_params[path]["kernel"])[~np.asarray(masks[path]["kernel"])] == 0).all()
    assert np.asarray(masks["LayerNorm_0"]["scale"]).all()
    assert np.isfinite(float(loss_fn(new_params)))


def test_nnx_state():
    model = NNXMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 12))
    algo = sj.RigL(sparsity=0.7, distribution="uniform", delta_t=2, t_end=100)
    assert set(algo.layer_plans(state)) == {"hidden/kernel", "out/kernel"}

    def loss_fn(s):
        return jnp.mean(nnx.merge(graphdef, s)(x) ** 2)

    new_state, masks = train_a_few_steps(algo, loss_fn, state)
    assert isinstance(masks, nnx.State)
    hidden = np.asarray(masks["hidden"]["kernel"].get_value())
    assert hidden.sum() == algo.layer_plans(state)["hidden/kernel"].nnz_budget
    assert (np.asarray(new_state["hidden"]["kernel"].get_value())[~hidden] == 0).all()
    nnx.update(model, new_state)  # the masked state loads back into the module
    assert np.isfinite(np.asarray(model(x))).all()


def test_mismatched_and_bad_inputs_raise_clear_errors():
    params = {"Dense_0": {"kernel": jnp.ones((6, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
    algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=1, t_end=10)
    key = jax.random.key(0)
    masks = algo.init_masks(params, key)
    with pytest.raises(ValueError, match="grads must have the same tree structure"):
        algo.update_masks(params, {"Dense_0": params["Dense_0"]}, masks, key, 1)
    with pytest.raises(ValueError, match="masks leaf 'Dense_0/kernel' has shape"):
        algo.update_masks(params, params, {"Dense_0": {"kernel": jnp.ones((4, 6), bool)},
                                           "Dense_1": masks["Dense_1"]}, key, 1)
    with pytest.raises(TypeError, match="boolean"):
        algo.update_masks(params, params, jax.tree.map(lambda m: m.astype(jnp.float32), masks), key, 1)
    with pytest.raises(ValueError, match="same tree structure"):
        algo.init_params(params, {"x": 1}, key)


def test_sparsity_metrics_and_itop_by_hand():
    # kernel (fan_in 4, neurons 3): neuron 0 has 2 active, neuron 1 has 2, neuron 2 none.
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    params = {"kernel": jnp.zeros((4, 3))}
    plans = sj.SRigL(sparsity=0.5, distribution="uniform", t_end=10, ablation_exempt=()).layer_plans(params)
    m = sj.sparsity_metrics({"kernel": mask}, plans)
    assert float(m["sparsity/kernel"]) == pytest.approx(1 - 4 / 12)
    assert int(m["active_neurons/kernel"]) == 2
    assert int(m["fan_in/kernel"]) == 2 and int(m["fan_in_min/kernel"]) == 2
    assert float(m["active_neuron_fraction"]) == pytest.approx(2 / 3)
    assert float(m["global_sparsity"]) == pytest.approx(8 / 12)
    itop = sj.init_itop({"kernel": mask})
    itop = sj.update_itop(itop, {"kernel": jnp.zeros((4, 3), bool).at[3, 2].set(True).at[0, 0].set(True)})
    assert float(sj.itop_rate(itop, plans)) == pytest.approx(5 / 12)
    jitted = jax.jit(lambda mm: sj.sparsity_metrics(mm, plans))({"kernel": mask})
    assert int(jitted["active_neurons/kernel"]) == 2


def test_static_and_set_share_the_interface():
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (10, 6))}}
    for cls in (sj.Static, sj.SET, sj.RigL, sj.SRigL):
        kwargs = dict(sparsity=0.6, distribution="uniform", delta_t=1)
        if cls is not sj.Static:
            kwargs["t_end"] = 10
        algo = cls(**kwargs)
        key = jax.random.key(1)
        masks = algo.init_masks(params, key)
        p = algo.init_params(params, masks, key)
        grads = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(2), (10, 6))}}
        new_p, new_m = jax.jit(algo.update_masks)(p, grads, masks, key, 1)
        changed = bool((np.asarray(new_m["Dense_0"]["kernel"]) != np.asarray(masks["Dense_0"]["kernel"])).any())
        assert changed == (cls is not sj.Static)
        assert int(new_m["Dense_0"]["kernel"].sum()) == int(masks["Dense_0"]["kernel"].sum())
