"""How close the batch-1 condensed kernel is to this CPU's limit, and what that limit allows against dense.

At batch 1 every nonzero weight needs one gathered input, so a pass of 16-lane gathers over the layer's own
index stream (bench/gather_floor.cc, compiled here with -O3 -march=native; AVX-512 and a C++ compiler
needed) bounds one core's vector-gather kernel from below (the default kernel, condensed_ffi, also splits the
larger layers across cores; condensed_ffi_1t stays on one). Where gathers are slow (microcoded, e.g. AMD Zen 4)
the kernel reads the inputs by scalar loads instead, which it measures faster (condensed_ffi_1t_scalar /
_vector force one formulation), and can then run below this floor. The layer is run L times inside one jit-compiled loop, so the per-call
dispatch (~10 us) and the cold start of a call are paid once per L layers, as in a compiled model; dense jnp,
condensed XLA, BCOO and BCSR run in the same kind of loop, numpy/BLAS (2 threads and 1) as L calls. Variants
and the floor are interleaved in a fresh random order each repetition; medians per layer application.
Prints each variant's time per layer and its speed-ups, the floor, and "bound" = best dense / floor: the
largest speed-up a batch-1 gather kernel can show on one core. Writes bench/results/batch1_bound.json
and a bar chart (.png).

    python bench/batch1_bound.py            # 3072 -> 768, 80/90/95/99% (about two minutes)
    python bench/batch1_bound.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from _blas_env import reexec_with_blas_env  # bench/ is sys.path[0]

reexec_with_blas_env()

import numpy as np  # noqa: E402
from condensed_linear import (  # noqa: E402
    N_IN, RESULTS, build_variants, machine_info, make_layer, time_interleaved)

FLOOR_SOURCE = pathlib.Path(__file__).resolve().parent / "gather_floor.cc"
FLOOR = "gather_floor"
FLOOR_COMPILERS = ("g++", "c++", "clang++")
# The variants of condensed_linear.py timed here, in this order.
VARIANTS = ("dense_jnp", "dense_numpy", "dense_numpy_1t", "condensed_ffi", "condensed_ffi_1t",
            "condensed_ffi_1t_vector", "condensed_ffi_1t_scalar", "condensed_xla", "bcoo", "bcsr")


def gather_floor(indices: np.ndarray, n_in: int, passes: int, workdir: pathlib.Path):
    """A callable timing the gather-only pass over ``indices`` (int16): it returns the median seconds of
    ``passes`` passes (timed inside the C++ program) on the fastest CPU, or a string saying why the floor is
    unavailable."""
    compiler = next(filter(None, map(shutil.which, FLOOR_COMPILERS)), None)
    if compiler is None:
        return "no C++ compiler found"
    exe = workdir / "gather_floor"
    build = subprocess.run([compiler, "-O3", "-march=native", "-std=c++17", str(FLOOR_SOURCE), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        return f"compile failed: {build.stderr.strip()[-500:]}"
    index_file = workdir / "indices.bin"
    np.ascontiguousarray(indices, dtype=np.int16).tofile(index_file)
    command = [str(exe), str(index_file), str(indices.shape[0]), str(indices.shape[1]), str(n_in), str(passes)]

    # The floor is a property of a core: timed pinned to each CPU this process may use, the fastest counts
    # (on a shared VM one vCPU can be much slower than another, e.g. with a busy hyperthread sibling).
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]

    def on_cpu(cpu: int | None) -> float:
        done = subprocess.run(command + ([] if cpu is None else [str(cpu)]), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or f"gather_floor exited with {done.returncode}")
        return float(done.stdout.split()[1]) * 1e-6

    def run() -> float:
        return min(on_cpu(cpu) for cpu in cpus)

    try:
        run()
    except RuntimeError as err:  # e.g. no AVX-512 on this CPU
        return str(err)
    return run


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Grouped bars per sparsity (us per layer, log scale), with each layer's gather floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(rows[0]["per_layer_median_us"])
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 4))
    for vi, name in enumerate(variants):
        xs = [i + (vi - (len(variants) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["per_layer_median_us"][name] for r in rows], width, label=name, color=f"C{vi}")
    for i, r in enumerate(rows):
        if "gather_floor_us" in r:
            ax.hlines(r["gather_floor_us"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                      label="gather floor" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['sparsity']:.0%}\nk={r['fan_in']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("median us per layer application, log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--applications", type=int, default=128,
                        help="layer applications per timed call (amortises the cold start of each call)")
    parser.add_argument("--reps", type=int, default=100, help="max interleaved repetitions per sparsity")
    parser.add_argument("--budget-s", type=float, default=25.0, help="time budget per sparsity (>= 10 reps)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 90%%, few repetitions")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.applications, args.reps, args.budget_s = [0.9], 4, 3, 0.5
    stem = "batch1_bound_quick" if args.quick else "batch1_bound"
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cores']} | jax {info['jax']} | ffi kernel: {info['ffi_kernel']}")
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            kernel, mask, bias, alive, k = make_layer(rng, sparsity, 0.0)
            x_np = rng.standard_normal((1, N_IN)).astype(np.float32)
            built, layer = build_variants(kernel, mask, bias, alive, x_np, args.applications, gather_variants=True)
            variants = {name: built[name] for name in VARIANTS if name in built}
            floor = gather_floor(np.asarray(layer.indices), N_IN, args.applications, pathlib.Path(tmp))
            for fn in variants.values():
                fn()  # compile, warm up
            timed = dict(variants) if isinstance(floor, str) else {**variants, FLOOR: floor}
            times = time_interleaved(timed, args.reps, args.budget_s, args.seed, min_reps=10)
            per_call_us = {n: float(np.median(t)) * 1e6 for n, t in times.items()}
            floor_us = per_call_us.pop(FLOOR, None)
            per_layer_us = {n: us / args.applications for n, us in per_call_us.items()}
            best_dense = min(v for n, v in per_layer_us.items() if n.startswith("dense"))
            reps_done = int(times["dense_jnp"].size)
            row = {"sparsity": sparsity, "fan_in": k, "applications_per_call": args.applications,
                   "reps": reps_done, "per_layer_median_us": per_layer_us, "best_dense_us": best_dense,
                   # speed-up of each variant (time of the reference / time of the variant)
                   "speedup": {name: {ref: per_layer_us[ref] / us for ref in ("dense_jnp", "bcoo", "bcsr")}
                               | {"best_dense": best_dense / us} for name, us in per_layer_us.items()}}
            print(f"\n{sparsity:.0%} sparse, fan-in {k}, batch 1, us per layer application (median of {reps_done}"
                  f" interleaved calls of {args.applications} applications each); speed-up vs:")
            print(f"  {'variant':<17} {'us':>8} {'jnp':>7} {'best dense':>10} {'bcoo':>7} {'bcsr':>7}")
            for name, us in per_layer_us.items():
                up = row["speedup"][name]
                print(f"  {name:<17} {us:8.1f} {up['dense_jnp']:6.2f}x {up['best_dense']:9.2f}x "
                      f"{up['bcoo']:6.2f}x {up['bcsr']:6.2f}x")
            if floor_us is None:
                row["gather_floor_unavailable"] = floor
                print(f"  gather floor: unavailable ({floor})")
            else:
                row["gather_floor_us"] = floor_us
                row["bound_vs_best_dense"] = best_dense / floor_us
                row["bound_vs_dense_jnp"] = per_layer_us["dense_jnp"] / floor_us
                print(f"  gather floor      {floor_us:8.1f} us   (16-lane gathers alone, same index stream, "
                      "fastest CPU)"
                      f"\n  bound: best dense / floor = {row['bound_vs_best_dense']:.2f}x, "
                      f"dense jnp / floor = {row['bound_vs_dense_jnp']:.2f}x")
                # the floor is one core's: compare the 1-thread kernel, as it runs (the formulation it measured
                # faster) and with vector gathers forced (the formulation the floor bounds)
                for name in ("condensed_ffi_1t", "condensed_ffi_1t_vector", "condensed_ffi_1t_scalar"):
                    if name in per_layer_us:
                        row[f"{name.removeprefix('condensed_')}_over_floor"] = per_layer_us[name] / floor_us
                        print(f"  {name} takes {per_layer_us[name] / floor_us:.2f}x the floor")
            rows.append(row)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps({"machine": info, "args": {k: str(v) if isinstance(v, pathlib.Path) else v
                                                          for k, v in vars(args).items()}, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"), f"batch 1, {N_IN}->768 fp32, steady state (x{args.applications} in one jit), "
         f"{info['cpu']} x{info['cores']}")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
