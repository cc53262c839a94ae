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


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of every call of each (blocking) candidate, alternating the candidates rep by rep so that drifts
    in machine load hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
