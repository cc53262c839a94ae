"""Whole models through ``sj.condense`` vs the dense model, fp32 on CPU, measured interleaved in one process.

Models (train/models.py): MLP 784-3072-768-10, ResNet-18 (CIFAR, 32x32), ViT-B/16 (224x224), each with random
90% SRigL constant fan-in masks (``init_masks`` + ``init_params``; ERK, and for the ViT 90% on every layer but
the dense attention in-projections, the paper's setting). For every batch size, ``condense``
chooses each layer's kernel by timing it on that layer's shape at the batch (and checks the whole model);
then the jitted dense ``model.apply`` and the jitted condensed model (variables as arguments) are timed
alternately, and for the MLP also a numpy dense forward (the best dense on many CPUs at batch 1). Ratios are
dense median / condensed median (> 1: condensed faster). Outputs are checked against the dense model.

    python bench/condense_models.py            # full (ViT-B/16 at batch 256 dominates: about 20+ min on 2 cores)
    python bench/condense_models.py --quick    # smoke run (small models, seconds)
    python bench/condense_models.py --models mlp resnet18 --batches 1 64
    python bench/condense_models.py --models mlp --batches 1 --steady 32   # also N forwards in one jit

``--sync-dispatch`` runs every call on the calling thread (``jax_cpu_enable_async_dispatch=False``): by default
XLA:CPU hands a call whose HLO it estimates at >= 1000 flops to a worker thread (custom calls count as 0, so a
condensed model with a ReLU between two kernels is handed off, a lone kernel call is not), and the hand-off and
wake-up cost tens of microseconds per call on a small VM.
``--steady N`` also times N chained forwards inside one compiled loop (each input depends on the last output
by an fp32-invisible nudge), dense and condensed alike, numpy as N calls: the per-call dispatch and cold start
are paid once per N forwards, as for a model run inside a larger compiled program or called back to back.

Writes bench/results/condense_models.json (with the CPU model, caches and load average).
"""

from __future__ import annotations

import argparse
import dataclasses
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

import srigl_jax as sj  # noqa: E402
from _machine import cpu_report, evict_caches, interleaved_times  # noqa: E402
from srigl_jax import _ffi_kernels  # noqa: E402
from srigl_jax.inference import Timing  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train.models import MLP, ViT, BasicBlock, ResNet  # noqa: E402

EVAL = {"train": False}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: object
    input_shape: tuple[int, ...]
    reps: int  # whole-model repetitions (interleaved)
    heavy_reps: int  # at the largest batch
    distribution: str = "erk"


def cases(quick: bool) -> dict[str, Case]:
    if quick:
        return {
            "mlp": Case("mlp", lambda: MLP(hidden=(96, 32)), (8, 8, 1), 5, 5),
            "resnet18": Case("resnet18", lambda: ResNet(stage_sizes=(1, 1), block=BasicBlock, width=8),
                             (8, 8, 3), 3, 3),
            "vit_b16": Case("vit_b16", lambda: ViT(patch=4, dim=16, depth=1, num_heads=2, mlp_dim=32,
                                                   num_classes=10), (8, 8, 3), 3, 3, "uniform_sparse"),
        }
    return {
        "mlp": Case("mlp", lambda: MLP(hidden=(3072, 768)), (28, 28, 1), 100, 40),
        "resnet18": Case("resnet18", lambda: ResNet(stage_sizes=(2, 2, 2, 2), block=BasicBlock), (32, 32, 3),
                         30, 8),
        # ERK at 90% is infeasible with the attention in-projections dense (21M of 86M weights): the paper's ViT
        # setting, 90% on every other layer
        "vit_b16": Case("vit_b16", lambda: ViT(), (224, 224, 3), 10, 3, "uniform_sparse"),
    }


def sparse_variables(model, input_shape, sparsity: float, distribution: str, seed: int = 0):
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init(jax.random.key(seed), x, train=False)
    algo = sj.SRigL(sparsity=sparsity, distribution=distribution, t_end=100)
    masks = algo.init_masks(variables["params"], jax.random.key(seed + 1))
    params = algo.init_params(variables["params"], masks, jax.random.key(seed + 2))
    return {**variables, "params": params}, masks


