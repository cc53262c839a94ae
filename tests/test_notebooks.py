"""Every notebook runs top to bottom with small settings (SRIGL_NOTEBOOK_SMALL=1); an erroring cell fails.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a private kernel spec, so
this works in a fresh venv with the test extras installed and nothing registered with Jupyter.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOK_DIR / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUNNER = _runner()


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", RUNNER.NOTEBOOKS)
def test_notebook_runs_with_small_settings(name):
    # XLA -O0: the small runs are compile-bound; this cuts their CPU time by ~30% (numerics are unaffected
    # beyond float rounding, which the notebooks' checks tolerate)
    xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    nb = RUNNER.execute_notebook(NOTEBOOK_DIR / f"{name}.ipynb", small=True, save=False, timeout=600,
                                 extra_env={"XLA_FLAGS": xla_flags})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # the small switch really reached the kernel
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if o.output_type == "stream")
    assert "small settings" in printed


@pytest.mark.parametrize("name", RUNNER.NOTEBOOKS)
def test_committed_notebook_is_colab_ready_and_has_stored_outputs(name):
    raw = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
    code_cells = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert "google.colab" in "".join(code_cells[0]["source"])  # first code cell: Colab install, no-op elsewhere
    assert any(c.get("outputs") for c in code_cells), "run `python notebooks/run_notebooks.py` to store outputs"
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.get("outputs", []))
