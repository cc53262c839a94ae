"""Data-parallel SRigL on 4 fake CPU devices: pmap and jit+NamedSharding against a single-device run.

XLA_FLAGS=--xla_force_host_platform_device_count=4 only works if it is set before jax is imported, so the
computations run once in a subprocess (this file executed as a script, see ``_worker_main``) that pickles its
results; the tests below assert on them.

Exactness: a multi-device run sums the gradient in a different order than a single-device run, so values agree
only to rounding. Masks are discrete (top-k choices): a rounding difference could flip a choice only if two
scores at a selection boundary were within rounding of each other. The worker therefore runs in float64
(``jax_enable_x64``): the runs then differ by ~1e-16 relative, and the core's float32 scores come out bit-equal
unless a value sits within that distance of a float32 rounding boundary (odds ~1e-9 per value), so exact mask
equality is a fair assertion. In float32 the same runs also give 0 differing mask entries (run the worker with
SRIGL_FLOAT32_FLIPS=1 to count them), but that is not asserted.
"""
from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.subprocess_env import fake_cpu_devices_env

N_DEVICES = 4
IN_FEATURES = 32
GLOBAL_BATCH = 32
N_STEPS = 11
DELTA_T = 3          # mask updates at steps 3, 6, 9 (t_end = 10)
T_END = 10
UPDATE_STEPS = [3, 6, 9]


# --------------------------------------------------------------------------------------------------------------
# Worker (runs in the subprocess with 4 devices)
# --------------------------------------------------------------------------------------------------------------

def _worker_main(out_path: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    import srigl_jax as sj
    from train import steps

    assert jax.device_count() == N_DEVICES, jax.devices()
    f64 = jnp.float64

    class MLP(nn.Module):
        """Two sparse layers with BatchNorm between them. bn_axis="batch": synchronised BN under pmap."""
        bn_axis: str | None = None

        @nn.compact
        def __call__(self, x, train=True):
            x = nn.Dense(48, name="fc1", param_dtype=f64)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis,
                             param_dtype=f64, name="bn")(x)
            return nn.Dense(10, name="head", param_dtype=f64)(nn.relu(x))

    def loss_for(model):
        def loss_fn(params, model_state, batch, rng):
            trace_count[0] += 1   # Python side effect: runs once per trace, never per executed step
            logits, new_state = model.apply({"params": params, **model_state}, batch["image"], train=True,
                                            mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, (dict(new_state), logits)
        return loss_fn

    def apply_fn(params, model_state, batch):
        return MLP().apply({"params": params, **model_state}, batch["image"], train=False)

    trace_count = [0]
    data_rng = np.random.default_rng(0)
    teacher = data_rng.normal(size=(IN_FEATURES, 10))
    batches = []
    for _ in range(N_STEPS):
        x = data_rng.normal(size=(GLOBAL_BATCH, IN_FEATURES))
        batches.append({"image": x, "label": np.argmax(x @ teacher, axis=-1).astype(np.int32)})
    # random_tie_break: the mask key matters, so a device-dependent key would show up as diverging replicas
    algo = sj.SRigL(sparsity=0.8, distribution="uniform", delta_t=DELTA_T, t_end=T_END, alpha=0.4, gamma_sal=0.3,
                    random_tie_break=True)
    inner = optax.sgd(0.1, momentum=0.9)
    mesh = steps.make_mesh()

    @functools.lru_cache(maxsize=None)
    def initial_setup(dtype):
        """(initial TrainState, sparse optimizer) shared by every run of ``dtype``."""
        init = jax.jit(lambda k: MLP().init(k, jnp.zeros((1, IN_FEATURES), dtype)))   # one program, not many ops
        variables = jax.tree.map(lambda v: v.astype(dtype), init(jax.random.key(1)))
        model_state = {k: v for k, v in variables.items() if k != "params"}
        params, tx = steps.init_sparse_training(algo, inner, variables["params"], jax.random.key(2))
        return steps.init_train_state(tx, params, model_state, jax.random.key(3)), tx

    def initial_state(dtype):
        return initial_setup(dtype)[0]

    def run(mode, bn_axis=None, dtype=f64):
        """Train N_STEPS from the shared initial state; final state (pmap: with its device axis), metrics, counts."""
        model = MLP(bn_axis)
        state, tx = initial_setup(dtype)
        state = steps.put_state(state, mode, mesh)
        step_fn = steps.make_train_step(loss_for(model), tx, mode, mesh)
        compiles = []
        listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
        trace_count[0] = 0
        history = []
        for i, batch in enumerate(batches):
            batch = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in batch.items()}
            placed = steps.shard_batch(batch, mode, mesh)
            if i == 1:   # everything compiled by the first step; later steps must reuse it
                jax.monitoring.register_event_duration_secs_listener(listener)
            state, metrics = step_fn(state, placed)
            history.append(metrics)
        jax.block_until_ready(state)
        jax.monitoring.unregister_event_duration_listener(listener)
        shard_views = None
        if mode == "sharded":   # every device's copy of the replicated state
            shard_views = [np.stack([np.asarray(s.data) for s in leaf.addressable_shards])
                           for leaf in jax.tree.leaves((state.masks, state.params))]
        eval_fn = steps.make_eval_step(apply_fn, mode, mesh)
        eval_batch = steps.pad_batch({"image": batches[0]["image"][:30].astype(dtype),
                                      "label": batches[0]["label"][:30]}, N_DEVICES)
        eval_sums = jax.device_get(eval_fn(state, steps.shard_batch(eval_batch, mode, mesh)))
        return {
            "state": jax.device_get(state.replace(rng=jax.random.key_data(state.rng))),
            "one_copy": jax.device_get(steps.get_state(state, mode).replace(rng=None)),
            "metrics": jax.device_get(history),
            "traces": trace_count[0],
            "compiles_after_first_step": len(compiles),
            "shard_views": shard_views,
            "eval": eval_sums,
        }

    results = {}
    clock = time.perf_counter()

    def timed(name, fn, *args, **kwargs):   # wall time per scenario on stderr, to keep the test budget honest
        nonlocal clock
        results[name] = fn(*args, **kwargs)
        print(f"{name}: {time.perf_counter() - clock:.1f} s", file=sys.stderr)
        clock = time.perf_counter()

    timed("initial_masks", lambda: jax.device_get(initial_state(f64).masks))
    timed("single", run, "single")
    timed("sharded", run, "sharded")
    timed("pmap_sync_bn", run, "pmap", bn_axis="batch")
    timed("pmap_local_bn", run, "pmap")
    if os.environ.get("SRIGL_FLOAT32_FLIPS"):   # informational, off by default to save test time
        timed("float32_mask_flips", _float32_mask_flips, run, jnp.float32)
    timed("averaging", _averaging_scenario, jax, jnp, optax, sj, steps)
    timed("sharded_kernels", _sharded_kernels_scenario, jax, jnp, optax, sj, steps)
    results["uneven_batch_errors"] = {}
    for mode in ("pmap", "sharded"):
        try:
            steps.shard_batch({"image": np.zeros((30, IN_FEATURES)), "label": np.zeros(30, np.int32)}, mode, mesh)
            results["uneven_batch_errors"][mode] = None
        except ValueError as e:
            results["uneven_batch_errors"][mode] = str(e)
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def _float32_mask_flips(run, dtype) -> dict:
    """Informational: mask entries that differ from the single-device run in float32 (not asserted)."""
    import jax

    single = jax.tree.leaves(run("single", dtype=dtype)["one_copy"].masks)
    return {mode: int(sum(np.sum(a != b) for a, b in zip(single, jax.tree.leaves(
        run(mode, bn_axis="batch" if mode == "pmap" else None, dtype=dtype)["one_copy"].masks))))
        for mode in ("pmap", "sharded")}


