"""Shared test settings: small hypothesis budgets so the suite fits CI's 2-core box, and JAX's on-disk
compilation cache for the subprocesses some tests start (multi-device runs, notebooks, benchmarks)."""

import os
import shutil
import tempfile

import jax  # noqa: E402  (first, so that the cache settings below reach only the subprocesses)

# The pytest process itself runs without the on-disk compilation cache: twice in full-suite runs it aborted
# (SIGABRT) while deserialising a cache entry in test_sparse_optimizer, after subprocess tests had written to
# the same cache. Subprocesses (multi-device and multi-process runs, notebooks, benchmarks) share one fresh
# cache per test session through the environment, removed at the end.
jax.config.update("jax_compilation_cache_dir", None)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="srigl_jax_test_compile_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SRIGL_HYPOTHESIS_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's own compilation cache (one set from outside is left alone)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
