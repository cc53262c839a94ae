"""Condensed-layer inference benchmark (the setup of the SRigL paper's Figure 4), CPU.

One linear layer 3072 -> 768, fp32, constant fan-in masks at several sparsities, with and without ~30% ablated
neurons (SRigL keeps the nonzero budget, so ablation raises k' of the surviving neurons), batch 1/8/64/256.
Variants, all timed interleaved in this one process (each repetition runs every variant once, so machine noise
hits all of them alike): jit_call_floor (a jit-ed call doing almost nothing: what any JAX call costs here),
dense_jnp (jit matmul), dense_numpy (BLAS), dense_numpy_1t (BLAS limited to one thread
with threadpoolctl; "best dense" = the fastest dense variant of each configuration), structured (dense matmul on the
active neurons only), condensed_xla, condensed_ffi (C++ kernel, default threads: as many as XLA's CPU pool has) and
condensed_ffi_1t (the kernel on one thread),
bcoo and bcsr (jax.experimental.sparse, unstructured). Prints medians and ratios, writes CSV, JSON and a
log-scale PNG into bench/results/.

    python bench/condensed_linear.py            # full run (a few minutes)
    python bench/condensed_linear.py --quick    # smoke run (seconds)

The script re-executes itself once with OpenBLAS settings fixed (see bench/_blas_env.py); the BLAS in use is
reported (threadpoolctl).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import sys
import time

from _blas_env import blas_env_report, reexec_with_blas_env  # bench/ is sys.path[0]

reexec_with_blas_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import sparse  # noqa: E402

from srigl_jax import _ffi_kernels  # noqa: E402
from srigl_jax.inference import condense_kernel, condensed_linear  # noqa: E402

N_IN, N_OUT = 3072, 768
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = []
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
                for d in threadpool_info()]
    except ImportError:
        blas = [{"note": "threadpoolctl not installed"}]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "jax": jax.__version__, "numpy": np.__version__, "jax_backend": jax.default_backend(),
        "blas": blas, **blas_env_report(),
        "ffi_kernel": _ffi_kernels.kernel_isa() or f"unavailable: {_ffi_kernels.unavailable_reason()}",
        # how the kernel reads gathered (batch < 4) columns here: vector gathers or scalar loads (measured)
        "ffi_gather": _ffi_kernels.gather_formulation(),
        "load_avg_start": os.getloadavg(),
    }


def make_layer(rng: np.random.Generator, sparsity: float, ablated_frac: float):
    """Kernel, SRigL-like constant fan-in mask and bias: the nonzero budget T is spread over surviving neurons."""
    budget = int(N_IN * N_OUT * (1.0 - sparsity))
    n_ablated = int(round(ablated_frac * N_OUT))
    alive = np.sort(rng.choice(N_OUT, N_OUT - n_ablated, replace=False))
    k = min(N_IN, budget // alive.size)
    mask = np.zeros((N_IN, N_OUT), bool)
    for o in alive:
        mask[rng.choice(N_IN, k, replace=False), o] = True
    kernel = (rng.standard_normal((N_IN, N_OUT)) * np.sqrt(2.0 / k)).astype(np.float32) * mask
    bias = rng.standard_normal(N_OUT).astype(np.float32) * 0.1
    return kernel, mask, bias, alive, k


def with_env(name: str, value: str, fn):
    """Trace-time environment switch (the FFI wrapper reads its env vars when a function is traced)."""
    def run(*args):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def in_jit_loop(layer_fn, applications: int):
    """jit of ``applications`` chained calls of ``layer_fn(x, *params)`` (each input depends on the last output,
    by an fp32-invisible 1e-30 nudge, so XLA can neither hoist nor merge them); returns the final x."""
    def run(x, *params):
        def body(_, x):
            y = layer_fn(x, *params)
            return x.at[0, 0].add(1e-30 * y[0, 0])
        return jax.lax.fori_loop(0, applications, body, x)
    return jax.jit(run)


def build_variants(kernel, mask, bias, alive, x_np, applications: int = 1, gather_variants: bool = False):
    """(name -> zero-arg callable, the condensed layer). A callable runs the layer ``applications`` times:
    once (returning its output, for check_outputs), or JAX variants in one compiled loop (in_jit_loop) and
    numpy as that many calls. ``gather_variants``: also the one-thread kernel with each formulation of the
    gathered columns forced (condensed_ffi_1t_vector, condensed_ffi_1t_scalar)."""
    x = jnp.asarray(x_np)
    w, b = jnp.asarray(kernel), jnp.asarray(bias)
    layer = condense_kernel(kernel, mask, bias)
    w_small, b_small = jnp.asarray(kernel[:, alive]), jnp.asarray(bias[alive])

    def compiled(fn):
        return jax.jit(fn) if applications == 1 else in_jit_loop(fn, applications)

    def numpy_dense():
        for _ in range(applications):
            y = x_np @ kernel + bias
        return y

    dense = compiled(lambda x, w, b: x @ w + b)
    xla = compiled(lambda x, layer: condensed_linear(x, layer, backend="xla"))
    # The cost of any jit-ed call in this interleaving (dispatch and a cold start, almost no work): every JAX
    # variant pays it, so it compresses their ratios at small sizes.
    noop = compiled(lambda x: x[:, :1])
    variants = {
        "jit_call_floor": lambda: noop(x).block_until_ready(),
        "dense_jnp": lambda: dense(x, w, b).block_until_ready(),
        "dense_numpy": numpy_dense,
        "structured": lambda: dense(x, w_small, b_small).block_until_ready(),
        "condensed_xla": lambda: xla(x, layer).block_until_ready(),
    }
    try:  # one-thread BLAS: more robust than spinning BLAS threads on a shared (oversubscribed) machine
        from threadpoolctl import threadpool_limits

        def numpy_1t():
            with threadpool_limits(1, user_api="blas"):
                return numpy_dense()

        variants["dense_numpy_1t"] = numpy_1t
    except ImportError:
        pass
    if _ffi_kernels.available():
        def ffi_layer(x, layer):
            return condensed_linear(x, layer, backend="ffi")

        ffi = compiled(with_env(_ffi_kernels.MAX_THREADS_ENV, "0", ffi_layer))  # default threads
        ffi_1t = compiled(with_env(_ffi_kernels.MAX_THREADS_ENV, "1", ffi_layer))
        variants["condensed_ffi"] = lambda: ffi(x, layer).block_until_ready()
        variants["condensed_ffi_1t"] = lambda: ffi_1t(x, layer).block_until_ready()
        for mode in ("vector", "scalar") if gather_variants else ():
            forced = compiled(with_env(_ffi_kernels.MAX_THREADS_ENV, "1",
                                       with_env(_ffi_kernels.GATHER_ENV, mode, ffi_layer)))
            variants[f"condensed_ffi_1t_{mode}"] = lambda forced=forced: forced(x, layer).block_until_ready()
    # unstructured baselines
    w_bcoo = sparse.BCOO.fromdense(w)
    w_bcsr = sparse.BCSR.fromdense(w.T)  # (out, in) rows: y^T = W^T x^T
    bcoo = compiled(lambda x, w: x @ w + b)
    bcsr = compiled(lambda x, w: (w @ x.T).T + b)
    variants["bcoo"] = lambda: bcoo(x, w_bcoo).block_until_ready()
    variants["bcsr"] = lambda: bcsr(x, w_bcsr).block_until_ready()
    return variants, layer


def check_outputs(variants, want, alive):
    for name, fn in variants.items():
        if name == "jit_call_floor":
            continue
        got = np.asarray(fn())
        ref = want[:, alive] if name == "structured" else want
        if not np.allclose(got, ref, rtol=1e-3, atol=1e-3):
            raise AssertionError(f"{name} disagrees with the masked dense layer (max err {np.abs(got - ref).max()})")


def time_interleaved(variants, reps: int, budget_s: float, seed: int = 0, min_reps: int = 5) -> dict[str, np.ndarray]:
    """Per-call seconds of every variant; each repetition calls all variants once, in a fresh random order,
    until ``reps`` repetitions or, after ``min_reps``, ``budget_s`` seconds. A variant that returns a Python
    float reports its own time (one measured in another process).

    Random (not rotating) order: a rotation keeps neighbours fixed, and a variant that always follows
    multithreaded BLAS (whose threads keep spinning after the call) would always pay for it.
    """
    names = list(variants)
    times = {n: [] for n in names}
    order_rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for rep in range(reps):
        for name in order_rng.permutation(names):
            t0 = time.perf_counter()
            own = variants[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
        if rep + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return {n: np.asarray(t) for n, t in times.items()}


def plot(rows, path: pathlib.Path, batches, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), squeeze=False)
    variants = sorted({r["variant"] for r in rows}, key=lambda v: [r["variant"] for r in rows].index(v))
    for ax, batch in zip(axes[0], batches):
        for vi, variant in enumerate(variants):
            labelled = False
            for ablated, style in ((0.0, "-"), (0.3, "--")):
                pts = sorted((r["sparsity"], r["median_us"]) for r in rows
                             if r["batch"] == batch and r["variant"] == variant and r["ablated_frac"] == ablated)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{vi}", label=None if labelled else variant)
                    labelled = True
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("sparsity")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time per call (us), log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, title="solid: no ablation\ndashed: 30% ablated",
               title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 90%% sparsity, 30%% ablated, batch 1, few reps")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--ablated", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--reps", type=int, default=200, help="max repetitions per configuration")
    parser.add_argument("--budget-s", type=float, default=8.0, help="time budget per configuration")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.batches, args.ablated, args.reps, args.budget_s = [0.9], [1], [0.3], 3, 0.5
    stem = "condensed_linear_quick" if args.quick else "condensed_linear"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cores']} | jax {info['jax']} ({info['jax_backend']}) | "
          f"ffi kernel: {info['ffi_kernel']} | BLAS: {info['blas']} | removed env: {info['removed_blas_env']}")

    rng = np.random.default_rng(args.seed)
    rows = []
    header = (f"{'S':>5} {'abl':>4} {'k':>5} {'B':>4} {'variant':<17} {'median us':>10} {'vs jnp':>7} "
              f"{'vs np':>7} {'vs best':>7} {'vs bcoo':>8} {'vs bcsr':>8} {'min us':>9} {'min vs jnp':>10}")
    print(header)
    for sparsity in args.sparsities:
        for ablated in args.ablated:
            kernel, mask, bias, alive, k = make_layer(rng, sparsity, ablated)
            for batch in args.batches:
                x_np = rng.standard_normal((batch, N_IN)).astype(np.float32)
                variants, _ = build_variants(kernel, mask, bias, alive, x_np)
                check_outputs(variants, x_np.astype(np.float64) @ kernel + bias, alive)  # also compiles
                times = time_interleaved(variants, args.reps, args.budget_s)
                med = {n: float(np.median(t)) for n, t in times.items()}
                fastest = {n: float(np.min(t)) for n, t in times.items()}
                best_dense = min(v for n, v in med.items() if n.startswith("dense"))
                for name, t in times.items():
                    row = {
                        "sparsity": sparsity, "ablated_frac": ablated, "n_active": int(alive.size), "fan_in": k,
                        "batch": batch, "variant": name, "reps": int(t.size), "median_us": med[name] * 1e6,
                        "p25_us": float(np.percentile(t, 25)) * 1e6, "p75_us": float(np.percentile(t, 75)) * 1e6,
                        "min_us": fastest[name] * 1e6,
                        "speedup_vs_dense_jnp": med["dense_jnp"] / med[name],
                        "speedup_vs_dense_numpy": med["dense_numpy"] / med[name],
                        "speedup_vs_best_dense": best_dense / med[name],
                        "speedup_vs_bcoo": med["bcoo"] / med[name] if "bcoo" in med else float("nan"),
                        "speedup_vs_bcsr": med["bcsr"] / med[name] if "bcsr" in med else float("nan"),
                        # min-based ratio: on a shared, oversubscribed machine the fastest call is the best
                        # estimate of the uncontended time (medians include preemptions)
                        "min_speedup_vs_dense_jnp": fastest["dense_jnp"] / fastest[name],
                        "min_speedup_vs_best_dense": min(v for n, v in fastest.items() if n.startswith("dense"))
                        / fastest[name],
                    }
                    rows.append(row)
                    print(f"{sparsity:5.2f} {ablated:4.1f} {k:5d} {batch:4d} {name:<17} {row['median_us']:10.1f} "
                          f"{row['speedup_vs_dense_jnp']:6.2f}x {row['speedup_vs_dense_numpy']:6.2f}x "
                          f"{row['speedup_vs_best_dense']:6.2f}x "
                          f"{row['speedup_vs_bcoo']:7.2f}x {row['speedup_vs_bcsr']:7.2f}x {row['min_us']:9.1f} "
                          f"{row['min_speedup_vs_dense_jnp']:9.2f}x", flush=True)
    info["load_avg_end"] = os.getloadavg()
    with open(args.out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"machine": info, "args": {
        k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    plot(rows, args.out_dir / f"{stem}.png", args.batches,
         f"{N_IN}->{N_OUT} fp32, {info['cpu']} x{info['cores']}, kernel {info['ffi_kernel']}")
    print(f"wrote {args.out_dir / stem}.csv/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