# One sparse layer (the classifier: never ablated), 12 inputs, 1 neuron, 4 active weights.
# Loss = mean over examples of sum(W * x), so d loss / d W = mean of the examples: each device's examples set its
# gradient. Active positions 0-3 with |w| = 1, 2, 3, 4; the update drops 2 (positions 0, 1) and regrows 2.
AVG_DEVICE_GRADS = np.zeros((N_DEVICES, 12))
for _d in range(N_DEVICES):
    AVG_DEVICE_GRADS[_d, 4 + _d] = 4.0                        # large on one device only: mean 1.0
AVG_DEVICE_GRADS[:, 8] = 1.5                                   # moderate everywhere: mean 1.5
AVG_DEVICE_GRADS[:, 9] = 1.4                                   # mean 1.4
AVG_DEVICE_GRADS[:, 10] = [5.0, 5.0, -5.0, -5.0]               # mean 0, but mean |g| = 5
# Device-averaged gradient -> grow 8 and 9. Device 0 alone would grow 10 and 4; averaging |g| would grow 10, 4..7.
AVG_EXPECTED_ACTIVE = [2, 3, 8, 9]


def _averaging_scenario(jax, jnp, optax, sj, steps) -> dict:
    """Masks after one update step where every device's gradient differs (pmap, sharded, and references)."""
    # sparsity 0.65: budget T = floor(12 * 0.35) = 4; d(1) ~ 0.6 -> the update drops floor(4 * 0.6) = 2
    algo = sj.SRigL(sparsity=0.65, distribution="uniform", delta_t=1, t_end=100, alpha=0.6, gamma_sal=0.3)
    kernel = np.zeros((12, 1))
    kernel[:4, 0] = [1.0, -2.0, 3.0, -4.0]
    params = {"head": {"kernel": jnp.asarray(kernel)}}
    masks = {"head": {"kernel": jnp.asarray(kernel != 0)}}
    inner = optax.sgd(0.0)   # lr 0: the weights stay as set
    tx = sj.sparse_optimizer(inner, algo, masks=masks, key=jax.random.key(0))

    def loss_fn(p, model_state, batch, rng):
        per_example = jnp.einsum("bf,fn->bn", batch["image"], p["head"]["kernel"])
        return jnp.mean(jnp.sum(per_example, axis=-1)), (model_state, per_example)

    def state():   # at step 1, an update step (delta_t = 1)
        opt_state = tx.init(params)._replace(step=jnp.asarray(1, jnp.int32))
        return steps.TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=opt_state, itop=masks,
                                model_state={}, rng=jax.random.key(0))

    # two examples per device, both equal to that device's target gradient
    images = np.repeat(AVG_DEVICE_GRADS, 2, axis=0)
    batch = {"image": images, "label": np.zeros(len(images), np.int32)}
    out = {}
    mesh = steps.make_mesh()
    for mode in ("pmap", "sharded"):
        step_fn = steps.make_train_step(loss_fn, tx, mode, mesh)
        new, metrics = step_fn(steps.put_state(state(), mode, mesh), steps.shard_batch(batch, mode, mesh))
        new = steps.get_state(new, mode)
        out[mode] = {"masks": np.asarray(new.masks["head"]["kernel"]), "updated": bool(metrics["updated"])}

    @jax.jit
    def reference(grad):   # single-device core update with a given gradient
        g = {"head": {"kernel": jnp.asarray(grad)[:, None]}}
        s = state()
        res = sj.sparse_apply(algo, inner, s.params, inner.init(s.params), masks, g, jax.random.key(0), s.step)
        return res.masks["head"]["kernel"][:, 0]

    out["ref_mean"] = np.asarray(reference(AVG_DEVICE_GRADS.mean(0)))
    out["ref_device0"] = np.asarray(reference(AVG_DEVICE_GRADS[0]))
    out["ref_mean_abs"] = np.asarray(reference(np.abs(AVG_DEVICE_GRADS).mean(0)))
    return out


