"""Condensed convolution benchmark, CPU: the patch-free FFI kernel (srigl_jax._ffi_conv) against dense ``lax.conv``
and against the old path (extract_patches, then the condensed-product kernel).

Layers, fp32, NHWC, constant fan-in masks at 90% sparsity (k = 10% of kh*kw*C_in per output channel), batch 1 / 64 /
256: the layer of issue 12 (3x3, 32->64 on 16x16) and the ResNet-18 CIFAR conv shapes (3x3 stride 1 at 32x32 64ch,
16x16 128ch, 8x8 256ch, 4x4 512ch; the stride-2 3x3 and 1x1 shortcut convs entering each stage). Variants, timed
interleaved in one process (each repetition runs every variant once, in a random order; medians):
dense_lax (jit lax.conv_general_dilated + bias), patches (the old path: patches + condensed-product FFI kernel),
conv_ffi (the new kernel, default threads: as many as XLA's CPU pool has), conv_ffi_1t (one thread) and
conv_xla (the portable patch-free XLA formulation, up to --xla-max-batch).
The old path is skipped where its patch tensor alone would exceed --max-patch-mb. Every result records
bench._machine.cpu_report() (CPU model, caches, load average at the start) and the load average at the end.

    python bench/condensed_conv.py            # full run (a few minutes), bench/results/condensed_conv.json
    python bench/condensed_conv.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from condensed_linear import time_interleaved, with_env  # noqa: E402  (bench/ is sys.path[0]; fixes BLAS env)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _machine import cpu_report  # noqa: E402

from srigl_jax import _ffi_conv, _ffi_kernels  # noqa: E402
from srigl_jax.inference import condense_kernel, condensed_linear, extract_patches  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# name: (H = W, C_in, C_out, window, stride)
LAYERS = {
    "issue12_3x3_32to64_16x16": (16, 32, 64, 3, 1),
    "r18_l1_3x3_64_32x32": (32, 64, 64, 3, 1),
    "r18_l2_3x3_128_16x16": (16, 128, 128, 3, 1),
    "r18_l3_3x3_256_8x8": (8, 256, 256, 3, 1),
    "r18_l4_3x3_512_4x4": (4, 512, 512, 3, 1),
    "r18_l2_down_3x3_64to128_s2": (32, 64, 128, 3, 2),
    "r18_l3_down_3x3_128to256_s2": (16, 128, 256, 3, 2),
    "r18_l4_down_3x3_256to512_s2": (8, 256, 512, 3, 2),
    "r18_l2_short_1x1_64to128_s2": (32, 64, 128, 1, 2),
}
QUICK_LAYERS = {"quick_3x3_8to16_8x8": (8, 8, 16, 3, 1), "quick_1x1_8to16_s2": (7, 8, 16, 1, 2)}


def make_layer(rng: np.random.Generator, c_in: int, c_out: int, window: int, sparsity: float):
    """HWIO masked kernel, bias and the condensed layer (k = round((1 - sparsity) * fan-in) inputs per neuron)."""
    fan_in = window * window * c_in
    k = max(1, round((1.0 - sparsity) * fan_in))
    mask = np.zeros((fan_in, c_out), bool)
    for o in range(c_out):
        mask[rng.choice(fan_in, k, replace=False), o] = True
    kernel = (rng.standard_normal((fan_in, c_out)) * np.sqrt(2.0 / k)).astype(np.float32) * mask
    bias = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
    return kernel.reshape(window, window, c_in, c_out), bias, condense_kernel(kernel, mask, bias), k


def build_variants(x_np, kernel, bias, layer, stride: int, max_patch_mb: float, xla_max_batch: int):
    window = kernel.shape[:2]
    x, w, b = jnp.asarray(x_np), jnp.asarray(kernel), jnp.asarray(bias)
    dense = jax.jit(lambda x, w, b: jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)
    variants = {"dense_lax": lambda: dense(x, w, b).block_until_ready()}
    out_hw = [-(-n // stride) for n in x_np.shape[1:3]]
    patch_mb = x_np.shape[0] * out_hw[0] * out_hw[1] * layer.in_features * 4 / 2**20
    skipped = {}
    if patch_mb <= max_patch_mb:
        old = jax.jit(lambda x, layer: condensed_linear(extract_patches(x, window, (stride, stride), "SAME"), layer))
        variants["patches"] = lambda: old(x, layer).block_until_ready()
    else:
        skipped["patches"] = f"patch tensor {patch_mb:.0f} MB > --max-patch-mb {max_patch_mb:.0f}"
    if x_np.shape[0] <= xla_max_batch:
        xla = jax.jit(lambda x, layer: _ffi_conv.condensed_conv2d_xla(x, layer, window, (stride, stride), "SAME"))
        variants["conv_xla"] = lambda: xla(x, layer).block_until_ready()
    else:
        skipped["conv_xla"] = f"batch > --xla-max-batch {xla_max_batch}"
    if _ffi_conv.available():
        def conv(x, layer):
            return _ffi_conv.condensed_conv2d(x, layer, window, (stride, stride), "SAME", backend="ffi")

        new = jax.jit(with_env(_ffi_kernels.MAX_THREADS_ENV, "0", conv))
        new_1t = jax.jit(with_env(_ffi_kernels.MAX_THREADS_ENV, "1", conv))
        variants["conv_ffi"] = lambda: new(x, layer).block_until_ready()
        variants["conv_ffi_1t"] = lambda: new_1t(x, layer).block_until_ready()
    else:
        skipped["conv_ffi"] = _ffi_conv._load()["reason"]
    return variants, skipped


def check_outputs(variants) -> None:
    """Every variant agrees with dense_lax (this also compiles them before timing)."""
    want = np.asarray(variants["dense_lax"]())
    scale = np.abs(want).max() + 1.0
    for name, fn in variants.items():
        got = np.asarray(fn())
        if not np.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
            raise AssertionError(f"{name} disagrees with dense_lax (max err {np.abs(got - want).max()})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: two tiny layers, batch 1 and 4, few reps")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS) + list(QUICK_LAYERS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--reps", type=int, default=60, help="max repetitions per configuration")
    parser.add_argument("--budget-s", type=float, default=4.0, help="time budget per configuration")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-patch-mb", type=float, default=300.0, help="skip the old path above this patch size")
    parser.add_argument("--xla-max-batch", type=int, default=64, help="time conv_xla up to this batch")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.batches, args.reps, args.budget_s, args.min_reps = list(QUICK_LAYERS), [1, 4], 3, 0.3, 3
    stem = "condensed_conv_quick" if args.quick else "condensed_conv"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_report(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
               "ffi_kernel": _ffi_kernels.kernel_isa() or f"unavailable: {_ffi_kernels.unavailable_reason()}",
               "xla_cpu_threads_default": os.cpu_count()}
    print(f"machine: {machine['cpu']}\njax {machine['jax']} | kernel ISA {machine['ffi_kernel']}")
    print(f"{'layer':<30} {'B':>4} {'k':>5} {'variant':<12} {'median us':>11} {'dense/x':>8} {'patches/x':>9}")
    rng = np.random.default_rng(args.seed)
    rows = []
    for name in args.layers:
        hw, c_in, c_out, window, stride = {**LAYERS, **QUICK_LAYERS}[name]
        kernel, bias, layer, k = make_layer(rng, c_in, c_out, window, args.sparsity)
        for batch in args.batches:
            x_np = rng.standard_normal((batch, hw, hw, c_in)).astype(np.float32)
            variants, skipped = build_variants(x_np, kernel, bias, layer, stride, args.max_patch_mb,
                                               args.xla_max_batch)
            check_outputs(variants)
            times = time_interleaved(variants, args.reps, args.budget_s, seed=args.seed, min_reps=args.min_reps)
            med = {n: float(np.median(t)) for n, t in times.items()}
            for variant, t in times.items():
                row = {"layer": name, "hw": hw, "c_in": c_in, "c_out": c_out, "window": window, "stride": stride,
                       "sparsity": args.sparsity, "fan_in": k, "batch": batch, "variant": variant,
                       "reps": int(t.size), "median_us": med[variant] * 1e6, "min_us": float(t.min()) * 1e6,
                       "p25_us": float(np.percentile(t, 25)) * 1e6, "p75_us": float(np.percentile(t, 75)) * 1e6,
                       "speedup_vs_dense_lax": med["dense_lax"] / med[variant],
                       "speedup_vs_patches": med["patches"] / med[variant] if "patches" in med else None}
                rows.append(row)
                vs_old = f"{row['speedup_vs_patches']:8.2f}x" if "patches" in med else f"{'-':>9}"
                print(f"{name:<30} {batch:4d} {k:5d} {variant:<12} {row['median_us']:11.1f} "
                      f"{row['speedup_vs_dense_lax']:7.2f}x {vs_old}", flush=True)
            for variant, why in skipped.items():
                rows.append({"layer": name, "batch": batch, "variant": variant, "skipped": why})
                print(f"{name:<30} {batch:4d} {k:5d} {variant:<12} skipped: {why}", flush=True)
    machine["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps({"machine": machine, "args": {
        k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"load average at end: {machine['load average at end']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
