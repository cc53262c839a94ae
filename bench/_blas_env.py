"""Fixed OpenBLAS settings for the benchmarks: call ``reexec_with_blas_env()`` before numpy is imported.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines) can slow numpy's BLAS: removed. OpenBLAS threads
spin for up to 2^28 cycles (~0.1 s) after each call by default, taking a core from whatever variant runs
next in an interleaved timing; OPENBLAS_THREAD_TIMEOUT=4 (the minimum) makes them sleep promptly. Both are
read when OpenBLAS loads, so the script re-executes itself once with the adjusted environment.
"""

from __future__ import annotations

import json
import os
import sys

REMOVED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
SET = {"OPENBLAS_THREAD_TIMEOUT": "4"}
_MARK = "SRIGL_BENCH_REEXEC"
_REMOVED_RECORD = "SRIGL_BENCH_REMOVED_BLAS_ENV"


def reexec_with_blas_env() -> None:
    """Re-execute the running script with the fixed BLAS environment (once; no-op if already fixed)."""
    if os.environ.get(_MARK) == "1":
        return
    if not any(v in os.environ for v in REMOVED) and all(os.environ.get(k) == v for k, v in SET.items()):
        return
    removed = {v: os.environ[v] for v in REMOVED if v in os.environ}
    env = {k: v for k, v in os.environ.items() if k not in REMOVED}
    env.update(SET)
    env[_MARK] = "1"
    env[_REMOVED_RECORD] = json.dumps(removed)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def blas_env_report() -> dict:
    """What was removed and set (for the results' machine record)."""
    return {"removed_blas_env": json.loads(os.environ.get(_REMOVED_RECORD, "{}")),
            "blas_env_set": {k: os.environ.get(k) for k in SET}}
