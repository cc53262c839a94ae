"""Shared test settings: small hypothesis budgets so the suite fits CI's 2-core box, and JAX's on-disk
compilation cache for the subprocesses some tests start (multi-device runs, notebooks, benchmarks)."""

import gc
import os
import shutil
import tempfile
from pathlib import Path

import jax  # noqa: E402  (first, so that the cache settings below reach only the subprocesses)

# One fresh on-disk compilation cache per test session, removed at the end: subprocesses (multi-device runs,
# notebooks, benchmarks) get it through the environment; multi-process runs (gloo collectives) and the pytest
# process itself (the end-to-end training modules opt in with the `compile_cache` fixture) use their own
# sub-folders. A cache read across those settings aborted (SIGABRT) full runs while deserialising an entry.
jax.config.update("jax_compilation_cache_dir", None)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="srigl_jax_test_compile_cache_"))
# pytest-xdist (`-n 2` in CI): each worker inherits the controller's folder and takes a sub-folder of its own.
# JAX writes cache entries in place (no temporary file + rename) and reads them without a lock when no size
# limit is set, so two workers whose subprocesses compile the same program at the same time could read a
# half-written entry. The controller's session end removes the whole folder.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _OWN_CACHE = False
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                           os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from train.testing import persistent_compile_cache  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SRIGL_HYPOTHESIS_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")


@pytest.fixture(scope="module")
def compile_cache():
    """The session's on-disk compilation cache, for modules of end-to-end training runs that compile the same
    train step again and again (``pytestmark = pytest.mark.usefixtures("compile_cache")``)."""
    # Its own folder: the pytest process must never read an executable that a subprocess compiled under other
    # settings (device count, gloo collectives) that the cache key may not capture: that aborted full runs.
    with persistent_compile_cache(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]) / "pytest-process") as path:
        yield path


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drop every compiled executable and trace cache after each test module: one process runs the whole suite
    (hundreds of compilations, up to ResNet-sized ones) and JAX keeps them all; late in full runs XLA crashed
    (segfaults while compiling) in the grown process. Modules share nothing compiled, so this costs nothing."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's own compilation cache (one set from outside is left alone)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
