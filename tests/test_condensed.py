"""Condensed / structured export and the condensed product (XLA and C++ FFI paths) against masked dense layers."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import srigl_jax as sj
from srigl_jax import _ffi_kernels
from srigl_jax.inference import (
    FORCE_XLA_ENV,
    CondensedConv,
    CondensedDense,
    CondensedLinear,
    condense_kernel,
    condensed_conv,
    condensed_linear,
    default_layer_order,
    densify,
    export_condensed,
    export_structured,
    use_ffi_kernel,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ["xla", pytest.param("ffi", marks=pytest.mark.skipif(
    not _ffi_kernels.available(), reason=f"C++ kernel unavailable: {_ffi_kernels.unavailable_reason()}"))]
RTOL, ATOL = 1e-5, 1e-5


def random_constant_fan_in(rng: np.random.Generator, n_in: int, n_out: int, k: int, ablated: float,
                           bias: bool = True, keep_one: bool = True):
    """Kernel, constant fan-in mask (k inputs per active neuron, ~`ablated` neurons all-False) and bias."""
    kernel = rng.standard_normal((n_in, n_out)).astype(np.float32)
    mask = np.zeros((n_in, n_out), bool)
    for o in range(n_out):
        mask[rng.choice(n_in, k, replace=False), o] = True
    dead = rng.random(n_out) < ablated
    if keep_one:
        dead[rng.integers(n_out)] = False
    mask[:, dead] = False
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    return kernel, mask, b


def masked_dense(x, kernel, mask, bias):
    y = np.asarray(x, np.float64) @ (kernel * mask).astype(np.float64)
    return y + (0.0 if bias is None else bias)


# ---------------------------------------------------------------------------------------------- the product
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8)
@given(n_in=st.integers(1, 300), n_out=st.integers(1, 70), k_frac=st.floats(0.0, 1.0),
       ablated=st.sampled_from([0.0, 0.3]), has_bias=st.booleans(), batch=st.integers(1, 256),
       seed=st.integers(0, 2**31 - 1))
def test_condensed_linear_equals_masked_dense(backend, n_in, n_out, k_frac, ablated, has_bias, batch, seed):
    rng = np.random.default_rng(seed)
    k = max(1, round(k_frac * n_in))
    kernel, mask, bias = random_constant_fan_in(rng, n_in, n_out, k, ablated, has_bias)
    layer = condense_kernel(kernel, mask, bias)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    y = jax.jit(lambda x, layer: condensed_linear(x, layer, backend=backend))(x, layer)
    np.testing.assert_allclose(np.asarray(y), masked_dense(x, kernel, mask, bias), rtol=RTOL, atol=ATOL * k)


# Every instruction-set variant of the kernel this CPU runs (AVX-512 machines test all three).
ISAS = _ffi_kernels.kernel_isas() or [pytest.param("none", marks=pytest.mark.skip(reason="C++ kernel unavailable"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32])
@pytest.mark.parametrize("gather", ["vector", "scalar"])
def test_ffi_matches_xla_on_every_batch_panel(monkeypatch, isa, index_dtype, gather):
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, isa)  # read when the function is traced
    monkeypatch.setenv(_ffi_kernels.GATHER_ENV, gather)
    rng = np.random.default_rng(0)
    # 1100 inputs: three packing tasks, 1100 = 68 x 16 + 12 (scalar transpose remainder); k = 45: the vector
    # gather loops and their tails
    kernel, mask, bias = random_constant_fan_in(rng, 1100, 37, 45, 0.3)
    layer = condense_kernel(kernel, mask, bias)
    layer = layer.replace(indices=layer.indices.astype(index_dtype))
    ffi = jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))
    # 1: gathers only; 13 = 8 + 4 + 1; 127 = 64 + 32 + 16 + 8 + 4 + 3 gathered; 200 = 3 x 64 + 8
    for batch in (1, 13, 127, 200):
        x = rng.standard_normal((batch, 1100)).astype(np.float32)
        y_ffi = ffi(x, layer)
        y_xla = condensed_linear(x, layer, backend="xla")
        np.testing.assert_allclose(np.asarray(y_ffi), np.asarray(y_xla), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(y_ffi), masked_dense(x, kernel, mask, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_auto_gather_runs_the_formulation_it_reports(monkeypatch, isa):
    """'auto' is one of the two formulations bit for bit (they round differently), the one gather_formulation
    names; a bad setting is an error."""
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, isa)
    rng = np.random.default_rng(1)
    kernel, mask, bias = random_constant_fan_in(rng, 3000, 64, 300, 0.2)
    layer = condense_kernel(kernel, mask, bias)
    x = rng.standard_normal((2, 3000)).astype(np.float32)
    outputs = {}
    for mode in ("vector", "scalar", "auto"):
        monkeypatch.setenv(_ffi_kernels.GATHER_ENV, mode)
        outputs[mode] = np.asarray(jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))(x, layer))
        if mode != "auto":
            np.testing.assert_allclose(outputs[mode], masked_dense(x, kernel, mask, bias), rtol=1e-5, atol=1e-4)
    picked = _ffi_kernels.gather_formulation()
    assert picked in ("vector", "scalar")
    np.testing.assert_array_equal(outputs["auto"], outputs[picked])
    if isa != "generic":  # the vector variants really have two formulations (the sums differ in order)
        assert not np.array_equal(outputs["vector"], outputs["scalar"])
    monkeypatch.setenv(_ffi_kernels.GATHER_ENV, "fast")
    with pytest.raises(ValueError, match=_ffi_kernels.GATHER_ENV):
        condensed_linear(x, layer, backend="ffi")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gather", ["vector", "scalar"])
@pytest.mark.parametrize("n_in", [32767, 32768, 32769, 40000])
def test_int16_indices_of_wide_layers_reject_negative_values(monkeypatch, isa, gather, n_in):
    """int16 indices address inputs 0..32767 whatever the width: a negative one (which, read as 16 unsigned bits,
    would be a valid input of a layer wider than 32768) is an error on every path; valid ones give the product."""
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, isa)
    monkeypatch.setenv(_ffi_kernels.GATHER_ENV, gather)
    rng = np.random.default_rng(n_in)
    n_out, k = 20, 40
    indices = np.stack([np.sort(rng.choice(min(n_in, 32768), k, replace=False)) for _ in range(n_out)])
    layer = CondensedLinear(jnp.asarray(rng.standard_normal((n_out, k)), jnp.float32),
                            jnp.asarray(indices, jnp.int16), jnp.zeros(n_out), jnp.arange(n_out, dtype=jnp.int32),
                            in_features=n_in, out_features=n_out)
    x = jnp.asarray(rng.standard_normal((1, n_in)), jnp.float32)
    ffi = jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))
    np.testing.assert_allclose(ffi(x, layer), condensed_linear(x, layer, backend="xla"), rtol=1e-5, atol=1e-4)
    for row, col, value in [(0, 5, -30000), (17, 20, -1), (3, 39, -32768)]:  # vector part; last 4; tail
        bad = layer.replace(indices=layer.indices.at[row, col].set(value))
        with pytest.raises(Exception, match="outside"):
            jax.block_until_ready(ffi(x, bad))


@pytest.mark.parametrize("env, value", [("SRIGL_JAX_CONDENSED_GATHER", "fast"), ("SRIGL_JAX_CONDENSED_ISA", "sse9"),
                                        ("SRIGL_JAX_CONDENSED_MAX_THREADS", "-1")])
def test_a_bad_setting_at_load_time_is_an_error_not_a_silent_fallback(env, value):
    """The library's load-time smoke test runs with default settings: a bad value in the environment when the
    kernel first loads does not mark it unusable (which would silently send "auto" to XLA for the whole process);
    calls that read the setting raise instead."""
    if not _ffi_kernels.available():
        pytest.skip("C++ kernel unavailable")
    code = textwrap.dedent(f"""
        import jax.numpy as jnp, numpy as np, pytest
        from srigl_jax import _ffi_kernels
        from srigl_jax.inference import condense_kernel, condensed_linear
        assert _ffi_kernels.available(), _ffi_kernels.unavailable_reason()
        layer = condense_kernel(np.ones((8, 2), np.float32), np.ones((8, 2), bool))
        with pytest.raises(ValueError, match="{env}"):
            condensed_linear(jnp.ones((1, 8)), layer)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, env: value, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", [_ffi_kernels.MAX_THREADS_ENV, _ffi_kernels.MIN_THREAD_WORK_ENV])
