"""Shared test settings: small hypothesis budgets so the suite fits CI's 2-core box, and JAX's on-disk
compilation cache, shared with the subprocesses some tests start (multi-device runs, notebooks, benchmarks)."""

import os
import tempfile

# Before any test module imports jax: the env vars reach subprocesses too.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "srigl_jax_test_compile_cache")
)
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
