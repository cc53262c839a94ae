"""Loading and registration of the optional C++ condensed-product kernel (srigl_jax/csrc, XLA FFI, CPU only).

The shared library ``srigl_jax/_condensed_kernel*.so`` is compiled by ``pip install`` (setup.py, optional: a
failed compile leaves it missing). Everything here degrades to "unavailable"; srigl_jax.inference then uses
its pure-XLA path. Environment:
  SRIGL_JAX_CONDENSED_FORCE_XLA=1     never use the kernel (checked when a function is traced)
  SRIGL_JAX_CONDENSED_MAX_THREADS=n   at most n threads (default 0: as many as XLA's CPU thread pool has, i.e.
      one per CPU, the calling thread included; 1 keeps the kernel on the calling thread, e.g. when XLA
      already runs other ops in parallel)
  SRIGL_JAX_CONDENSED_MIN_THREAD_WORK=m   every thread gets at least m multiply-adds (gathered ones, batch < 4
      and the last < 4 columns of a batch, counted 4x), so smaller calls stay on one thread (default 262144,
      measured on a 2-vCPU VM; 0: always all threads)
  SRIGL_JAX_CONDENSED_ISA=name        cap the instruction-set variant: avx512, avx2 or generic (default: the
      best this CPU runs; a variant the CPU lacks is never used). For tests and comparisons.
  SRIGL_JAX_CONDENSED_GATHER=mode     how the AVX2 / AVX-512 variants read the inputs of gathered columns (batch
      < 4, the last < 4 columns of a batch): "vector" (vector gathers), "scalar" (scalar loads, four per vector
      multiply-add), or "auto" (default: whichever the kernel measured faster on this CPU, once per process;
      see gather_formulation). The two round differently (float32 sums in another order).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.inference.ops import CondensedLinear, condensed_linear_xla

TARGET_NAME = "srigl_condensed_matmul"
FORCE_XLA_ENV = "SRIGL_JAX_CONDENSED_FORCE_XLA"
MAX_THREADS_ENV = "SRIGL_JAX_CONDENSED_MAX_THREADS"
MIN_THREAD_WORK_ENV = "SRIGL_JAX_CONDENSED_MIN_THREAD_WORK"
DEFAULT_MIN_THREAD_WORK = 1 << 18
ISA_ENV = "SRIGL_JAX_CONDENSED_ISA"
ISA_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}
GATHER_ENV = "SRIGL_JAX_CONDENSED_GATHER"
GATHER_MODES = {"auto": 0, "vector": 1, "scalar": 2}
_LIB_STEM = "_condensed_kernel"
_lock = threading.Lock()
_state: dict[str, object] = {}


def library_path() -> pathlib.Path | None:
    """The compiled kernel next to this file, or None if the build did not produce it."""
    here = pathlib.Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{_LIB_STEM}{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load() -> dict[str, object]:
    """Load and register the kernel once (thread-safe); records the failure reason instead of raising."""
    with _lock:
        if _state:
            return _state
        path = library_path()
        if path is None:
            _state.update(ok=False, reason="kernel not built (no srigl_jax/_condensed_kernel*.so; see setup.py)")
            return _state
        try:
            lib = ctypes.CDLL(str(path))
            jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(lib.SriglCondensedMatmul), platform="cpu")
            level = int(lib.SriglCondensedIsaLevel())
            _smoke_test()
            _state.update(ok=True, reason="", isa_level=level, path=str(path), lib=lib)
        except Exception as err:  # stale build, FFI ABI mismatch with this jaxlib, wrong answer: use XLA
            _state.update(ok=False, reason=f"kernel at {path} unusable: {type(err).__name__}: {err}")
        return _state


_smoke_thread = threading.local()


def _env(name: str) -> str:
    """A kernel setting from the environment, stripped; '' (the default) in the smoke test's thread, so that a bad
    value fails the caller's calls loudly (ValueError when traced) instead of making the library look unusable
    for the whole process."""
    return "" if getattr(_smoke_thread, "active", False) else os.environ.get(name, "").strip()


def _smoke_test(check=None) -> None:
    """Run the kernel once on a tiny layer (catches a build against an incompatible jaxlib); ``check``: another
    check to run the same way instead (raises on a wrong answer).

    Runs in a fresh thread: loading usually happens while a caller's function is being traced, and JAX's
    trace state is per thread, so this small computation executes instead of being traced.
    """
    outcome: list = []

    def run() -> None:
        _smoke_thread.active = True  # default settings: a bad SRIGL_JAX_CONDENSED_* value is the caller's error
        try:
            with jax.default_device(jax.devices("cpu")[0]):  # the kernels are CPU targets, also on a GPU host
                outcome.append((check or _smoke_result)())
        except Exception as err:  # reported to the loading thread
            outcome.append(err)

    thread = threading.Thread(target=run, name="srigl-condensed-smoke-test")
    thread.start()
    thread.join()
    if isinstance(outcome[0], Exception):
        raise outcome[0]


def _smoke_result() -> None:
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    values = np.array([[2.0, -1.0]], np.float32)
    indices = np.array([[0, 2]], np.int16)
    out = np.asarray(jax.jit(_ffi_call, static_argnums=5)(x, values, indices, np.array([0.5, 7.0], np.float32),
                                                          np.array([1], np.int32), 2))
    if not np.allclose(out, [[0.5, 2.0 - 3.0 + 7.0]]):
        raise RuntimeError(f"smoke test gave {out}")


class LibraryTarget:
    """Another FFI target of the loaded kernel library (the conv kernel, the selection kernel),
    registered with XLA and smoke-tested on first use, thread-safe; ``load()`` records why it cannot be used
    instead of raising (a library built before the target existed, a wrong answer), so callers fall back to XLA."""

    def __init__(self, target_name: str, symbol: str, smoke_check, what: str):
        self.target_name, self.symbol, self.smoke_check, self.what = target_name, symbol, smoke_check, what
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}

    def load(self) -> dict[str, object]:
        with self._lock:
            if self._state:
                return self._state
            lib = loaded_library()
            if lib is None:
                self._state.update(ok=False, reason=unavailable_reason())
                return self._state
            try:
                jax.ffi.register_ffi_target(self.target_name, jax.ffi.pycapsule(getattr(lib, self.symbol)),
                                            platform="cpu")
                _smoke_test(self.smoke_check)
                self._state.update(ok=True, reason="")
            except Exception as err:
                self._state.update(ok=False, reason=f"{self.what} unusable: {type(err).__name__}: {err}")
            return self._state


def available() -> bool:
    """True if the C++ kernel is built and registered with XLA."""
    return bool(_load()["ok"])


def loaded_library() -> ctypes.CDLL | None:
    """The loaded kernel library (for registering its other targets, e.g. srigl_jax._ffi_conv), None if unusable."""
    state = _load()
    return state["lib"] if state["ok"] else None


def unavailable_reason() -> str:
    """Why the kernel cannot be used ('' if it can)."""
    return str(_load()["reason"])


def kernel_isa() -> str | None:
    """The best instruction-set variant this CPU runs ('avx512', 'avx2', 'generic'; the kernel's default unless
    SRIGL_JAX_CONDENSED_ISA caps it), None if the kernel is unavailable."""
    isas = kernel_isas()
    return isas[-1] if isas else None


def kernel_isas() -> list[str]:
    """Every instruction-set variant this CPU can run, best last (empty if the kernel is unavailable)."""
    state = _load()
    if not state["ok"]:
        return []
    return [name for name, level in ISA_LEVELS.items() if level <= int(state["isa_level"])]


def unsupported_reason(x, values, indices) -> str:
    """'' if the kernel handles these operands, else why not (dtypes it does not implement)."""
    if not available():
        return unavailable_reason()
    if x.ndim != 2 or values.ndim != 2 or indices.ndim != 2:
        return "expects x (B, in), values and indices (n_active, k)"
    if x.dtype != jnp.float32 or values.dtype != jnp.float32:
        return f"kernel is float32 only (x {x.dtype}, values {values.dtype})"
    if indices.dtype not in (jnp.int16, jnp.int32):
        return f"kernel takes int16/int32 indices, got {indices.dtype}"
    return ""


def supports(x, values, indices) -> bool:
    return unsupported_reason(x, values, indices) == ""


def _non_negative_int_env(name: str, default: int) -> int:
    """An integer setting in [0, 2^62] (it travels to the kernel as int64)."""
    raw = _env(name)
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}") from err
    if not 0 <= value <= 2**62:
        raise ValueError(f"{name} must be a non-negative integer up to 2^62, got {raw!r}")
    return value


def forced_off() -> bool:
    """True when SRIGL_JAX_CONDENSED_FORCE_XLA turns every kernel of the library off (read when tracing)."""
    return os.environ.get(FORCE_XLA_ENV, "") not in ("", "0")


def _max_threads() -> int:
    return _non_negative_int_env(MAX_THREADS_ENV, 0)


def _min_thread_work() -> int:
    return _non_negative_int_env(MIN_THREAD_WORK_ENV, DEFAULT_MIN_THREAD_WORK)


def _isa_level() -> int:
    """The ISA cap from SRIGL_JAX_CONDENSED_ISA (-1: the best the CPU runs)."""
    raw = _env(ISA_ENV).lower()
    if raw in ("", "auto"):
        return -1
    if raw not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV} must be one of {sorted(ISA_LEVELS)} or 'auto', got {raw!r}")
    return ISA_LEVELS[raw]


def _gather_mode() -> int:
    """The gathered-column formulation from SRIGL_JAX_CONDENSED_GATHER (0 auto, 1 vector, 2 scalar)."""
    raw = _env(GATHER_ENV).lower() or "auto"
    if raw not in GATHER_MODES:
        raise ValueError(f"{GATHER_ENV} must be one of {sorted(GATHER_MODES)}, got {raw!r}")
    return GATHER_MODES[raw]


def gather_formulation() -> str | None:
    """How the kernel reads the inputs of gathered columns (batch < 4) under the current settings: 'vector'
    (vector gathers) or 'scalar' (scalar loads); None if the kernel is unavailable.

    With SRIGL_JAX_CONDENSED_GATHER unset or 'auto' this is what the kernel measured faster on this CPU (once
    per process, for the ISA variant in use, as SRIGL_JAX_CONDENSED_ISA caps it): gathers are microcoded on
    some CPUs and fast on others. The generic variant has no vector gathers: always 'scalar'.
    """
    state = _load()
    if not state["ok"]:
        return None
    # the kernel's own decision (condensed_kernel.cc, UsesScalarLoads), for the variant and mode it would run
    return "scalar" if state["lib"].SriglCondensedScalarLoads(_isa_level(), _gather_mode()) else "vector"


def _ffi_call(x, values, indices, bias, active, out_features: int):
    call = jax.ffi.ffi_call(
        TARGET_NAME,
        jax.ShapeDtypeStruct((x.shape[0], out_features), jnp.float32),
        # The kernel writes the output transposed (its inner loops run along the batch); XLA transposes it back.
        # For one sample both layouts are the same bytes: asking for the default one saves XLA's copy.
        output_layouts=None if x.shape[0] == 1 else (1, 0),
        vmap_method="sequential",
    )
    return call(x, values, indices, bias.astype(jnp.float32), active.astype(jnp.int32),
                max_threads=np.int64(_max_threads()), min_thread_work=np.int64(_min_thread_work()),
                isa=np.int64(_isa_level()), gather=np.int64(_gather_mode()))


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _condensed_matmul(x, values, indices, bias, active, out_features):
    return _ffi_call(x, values, indices, bias, active, out_features)


@_condensed_matmul.defjvp
def _condensed_matmul_jvp(out_features, primals, tangents):
    # Differentiate through the equivalent XLA formulation (the kernel itself is forward only).
    def xla(x, values, indices, bias, active):
        return condensed_linear_xla(x, CondensedLinear(values, indices, bias, active, x.shape[1], out_features))

    _, tangent_out = jax.jvp(xla, primals, tangents)
    return _condensed_matmul(*primals, out_features), tangent_out


def condensed_matmul_ffi(x, values, indices, bias, active, out_features: int):
    """Full-width condensed product (B, in) -> (B, out) on the C++ kernel (CPU); ValueError if unsupported.

    On a non-CPU backend this lowers to the pure-XLA path (lax.platform_dependent), so jit-ed code stays portable.
    """
    reason = unsupported_reason(x, values, indices)
    if reason:
        raise ValueError(f"condensed FFI kernel unavailable: {reason}")
    def xla(x, values, indices, bias, active):
        return condensed_linear_xla(x, CondensedLinear(values, indices, bias, active, x.shape[1], out_features))

    def cpu(x, values, indices, bias, active):
        return _condensed_matmul(x, values, indices, bias, active, out_features)

    return jax.lax.platform_dependent(x, values, indices, bias, active, cpu=cpu, default=xla)