def _sharded_kernels_scenario(jax, jnp, optax, sj, steps) -> dict:
    """The sparse optimizer under plain ``jit`` with the kernels themselves sharded over the 4 devices (columns
    of one, rows of the other) against the same loop unsharded: nothing in the user's code changes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(5)
    params = {"fc1": {"kernel": jnp.asarray(rng.normal(size=(IN_FEATURES, 48))), "bias": jnp.zeros(48)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(48, 10))), "bias": jnp.zeros(10)}}
    algo = sj.SRigL(sparsity=0.8, distribution="uniform", delta_t=2, t_end=7, gamma_sal=0.3, random_tie_break=True)
    masks = algo.init_masks(params, jax.random.key(0))
    params = algo.init_params(params, masks, jax.random.key(1))
    grads = [jax.tree.map(lambda p, i=i: jnp.asarray(np.random.default_rng(i).normal(size=p.shape)), params)
             for i in range(7)]
    mesh = steps.make_mesh()
    specs = {"fc1": {"kernel": P(None, "batch"), "bias": P("batch")}, "head": {"kernel": P("batch", None), "bias": P()}}

    def run(shard):
        tx = sj.sparse_optimizer(optax.adam(1e-2), algo, masks=masks, key=jax.random.key(2))
        place = (lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)) \
            if shard else (lambda t: t)
        p = place(params)
        state = tx.init(p)

        @jax.jit
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optax.apply_updates(p, updates), state

        for g in grads:
            p, state = step(p, state, place(g))
        shardings = [str(getattr(x.sharding, "spec", "")) for x in jax.tree.leaves(p)]
        return jax.device_get((p, sj.get_masks(state))), shardings, int(sj.get_sparse_state(state).step)

    return {"unsharded": run(False), "sharded": run(True), "initial_masks": jax.device_get(masks)}


# --------------------------------------------------------------------------------------------------------------
# Tests (parent process)
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multidevice") / "results.pkl"
    repo = Path(__file__).resolve().parents[1]
    env = fake_cpu_devices_env(N_DEVICES, repo)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"multi-device worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_run(got: dict, want: dict, rtol: float = 1e-9) -> None:
    """Masks exactly equal; params, model state and metrics equal to rounding."""
    for a, b in zip(_leaves(got["one_copy"].masks), _leaves(want["one_copy"].masks), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("params", "model_state", "itop"):
        for a, b in zip(_leaves(getattr(got["one_copy"], name)), _leaves(getattr(want["one_copy"], name)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)
    for m_got, m_want in zip(got["metrics"], want["metrics"], strict=True):
        np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=rtol)
        assert m_got["updated"] == m_want["updated"]


def test_masks_change_at_the_scheduled_steps(results):
    """The comparisons below are not trivial: several mask updates happen and change the masks."""
    run = results["single"]
    assert [i for i, m in enumerate(run["metrics"]) if m["updated"]] == UPDATE_STEPS
    changed = sum(np.sum(a != b) for a, b in zip(_leaves(run["one_copy"].masks), _leaves(results["initial_masks"])))
    assert changed > 0
    losses = [float(m["loss"]) for m in run["metrics"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


@pytest.mark.parametrize("name", ["pmap_sync_bn", "pmap_local_bn"])
def test_pmap_replicas_stay_identical(results, name):
    """Masks, params, optimizer and BatchNorm state agree on all devices (per-device BN: stats are pmean'd)."""
    state = results[name]["state"]
    for tree in (state.masks, state.params, state.model_state, state.opt_state, state.itop, state.step):
        for leaf in _leaves(tree):
            assert leaf.shape[0] == N_DEVICES
            for replica in leaf[1:]:
                np.testing.assert_array_equal(replica, leaf[0])


def test_sharded_replicated_state_is_identical_on_every_device(results):
    for per_device in results["sharded"]["shard_views"]:
        assert per_device.shape[0] == N_DEVICES
        for copy in per_device[1:]:
            np.testing.assert_array_equal(copy, per_device[0])


@pytest.mark.parametrize("name", ["sharded", "pmap_sync_bn"])
def test_matches_single_device_run(results, name):
    """Same global batch -> same masks (exactly), params, BN stats and losses as one device.

    Sharded: BN statistics are global-batch statistics automatically. pmap: needs BatchNorm(axis_name=...).
    """
    _assert_same_run(results[name], results["single"])


def test_local_batchnorm_pmap_differs_from_single_device(results):
    """Control: per-device BN normalises with per-device statistics, so this run really is different."""
    local, single = results["pmap_local_bn"]["one_copy"], results["single"]["one_copy"]
    assert not all(np.allclose(a, b) for a, b in zip(_leaves(local.params), _leaves(single.params)))


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_growth_follows_device_averaged_gradient(results, mode):
    avg = results["averaging"]
    got = avg[mode]
    assert got["updated"]
    np.testing.assert_array_equal(np.flatnonzero(got["masks"][:, 0]), AVG_EXPECTED_ACTIVE)
    np.testing.assert_array_equal(np.flatnonzero(avg["ref_mean"]), AVG_EXPECTED_ACTIVE)
    # the scenario discriminates: one device's gradient, or averaging |g|, would pick other positions
    assert not np.array_equal(avg["ref_device0"], avg["ref_mean"])
    assert not np.array_equal(avg["ref_mean_abs"], avg["ref_mean"])


@pytest.mark.parametrize("name", ["single", "sharded", "pmap_sync_bn"])
def test_step_compiles_once_with_traced_step(results, name):
    """One trace and no compilation after the first step, across update and non-update steps (step is traced)."""
    run = results[name]
    assert run["traces"] == 1
    assert run["compiles_after_first_step"] == 0


@pytest.mark.parametrize("name", ["sharded", "pmap_sync_bn"])
def test_eval_sums_match_single_device(results, name):
    got, want = results[name]["eval"], results["single"]["eval"]
    assert float(want["count"]) == 30.0   # the 2 padding examples are excluded
    assert float(got["count"]) == 30.0 and float(got["correct"]) == float(want["correct"])
    # The eval loss is a float32 sum whose reduction order differs across devices: 1 ulp apart is expected.
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)


def test_sparse_optimizer_with_sharded_kernels_matches_unsharded(results):
    (params, masks), shardings, step = results["sharded_kernels"]["sharded"]
    (want_params, want_masks), _, _ = results["sharded_kernels"]["unsharded"]
    assert step == 7 and any("batch" in s for s in shardings)   # the kernels really stayed sharded
    for a, b in zip(_leaves(masks), _leaves(want_masks), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(params), _leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # mask updates at steps 2, 4, 6 really changed the masks
    assert any(np.any(a != b) for a, b in zip(_leaves(masks), _leaves(results["sharded_kernels"]["initial_masks"])))


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_uneven_batch_is_a_clear_error(results, mode):
    message = results["uneven_batch_errors"][mode]
    assert message is not None and "not divisible" in message and "pad_batch" in message


if __name__ == "__main__":
    _worker_main(sys.argv[1])
