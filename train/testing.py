"""Helpers shared by the train/ tests (kept in the package so every test file uses the same code)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

import srigl_jax as sj


# A 24-step mnist_mlp run with mask updates at 5, 10, 15 and eval/checkpoints every 8 steps. Tests that train
# use exactly these settings so the compiled train step is shared through the on-disk compilation cache.
TINY_RUN = dict(steps=24, delta_t=5, eval_every=8, ckpt_every=8, log_every=4, progress=False)


@contextlib.contextmanager
def persistent_compile_cache(directory: str | os.PathLike | None = None) -> Iterator[Path]:
    """Enable JAX's on-disk compilation cache (restored afterwards): repeated end-to-end runs in the tests
    compile the same train step, and recompiling it costs tens of seconds on 2 CPU cores.

    Default directory: ``$JAX_COMPILATION_CACHE_DIR`` (tests/conftest.py makes a fresh one per test session),
    else a new temporary one. Never a fixed path shared by unrelated runs: an entry written there by a
    concurrent session of other code crashed a later run while being read (SIGABRT)."""
    path = Path(directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="jax_cache_"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield path
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        # JAX decides once per process whether to use the cache; without a reset it keeps reading and writing
        # this folder after the block. (In full test runs a later eager op aborted, SIGABRT, while reading an
        # executable from it.)
        from jax._src import compilation_cache  # private, but the only way to switch the cache off again

        compilation_cache.reset_cache()


def trees_equal(a: Any, b: Any) -> bool:
    """True if two pytrees have the same structure and exactly equal leaves."""
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def constant_fan_in_violations(params, masks, plans: dict[str, sj.LayerPlan]) -> list[str]:
    """Check the SRigL invariants on every sparse layer; returns human-readable violations (empty = OK).

    Every active neuron has the same fan-in k', nnz == k' * active neurons <= T, and every masked weight is
    exactly 0.
    """
    leaves = dict(sj.paths.named_leaves(params)[0])
    mask_leaves = dict(sj.paths.named_leaves(masks)[0])
    problems = []
    for path, plan in plans.items():
        if plan.is_dense:
            continue
        w, m = np.asarray(leaves[path]), np.asarray(mask_leaves[path])
        for s, slice_mask in enumerate(np.asarray(plan.layout.to_slices(m))):   # each slice is a layer
            where = f"{path}[slice {s}]" if plan.n_slices > 1 else path
            fan_in = slice_mask.sum(axis=0)
            active = fan_in > 0
            if len(set(fan_in[active].tolist())) > 1:
                problems.append(f"{where}: active neurons have different fan-ins {sorted(set(fan_in[active].tolist()))}")
            k = int(fan_in[active].max()) if active.any() else 0
            if int(slice_mask.sum()) != k * int(active.sum()):
                problems.append(f"{where}: nnz {int(slice_mask.sum())} != k' {k} * active {int(active.sum())}")
            if int(slice_mask.sum()) > plan.nnz_budget:
                problems.append(f"{where}: nnz {int(slice_mask.sum())} exceeds budget {plan.nnz_budget}")
        if np.any(w[~m] != 0):
            problems.append(f"{path}: {int(np.sum(w[~m] != 0))} masked weights are non-zero")
    return problems


@contextlib.contextmanager
def one_layer_at_a_time(algo):
    """While tracing inside this block, every sparse leaf gets its own compiled update (the behaviour before
    equal layers were batched), for comparison."""
    cls = type(algo)
    original = cls._groups
    had_own = "_groups" in cls.__dict__
    cls._groups = lambda self, p: [type(g)(m[1], (m,)) for g in original(self, p) for m in g.members]
    try:
        yield
    finally:
        if had_own:
            cls._groups = original
        else:
            del cls._groups
