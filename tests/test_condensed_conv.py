"""Condensed 2-D convolution without patches (srigl_jax._ffi_conv): the C++ kernel and its XLA counterpart against
``lax.conv_general_dilated`` on the densified kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from srigl_jax import _ffi_conv, _ffi_kernels
from srigl_jax.inference import FORCE_XLA_ENV, condense_kernel
from tests.test_condensed import REPO, random_constant_fan_in

KERNEL = pytest.mark.skipif(not _ffi_conv.available(), reason=f"conv kernel unavailable: {_ffi_conv._load()['reason']}")
BACKENDS = ["xla", pytest.param("ffi", marks=KERNEL)]
ISAS = _ffi_kernels.kernel_isas() or [pytest.param("none", marks=pytest.mark.skip(reason="C++ kernel unavailable"))]
RTOL, ATOL = 1e-5, 1e-4


def make_layer(rng, c_in, c_out, window, k, ablated=0.0, index_dtype=None):
    """A random constant fan-in conv layer: (condensed layer, HWIO masked kernel, bias)."""
    kh, kw = window
    kernel, mask, bias = random_constant_fan_in(rng, kh * kw * c_in, c_out, k, ablated)
    layer = condense_kernel(kernel, mask, bias)
    if index_dtype is not None:
        layer = layer.replace(indices=layer.indices.astype(index_dtype))
    return layer, (kernel * mask).reshape(kh, kw, c_in, c_out), bias


def reference(x, kernel, bias, strides, padding):
    pads = _ffi_conv.conv_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    y = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(kernel), strides, pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return np.asarray(y) + bias


def check(rng, backend, batch, hw, c_in, c_out, window, strides, padding, k, ablated=0.0, index_dtype=None):
    layer, kernel, bias = make_layer(rng, c_in, c_out, window, k, ablated, index_dtype)
    x = rng.standard_normal((batch, *hw, c_in)).astype(np.float32)
    got = jax.jit(lambda x, layer: _ffi_conv.condensed_conv2d(x, layer, window, strides, padding,
                                                               backend=backend))(x, layer)
    want = reference(x, kernel, bias, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


# batch, (H, W), c_in, c_out, window, strides, padding, k ("full": every tap), ablated fraction
CASES = [
    (1, (5, 5), 2, 3, (3, 3), (1, 1), "SAME", 4, 0.0),
    (2, (7, 6), 4, 6, (3, 2), (2, 1), "VALID", 7, 0.3),
    (3, (9, 11), 3, 17, (7, 7), (2, 2), ((3, 1), (0, 4)), 30, 0.3),
    (1, (4, 4), 16, 20, (3, 3), (1, 1), "SAME", "full", 0.0),
    (5, (6, 5), 8, 9, (1, 1), (1, 1), "VALID", 1, 0.2),
    (4, (8, 8), 5, 24, (1, 1), (2, 2), "SAME", 3, 0.0),
    (64, (4, 4), 8, 33, (3, 3), (1, 1), "SAME", 10, 0.5),        # batch chunks of 16 images
    (37, (5, 3), 6, 16, (3, 3), (2, 2), "SAME", 1, 0.0),          # a partial last batch chunk
    (2, (17, 19), 16, 40, (3, 3), (2, 2), "SAME", 14, 0.1),        # odd sizes, stride 2
    (3, (3, 4), 3, 5, (5, 5), (1, 1), ((6, 0), (2, 7)), 12, 0.0),  # padding larger than the window
    (2, (2, 2), 3, 4, (3, 3), (1, 1), "VALID", 5, 0.0),           # window larger than the input: no output
    (1, (33, 32), 4, 8, (7, 7), (2, 2), "SAME", "full", 0.0),
]


def expand(case):
    batch, hw, c_in, c_out, window, strides, padding, k, ablated = case
    return batch, hw, c_in, c_out, window, strides, padding, window[0] * window[1] * c_in if k == "full" else k, ablated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-{c[1][0]}x{c[1][1]}-w{c[4][0]}x{c[4][1]}-s{c[5][0]}{c[5][1]}-{c[6] if isinstance(c[6], str) else 'explicit'}-k{c[7]}")
def test_conv_equals_dense_conv(backend, case):
    check(np.random.default_rng(0), backend, *expand(case))


@KERNEL
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", ["1", "0"])
@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32])
def test_every_isa_and_thread_setting(monkeypatch, isa, threads, index_dtype):
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, isa)  # read when the function is traced
    monkeypatch.setenv(_ffi_kernels.MAX_THREADS_ENV, threads)
    monkeypatch.setenv(_ffi_kernels.MIN_THREAD_WORK_ENV, "0")  # every call split over all threads
    rng = np.random.default_rng(1)
    for case in CASES[:2] + CASES[6:9] + CASES[-1:]:
        batch, hw, c_in, c_out, window, strides, padding, k, ablated = expand(case)
        check(rng, "ffi", batch, hw, c_in, c_out, window, strides, padding, k, ablated, index_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_conv_property(backend, data):
    """Random shapes, windows, strides and paddings: the kernel equals the dense convolution."""
    draw = data.draw
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    c_in, c_out = draw(st.integers(1, 9)), draw(st.integers(1, 20))
    padding = draw(st.one_of(st.sampled_from(["SAME", "VALID"]),
                             st.tuples(st.tuples(st.integers(0, 4), st.integers(0, 4)),
                                       st.tuples(st.integers(0, 4), st.integers(0, 4)))))
    k = draw(st.integers(1, kh * kw * c_in))
    batch = draw(st.sampled_from([1, 2, 3, 16, 21]))
    ablated = draw(st.sampled_from([0.0, 0.4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    check(rng, backend, batch, (h, w), c_in, c_out, (kh, kw), (sh, sw), padding, k, ablated)


def test_xla_falls_back_to_patches_beyond_int32_offsets(monkeypatch):
    monkeypatch.setattr(_ffi_conv, "_MAX_XLA_OFFSET", 10)
    check(np.random.default_rng(9), "xla", *expand(CASES[2]))
    fn = jax.jit(lambda x: _ffi_conv.condensed_conv2d_xla(x, make_layer(np.random.default_rng(9), 2, 3, (3, 3), 4)[0],
                                                           (3, 3)))
    assert "concatenate" in fn.lower(jnp.ones((1, 5, 5, 2))).as_text()  # the patch tensor is built


@KERNEL
def test_all_ablated_and_no_taps():
    """Every neuron ablated (outputs = bias) and k = 0 (a layer with no inputs left)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)).astype(np.float32))
    bias = rng.standard_normal(4).astype(np.float32)
    dead = condense_kernel(np.ones((27, 4), np.float32), np.zeros((27, 4), bool), bias)
    y = _ffi_conv.condensed_conv2d(x, dead, (3, 3), backend="ffi")
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(bias, (2, 5, 5, 4)))
    no_taps = dead.replace(values=jnp.zeros((4, 0)), indices=jnp.zeros((4, 0), jnp.int16),
                           active=jnp.arange(4, dtype=jnp.int32))
    y = _ffi_conv.condensed_conv2d(x, no_taps, (3, 3), backend="ffi")
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(bias, (2, 5, 5, 4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_dense_conv(backend):
    rng = np.random.default_rng(3)
    layer, kernel, bias = make_layer(rng, 3, 5, (3, 3), 6, 0.2)
    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)

    def loss_condensed(x, values, bias_):
        y = _ffi_conv.condensed_conv2d(x, layer.replace(values=values, bias=bias_), (3, 3), (2, 1), "SAME",
                                       backend=backend)
        return jnp.sum(jnp.tanh(y))

    def loss_dense(x, bias_):
        y = jax.lax.conv_general_dilated(x, jnp.asarray(kernel), (2, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y + bias_))

    gx, _, gb = jax.grad(loss_condensed, argnums=(0, 1, 2))(x, layer.values, layer.bias)
    dx, db = jax.grad(loss_dense, argnums=(0, 1))(x, bias)
    np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, db, rtol=1e-4, atol=1e-5)


