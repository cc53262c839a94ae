"""Runs ``sparse_optimizer_cases.py`` (sj.sparse_optimizer in plain optax, Flax TrainState and nnx.Optimizer loops,
MultiSteps, non-finite steps, Orbax) in a fresh Python process.

Why a separate process: in full-suite runs (never alone) the pytest process aborted (SIGABRT, no message) while
XLA compiled the eager ``MultiSteps`` update of these cases, after the ~400 earlier tests; a fresh process
isolates them from whatever state those leave behind. The root cause is not found yet.

CI runs the cases' non-slow selection (the loops compiled); the slow variant runs every case, the eager loops too.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_cases(tmp_path: Path, markers: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markers,
                           "--basetemp", str(tmp_path / "cases"), str(REPO / "tests" / "sparse_optimizer_cases.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_sparse_optimizer_cases(tmp_path):
    _run_cases(tmp_path, "not slow")


@pytest.mark.slow
def test_sparse_optimizer_cases_all(tmp_path):
    _run_cases(tmp_path, "")
