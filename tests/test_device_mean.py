"""Exact ties in the growth scores survive the cross-device gradient average (``train.steps.device_mean``).

The bug this guards against (2-process ``--mode pmap`` masks differed from one process's after the first mask
update): ``lax.pmean`` across processes runs XLA's CPU all-reduce over gloo, a ring that adds each chunk of a
buffer starting at another device, so a value equal on every device comes out 1 ulp apart in different chunks.
MNIST's background pixels (constant over a batch) give gradients that tie exactly within a neuron's column; the
growth step breaks such ties by index in one process, but after that all-reduce by buffer position.

One process is enough to see it: with the gloo collectives selected (``jax.distributed.initialize`` with
``num_processes=1``) every fake CPU device is a gloo rank and ``lax.pmean`` adds chunks in rotated orders,
while the default in-process collectives add every element in the same order (so the plain multi-device tests
cannot see it). Needs a fresh process with 4 fake devices: this file runs itself as the worker (a few seconds).
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.subprocess_env import fake_cpu_devices_env

N_DEVICES = 4
TRIALS = 49           # sets of per-device values; element e of the test vector carries set e % TRIALS
LENGTH = TRIALS * 4800
FEATURES, CLASSES, CONSTANT_FROM = 64, 8, 8   # features >= CONSTANT_FROM are constant over the batch
GLOBAL_BATCH = 16


# --------------------------------------------------------------------------------------------------------------
# Worker (fresh process: gloo collectives, 4 fake CPU devices, one process)
# --------------------------------------------------------------------------------------------------------------

def _worker_main(out_path: str, port: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=1, process_id=0,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60)
    import jax.numpy as jnp
    import optax
    from jax import lax

    import srigl_jax as sj
    from train import steps

    assert jax.device_count() == N_DEVICES, jax.devices()
    out = {}

    # 1. Values equal on every device: lax.pmean vs device_mean vs the sum in device order.
    values = np.random.default_rng(0).normal(size=(N_DEVICES, TRIALS)).astype(np.float32) * np.float32(1e-3)
    stacked = np.stack([np.tile(values[d], LENGTH // TRIALS) for d in range(N_DEVICES)])
    in_order = values[0]
    for d in range(1, N_DEVICES):
        in_order = in_order + values[d]
    out["in_order"] = in_order / np.float32(N_DEVICES)
    for name, fn in (("pmean", lambda v: lax.pmean(v, "batch")),
                     ("device_mean", lambda v: steps.device_mean(v, "batch"))):
        out[name] = np.asarray(jax.pmap(fn, axis_name="batch")(stacked))   # (devices, LENGTH)
    # shapes, dtypes, padding (sizes not divisible by the device count), integer leaves passed through
    tree = {"odd": np.arange(N_DEVICES * 7, dtype=np.float32).reshape(N_DEVICES, 7) / 3,
            "scalar": np.arange(N_DEVICES, dtype=np.float32) * 0.1,
            "matrix": np.random.default_rng(1).normal(size=(N_DEVICES, 5, 3)).astype(np.float32),
            "count": np.arange(N_DEVICES, dtype=np.int32)}
    out["tree_in"] = tree
    out["tree"] = jax.device_get(jax.pmap(lambda t: steps.device_mean(t, "batch"), axis_name="batch")(tree))

    # 2. One SRigL update on a linear classifier whose growth gradients tie exactly (constant input features).
    rng = np.random.default_rng(2)
    images = np.full((GLOBAL_BATCH, FEATURES), -0.42, np.float32)
    images[:, :CONSTANT_FROM] = rng.normal(size=(GLOBAL_BATCH, CONSTANT_FROM))
    batch = {"image": images, "label": rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)}
    params = {"head": {"kernel": jnp.asarray(rng.normal(size=(FEATURES, CLASSES)), jnp.float32)}}
    algo = sj.SRigL(sparsity=0.75, distribution="uniform", delta_t=1, t_end=100, alpha=0.3)
    params, tx = steps.init_sparse_training(algo, optax.sgd(0.1), params, jax.random.key(0))

    def loss_fn(p, model_state, b, key):
        logits = b["image"] @ p["head"]["kernel"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()
        return loss, (model_state, logits)

    state = steps.init_train_state(tx, params, {}, jax.random.key(1))
    state = state.replace(step=jnp.ones((), jnp.int32),   # step 1: an update step (delta_t = 1)
                          opt_state=state.opt_state._replace(step=jnp.ones((), jnp.int32)))
    masks = {}
    for mode in ("single", "pmap"):
        step_fn = steps.make_train_step(loss_fn, tx, mode)
        new, metrics = step_fn(steps.put_state(state, mode), steps.shard_batch(batch, mode))
        assert bool(metrics["updated"])
        masks[mode] = np.asarray(steps.get_state(new, mode).masks["head"]["kernel"])
    out["step_masks"] = masks
    out["initial_mask"] = np.asarray(state.masks["head"]["kernel"])

    # The same update fed with each average of the device gradients: shows the ties decide the masks here.
    grad = lambda b: jax.grad(lambda p: loss_fn(p, {}, b, None)[0])(state.params)   # noqa: E731
    per_device = {k: v.reshape((N_DEVICES, -1) + v.shape[1:]) for k, v in batch.items()}
    growth = {"single": jax.jit(grad)(batch)}
    for name, mean in (("pmean", lambda g: lax.pmean(g, "batch")),
                       ("device_mean", lambda g: steps.device_mean(g, "batch"))):
        growth[name] = jax.tree.map(lambda x: x[0], jax.pmap(lambda b: mean(grad(b)), axis_name="batch")(per_device))
    update = jax.jit(lambda g: algo.update_masks(state.params, g, state.masks, jax.random.key(2), 1)[1])
    out["growth"] = {k: np.asarray(g["head"]["kernel"]) for k, g in growth.items()}
    out["update_masks"] = {k: np.asarray(update(g)["head"]["kernel"]) for k, g in growth.items()}
    with open(out_path, "wb") as f:
        pickle.dump(out, f)


# --------------------------------------------------------------------------------------------------------------
# Tests (parent process)
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    import socket

    out = tmp_path_factory.mktemp("device_mean") / "results.pkl"
    repo = Path(__file__).resolve().parents[1]
    env = fake_cpu_devices_env(N_DEVICES, repo)
    if "JAX_COMPILATION_CACHE_DIR" in env:   # gloo executables: a cache of their own (see conftest)
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(env["JAX_COMPILATION_CACHE_DIR"], "gloo-1proc-4dev")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, __file__, str(out), str(port)], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"gloo worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


def _unequal_trials(mean: np.ndarray) -> int:
    """How many of the value sets came out as more than one value (they were equal on every device)."""
    per_trial = mean.reshape(-1, TRIALS)
    return sum(len(np.unique(per_trial[:, t])) > 1 for t in range(TRIALS))


def test_cross_process_pmean_breaks_equal_values(results):
    """The hazard itself (XLA/gloo behaviour, not ours). If this ever fails, gloo's all-reduce became
    order-uniform and the tests below lost their teeth: build the hazard another way, do not delete them."""
    assert _unequal_trials(results["pmean"][0]) > 0


def test_device_mean_keeps_equal_values_equal_and_sums_in_device_order(results):
    for replica in results["device_mean"]:   # every device holds the same result
        assert _unequal_trials(replica) == 0
        np.testing.assert_array_equal(replica.reshape(-1, TRIALS)[0], results["in_order"])
        np.testing.assert_array_equal(replica, results["device_mean"][0])
    np.testing.assert_allclose(results["device_mean"][0], results["pmean"][0], rtol=1e-6, atol=1e-9)


def test_device_mean_of_a_tree(results):
    got, given = results["tree"], results["tree_in"]
    for name in ("odd", "scalar", "matrix"):
        assert got[name].shape == given[name].shape and got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], np.broadcast_to(given[name].mean(0), given[name].shape), rtol=1e-6)
    np.testing.assert_array_equal(got["count"], given["count"])   # integer leaves: untouched


def test_growth_ties_decide_the_masks_here(results):
    """The scenario has teeth: exactly tied growth gradients (constant features) split by the all-reduce."""
    g = results["growth"]["single"]
    assert all(len(np.unique(g[CONSTANT_FROM:, n])) == 1 for n in range(CLASSES))   # tied in one process
    split = results["growth"]["pmean"][CONSTANT_FROM:]
    assert any(len(np.unique(split[:, n])) > 1 for n in range(CLASSES))
    masks = results["update_masks"]
    assert not np.array_equal(masks["pmean"], masks["single"])   # ties broken by buffer position, not index
    assert not np.array_equal(masks["single"], results["initial_mask"])


def test_device_mean_growth_matches_one_device(results):
    g = results["growth"]["device_mean"]
    assert all(len(np.unique(g[CONSTANT_FROM:, n])) == 1 for n in range(CLASSES))
    np.testing.assert_array_equal(results["update_masks"]["device_mean"], results["update_masks"]["single"])


def test_pmap_train_step_masks_match_single_device(results):
    """The real pmap train step (gradients averaged with device_mean) takes the single-device mask decision."""
    masks = results["step_masks"]
    assert not np.array_equal(masks["single"], results["initial_mask"])
    np.testing.assert_array_equal(masks["pmap"], masks["single"])


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
