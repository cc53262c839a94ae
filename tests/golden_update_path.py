"""Golden scenarios for the update path: fixed inputs, every method, several mask updates, bit-for-bit outputs.

``python tests/golden_update_path.py`` rewrites ``tests/golden/update_path.npz`` from the code as it is; do that
only on purpose (a change of the rule itself), never to make a refactor pass. ``tests/test_golden.py`` replays
the scenarios through the public API and compares every mask and param bit for bit.

Inputs come from numpy's seeded generator (platform independent); keys are fixed. Gradients are synthetic
(no model), shaped so that ablation happens (some neurons get tiny gradients), ties occur (quantised values),
and one step is non-finite.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import srigl_jax as sj

GOLDEN_FILE = pathlib.Path(__file__).parent / "golden" / "update_path.npz"
STEPS = 9  # optimizer steps 0..8 (the step passed is the number of steps already taken, as in train/)
NONFINITE_STEP = 5  # grads hold a NaN on this step: it must change nothing


def shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {
        "Conv_0": {"kernel": (3, 3, 4, 16), "bias": (16,)},
        "Dense_0": {"kernel": (144, 64), "bias": (64,)},
        "Dense_1": {"kernel": (64, 32), "bias": (32,)},
        "Dense_2": {"kernel": (32, 10), "bias": (10,)},
    }


def dense_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {m: {n: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for n, s in leaves.items()}
            for m, leaves in shapes().items()}


def synthetic_grads(step: int, ties: bool) -> dict:
    """Gradients of step ``step``: neurons 0-5 of each kernel get 1e-3-scale gradients (ablation candidates)."""
    rng = np.random.default_rng(1000 + step)
    out = {}
    for m, leaves in shapes().items():
        out[m] = {}
        for n, s in leaves.items():
            g = rng.standard_normal(s).astype(np.float32)
            if n == "kernel":
                g[..., :6] *= 1e-3
            if ties:
                g = np.round(g * 4) / 4
            if step == NONFINITE_STEP and m == "Dense_1" and n == "kernel":
                g[0, 0] = np.nan
            out[m][n] = jnp.asarray(g)
    return out


SCENARIOS: dict[str, Callable[[], Any]] = {
    "srigl_ablation": lambda: sj.SRigL(sparsity=0.9, delta_t=2, t_end=9, gamma_sal=0.3),
    "srigl_no_ablation": lambda: sj.SRigL(sparsity=0.9, delta_t=2, t_end=9, gamma_sal=None),
    "srigl_absolute_ties_window": lambda: sj.SRigL(sparsity=0.8, distribution="uniform", delta_t=2, t_end=9,
                                                   gamma_sal=2, random_tie_break=True,
                                                   grad_accumulation_steps=2),
    "srigl_high_gamma": lambda: sj.SRigL(sparsity=0.95, delta_t=3, t_end=9, gamma_sal=0.9, alpha=0.5),
    "rigl": lambda: sj.RigL(sparsity=0.9, delta_t=2, t_end=9),
    "set": lambda: sj.SET(sparsity=0.9, distribution="uniform", delta_t=2, t_end=9),
    "static": lambda: sj.Static(sparsity=0.9),
}
TIES = {"srigl_absolute_ties_window", "rigl"}


def inner_optimizer() -> optax.GradientTransformation:
    return optax.sgd(0.05, momentum=0.9)


def initial_state(name: str):
    algo = SCENARIOS[name]()
    key = jax.random.key(7)
    masks = algo.init_masks(dense_params(), jax.random.fold_in(key, 1))
    params = algo.init_params(dense_params(), masks, jax.random.fold_in(key, 2))
    # Neurons 0-5 start with tiny weights (and get tiny gradients): few salient weights, so ablation happens.
    params = jax.tree.map(lambda p: p.at[..., :6].multiply(1e-3) if p.ndim >= 2 else p, params)
    return algo, params, masks


def mask_key(step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(11), step)


def run_sparse_apply(name: str) -> dict[str, np.ndarray]:
    """The scenario through ``sj.sparse_apply`` (the path the golden file was made with)."""
    algo, params, masks = initial_state(name)
    tx = optax.chain(inner_optimizer(), sj.apply_masks())
    opt_state = tx.init(params)
    acc = algo.init_grad_accumulator(params) if algo.grad_accumulation_steps > 1 else None
    out = record({}, "init", params, masks)
    step_fn = jax.jit(lambda p, s, m, g, k, t, a: sj.sparse_apply(algo, tx, p, s, m, g, k, t, grad_acc=a))
    for step in range(STEPS):
        res = step_fn(params, opt_state, masks, synthetic_grads(step, name in TIES), mask_key(step),
                      jnp.int32(step), acc)
        params, opt_state, masks, acc = res.params, res.opt_state, res.masks, res.grad_acc
        record(out, f"step{step}", params, masks)
        out[f"step{step}/nonfinite"] = np.asarray(res.info.nonfinite)
    return out


def run_sparse_optimizer(name: str) -> dict[str, np.ndarray]:
    """The same scenario through ``sj.sparse_optimizer`` with a plain optax loop (step t's key is
    ``fold_in(key, t)`` inside the transformation, as ``mask_key`` gives ``sparse_apply``)."""
    algo, params, masks = initial_state(name)
    tx = sj.sparse_optimizer(inner_optimizer(), algo, masks=masks, key=jax.random.key(11))
    opt_state = tx.init(params)
    out = record({}, "init", params, sj.get_masks(opt_state))

    @jax.jit
    def step_fn(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for step in range(STEPS):
        params, opt_state = step_fn(params, opt_state, synthetic_grads(step, name in TIES))
        record(out, f"step{step}", params, sj.get_masks(opt_state))
        out[f"step{step}/nonfinite"] = np.asarray(sj.get_sparse_state(opt_state).info.nonfinite)
    return out


def record(out: dict, prefix: str, params: Any, masks: Any) -> dict:
    for kind, tree in (("params", params), ("masks", masks)):
        for path, leaf in sj.paths.named_leaves(tree)[0]:
            out[f"{prefix}/{kind}/{path}"] = np.asarray(leaf)
    return out


def generate() -> dict[str, np.ndarray]:
    arrays = {}
    for name in SCENARIOS:
        arrays.update({f"{name}/{k}": v for k, v in run_sparse_apply(name).items()})
    return arrays


if __name__ == "__main__":
    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN_FILE, **generate())
    print(f"wrote {GOLDEN_FILE}")