@pytest.mark.parametrize("raw", ["-1", "many", "1.5", str(2**63)])
def test_thread_settings_must_be_non_negative_integers(monkeypatch, name, raw):
    if not _ffi_kernels.available():
        pytest.skip("C++ kernel unavailable")
    monkeypatch.setenv(name, raw)
    layer = condense_kernel(np.ones((40, 3), np.float32), np.ones((40, 3), bool))
    with pytest.raises(ValueError, match=name):
        condensed_linear(jnp.ones((2, 40)), layer, backend="ffi")


def test_unknown_isa_name_is_an_error(monkeypatch):
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="SRIGL_JAX_CONDENSED_ISA"):
        _ffi_kernels._isa_level()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_densify_roundtrip(backend):
    rng = np.random.default_rng(1)
    kernel, mask, bias = random_constant_fan_in(rng, 30, 12, 5, 0.3)
    layer = condense_kernel(kernel, mask, bias)
    np.testing.assert_array_equal(np.asarray(densify(layer)), kernel * mask)
    x = rng.standard_normal((2, 3, 30)).astype(np.float32)
    y = condensed_linear(x, layer, backend=backend)
    assert y.shape == (2, 3, 12)
    np.testing.assert_allclose(np.asarray(y), masked_dense(x, kernel, mask, bias), rtol=RTOL, atol=1e-4)