def test_gpu_lowering_uses_the_xla_path():
    """Lowered for CUDA (no GPU needed to lower), the jit-ed op has no CPU FFI call; for CPU it has one."""
    layer, _, _ = make_layer(np.random.default_rng(4), 2, 4, (3, 3), 5)
    fn = jax.jit(lambda x, layer: _ffi_conv.condensed_conv2d(x, layer, (3, 3), (2, 2), "SAME"))
    traced = fn.trace(jnp.ones((2, 6, 6, 2)), layer)
    cuda_text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert _ffi_conv.CONV_TARGET_NAME not in cuda_text and "gather" in cuda_text
    cpu_text = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert (_ffi_conv.CONV_TARGET_NAME in cpu_text) == _ffi_conv.available()


def test_force_xla_env(monkeypatch):
    layer, _, _ = make_layer(np.random.default_rng(5), 2, 4, (3, 3), 5)
    fn = lambda x: _ffi_conv.condensed_conv2d(x, layer, (3, 3))  # noqa: E731
    monkeypatch.setenv(FORCE_XLA_ENV, "1")
    assert _ffi_conv.CONV_TARGET_NAME not in jax.jit(fn).lower(jnp.ones((1, 4, 4, 2))).as_text()


def test_padding_and_shape_errors():
    layer, _, _ = make_layer(np.random.default_rng(6), 2, 4, (3, 3), 5)
    x = jnp.ones((1, 5, 5, 2))
    assert _ffi_conv.conv_padding("same", (16, 15), (3, 3), (2, 2)) == tuple(
        jax.lax.padtype_to_pads((16, 15), (3, 3), (2, 2), "SAME"))
    with pytest.raises(ValueError, match="padding must be"):
        _ffi_conv.condensed_conv2d(x, layer, (3, 3), padding="FULL")
    with pytest.raises(ValueError, match="non-negative"):
        _ffi_conv.condensed_conv2d(x, layer, (3, 3), padding=((1, -1), (0, 0)))
    with pytest.raises(ValueError, match="taps, layer expects"):
        _ffi_conv.condensed_conv2d(jnp.ones((1, 5, 5, 3)), layer, (3, 3))
    with pytest.raises(ValueError, match="NHWC"):
        _ffi_conv.condensed_conv2d(jnp.ones((5, 5, 2)), layer, (3, 3))
    with pytest.raises(ValueError, match="backend"):
        _ffi_conv.condensed_conv2d(x, layer, (3, 3), backend="cuda")


