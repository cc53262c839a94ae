"""train.steps on one device: state init, the jitted step (schedule, NaN guard, one compilation), eval sums, errors.

Multi-device behaviour (pmap, jit+NamedSharding) is in test_multidevice.py.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax as sj
from train import steps

DELTA_T = 3
N_STEPS = 7   # updates at steps 3 and 6


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(16, name="fc1")(x)))


MODEL = TinyMLP()
ALGO = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=DELTA_T, t_end=100, alpha=0.3, gamma_sal=0.3,
                grad_accumulation_steps=2)
INNER = optax.sgd(0.1, momentum=0.9)
TRACES = {"loss_fn": 0}


def loss_fn(params, model_state, batch, rng):
    logits = MODEL.apply({"params": params}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), (model_state, logits)


def counted_loss_fn(params, model_state, batch, rng):
    TRACES["loss_fn"] += 1   # Python side effect: counts traces, not executions
    return loss_fn(params, model_state, batch, rng)


def apply_fn(params, model_state, batch):
    return MODEL.apply({"params": params}, batch["image"])


def make_batch(seed: int, n: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"image": x, "label": (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)}


@functools.lru_cache(maxsize=None)   # never donated: every use goes through put_state (a copy) or stays eager
def fresh_setup(seed: int = 0) -> tuple[steps.TrainState, optax.GradientTransformation]:
    params = MODEL.init(jax.random.key(seed), jnp.zeros((1, 8)))["params"]
    params, tx = steps.init_sparse_training(ALGO, INNER, params, jax.random.key(seed + 1))
    return steps.init_train_state(tx, params, None, jax.random.key(seed + 2)), tx


def fresh_state(seed: int = 0) -> steps.TrainState:
    return fresh_setup(seed)[0]


TX = fresh_setup()[1]


@pytest.fixture(scope="module")
def step_fn():
    TRACES["loss_fn"] = 0
    return steps.make_train_step(counted_loss_fn, TX, "single")


@pytest.fixture(scope="module")
def trained(step_fn):
    """(states before each step, metrics of each step, final state) of an N_STEPS run."""
    state = steps.put_state(fresh_state(), "single")
    before, metrics = [], []
    for i in range(N_STEPS):
        before.append(jax.device_get(state))   # host copy: the step donates its input
        state, m = step_fn(state, make_batch(i))
        metrics.append(jax.device_get(m))
    return before, metrics, jax.device_get(state)


def test_init_train_state():
    state = fresh_state()
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert state.model_state == {}
    kernel, mask = np.asarray(state.params["fc1"]["kernel"]), np.asarray(state.masks["fc1"]["kernel"])
    assert mask.dtype == bool and 0 < mask.sum() < mask.size
    assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0)
    assert len(set(mask.sum(axis=0).tolist())) == 1          # SRigL: constant fan-in
    for ever, now in zip(jax.tree.leaves(state.itop), jax.tree.leaves(state.masks)):
        np.testing.assert_array_equal(ever, now)
    sparse = sj.get_sparse_state(state.opt_state)   # the growth window is there because ALGO asks for 2 steps
    for acc, p in zip(jax.tree.leaves(sparse.grad_acc), jax.tree.leaves(state.params)):
        assert acc.shape == p.shape and not np.any(acc)
    fresh_setup.cache_clear()
    again = fresh_state()   # deterministic given the keys
    for a, b in zip(jax.tree.leaves((state.params, state.masks)), jax.tree.leaves((again.params, again.masks))):
        np.testing.assert_array_equal(a, b)


def test_step_follows_the_mask_schedule(trained):
    before, metrics, final = trained
    states = before + [final]
    assert [int(s.step) for s in states] == list(range(N_STEPS + 1))
    assert [i for i, m in enumerate(metrics) if m["updated"]] == [3, 6]
    for i in range(N_STEPS):
        changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(states[i].masks),
                                                     jax.tree.leaves(states[i + 1].masks)))
        assert changed == bool(metrics[i]["updated"]), i
        for p, m in zip(jax.tree.leaves(states[i + 1].params), jax.tree.leaves(states[i + 1].masks)):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
        for ever, m in zip(jax.tree.leaves(states[i + 1].itop), jax.tree.leaves(states[i + 1].masks)):
            assert np.all(np.asarray(ever)[np.asarray(m)])


def test_metrics_are_loss_and_accuracy_before_the_update(trained):
    before, metrics, _ = trained
    for i in (0, 3):
        loss, (_, logits) = loss_fn(before[i].params, {}, make_batch(i), None)
        np.testing.assert_allclose(metrics[i]["loss"], loss, rtol=1e-5)
        accuracy = np.mean(np.argmax(logits, -1) == make_batch(i)["label"])
        np.testing.assert_allclose(metrics[i]["accuracy"], accuracy, rtol=1e-6)
        assert not metrics[i]["nonfinite"]


def test_step_compiles_once(trained, step_fn):
    """N_STEPS calls (update and non-update steps) -> one trace, one executable: ``step`` is traced."""
    assert TRACES["loss_fn"] == 1
    assert step_fn._cache_size() == 1


@pytest.mark.parametrize("extra_steps", [
    1,   # step 8 lies in the growth-gradient window (the 2 steps up to the update at 9)
    0,   # outside the window: the step's own grads must be checked, not only the accumulated ones
])
def test_nonfinite_batch_leaves_state_untouched(trained, step_fn, extra_steps):
    _, _, state = trained
    state = steps.put_state(state, "single")
    for i in range(extra_steps):
        state, _ = step_fn(state, make_batch(50 + i))
    before = jax.device_get(state)
    bad = make_batch(99)
    bad["image"][0, 0] = np.nan
    after, m = step_fn(state, bad)
    assert bool(m["nonfinite"])
    for a, b in zip(jax.tree.leaves((before.params, before.masks)), jax.tree.leaves((after.params, after.masks))):
        np.testing.assert_array_equal(a, b)


def test_forward_key_depends_on_rng_and_step_only():
    state = fresh_state()
    k0 = steps.forward_key(state)
    same = steps.forward_key(state.replace(params=None))
    later = steps.forward_key(state.replace(step=state.step + 1))
    np.testing.assert_array_equal(jax.random.key_data(k0), jax.random.key_data(same))
    assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(later))


def test_eval_step_sums_and_padding(trained):
    _, _, final = trained
    eval_fn = steps.make_eval_step(apply_fn, "single")
    batch = make_batch(5, n=13)
    sums = jax.device_get(eval_fn(final, batch))
    logits = np.asarray(apply_fn(final.params, {}, batch))
    assert float(sums["count"]) == 13
    assert float(sums["correct"]) == np.sum(np.argmax(logits, -1) == batch["label"])
    expected_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
    np.testing.assert_allclose(float(sums["loss"]), expected_loss, rtol=1e-5)
    padded = steps.pad_batch(batch, 8)
    assert padded["image"].shape[0] == 16 and padded["valid"].sum() == 13
    padded_sums = jax.device_get(eval_fn(final, padded))
    for key in ("count", "correct", "loss"):
        np.testing.assert_allclose(float(padded_sums[key]), float(sums[key]), rtol=1e-6)


def test_replicate_roundtrip():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}
    rep = steps.replicate(tree)
    assert rep["a"].shape == (jax.local_device_count(), 2, 3)
    back = steps.unreplicate(rep)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["step"]) == 4


def test_put_state_does_not_alias_leaves():
    """The step donates its input: put_state must hand it distinct buffers even if leaves are shared."""
    state = fresh_state()
    shared = state.replace(itop=state.masks)   # the same arrays twice
    placed = steps.put_state(shared, "single")
    ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(placed)]
    assert len(set(ptrs)) == len(ptrs)


def test_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        steps.make_train_step(loss_fn, TX, "tpu")
    with pytest.raises(ValueError, match="do not include the batch axis"):
        steps.make_train_step(loss_fn, TX, "sharded", mesh=steps.make_mesh("data"))
    with pytest.raises(ValueError, match="leading"):
        steps.shard_batch({"image": np.zeros((4, 2)), "label": np.zeros(3)}, "single")
    eval_fn = steps.make_eval_step(apply_fn, "single")
    one_hot = {"image": np.zeros((2, 8), np.float32), "label": np.zeros((2, 4), np.int32)}
    with pytest.raises(ValueError, match="integer class ids"):
        eval_fn(fresh_state(), one_hot)