def test_index_dtype_follows_fan_in():
    rng = np.random.default_rng(2)
    for n_in, dtype in [(32768, jnp.int16), (32769, jnp.int32)]:
        mask = np.zeros((n_in, 2), bool)
        mask[[0, n_in - 1], :] = True
        layer = condense_kernel(np.ones((n_in, 2), np.float32), mask)
        assert layer.indices.dtype == dtype
        x = rng.standard_normal((1, n_in)).astype(np.float32)
        for backend in ("xla", "ffi") if _ffi_kernels.available() else ("xla",):
            y = condensed_linear(x, layer, backend=backend)
            np.testing.assert_allclose(np.asarray(y)[0], [x[0, 0] + x[0, -1]] * 2, rtol=1e-6)


def test_not_constant_fan_in_is_a_clear_error():
    mask = np.zeros((6, 3), bool)
    mask[:2, 0] = True
    mask[:3, 1] = True  # fan-in 3 vs 2
    with pytest.raises(ValueError, match="not constant fan-in"):
        condense_kernel(np.ones((6, 3), np.float32), mask, name="Dense_0")
    params = {"Dense_0": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="Dense_0.*not constant fan-in"):
        export_condensed(params, {"Dense_0": {"kernel": jnp.asarray(mask), "bias": jnp.ones(3, bool)}})


def test_wrong_input_width_is_an_error():
    layer = condense_kernel(np.ones((4, 2), np.float32), np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="expects 4"):
        condensed_linear(jnp.ones((1, 5)), layer)


def test_exported_variables_run_through_from_variables_and_a_bare_dict_is_a_type_error():
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 5), bool)
    for n in (0, 2, 4):  # neurons 1 and 3 ablated, fan-in 3
        mask[rng.choice(12, 3, replace=False), n] = True
    params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((12, 5)) * mask, jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(5), jnp.float32)}}
    exported = export_condensed(params, {"fc": {"kernel": jnp.asarray(mask), "bias": jnp.ones(5, bool)}})["fc"]
    x = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
    want = x @ params["fc"]["kernel"] + params["fc"]["bias"]
    for backend in ("xla", "auto"):
        with pytest.raises(TypeError, match="CondensedLinear.from_variables"):
            condensed_linear(x, exported, backend=backend)
        layer = CondensedLinear.from_variables(exported, in_features=12)
        np.testing.assert_allclose(condensed_linear(x, layer, backend=backend), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="condensed_conv2d: layer must be a CondensedLinear"):
        condensed_conv(jnp.ones((1, 4, 4, 3)), exported, (2, 2))
    with pytest.raises(KeyError, match="missing \\['active'\\]"):
        CondensedLinear.from_variables({k: v for k, v in exported.items() if k != "active"}, 12)
    with pytest.raises(ValueError, match="values and indices"):
        CondensedLinear.from_variables({**exported, "indices": exported["indices"][:, :2]}, 12)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("gather", ["vector", "scalar"])
