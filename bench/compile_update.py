"""Compile time of ``jax.jit(algo.update_masks)`` vs the model's gradient step, and the run time of one update.

Layers whose slices have equal plans (shape, budget, ablation) share one compiled, ``lax.map``-ped update
(``DynamicSparsity._groups``); "one by one" compiles each layer's update separately, as before batching.
Both must give bit-identical masks and params (checked here on one update step). On CPU every selection is one
call of the C++ selection kernel where it is built (srigl_jax/_ffi_select.py); ``SRIGL_JAX_CONDENSED_FORCE_XLA=1``
times the XLA radix select instead.

    PYTHONPATH=. python bench/compile_update.py                 # ResNet-50 and ViT-B/16 (a few minutes)
    PYTHONPATH=. python bench/compile_update.py --quick         # smoke run on a small CNN
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import srigl_jax as sj
from train.models import build_model
from train.testing import one_layer_at_a_time

try:
    from _machine import cpu_report  # run as a script: bench/ is on sys.path
except ImportError:
    from bench._machine import cpu_report


def _timed_compile(fn, *args) -> tuple[float, object]:
    # Every variant from cold caches: the selections trace their XLA fallback through a jitted function, and a
    # warm jit cache left by the previous variant would flatter the next one.
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def _median_run(compiled, args, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, model_kwargs: dict, batch: int, reps: int) -> dict:
    model, spec = build_model(name, **model_kwargs)
    x = jnp.ones((batch, *spec.input_shape), jnp.float32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    params = variables["params"]
    # ViT: the paper's recipe, 90% on every layer but the dense q/k/v (ERK cannot reach 90% with them dense)
    distribution = "uniform_sparse" if name.startswith("vit") else "erk"
    algo = sj.SRigL(sparsity=0.9, distribution=distribution, delta_t=100, t_end=1000, dense_paths=spec.dense_paths,
                    ablation_exempt=spec.ablation_exempt)
    key = jax.random.key(1)
    masks = algo.init_masks(params, key)
    params = algo.init_params(params, masks, key)
    y = jnp.zeros((batch,), jnp.int32)

    def loss(p, x, y):
        logits = model.apply({**variables, "params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_compile_s, grad_fn = _timed_compile(jax.grad(loss), params, x, y)
    grads = jax.block_until_ready(grad_fn(params, x, y))  # not still running while update_masks compiles
    step = jnp.int32(algo.delta_t)   # an update step
    args = (params, grads, masks, key, step)
    grouped_s, grouped = _timed_compile(algo.update_masks, *args)
    with one_layer_at_a_time(algo):
        single_s, single = _timed_compile(algo.update_masks, *args)
    out_g, out_s = grouped(*args), single(*args)
    identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out_g), jax.tree.leaves(out_s)))
    run_g, run_s = [], []
    for _ in range(reps):   # interleaved
        run_g.append(_median_run(grouped, args, 1))
        run_s.append(_median_run(single, args, 1))
    n_sparse = len(algo._sparse_leaves(params))
    return {
        "model": name, "sparse_layers": n_sparse, "update_groups": len(algo._groups(params)),
        "grad_step_compile_s": grad_compile_s, "update_compile_s": grouped_s,
        "update_compile_one_by_one_s": single_s,
        "update_compile_vs_grad_step": grouped_s / grad_compile_s,
        "update_run_ms": 1e3 * statistics.median(run_g), "update_run_one_by_one_ms": 1e3 * statistics.median(run_s),
        "bit_identical": bool(identical),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CNN only (smoke run)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="bench/results/compile_update.json")
    args = parser.parse_args()
    runs = [("cnn", {}, 2)] if args.quick else [("resnet50", {}, 2), ("vit_b16", {}, 2)]
    result = {"cpu": cpu_report(), "jax": jax.__version__, "models": []}
    for name, kwargs, batch in runs:
        r = measure(name, kwargs, batch, 1 if args.quick else args.reps)
        result["models"].append(r)
        print(f"{name}: {r['sparse_layers']} sparse layers in {r['update_groups']} update groups; compile: "
              f"grad step {r['grad_step_compile_s']:.1f} s, update_masks {r['update_compile_s']:.1f} s "
              f"({r['update_compile_vs_grad_step']:.2f}x the grad step; one by one "
              f"{r['update_compile_one_by_one_s']:.1f} s); one update {r['update_run_ms']:.0f} ms "
              f"(one by one {r['update_run_one_by_one_ms']:.0f} ms); bit-identical: {r['bit_identical']}",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"cpu: {result['cpu'].get('Model name')}, load {result['cpu'].get('load average at start')}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
