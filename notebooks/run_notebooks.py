"""Execute the notebooks with a kernel that runs *this* interpreter (works in a fresh venv: no registered
kernel spec needed), optionally storing the outputs in the .ipynb.

    python notebooks/run_notebooks.py                  # real settings, write outputs into the notebooks
    python notebooks/run_notebooks.py --small          # SRIGL_NOTEBOOK_SMALL=1, outputs not saved
    python notebooks/run_notebooks.py quickstart       # just one (name or path)

tests/test_notebooks.py imports :func:`execute_notebook` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent
REPO_ROOT = NOTEBOOK_DIR.parent
NOTEBOOKS = ("quickstart", "condensed_inference", "paper_analysis")
KERNEL_NAME = "srigl-notebook-python"


def _kernel_manager(kernel_dir: Path, env: dict[str, str]):
    """A KernelManager whose only kernel spec launches ``sys.executable -m ipykernel_launcher``.

    The spec lives in a temporary folder handed to a private KernelSpecManager, so nothing depends on
    which kernels are registered (``jupyter kernelspec list``) or on PATH: a fresh venv works as is.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (srigl-jax notebooks)", "language": "python", "env": env}))
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    # connection file next to the spec: no need for a writable ~/.local/share/jupyter/runtime
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm,
                         connection_file=str(kernel_dir / "connection.json"))


def execute_notebook(path: str | os.PathLike, small: bool, save: bool = False, timeout: int = 1800,
                     extra_env: dict[str, str] | None = None):
    """Run every cell of the notebook at ``path`` top to bottom; raises ``CellExecutionError`` on the first
    failing cell. The kernel runs in the repo root with PYTHONPATH=repo root (so ``import train`` and
    ``import srigl_jax`` work without installing) and SRIGL_NOTEBOOK_SMALL=1 when ``small``.
    Returns the executed notebook; with ``save`` the outputs are written back to ``path``."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
           "SRIGL_NOTEBOOK_SMALL": "1" if small else "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    env.update(extra_env or {})
    with tempfile.TemporaryDirectory() as tmp:
        km = _kernel_manager(Path(tmp) / "kernels", env)
        client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(REPO_ROOT)}})
        client.execute()
    if save:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, path)
    return nb


def _resolve(name: str) -> Path:
    p = Path(name)
    return p if p.suffix == ".ipynb" else NOTEBOOK_DIR / f"{name}.ipynb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS))
    ap.add_argument("--small", action="store_true", help="SRIGL_NOTEBOOK_SMALL=1 (and do not save outputs)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args()
    for name in args.notebooks:
        t = time.time()
        execute_notebook(_resolve(name), small=args.small, save=not args.small, timeout=args.timeout)
        print(f"{name}: ok in {time.time() - t:.0f}s{'' if args.small else ' (outputs saved)'}")


if __name__ == "__main__":
    main()