@KERNEL
def test_kernel_rejects_bad_indices_and_unsupported_dtypes():
    layer, _, _ = make_layer(np.random.default_rng(7), 2, 4, (3, 3), 5)
    x = jnp.ones((1, 5, 5, 2))
    for bad in (18, -1):
        broken = layer.replace(indices=layer.indices.at[1, 2].set(bad))
        with pytest.raises(Exception, match="outside"):
            jax.block_until_ready(_ffi_conv.condensed_conv2d(x, broken, (3, 3), backend="ffi"))
    with pytest.raises(ValueError, match="float32"):
        _ffi_conv.condensed_conv2d(x.astype(jnp.bfloat16), layer, (3, 3), backend="ffi")
    # "auto" runs what the kernel does not implement on XLA, with the right answer
    y = _ffi_conv.condensed_conv2d(x.astype(jnp.bfloat16), layer, (3, 3))
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(_ffi_conv.condensed_conv2d(x, layer, (3, 3), backend="xla")),
                               rtol=2e-2, atol=2e-2)


@KERNEL
def test_concurrent_calls_match(monkeypatch):
    """Calls from several Python threads at once (each kernel call also on all pool threads) agree."""
    monkeypatch.setenv(_ffi_kernels.MIN_THREAD_WORK_ENV, "0")
    rng = np.random.default_rng(8)
    layer, kernel, bias = make_layer(rng, 16, 40, (3, 3), 20, 0.2)
    xs = [rng.standard_normal((b, 9, 7, 16)).astype(np.float32) for b in (1, 5, 20)]
    wants = [reference(x, kernel, bias, (1, 1), "SAME") for x in xs]
    fn = jax.jit(lambda x, layer: _ffi_conv.condensed_conv2d(x, layer, (3, 3), backend="ffi"))
    for x in xs:
        fn(x, layer).block_until_ready()
    errors = []

    def worker():
        for _ in range(4):
            for x, want in zip(xs, wants):
                if not np.allclose(np.asarray(fn(x, layer)), want, rtol=RTOL, atol=ATOL):
                    errors.append(x.shape)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_benchmark_quick_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "condensed_conv.py"), "--quick", "--out-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "condensed_conv_quick.json").read_text())
    assert "load average at start" in result["machine"]["cpu"] and "load average at end" in result["machine"]
    variants = {row["variant"] for row in result["rows"]}
    assert {"dense_lax", "patches"} <= variants
    assert ("conv_ffi" in variants) == _ffi_conv.available()
