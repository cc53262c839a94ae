"""Cost of SRigL training relative to dense training, measured interleaved in one process.

Prints (1) the median step time of an SRigL train step (a plain optax step with ``sj.sparse_optimizer``) vs the
same dense step (MLP
784-3072-3072-10, batch 128, SGD momentum), on a non-update step and on a mask-update step, and (2) the cost
of one ``update_masks`` call on a 3072x3072 layer, amortised over delta_t steps.

    python bench/train_step.py            # full (about a minute on 2 cores)
    python bench/train_step.py --quick    # smoke run
    python bench/train_step.py --mask-update --baseline 5723db6   # selection A/B only (see below)

``--baseline REV`` also times the mask-update step with ``srigl_jax/selection.py`` as of the git
revision REV (loaded from git and swapped into ``layer_updates`` while tracing), interleaved.
``--mask-update`` times only the mask update of the 3072x3072 layer: ``update_masks`` and the three
selections it makes (global top-n of |w| among the active weights, global top-n of |grad|, per-column
regrowth), interleaved with the same calls with the selection kernel switched off (XLA's radix select) and
under ``--baseline``, and checks that all give identical masks. "new" is the ``srigl_jax`` that Python
imports: with an editable install of another checkout, run from the repo root with ``PYTHONPATH=.`` to time
this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
import types

import jax
import jax.numpy as jnp
import optax

import srigl_jax as sj
from srigl_jax import _ffi_select, layer_updates, selection
from srigl_jax._ffi_kernels import FORCE_XLA_ENV

try:
    from _machine import cpu_report, interleaved_times  # run as a script: bench/ is on sys.path
except ImportError:
    from bench._machine import cpu_report, interleaved_times


def mlp_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (m, n)) * (2.0 / m) ** 0.5,
            "bias": jnp.zeros(n),
        }
        for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def mlp_loss(params, x, y):
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def median_seconds(fn, reps):
    """Median wall time of ``fn()`` (which must block) over ``reps`` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, reps: int) -> dict:
    """Median seconds of each candidate, timed interleaved (``interleaved_times``)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, reps).items()}


def module_at(revision: str, path: str, name: str) -> types.ModuleType:
    """The repository file ``path`` as of a git revision, loaded as a module (its imports resolve to the
    ``srigl_jax`` that Python imports)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "-C", root, "show", f"{revision}:{path}"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"{name}_at_{revision}")
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def selection_primitives(module: types.ModuleType):
    """Make ``layer_updates`` use ``module``'s selection primitives (for whatever is traced meanwhile)."""
    saved = layer_updates.top_n_mask, layer_updates.column_top_count_mask
    layer_updates.top_n_mask, layer_updates.column_top_count_mask = module.top_n_mask, module.column_top_count_mask
    try:
        yield
    finally:
        layer_updates.top_n_mask, layer_updates.column_top_count_mask = saved


@contextlib.contextmanager
def kernel_switched_off(off: bool):
    """Trace with the C++ kernels switched off (``SRIGL_JAX_CONDENSED_FORCE_XLA=1``) when ``off``."""
    saved = os.environ.get(FORCE_XLA_ENV)
    if off:
        os.environ[FORCE_XLA_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FORCE_XLA_ENV, None)
        else:
            os.environ[FORCE_XLA_ENV] = saved


