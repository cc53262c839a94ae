"""What every benchmark shares: the CPU it ran on, as ``lscpu`` reports it (model and cache sizes), for every
result file (machines differ from session to session, e.g. Intel Sapphire Rapids vs AMD Zen 4, and so do the
ratios), and interleaved timing."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Callable

_FIELDS = ("Model name", "Vendor ID", "CPU(s)", "L1d cache", "L2 cache", "L3 cache", "Flags")


def cpu_report() -> dict[str, str]:
    """``lscpu`` fields (model, vendor, caches; AVX-512/AVX2 presence instead of the whole flag list) and the load
    average at the start; ``{"lscpu": "unavailable ..."}`` where lscpu is missing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"lscpu": f"unavailable ({err})"}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _FIELDS:
            out[key.strip()] = value.strip()
    flags = set(out.pop("Flags", "").split())
    out["vector ISA"] = " ".join(f for f in ("avx512f", "avx2", "fma") if f in flags) or "none of avx512f/avx2/fma"
    out["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return out


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int,
                      before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds of every call of each (blocking) candidate, alternating the candidates rep by rep so that drifts
    in machine load hit all of them alike. ``before`` (untimed) runs ahead of every timed call, e.g.
    ``evict_caches`` to time a model whose weights come from DRAM."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def evict_caches(buffer: list = []) -> None:  # noqa: B006  (the buffer is allocated once, on first use)
    """Write a buffer of 4x the largest cache (128 MiB to 1 GiB) so that the next call reads its weights from
    DRAM, as a model does whose layers do not all fit in the caches (or after other work)."""
    import numpy as np

    if not buffer:
        buffer.append(np.ones(min(max(_largest_cache_bytes() * 4, 128 << 20), 1 << 30) // 8))
    buffer[0] += 1.0


def _largest_cache_bytes() -> int:
    """The largest ``lscpu`` cache size in bytes (0 when lscpu is unavailable)."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    sizes = []
    for field in ("L2 cache", "L3 cache"):
        number, _, unit = cpu_report().get(field, "").partition(" ")
        try:
            sizes.append(int(float(number) * units[unit.split()[0]]))
        except (ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=0)
