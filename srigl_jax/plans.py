"""Which leaves are sparse, and each sparse layer's static budget (sparsity, nnz T, fan-in k0)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.paths import matches_any, named_leaves, natural_key

# A leaf is a sparse candidate when its path matches this and it has >= 2 dims (Dense/Conv kernels).
DEFAULT_SPARSE_PATTERN = r"(^|/)kernel$"
# Attention in-projections stay dense by default (as in the paper's ViT runs).
DEFAULT_DENSE_PATHS: tuple[str, ...] = (r"(^|/)(query|key|value)/kernel$",)
# Guards floor(numel * density) against 0.1 * 100 = 9.999999999999998.
_FLOOR_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static facts about one sparse-candidate leaf.

    Neurons are the last axis of the kernel; the fan-in is the product of all other axes.
    ``sparsity == 0`` means the layer is kept dense.
    """

    path: str
    shape: tuple[int, ...]
    sparsity: float
    ablatable: bool

    @property
    def n_neurons(self) -> int:
        return int(self.shape[-1])

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.shape[:-1]))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nnz_budget(self) -> int:
        """T = floor(numel * (1 - S))."""
        return int(math.floor(self.numel * (1.0 - self.sparsity) + _FLOOR_EPS))

    @property
    def k0(self) -> int:
        """Initial constant fan-in floor(T / n_neurons)."""
        return self.nnz_budget // self.n_neurons

    @property
    def is_dense(self) -> bool:
        return self.sparsity == 0.0

    @property
    def min_active(self) -> int:
        """Fewest neurons that may survive ablation so that k' = floor(T / active) <= fan_in."""
        return min(self.n_neurons, self.nnz_budget // self.fan_in + 1)


def sparse_candidates(
    params: Any,
    *,
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN,
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS,
    dense_first_layer: bool = False,
) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """Candidate (path, shape) pairs in natural path order, and the subset forced dense.

    ``dense_first_layer`` picks the first top-level (``"name/kernel"``) conv kernel (the stem or patch
    embedding), else the first top-level kernel, in natural path order.
    """
    candidates = []
    for path, leaf in named_leaves(params)[0]:
        if re.search(sparse_pattern, path) and getattr(leaf, "ndim", 0) >= 2:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"sparse layer {path!r} has non-float dtype {leaf.dtype}")
            candidates.append((path, tuple(int(d) for d in leaf.shape)))
    if not candidates:
        raise ValueError(
            f"no sparse layers found: no leaf path matches {sparse_pattern!r} with ndim >= 2"
        )
    candidates.sort(key=lambda c: natural_key(c[0]))
    forced_dense = {p for p, _ in candidates if matches_any(p, dense_paths)}
    if dense_first_layer:
        top = _top_level(candidates)
        forced_dense.add(([c for c in top if len(c[1]) >= 3] or top)[0][0])
    return candidates, forced_dense