def mask_update_ab(layer_algo, layer_params, layer_masks, grads, key, step, reps, baseline):
    """Median ms of update_masks and of each selection, per implementation, interleaved; checks equal outputs."""
    w_score = selection.magnitude_score(layer_params["kernel"])
    g_score = selection.magnitude_score(grads["kernel"])
    mask = layer_masks["kernel"]
    n_prune, n_keep = layer_updates.prune_counts(mask, layer_algo.drop_fraction(step))
    keep = selection.top_n_mask(w_score, mask, n_keep)
    need = mask.sum(axis=0) - keep.sum(axis=0)  # no ablation: regrow each neuron back to k0
    # "new" selects with the C++ kernel where it is built; "new, XLA select" is the same code with the kernel
    # switched off (the switch is read while tracing, i.e. on each case's first call below).
    implementations = {"new": (selection, False)}
    if _ffi_select.usable():
        implementations["new, XLA select"] = (selection, True)
    if baseline:
        implementations = {f"baseline {baseline}": (module_at(baseline, "srigl_jax/selection.py", "selection"), False),
                           **implementations}
    calls, outputs = {}, {}
    for impl, (module, force_xla) in implementations.items():
        fresh = lambda f: jax.jit(lambda *a: f(*a))  # noqa: E731  (a new trace per implementation: jit caches
        cases = {                                      # per function, and the kernel switch is read when tracing)
            "top_n |w| (drop)": (fresh(module.top_n_mask), (w_score, mask, n_keep)),
            "top_n |grad| (salience)": (fresh(module.top_n_mask), (g_score, jnp.ones_like(mask), n_prune)),
            "column_top_count |grad| (grow)": (fresh(module.column_top_count_mask), (g_score, ~keep, need)),
            "update_masks": (jax.jit(lambda *a: layer_algo.update_masks(*a)),
                             (layer_params, grads, layer_masks, key, step)),
        }
        with selection_primitives(module), kernel_switched_off(force_xla):  # compile inside: update_masks traces
            for case, (fn, args) in cases.items():                           # layer_updates
                outputs[impl, case] = jax.block_until_ready(fn(*args))
                calls[impl, case] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    for impl, case in outputs:
        same = jax.tree.map(lambda a, b: bool((a == b).all()), outputs[impl, case], outputs["new", case])
        assert jax.tree.all(same), f"{impl} and new differ on {case}"
    med = interleaved_medians(calls, reps)
    return {case: {impl: med[impl, case] * 1e3 for impl in implementations} for impl, case in calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--out", default=None,
                    help="JSON results (default bench/results/train_step.json, or mask_update.json with --mask-update)")
    ap.add_argument("--mask-update", action="store_true", help="time only the 3072x3072 layer's mask update")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time partial steps (masking only; masking + NaN/Inf check) to locate the overhead")
    ap.add_argument("--baseline", default=None,
                    help="git revision of selection.py to compare with (mask-update step, or --mask-update)")
    ap.add_argument("--optim-baseline", default=None,
                    help="git revision of srigl_jax/optim.py whose sparse_optimizer is timed too (A/B of the step)")
    args = ap.parse_args()
    results_dir = os.path.join(os.path.dirname(__file__), "results")
    out = args.out or os.path.join(results_dir, "mask_update.json" if args.mask_update else "train_step.json")
    width, batch, reps = (256, 32, 5) if args.quick else (3072, 128, args.reps)
    sizes = [784, width, width, 10]

    key = jax.random.key(0)
    params = mlp_params(key, sizes)
    x = jax.random.normal(jax.random.key(1), (batch, 784))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    tx_dense = optax.sgd(0.01, momentum=0.9)
    algo = sj.SRigL(sparsity=args.sparsity, distribution="erk", delta_t=args.delta_t, t_end=10**6, gamma_sal=0.3)
    masks = algo.init_masks(params, key)
    sparse_params = algo.init_params(params, masks, key)
    plain_step, update_step = jnp.int32(1), jnp.int32(args.delta_t)

    # update_masks alone on one square layer (the 3072x3072 hidden layer).
    layer = {"kernel": params["Dense_1"]["kernel"]}
    layer_algo = sj.SRigL(sparsity=args.sparsity, distribution="uniform", delta_t=args.delta_t,
                          t_end=10**6, gamma_sal=0.3, ablation_exempt=())
    layer_masks = layer_algo.init_masks(layer, key)
    layer_params = layer_algo.init_params(layer, layer_masks, key)
    grads = {"kernel": jax.random.normal(jax.random.key(3), layer["kernel"].shape)}
    if args.mask_update:
        med = mask_update_ab(layer_algo, layer_params, layer_masks, grads, key, update_step, reps, args.baseline)
        print(f"mask update of the {width}x{width} layer, SRigL {args.sparsity:.0%}, {reps} interleaved reps, "
              f"{jax.default_backend()} ({os.cpu_count()} cores), jax {jax.__version__}; median ms; "
              f"new = {selection.__file__}")
        for case, by_impl in med.items():
            ratio = f"   {by_impl[f'baseline {args.baseline}'] / by_impl['new']:.2f}x faster" if args.baseline else ""
            print(f"  {case:32s}" + "".join(f"  {impl} {ms:8.1f}" for impl, ms in by_impl.items()) + ratio)
        write_json(out, {"machine": platform.processor() or platform.machine(), "cpu": cpu_report(),
                         "cpu_count": os.cpu_count(),
                         "jax": jax.__version__, "layer": [width, width], "reps": reps, "median_ms": med})
        return


    @jax.jit
    def dense_step(params, opt_state):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, opt_state = tx_dense.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def sparse_runner(optimizer=sj.sparse_optimizer, skip_nonfinite=True, step=plain_step):
        """The user's plain optax step with the sparse optimizer (the same inner optimizer), at ``step``."""
        tx_sparse = optimizer(tx_dense, algo, masks=masks, key=key, skip_nonfinite=skip_nonfinite)

        def sparse_step_fn(params, opt_state):
            grads = jax.grad(mlp_loss)(params, x, y)
            updates, opt_state = tx_sparse.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        state = tx_sparse.init(sparse_params)._replace(step=step)
        compiled = jax.jit(sparse_step_fn).lower(sparse_params, state).compile()
        return lambda: jax.block_until_ready(compiled(sparse_params, state))

    dense_state = (params, tx_dense.init(params))

    def run_dense():
        jax.block_until_ready(dense_step(*dense_state))

    candidates = {"dense": run_dense, "srigl": sparse_runner(), "srigl_update_step": sparse_runner(step=update_step),
                  # what the NaN/Inf skip costs: its check is one more read of every gradient and parameter
                  "srigl_no_nonfinite_skip": sparse_runner(skip_nonfinite=False)}
    if args.optim_baseline:  # the same steps with sparse_optimizer as of another revision
        old = module_at(args.optim_baseline, "srigl_jax/optim.py", "optim_baseline")
        candidates["srigl_optim_baseline"] = sparse_runner(old.sparse_optimizer)
        candidates["srigl_update_step_optim_baseline"] = sparse_runner(old.sparse_optimizer, step=update_step)
    if args.breakdown:  # where the non-update step's overhead goes: hand-written partial steps
        candidates.update(overhead_breakdown(tx_dense, sparse_params, masks, x, y))
    if args.baseline:  # the same update step, compiled with the baseline's selection primitives
        with selection_primitives(module_at(args.baseline, "srigl_jax/selection.py", "selection")):
            candidates["srigl_update_step_baseline"] = sparse_runner(step=update_step)
    for fn in candidates.values():  # compile + warm up
        fn()
        fn()
    med = interleaved_medians(candidates, reps)

    update = jax.jit(layer_algo.update_masks)
    run_update = lambda: jax.block_until_ready(update(layer_params, grads, layer_masks, key, update_step))
    run_update()
    update_s = median_seconds(run_update, max(3, reps // 3))

    stacked_width, stacked_depth = (128, 3) if args.quick else (1024, 4)
    stacked_ms = stacked_vs_unrolled(stacked_width, stacked_depth, args.sparsity, max(3, reps // 3))

    extra_per_update = med["srigl_update_step"] - med["srigl"]
    amortised = extra_per_update / (args.delta_t * med["srigl"])
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_report(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "mlp": sizes,
        "batch": batch,
        "sparsity": args.sparsity,
        "reps": reps,
        "dense_step_ms": med["dense"] * 1e3,
        "srigl_step_ms": med["srigl"] * 1e3,
        "srigl_update_step_ms": med["srigl_update_step"] * 1e3,
        "srigl_vs_dense": med["srigl"] / med["dense"],
        "srigl_no_nonfinite_skip_ms": med["srigl_no_nonfinite_skip"] * 1e3,
        "srigl_no_nonfinite_skip_vs_dense": med["srigl_no_nonfinite_skip"] / med["dense"],
        "update_masks_layer_ms": update_s * 1e3,
        "update_masks_layer_shape": list(layer["kernel"].shape),
        "update_overhead_amortised": amortised,
        "delta_t": args.delta_t,
        "update_masks_stacked_ms": {"layers": [stacked_depth, stacked_width, stacked_width], **stacked_ms},
        "stacked_vs_unrolled": stacked_ms["stacked"] / stacked_ms["unrolled, one by one"],
    }
    if args.breakdown:
        result["breakdown_vs_dense"] = {name: med[name] / med["dense"] for name in BREAKDOWN}
    if args.optim_baseline:
        result["optim_baseline"] = args.optim_baseline
        for name in ("srigl_optim_baseline", "srigl_update_step_optim_baseline"):
            result[f"{name}_ms"] = med[name] * 1e3
        result["srigl_optim_baseline_vs_dense"] = med["srigl_optim_baseline"] / med["dense"]
    if args.baseline:
        result["baseline"] = args.baseline
        result["srigl_update_step_baseline_ms"] = med["srigl_update_step_baseline"] * 1e3
        result["update_overhead_amortised_baseline"] = (
            (med["srigl_update_step_baseline"] - med["srigl"]) / (args.delta_t * med["srigl"]))
    print(f"MLP {sizes}, batch {batch}, SRigL {args.sparsity:.0%} ERK, {reps} interleaved reps, "
          f"{jax.default_backend()} ({os.cpu_count()} cores), jax {jax.__version__}")
    print(f"  dense step             {result['dense_step_ms']:9.2f} ms")
    print(f"  SRigL step             {result['srigl_step_ms']:9.2f} ms   {result['srigl_vs_dense']:.3f}x dense (goal <= 1.05x)")
    print(f"  SRigL step, no NaN/Inf skip {result['srigl_no_nonfinite_skip_ms']:9.2f} ms   "
          f"{result['srigl_no_nonfinite_skip_vs_dense']:.3f}x dense")
    print(f"  SRigL mask-update step {result['srigl_update_step_ms']:9.2f} ms")
    if args.optim_baseline:
        print(f"  optim.py of {args.optim_baseline}: step {result['srigl_optim_baseline_ms']:.2f} ms "
              f"({result['srigl_optim_baseline_vs_dense']:.3f}x dense), "
              f"mask-update step {result['srigl_update_step_optim_baseline_ms']:.2f} ms")
    print(f"  update_masks, {layer['kernel'].shape[0]}x{layer['kernel'].shape[1]} layer: {result['update_masks_layer_ms']:.1f} ms")
    print(f"  mask updates amortised over delta_t={args.delta_t}: {amortised:.2%} of training time (goal < 2%)")
    print(f"  update_masks of {stacked_depth} stacked {stacked_width}x{stacked_width} layers: "
          + ", ".join(f"{n} {ms:.1f} ms" for n, ms in stacked_ms.items())
          + f"; stacked / unrolled one by one {result['stacked_vs_unrolled']:.2f}x (goal <= 1)")
    if args.breakdown:
        for name in BREAKDOWN:
            print(f"  {name:22s} {med[name] * 1e3:9.2f} ms   {result['breakdown_vs_dense'][name]:.3f}x dense")
    if args.baseline:
        print(f"  baseline {args.baseline}: mask-update step {result['srigl_update_step_baseline_ms']:.2f} ms, "
              f"amortised {result['update_overhead_amortised_baseline']:.2%}")
    write_json(out, result)


BREAKDOWN = ("dense + masking", "dense + masking + check")


def stacked_vs_unrolled(width: int, depth: int, sparsity: float, reps: int) -> dict:
    """Median ms of one update_masks (an update step) on ``depth`` layers of width x width stored as one stacked
    kernel (``stack_axes``), the same layers unrolled (batched into one mapped update), and unrolled with
    every layer compiled on its own (as before batching); checks that all three give identical masks."""
    from train.testing import one_layer_at_a_time

    key = jax.random.key(0)
    w = jax.random.normal(key, (depth, width, width))
    g = jax.random.normal(jax.random.key(1), (depth, width, width))
    stacked = {"blocks": {"kernel": w}}
    unrolled = {f"block{i}": {"kernel": w[i]} for i in range(depth)}
    g_unrolled = {f"block{i}": {"kernel": g[i]} for i in range(depth)}
    common = dict(sparsity=sparsity, distribution="uniform", delta_t=100, t_end=10**6, ablation_exempt=())
    cases = {}
    for name, algo, params, grads in (
        ("stacked", sj.SRigL(stack_axes={"blocks/": 0}, **common), stacked, {"blocks": {"kernel": g}}),
        ("unrolled", sj.SRigL(**common), unrolled, g_unrolled),
        ("unrolled, one by one", sj.SRigL(**common), unrolled, g_unrolled),
    ):
        masks = algo.init_masks(params, key)
        params = algo.init_params(params, masks, key)
        args = (params, grads, masks, key, jnp.int32(100))
        if name.endswith("one by one"):
            with one_layer_at_a_time(algo):
                fn = jax.jit(algo.update_masks).lower(*args).compile()
        else:
            fn = jax.jit(algo.update_masks).lower(*args).compile()
        cases[name] = (fn, args)
    outs = {name: jax.block_until_ready(fn(*args)) for name, (fn, args) in cases.items()}
    stacked_masks = outs["stacked"][1]["blocks"]["kernel"]
    for name in ("unrolled", "unrolled, one by one"):
        for i in range(depth):
            assert bool((outs[name][1][f"block{i}"]["kernel"] == stacked_masks[i]).all()), name
    med = interleaved_medians({n: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for n, (f, a) in cases.items()},
                              reps)
    return {name: t * 1e3 for name, t in med.items()}


def overhead_breakdown(tx, params, masks, x, y) -> dict:
    """Partial steps between the dense step and the sparse one: (1) the dense step with the gradient masked for
    the optimizer and the updates masked (what any masked training must do), (2) plus the NaN/Inf check and the
    skip selects (what ``sparse_optimizer`` adds on a non-update step, besides the compiled mask-update branch)."""
    from srigl_jax.optim import _any_nonfinite_pair

    def masked(p, s, check):
        g = jax.grad(mlp_loss)(p, x, y)
        bad = _any_nonfinite_pair(g, p) if check else jnp.zeros((), bool)
        g = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), g, masks)
        u, new_s = tx.update(g, s, p)
        u = jax.tree.map(lambda u, m, p: jnp.where(bad, 0.0, jnp.where(m, u, -p)), u, masks, p)
        return optax.apply_updates(p, u), jax.tree.map(lambda a, b: jnp.where(bad, a, b), s, new_s)

    state = tx.init(params)
    steps = {name: jax.jit(lambda p, s, check=check: masked(p, s, check)) for name, check in zip(BREAKDOWN, (0, 1))}
    return {name: (lambda f=f: jax.block_until_ready(f(params, state))) for name, f in steps.items()}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
