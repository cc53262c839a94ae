"""Which leaves are sparse, and each sparse layer's static budget (sparsity, nnz T, fan-in k0)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from srigl_jax.paths import matches_any, named_leaves, natural_key

# A leaf is a sparse candidate when its path matches this and it has >= 2 dims (Dense/Conv kernels).
DEFAULT_SPARSE_PATTERN = r"(^|/)kernel$"
# Attention in-projections stay dense by default (as in the paper's ViT runs).
DEFAULT_DENSE_PATHS: tuple[str, ...] = (r"(^|/)(query|key|value)/kernel$",)
DISTRIBUTIONS: tuple[str, ...] = ("erk", "uniform", "uniform_sparse")
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
    dense_first_layer: bool | str = False,
) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """Candidate (path, shape) pairs in natural path order, and the subset forced dense.

    ``dense_first_layer``: a regex (every candidate it matches is kept dense; it must match one), or True for
    the network's first layer as found by :func:`first_layer`.
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
    if isinstance(dense_first_layer, str):
        chosen = {p for p, _ in candidates if re.search(dense_first_layer, p)}
        if not chosen:
            raise ValueError(f"dense_first_layer={dense_first_layer!r} matches no sparse candidate; candidates: "
                             f"{[p for p, _ in candidates]}")
        forced_dense |= chosen
    elif dense_first_layer:
        forced_dense.add(first_layer(candidates))
    return candidates, forced_dense


def _module_depths(candidates: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """How many modules deep each candidate's owner sits below the modules all candidates share: 1 for
    "Dense_0/kernel" (also under a common "params/" or "encoder/" wrapper), 2 for "block3/conv1/kernel"."""
    parts = [c[0].split("/")[:-1] for c in candidates]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [len(p) - common for p in parts]


def _by_position(candidates: list[tuple[str, tuple[int, ...]]], which: str, want_conv: bool) -> str:
    """The first (or last) layer of the network: unambiguous from the paths alone only for a flat model (every
    kernel owned by one module level, e.g. "Dense_0".."Dense_3" or "Conv_0", "Dense_0"), where auto-names
    and natural order give the call order, or beside nested blocks when exactly one top-level kernel is of
    the wanted kind (a stem conv / patch embedding, or a 2-D classifier), or those are auto-named modules of
    one type (their counter is their call order)."""
    depths = _module_depths(candidates)
    top = [c for c, d in zip(candidates, depths) if d <= 1]
    kind = [c for c in top if (len(c[1]) >= 3) == want_conv]
    if len(top) == len(candidates):   # flat: natural order is network order
        pool = kind or top
        return (pool[0] if which == "first" else pool[-1])[0]
    if len(kind) == 1:
        return kind[0][0]
    names = [re.fullmatch(r"([A-Za-z]\w*?)_(\d+)", c[0].split("/")[-2]) for c in kind] if kind else [None]
    if all(names) and len({m.group(1) for m in names}) == 1:
        # Flax auto-names of one module type ("Dense_0", "Dense_2", "Dense_10") count in call order.
        ordered = [c for _, c in sorted(zip((int(m.group(2)) for m in names), kind))]
        return (ordered[0] if which == "first" else ordered[-1])[0]
    option = "dense_first_layer='<regex of its path>'" if which == "first" else "ablation_exempt=('<regex>',)"
    raise ValueError(
        f"cannot tell the network's {which} layer from the parameter paths (nested modules; top-level "
        f"{'conv' if want_conv else '2-D'} kernels: {[c[0] for c in kind] or 'none'}; candidates: "
        f"{[c[0] for c in candidates]}): name it with {option}")


def first_layer(candidates: list[tuple[str, tuple[int, ...]]]) -> str:
    """The network's first layer (see ``_by_position``): the first conv kernel (else the first kernel) of a
    flat model, or the one top-level conv kernel (stem, patch embedding) beside nested blocks; else an error."""
    return _by_position(candidates, "first", want_conv=True)


def default_classifier(candidates: list[tuple[str, tuple[int, ...]]]) -> str:
    """The classifier: the last 2-D kernel of a flat model, or the one top-level 2-D kernel beside nested
    blocks ("head/kernel" after "block3/..."); else an error asking for ``ablation_exempt``."""
    return _by_position(candidates, "last", want_conv=False)


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

    ``distribution`` is "uniform" or "erk" (forced-dense layers count against the global budget), or
    "uniform_sparse" (every layer not forced dense gets exactly ``sparsity``; the dense ones come on top, as in
    the paper's ViT runs); a mapping ``sparsity`` gives per-path values explicitly (unlisted candidates stay
    dense).

    >>> s = layer_sparsities({"a": (10, 10), "b": (10, 10)}, 0.25, "uniform", {"a"})
    >>> s["a"], round(s["b"], 6)
    (0.0, 0.5)
    """
    if distribution == "uniform_sparse" and not isinstance(sparsity, Mapping):
        _check_sparsity(sparsity, "global")
        return {p: (0.0 if p in forced_dense else float(sparsity)) for p in shapes}
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
            raise ValueError(f"unknown distribution {distribution!r}; use {DISTRIBUTIONS} or a dict")
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
    dense_first_layer: bool | str = False,
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