def _top_level(candidates: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """Candidates owned by a top-level module ("Dense_0/kernel", "head/kernel"), else all of them: nested
    ones ("block3/conv1/kernel") are never the network's first layer or its classifier."""
    return [c for c in candidates if c[0].count("/") == 1] or candidates


def default_classifier(candidates: list[tuple[str, tuple[int, ...]]]) -> str:
    """The classifier: the last top-level Dense (2-D) kernel in natural path order."""
    top = _top_level(candidates)
    return ([c for c in top if len(c[1]) == 2] or top)[-1][0]


def erk_raw_density(shape: Sequence[int]) -> float:
    """Erdos-Renyi-Kernel score sum(shape) / prod(shape) (layout independent)."""
    return float(sum(shape)) / float(np.prod(shape))


def layer_sparsities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float | Mapping[str, float],
    distribution: str,
    forced_dense: set[str] = frozenset(),
) -> dict[str, float]:
    """Per-layer sparsity so that the global nonzero budget (1 - S) * sum(numel) holds.

    ``distribution`` is "uniform" or "erk"; a mapping ``sparsity`` gives per-path values explicitly
    (unlisted candidates stay dense). Forced-dense layers count against the global budget.

    >>> s = layer_sparsities({"a": (10, 10), "b": (10, 10)}, 0.25, "uniform", {"a"})
    >>> s["a"], round(s["b"], 6)
    (0.0, 0.5)
    """
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(shapes))
        if unknown:
            raise ValueError(f"unknown layer paths in sparsity dict: {unknown}; layers: {sorted(shapes)}")
        for path, s in sparsity.items():
            _check_sparsity(s, path)
        return {p: (0.0 if p in forced_dense else float(sparsity.get(p, 0.0))) for p in shapes}
    _check_sparsity(sparsity, "global")
    numel = {p: float(np.prod(s)) for p, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    dense = set(forced_dense)
    while True:
        free = [p for p in shapes if p not in dense]
        remaining = budget - sum(numel[p] for p in dense)
        if not free:
            return {p: 0.0 for p in shapes}
        if remaining <= 0:
            raise ValueError(
                f"sparsity {sparsity} is infeasible: the dense layers {sorted(dense)} alone exceed the "
                f"nonzero budget {budget:.0f}"
            )
        if distribution == "uniform":
            raw = {p: 1.0 for p in free}
        elif distribution == "erk":
            raw = {p: erk_raw_density(shapes[p]) for p in free}
        else:
            raise ValueError(f"unknown distribution {distribution!r}; use 'uniform', 'erk' or a dict")
        eps = remaining / sum(raw[p] * numel[p] for p in free)
        too_dense = [p for p in free if eps * raw[p] > 1.0]
        if not too_dense:
            break
        dense.update(too_dense)
    out = {p: 0.0 for p in dense}
    out.update({p: max(0.0, 1.0 - eps * raw[p]) for p in free})
    return out


def _check_sparsity(s: Any, where: str) -> None:
    if not isinstance(s, numbers.Real) or isinstance(s, bool) or not (0.0 <= float(s) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {s!r} ({where})")


def build_plans(
    params: Any,
    sparsity: float | Mapping[str, float],
    distribution: str,
    *,
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN,
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS,
    dense_first_layer: bool = False,
    ablation_exempt: Sequence[str] | None = None,
) -> dict[str, LayerPlan]:
    """LayerPlans for all sparse candidates of ``params`` (dense ones included with sparsity 0).

    ``ablation_exempt=None`` exempts the classifier (``default_classifier``).
    Raises if a sparse layer would get a fan-in k0 of 0, or if an attention in-projection kernel of a Flax
    ``DenseGeneral`` (in, heads, head_dim), whose neurons span two axes, is asked to be sparse.
    """
    candidates, forced_dense = sparse_candidates(
        params,
        sparse_pattern=sparse_pattern,
        dense_paths=dense_paths,
        dense_first_layer=dense_first_layer,
    )
    shapes = dict(candidates)
    sparsities = layer_sparsities(shapes, sparsity, distribution, forced_dense)
    if ablation_exempt is None:
        exempt = {default_classifier(candidates)}
    else:
        exempt = {p for p in shapes if matches_any(p, ablation_exempt)}
    plans = {}
    for path, shape in candidates:
        plan = LayerPlan(path, shape, sparsities[path], ablatable=path not in exempt)
        if plan.sparsity > 0 and len(shape) == 3 and re.search(DEFAULT_DENSE_PATHS[0], path):
            raise ValueError(
                f"{path!r} {shape}: a DenseGeneral in-projection (in, heads, head_dim) has neurons over two "
                "axes, which is not supported sparse; keep it in dense_paths (the default)"
            )
        if plan.k0 < 1:
            raise ValueError(
                f"layer {path!r} {shape} at sparsity {plan.sparsity:.4f} keeps {plan.nnz_budget} weights "
                f"for {plan.n_neurons} neurons: fan-in k0 would be 0. Lower its sparsity or keep it dense."
            )
        plans[path] = plan
    return plans
