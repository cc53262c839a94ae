"""The environment of a test's worker subprocess that runs JAX on fake CPU devices (no jax import here: the worker
must see XLA_FLAGS before it imports jax)."""
from __future__ import annotations

import os
from pathlib import Path


def fake_cpu_devices_env(n_devices: int, repo: Path) -> dict[str, str]:
    """``os.environ`` with ``n_devices`` host-platform CPU devices, the CPU backend, ``repo`` first on the
    Python path, and no multi-process settings inherited from the caller (each worker decides its own)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(var, None)
    return env
