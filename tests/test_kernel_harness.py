"""The C++ kernel's row blocks, every ISA variant this CPU runs, under AddressSanitizer and UBSan.

tests/csrc/kernel_harness.cc includes the kernel source, draws random layers (edge sizes, ablation, int16 and
int32 indices, bad indices), computes them over random row partitions as the thread chunks do, and checks
values, the bad-index flag and that rows outside a chunk are never written, against a double reference.
Buffers are exact-size (ASan) or end/start at a guard page (AVX-512 accesses that ASan does not instrument).
Every third configuration also runs a random condensed convolution (srigl_condensed_conv2d's packing, tap
table and blocks; random windows, strides, paddings, batch chunks, ablation, bad indices) against a double
reference.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from srigl_jax import _ffi_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "csrc" / "kernel_harness.cc"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> pathlib.Path:
    compiler = shutil.which("g++")  # the ISA variants are GCC-only (condensed_kernel.cc), as in the package build
    if compiler is None:
        pytest.skip("no g++ (the package kernel is optional without a compiler)")
    import jax.ffi

    exe = tmp_path_factory.mktemp("kernel_harness") / "kernel_harness"
    build = subprocess.run(
        [compiler, "-O1", "-g", "-std=c++17", "-fno-math-errno", "-Wno-psabi", "-Wno-attributes", *SANITIZE,
         "-I", str(REPO / "srigl_jax" / "csrc"), "-I", jax.ffi.include_dir(), str(HARNESS), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return exe


def run_harness(exe: pathlib.Path, configs: int, mode: int, seed: int) -> str:
    """Runs the harness; fails on any mismatch, sanitizer report or crash."""
    done = subprocess.run([str(exe), str(configs), str(mode), str(seed)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "failures=0" in done.stdout
    return done.stdout


@pytest.mark.parametrize("mode, seed", [(0, 1), (3, 2)])  # exact malloc (ASan); guard pages
def test_kernel_blocks_match_reference_under_sanitizers(harness, mode, seed):
    out = run_harness(harness, 3000, mode, seed)
    assert "configs=3000" in out
    assert int(out.split("conv configs=", 1)[1].split()[0]) > 500
    tested = out.split("variants:", 1)[1].split("\n", 1)[0].split()
    # every variant the package kernel runs on this CPU went through the harness
    assert set(_ffi_kernels.kernel_isas() or ["generic"]) <= set(tested), tested
    # ... and with the gathered columns by scalar loads, the other batch-1 formulation of the vector variants
    assert {f"{isa}+scalar-loads" for isa in _ffi_kernels.kernel_isas() if isa != "generic"} <= set(tested)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_kernel_blocks_match_reference_under_sanitizers_long(harness, mode):
    run_harness(harness, 100_000, mode, 100 + mode)