def numpy_mlp(params):
    """The MLP forward in numpy (float32 BLAS): x.reshape(B, -1) -> relu(fc1) -> relu(fc2) -> head."""
    layers = [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])) for n in ("fc1", "fc2", "head")]

    def forward(x):
        h = x.reshape(x.shape[0], -1)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                np.maximum(h, 0, out=h)
        return h
    return forward


def interleaved(fns: dict, reps: int, before=None) -> dict[str, np.ndarray]:
    for fn in fns.values():  # compile and warm up (once: a ViT-B/16 forward at batch 256 takes minutes here)
        fn()
    return {name: np.asarray(t) for name, t in interleaved_times(fns, reps, before).items()}


def chained(forward, n: int):
    """jit of ``n`` forwards of ``forward(variables, x)``, each input nudged by 1e-30 x the last output (so XLA can
    neither hoist nor merge them); returns the final input."""
    def run(variables, x):
        def body(_, x):
            y = forward(variables, x)
            return x.at[(0,) * x.ndim].add(1e-30 * y.reshape(-1)[0])
        return jax.lax.fori_loop(0, n, body, x)
    return jax.jit(run)


def run_case(case: Case, batch: int, reps: int, sparsity: float, timing: Timing, cold: bool = False,
             steady: int = 0) -> dict:
    model = case.build()
    variables, masks = sparse_variables(model, case.input_shape, sparsity, case.distribution)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *case.input_shape)), jnp.float32)
    t0 = time.perf_counter()
    fast = sj.condense(model, variables, masks, example=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       apply_kwargs=EVAL, timing=timing)
    condense_s = time.perf_counter() - t0
    dense_fn = jax.jit(lambda v, x: model.apply(v, x, **EVAL))
    fast_fn = jax.jit(lambda v, x: fast.apply(v, x, **EVAL))
    want, got = dense_fn(variables, x), fast_fn(fast.variables, x)
    err = float(jnp.max(jnp.abs(want - got)) / (jnp.max(jnp.abs(want)) + 1e-30))
    fns = {"dense_jnp": lambda: dense_fn(variables, x).block_until_ready(),
           "condensed": lambda: fast_fn(fast.variables, x).block_until_ready()}
    if case.name == "mlp":
        forward, xn = numpy_mlp(variables["params"]), np.asarray(x)
        np.testing.assert_allclose(forward(xn), np.asarray(want), rtol=1e-3, atol=1e-3)
        fns["dense_numpy"] = lambda: forward(xn)
    t = interleaved(fns, reps)
    med = {name: float(np.median(v)) for name, v in t.items()}
    row = {
        "model": case.name, "distribution": case.distribution, "batch": batch, "reps": reps,
        "condense_s": round(condense_s, 2),
        "max_rel_err": err,
        **{f"{name}_ms": round(m * 1e3, 4) for name, m in med.items()},
        "speedup_vs_dense_jnp": med["dense_jnp"] / med["condensed"],
        "paired_wins_vs_dense_jnp": float(np.mean(t["condensed"] < t["dense_jnp"])),
        "kernels": {k: sum(c.kernel == k for c in fast.choices) for k in sorted({c.kernel for c in fast.choices})},
        "choices": [c.row() for c in fast.choices],
    }
    if "dense_numpy_ms" in row:
        row["speedup_vs_dense_numpy"] = med["dense_numpy"] / med["condensed"]
        row["speedup_vs_best_dense"] = min(med["dense_numpy"], med["dense_jnp"]) / med["condensed"]
    if steady:  # n forwards per timed call, in one compiled loop: per-forward times
        dense_loop = chained(lambda v, x: model.apply(v, x, **EVAL), steady)
        fast_loop = chained(lambda v, x: fast.apply(v, x, **EVAL), steady)
        loops = {"dense_jnp": lambda: dense_loop(variables, x).block_until_ready(),
                 "condensed": lambda: fast_loop(fast.variables, x).block_until_ready()}
        if "dense_numpy" in fns:
            loops["dense_numpy"] = lambda: [forward(xn) for _ in range(steady)]
        steady_med = {name: float(np.median(v)) / steady for name, v in interleaved(loops, reps).items()}
        row["steady_forwards_per_call"] = steady
        row.update({f"{name}_steady_ms": round(m * 1e3, 4) for name, m in steady_med.items()})
        row["speedup_vs_dense_jnp_steady"] = steady_med["dense_jnp"] / steady_med["condensed"]
        if "dense_numpy" in steady_med:
            row["speedup_vs_dense_numpy_steady"] = steady_med["dense_numpy"] / steady_med["condensed"]
    if cold:  # the same calls with the caches evicted before each: weights (and activations) come from DRAM
        cold_med = {name: float(np.median(v)) for name, v in interleaved(fns, reps, before=evict_caches).items()}
        row.update({f"{name}_cold_ms": round(m * 1e3, 4) for name, m in cold_med.items()})
        row["speedup_vs_dense_jnp_cold"] = cold_med["dense_jnp"] / cold_med["condensed"]
        if "dense_numpy" in cold_med:
            row["speedup_vs_dense_numpy_cold"] = cold_med["dense_numpy"] / cold_med["condensed"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models, batches 1 and 4, few repetitions")
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet18", "vit_b16"])
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--layer-reps", type=int, default=15, help="per-layer timing repetitions in condense")
    ap.add_argument("--layer-budget-s", type=float, default=3.0, help="per-layer timing budget in condense")
    ap.add_argument("--cold", action="store_true",
                    help="also time every call with the caches evicted before it (weights from DRAM)")
    ap.add_argument("--sync-dispatch", action="store_true",
                    help="jax_cpu_enable_async_dispatch=False: run each call on the calling thread (no hand-off to "
                         "a worker thread and back; it applies to the dense model alike)")
    ap.add_argument("--steady", type=int, default=0, metavar="N",
                    help="also time N forwards per call inside one compiled loop (steady state)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "condense_models.json"))
    args = ap.parse_args()
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    batches = args.batches or ([1, 4] if args.quick else [1, 64, 256])
    timing = Timing(reps=3, budget_s=0.05) if args.quick else Timing(reps=args.layer_reps,
                                                                     budget_s=args.layer_budget_s)
    machine = {"cpu": cpu_report(), "platform": platform.platform(), "jax": jax.__version__,
               "ffi_kernel": _ffi_kernels.kernel_isa(), "ffi_gather": _ffi_kernels.gather_formulation(),
               "cpu_async_dispatch": bool(jax.config.values["jax_cpu_enable_async_dispatch"]),
               **blas_env_report()}
    known = cases(args.quick)
    rows = []
    for name in args.models:
        case = known[name]
        for batch in batches:
            reps = case.heavy_reps if batch == max(batches) else case.reps
            row = run_case(case, batch, reps, args.sparsity, timing, args.cold, args.steady)
            rows.append(row)
            extra = f"  vs numpy {row['speedup_vs_dense_numpy']:.2f}x" if "speedup_vs_dense_numpy" in row else ""
            if args.steady:
                extra += (f"  steady state: dense {row['dense_jnp_steady_ms']:.3f} ms, condensed "
                          f"{row['condensed_steady_ms']:.3f} ms, {row['speedup_vs_dense_jnp_steady']:.2f}x")
            if args.cold:
                extra += (f"  cold caches: dense {row['dense_jnp_cold_ms']:.3f} ms, condensed "
                          f"{row['condensed_cold_ms']:.3f} ms, {row['speedup_vs_dense_jnp_cold']:.2f}x")
            print(f"{name:<9} batch {batch:>3}: dense {row['dense_jnp_ms']:9.3f} ms  condensed "
                  f"{row['condensed_ms']:9.3f} ms  {row['speedup_vs_dense_jnp']:.2f}x dense jnp{extra}  "
                  f"(kernels {row['kernels']}, condense {row['condense_s']:.0f} s, rel err {row['max_rel_err']:.1e})",
                  flush=True)
    machine["load_average_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
