"""The training-cost benchmark stays runnable (its --quick smoke mode): it writes its JSON with the machine's
CPU model and caches and every ratio it prints. Timings are never asserted (2 shared cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*argv: str) -> subprocess.CompletedProcess:
    """``python bench/<argv>`` from the repo root with the repo importable; asserts that it succeeded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_step_benchmark_quick(tmp_path):
    out = tmp_path / "train_step.json"
    proc = run_bench("bench/train_step.py", "--quick", "--breakdown", "--optim-baseline", "HEAD", "--out", str(out))
    result = json.loads(out.read_text())
    assert "Model name" in result["cpu"] and "L2 cache" in result["cpu"]
    for key in ("dense_step_ms", "srigl_step_ms", "srigl_update_step_ms", "srigl_vs_dense",
                "update_overhead_amortised", "update_masks_layer_ms", "stacked_vs_unrolled"):
        assert result[key] > 0, key
    assert "x dense" in proc.stdout and "amortised" in proc.stdout
    assert set(result["breakdown_vs_dense"]) == {"dense + masking", "dense + masking + check"}
    assert result["srigl_no_nonfinite_skip_ms"] > 0 and "no NaN/Inf skip" in proc.stdout
    assert result["srigl_optim_baseline_ms"] > 0 and "optim.py of HEAD" in proc.stdout  # the A/B of the step


def test_mask_update_benchmark_quick(tmp_path):
    """--mask-update: update_masks and its selections, with and without the selection kernel, identical masks."""
    from srigl_jax import _ffi_select

    out = tmp_path / "mask_update.json"
    run_bench("bench/train_step.py", "--quick", "--mask-update", "--out", str(out))
    med = json.loads(out.read_text())["median_ms"]
    assert set(med) == {"top_n |w| (drop)", "top_n |grad| (salience)", "column_top_count |grad| (grow)",
                        "update_masks"}
    impls = {"new", "new, XLA select"} if _ffi_select.usable() else {"new"}
    assert all(set(by_impl) == impls and min(by_impl.values()) > 0 for by_impl in med.values())


def test_condense_models_benchmark_quick(tmp_path):
    """bench/condense_models.py --quick: whole (small) models through sj.condense, every row complete."""
    out = tmp_path / "condense_models.json"
    proc = run_bench("bench/condense_models.py", "--quick", "--models", "mlp", "resnet18", "--batches", "1",
                     "--cold", "--steady", "3", "--sync-dispatch", "--out", str(out))
    result = json.loads(out.read_text())
    assert "Model name" in result["machine"]["cpu"] and "L2 cache" in result["machine"]["cpu"]
    assert result["machine"]["cpu_async_dispatch"] is False  # --sync-dispatch took effect
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("mlp", 1), ("resnet18", 1)]
    for row in result["rows"]:
        assert row["dense_jnp_ms"] > 0 and row["condensed_ms"] > 0 and row["max_rel_err"] < 1e-4
        assert row["choices"] and all(c["kernel"] for c in row["choices"])
        assert row["dense_jnp_cold_ms"] > 0 and row["condensed_cold_ms"] > 0  # weights from DRAM (--cold)
        assert row["steady_forwards_per_call"] == 3 and row["condensed_steady_ms"] > 0  # --steady: in one jit
        assert row["speedup_vs_dense_jnp_steady"] == pytest.approx(  # the ms fields are rounded to 0.1 us
            row["dense_jnp_steady_ms"] / row["condensed_steady_ms"], rel=0.05)
    assert result["rows"][0]["speedup_vs_dense_numpy"] > 0 and result["rows"][0]["dense_numpy_cold_ms"] > 0
    assert "x dense jnp" in proc.stdout


def test_compile_update_benchmark_quick(tmp_path):
    """bench/compile_update.py runs (small CNN): compile times of update_masks, batched vs one layer at a time,
    and a bit-identity check of the two."""
    out = tmp_path / "compile_update.json"
    run_bench("bench/compile_update.py", "--quick", "--out", str(out))
    (model,) = json.loads(out.read_text())["models"]
    assert model["bit_identical"] and model["update_compile_s"] > 0 and model["grad_step_compile_s"] > 0