def test_ffi_rejects_out_of_range_indices_and_unsupported_dtypes(monkeypatch, isa, gather):
    monkeypatch.setenv(_ffi_kernels.ISA_ENV, isa)
    monkeypatch.setenv(_ffi_kernels.GATHER_ENV, gather)
    # k = 40: a bad index in the vector gather loop (position 1) and in the tails (position 37); 18 neurons:
    # rows 0-15 are one 16-row group of the batch-1 gathers, rows 16-17 the rows after it
    layer = condense_kernel(np.ones((40, 18), np.float32), np.ones((40, 18), bool))
    ffi = jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))
    for row, col, value in [(1, 1, 40), (17, 37, 40), (0, 1, -1), (16, 37, -3), (9, 39, 1000)]:  # 40 == in_features
        bad = layer.replace(indices=layer.indices.at[row, col].set(value))
        for batch in (1, 3, 70):  # gathers; gathers; a 64-wide panel + 4-wide panel + 2 gathered columns
            with pytest.raises(Exception, match="outside"):
                jax.block_until_ready(ffi(jnp.ones((batch, 40)), bad))
    # no inputs at all but k > 0: every index is out of range (and there is no x[0] to clamp to)
    empty = CondensedLinear(jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int16), jnp.zeros(2), jnp.arange(2, dtype=jnp.int32),
                            in_features=0, out_features=2)
    with pytest.raises(Exception, match="outside"):
        jax.block_until_ready(condensed_linear(jnp.ones((3, 0)), empty, backend="ffi"))
    half = jnp.ones((1, 40), jnp.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        condensed_linear(half, layer, backend="ffi")
    # "auto" falls back to XLA for what the kernel does not implement, with the right answer
    np.testing.assert_allclose(np.asarray(condensed_linear(half, layer), np.float32), np.full((1, 18), 40.0))


def test_kernel_loads_when_first_used_inside_jit():
    """The first use is usually inside a trace: loading (and its smoke test) must still work there."""
    code = ("import jax, numpy as np\n"
            "from srigl_jax import _ffi_kernels\n"
            "from srigl_jax.inference import condense_kernel, condensed_linear\n"
            "layer = condense_kernel(np.ones((4, 2), np.float32), np.ones((4, 2), bool))\n"
            "y = jax.jit(lambda x: condensed_linear(x, layer))(np.ones((1, 4), np.float32))\n"
            "assert np.allclose(y, 4.0)\n"
            "print(_ffi_kernels.available(), _ffi_kernels.unavailable_reason())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = _ffi_kernels.library_path() is not None
    assert proc.stdout.split()[0] == str(built and _ffi_kernels.available()), proc.stdout


def test_gpu_lowering_uses_the_xla_path():
    """Lowered for CUDA (no GPU needed to lower), the jit-ed op contains no CPU FFI call; for CPU it does."""
    layer = condense_kernel(np.ones((8, 4), np.float32), np.ones((8, 4), bool))
    fn = jax.jit(lambda x, layer: condensed_linear(x, layer))
    traced = fn.trace(jnp.ones((2, 8)), layer)
    cuda_text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert _ffi_kernels.TARGET_NAME not in cuda_text and "gather" in cuda_text
    cpu_text = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert (_ffi_kernels.TARGET_NAME in cpu_text) == _ffi_kernels.available()


def test_force_xla_env(monkeypatch):
    layer = condense_kernel(np.ones((4, 2), np.float32), np.ones((4, 2), bool))
    x = jnp.ones((1, 4))
    monkeypatch.setenv(FORCE_XLA_ENV, "1")
    assert not use_ffi_kernel(x, layer)
    monkeypatch.setenv(FORCE_XLA_ENV, "0")
    assert use_ffi_kernel(x, layer) == _ffi_kernels.available()


@pytest.mark.skipif(not _ffi_kernels.available(), reason="C++ kernel unavailable")
def test_ffi_is_thread_safe_and_threaded_results_match(monkeypatch):
    rng = np.random.default_rng(3)
    # 1030 inputs: packing is split into three tasks that the threads share; 250 outputs: thread chunks (a
    # multiple of 24 rows) end in rows after the last 16-row gather group
    kernel, mask, bias = random_constant_fan_in(rng, 1030, 250, 103, 0.2)
    layer = condense_kernel(kernel, mask, bias)
    xs = [rng.standard_normal((b, 1030)).astype(np.float32) for b in (1, 9, 64, 130)]
    monkeypatch.setenv(_ffi_kernels.MAX_THREADS_ENV, "0")  # all pool threads (read at trace time)
    # every call split into thread chunks, batch 1 too (when XLA's pool has 2+ threads)
    monkeypatch.setenv(_ffi_kernels.MIN_THREAD_WORK_ENV, "0")
    fn = jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))
    expected = [np.asarray(condensed_linear(x, layer, backend="xla")) for x in xs]
    for x in xs:  # compile first so threads only run
        fn(x, layer).block_until_ready()
    errors = []

    def worker():
        for _ in range(5):
            for x, want in zip(xs, expected):
                got = np.asarray(fn(x, layer))
                if not np.allclose(got, want, rtol=1e-5, atol=1e-4):
                    errors.append(np.abs(got - want).max())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    monkeypatch.setenv(_ffi_kernels.MAX_THREADS_ENV, "1")  # single-threaded kernel: same answers
    single = jax.jit(lambda x, layer: condensed_linear(x, layer, backend="ffi"))
    for x, want in zip(xs, expected):
        np.testing.assert_allclose(np.asarray(single(x, layer)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_masked_dense(backend):
    rng = np.random.default_rng(4)
    kernel, mask, bias = random_constant_fan_in(rng, 40, 16, 7, 0.3)
    layer = condense_kernel(kernel, mask, bias)
    x = rng.standard_normal((3, 40)).astype(np.float32)

    def loss_condensed(x, values, bias_):
        return jnp.sum(jnp.tanh(condensed_linear(x, layer.replace(values=values, bias=bias_), backend=backend)))

    def loss_dense(x, kernel_, bias_):
        return jnp.sum(jnp.tanh(x @ (kernel_ * mask) + bias_))

    gx, gv, gb = jax.grad(loss_condensed, argnums=(0, 1, 2))(x, layer.values, layer.bias)
    dx, dk, db = jax.grad(loss_dense, argnums=(0, 1, 2))(x, kernel, bias)
    np.testing.assert_allclose(gx, dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, db, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(densify(layer.replace(values=gv)), np.asarray(dk) * mask, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- conv
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding,strides", [("SAME", (1, 1)), ("VALID", (1, 1)), ("SAME", (2, 2)),
                                             ("VALID", (2, 1))])
def test_condensed_conv_equals_masked_conv(backend, padding, strides):
    rng = np.random.default_rng(5)
    kh, kw, c_in, c_out = 3, 2, 4, 6
    k2, mask2, bias = random_constant_fan_in(rng, kh * kw * c_in, c_out, 7, 0.3)
    kernel, mask = k2.reshape(kh, kw, c_in, c_out), mask2.reshape(kh, kw, c_in, c_out)
    x = rng.standard_normal((2, 7, 6, c_in)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, kernel * mask, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    layer = condense_kernel(k2, mask2, bias)
    got = condensed_conv(jnp.asarray(x), layer, (kh, kw), strides, padding, backend=backend)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- structured
def test_default_layer_order_is_natural():
    params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (10, 2, 0, 1)}
    assert default_layer_order(params) == ["Dense_0", "Dense_1", "Dense_2", "Dense_10"]


@pytest.mark.parametrize("activation", [jax.nn.relu, jnp.tanh])
def test_structured_mlp_equals_masked_mlp(activation):
    rng = np.random.default_rng(6)
    widths = [(20, 15), (15, 12), (12, 4)]
    params, masks = {}, {}
    for i, (n_in, n_out) in enumerate(widths):
        kernel, mask, bias = random_constant_fan_in(rng, n_in, n_out, min(5, n_in), 0.3 if i < 2 else 0.0)
        bias = bias + 0.5  # relu(bias) > 0 for most neurons: the fold matters
        params[f"Dense_{i}"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
        masks[f"Dense_{i}"] = {"kernel": jnp.asarray(mask), "bias": jnp.ones(n_out, bool)}

    def forward(p, x):
        for i in range(3):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            x = activation(x) if i < 2 else x
        return x

    masked = jax.tree.map(lambda w, m: w * m, params, masks)
    small, small_masks = export_structured(params, masks, activation=activation)
    removed = [widths[i][1] - small[f"Dense_{i}"]["kernel"].shape[1] for i in range(2)]
    assert sum(removed) > 0 and small["Dense_2"]["kernel"].shape[1] == 4
    x = rng.standard_normal((9, 20)).astype(np.float32)
    np.testing.assert_allclose(forward(small, x), forward(masked, x), rtol=1e-5, atol=1e-5)
    # inputs from removed neurons are gone, so fan-ins may differ: condensing then needs padding
    condensed = export_condensed(small, small_masks, pad_fan_in=True)
    assert set(condensed["Dense_1"]) == {"values", "indices", "bias", "active"}
    x_out = MLP((small["Dense_0"]["kernel"].shape[1], small["Dense_1"]["kernel"].shape[1], 4), (True,) * 3)
    if activation is jax.nn.relu:
        np.testing.assert_allclose(x_out.apply({"params": condensed}, x), forward(masked, x), rtol=1e-5, atol=1e-5)


def test_structured_conv_same_padding_fold_is_refused_when_inexact():
    k1 = np.ones((3, 3, 1, 2), np.float32)
    m1 = np.ones((3, 3, 1, 2), bool)
    m1[..., 1] = False  # channel 1 ablated
    params = {"Conv_0": {"kernel": k1, "bias": np.array([0.0, 1.0], np.float32)},
              "Conv_1": {"kernel": np.ones((3, 3, 2, 1), np.float32), "bias": np.zeros(1, np.float32)}}
    masks = {"Conv_0": {"kernel": m1, "bias": np.ones(2, bool)},
             "Conv_1": {"kernel": np.ones((3, 3, 2, 1), bool), "bias": np.ones(1, bool)}}
    with pytest.raises(ValueError, match="SAME"):
        export_structured(params, masks)
    params["Conv_0"]["bias"] = np.array([0.0, -1.0], np.float32)  # relu(-1) = 0: exact, allowed
    small, _ = export_structured(params, masks)
    assert small["Conv_1"]["kernel"].shape == (3, 3, 1, 1)


# ---------------------------------------------------------------------------------------------- end to end
def load_mnist(n: int, split: str = "train", downsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """First n MNIST images (N, 28/d, 28/d, 1) in [0, 1] (d x d average-pooled) and labels, from data/mnist."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(REPO / "data" / "mnist" / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784]
    with gzip.open(REPO / "data" / "mnist" / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    side = 28 // downsample
    images = images.reshape(n, side, downsample, side, downsample).mean(axis=(2, 4))
    return images[..., None].astype(np.float32) / 255.0, labels.astype(np.int32)


class MLP(nn.Module):
    widths: tuple[int, ...]
    condensed: tuple[bool, ...] = ()

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            layer = CondensedDense if (self.condensed and self.condensed[i]) else nn.Dense
            x = layer(width, name=f"Dense_{i}")(x)
            x = nn.relu(x) if i < len(self.widths) - 1 else x
        return x


class CNN(nn.Module):
    channels: tuple[int, int] = (8, 16)
    condensed: bool = False

    @nn.compact
    def __call__(self, x):
        conv = CondensedConv if self.condensed else nn.Conv
        dense = CondensedDense if self.condensed else nn.Dense
        x = nn.relu(conv(self.channels[0], kernel_size=(3, 3), strides=(2, 2), name="Conv_0")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(conv(self.channels[1], kernel_size=(3, 3), padding="VALID", name="Conv_1")(x))
        return dense(10, name="Dense_0")(x.reshape(x.shape[0], -1))


def train_srigl(model, params, images, labels, steps, key, sparsity=0.9, gamma_sal=0.9):
    """Briefly train with the core SRigL API (frequent mask updates, strong ablation: gamma_sal 0.9)."""
    algo = sj.SRigL(sparsity=sparsity, distribution="uniform", delta_t=5, t_end=int(steps * 0.75), alpha=0.3,
                    gamma_sal=gamma_sal)
    k_mask, k_init, k_loop = jax.random.split(key, 3)
    masks = algo.init_masks(params, k_mask)
    params = algo.init_params(params, masks, k_init)
    tx = optax.chain(optax.sgd(0.05, momentum=0.9), sj.apply_masks())
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, masks, x, y, key, step):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        res = sj.sparse_apply(algo, tx, params, opt_state, masks, grads, key, step)
        return res.params, res.opt_state, res.masks

    batch = 128
    for step in range(steps):
        lo = (step * batch) % (len(images) - batch)
        params, opt_state, masks = step_fn(params, opt_state, masks, images[lo:lo + batch], labels[lo:lo + batch],
                                           jax.random.fold_in(k_loop, step), jnp.asarray(step))
    return params, masks


def check_exported_predictions(model_masked, params, masks, model_exported, exported, x):
    masked = jax.tree.map(lambda w, m: w * m, params, masks)
    want = jax.jit(model_masked.apply)({"params": masked}, x)
    got = jax.jit(model_exported.apply)({"params": exported}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
    return np.asarray(got)


def run_mlp_end_to_end(n_train, steps, widths=(256, 128, 10), min_accuracy=0.8, check_both=True):
    images, labels = load_mnist(n_train)
    test_x, test_y = load_mnist(500, "test")
    model = MLP(widths)
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    params, masks = train_srigl(model, params, images, labels, steps, jax.random.key(1))
    small, small_masks = export_structured(params, masks)
    new_widths = tuple(int(small[f"Dense_{i}"]["kernel"].shape[1]) for i in range(len(widths)))
    assert new_widths[:-1] < widths[:-1], "training should have ablated some neurons"
    # structured (smaller dense), condensed (full width, ablated outputs = bias), structured + condensed
    logits = check_exported_predictions(model, params, masks, MLP(new_widths), small, test_x)
    condensed = export_condensed(params, masks)
    check_exported_predictions(model, params, masks, MLP(widths, (True,) * 3), condensed, test_x)
    if check_both:
        both = export_condensed(small, small_masks, pad_fan_in=True)
        check_exported_predictions(model, params, masks, MLP(new_widths, (True,) * 3), both, test_x)
    accuracy = np.mean(np.argmax(logits, -1) == test_y)
    assert accuracy > min_accuracy, f"trained MLP accuracy {accuracy} <= {min_accuracy}"


def run_cnn_end_to_end(n_train, steps, channels=(8, 16), downsample=1):
    images, labels = load_mnist(n_train, downsample=downsample)
    test_x, _ = load_mnist(200, "test", downsample=downsample)
    model = CNN(channels)
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    # gamma_sal = 7 (an absolute count, = k0 of Conv_1): channels with fewer than 7 salient weights are
    # ablated, so the exports below really have channels to remove.
    params, masks = train_srigl(model, params, images, labels, steps, jax.random.key(2), sparsity=0.8,
                                gamma_sal=7.0)
    assert any(not np.asarray(masks[p]["kernel"]).any(axis=(0, 1, 2)).all() for p in ("Conv_0", "Conv_1")), \
        "training should have ablated some channels"
    condensed = export_condensed(params, masks)
    check_exported_predictions(model, params, masks, CNN(condensed=True), condensed, test_x)
    small, _ = export_structured(params, masks, ["Conv_0", "Conv_1", "Dense_0"], conv_padding="VALID")
    new_channels = (int(small["Conv_0"]["kernel"].shape[-1]), int(small["Conv_1"]["kernel"].shape[-1]))
    check_exported_predictions(model, params, masks, CNN(new_channels), small, test_x)


def test_mnist_mlp_end_to_end_small():
    # structured + condensed together is covered by test_structured_mlp_equals_masked_mlp here
    run_mlp_end_to_end(n_train=2048, steps=30, widths=(64, 32, 10), min_accuracy=0.2, check_both=False)


def test_mnist_cnn_end_to_end_small():
    run_cnn_end_to_end(n_train=1024, steps=12, channels=(4, 8), downsample=2)


@pytest.mark.slow
def test_mnist_mlp_and_cnn_end_to_end_full():
    run_mlp_end_to_end(n_train=20000, steps=600)
    run_cnn_end_to_end(n_train=10000, steps=300)


# ---------------------------------------------------------------------------------------------- benchmark smoke
def run_bench_quick(script: str, out_dir: pathlib.Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--out-dir", str(out_dir)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_benchmark_quick_smoke(tmp_path):
    proc = run_bench_quick("condensed_linear.py", tmp_path)
    assert (tmp_path / "condensed_linear_quick.csv").exists()
    assert "condensed" in proc.stdout


def test_batch1_bound_records_the_floor_or_why_not(tmp_path):
    run_bench_quick("batch1_bound.py", tmp_path)
    assert (tmp_path / "batch1_bound_quick.png").stat().st_size > 0
    (row,) = json.loads((tmp_path / "batch1_bound_quick.json").read_text())["rows"]
    assert set(row["per_layer_median_us"]) >= {"dense_jnp", "dense_numpy", "condensed_xla"}
    if _ffi_kernels.available():  # both formulations of the batch-1 product, each forced, and what auto picked
        assert {"condensed_ffi_1t_vector", "condensed_ffi_1t_scalar"} <= set(row["per_layer_median_us"])
        machine = json.loads((tmp_path / "batch1_bound_quick.json").read_text())["machine"]
        assert machine["ffi_gather"] in ("vector", "scalar")
    assert all(us > 0 for us in row["per_layer_median_us"].values())
    assert ("gather_floor_us" in row) != ("gather_floor_unavailable" in row)
    # the kernel's ISA says the CPU has AVX-512; the floor then needs only a compiler
    if _ffi_kernels.kernel_isa() == "avx512" and any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        assert row["gather_floor_us"] > 0
    if "gather_floor_us" in row:
        assert row["bound_vs_best_dense"] == pytest.approx(row["best_dense_us"] / row["gather_floor_us"])
    else:
        assert row["gather_floor_unavailable"]


# ---------------------------------------------------------------------------------------------- export errors
def test_masks_lacking_a_layer_name_the_masks_tree():
    params = {"Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
              "Dense_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    masks = {"Dense_0": {"kernel": jnp.ones((4, 2), bool), "bias": jnp.ones(2, bool)}}
    for export in (export_condensed, export_structured):
        with pytest.raises(KeyError, match=r"masks tree lacks 'Dense_1/kernel'"):
            export(params, masks)


@pytest.mark.parametrize("mask", [np.full((4, 2), 0.5, np.float32), np.ones((4, 2), np.int32)])
def test_non_boolean_masks_are_an_error(mask):
    params = {"Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    masks = {"Dense_0": {"kernel": jnp.asarray(mask), "bias": jnp.ones(2, bool)}}
    for export in (export_condensed, export_structured):
        with pytest.raises(ValueError, match="masks must be boolean"):
            export(params, masks)
    with pytest.raises(ValueError, match="masks must be boolean"):
        condense_kernel(np.ones((4, 2), np.float32), mask)
