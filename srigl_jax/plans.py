"""Which leaves are sparse, and each sparse layer's static budget (sparsity, nnz T, fan-in k0) per layer slice."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from srigl_jax.layout import Axes, Layout, infer_layouts
from srigl_jax.paths import matches_any, named_leaves, natural_key

# A leaf is a sparse candidate when its path matches this and it has >= 2 dims (Dense/Conv kernels).
DEFAULT_SPARSE_PATTERN = r"(^|/)kernel$"
# Attention in-projections stay dense by default (as in the paper's ViT runs).
DEFAULT_DENSE_PATHS: tuple[str, ...] = (r"(^|/)(query|key|value)/kernel$",)
DISTRIBUTIONS: tuple[str, ...] = ("erk", "uniform", "uniform_sparse")
# Guards floor(numel * density) against 0.1 * 100 = 9.999999999999998.
_FLOOR_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FanIn:
    """A layer's budget given as a constant fan-in ``k`` instead of a sparsity: ``sparsity={path: FanIn(k)}``
    keeps exactly ``k`` weights per neuron (nnz T = k * n_neurons per layer slice).

    >>> plans = build_plans({"Dense_0": {"kernel": jnp.zeros((10, 4))}}, {"Dense_0/kernel": FanIn(3)}, "erk")
    >>> plans["Dense_0/kernel"].k0, plans["Dense_0/kernel"].nnz_budget
    (3, 12)
    """

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(f"FanIn(k) needs an int k >= 1, got {self.k!r}")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Static facts about one sparse-candidate leaf; budgets are per layer slice (see :mod:`srigl_jax.layout`:
    a stacked leaf holds ``n_slices`` independent layers, each with this budget).

    A slice is viewed as a ``(fan_in, n_neurons)`` matrix; without a layout, neurons are the last axis.
    ``sparsity == 0`` means the layer is kept dense; ``fan_in_k`` (from :class:`FanIn`) fixes T = k * n_neurons.
    """

    path: str
    shape: tuple[int, ...]
    sparsity: float
    ablatable: bool
    layout: Layout | None = None
    fan_in_k: int | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", Layout(tuple(self.shape), (), (len(self.shape) - 1,), "dense"))

    @property
    def n_slices(self) -> int:
        return self.layout.n_slices

    @property
    def n_neurons(self) -> int:
        return self.layout.n_neurons

    @property
    def fan_in(self) -> int:
        return self.layout.fan_in

    @property
    def numel(self) -> int:
        """Weights of one slice."""
        return self.fan_in * self.n_neurons

    @property
    def total_numel(self) -> int:
        return self.numel * self.n_slices

    @property
    def nnz_budget(self) -> int:
        """T per slice = floor(numel * (1 - S)), or k * n_neurons for a FanIn(k) layer."""
        if self.fan_in_k is not None and not self.is_dense:
            return self.fan_in_k * self.n_neurons
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

    def budget_key(self) -> tuple:
        """Everything the mask update of one slice depends on besides its data: slices of leaves with equal
        keys share one compiled update."""
        return (self.fan_in, self.n_neurons, self.sparsity, self.fan_in_k, self.ablatable, self.nnz_budget)


def sparse_candidates(
    params: Any,
    *,
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN,
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS,
    dense_first_layer: bool | str = False,
    layouts: Mapping[str, Layout] | None = None,
) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """Candidate (path, shape) pairs in natural path order, and the subset forced dense.

    ``dense_first_layer``: a regex (every candidate it matches is kept dense; it must match one), or True for
    the network's first layer as found by :func:`first_layer` (using ``layouts`` to tell convs and stacked
    kernels apart, when given).
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
    return candidates, forced_dense | _first_layers_kept_dense(candidates, dense_first_layer, layouts)


def _first_layers_kept_dense(candidates: list[tuple[str, tuple[int, ...]]], dense_first_layer: bool | str,
                             layouts: Mapping[str, Layout] | None) -> set[str]:
    """The candidates ``dense_first_layer`` keeps dense (a regex that must match, or True: :func:`first_layer`)."""
    if isinstance(dense_first_layer, str):
        chosen = {p for p, _ in candidates if re.search(dense_first_layer, p)}
        if not chosen:
            raise ValueError(f"dense_first_layer={dense_first_layer!r} matches no sparse candidate; candidates: "
                             f"{[p for p, _ in candidates]}")
        return chosen
    return {first_layer(candidates, layouts)} if dense_first_layer else set()


def _module_depths(candidates: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """How many modules deep each candidate's owner sits below the modules all candidates share: 1 for
    "Dense_0/kernel" (also under a common "params/" or "encoder/" wrapper), 2 for "block3/conv1/kernel"."""
    parts = [c[0].split("/")[:-1] for c in candidates]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [len(p) - common for p in parts]


def _kind(path: str, shape: tuple[int, ...], layouts: Mapping[str, Layout] | None) -> str:
    """"conv", "2d" (a Dense kernel) or "other", of one layer slice."""
    if layouts is None:
        return "conv" if len(shape) >= 3 else "2d"
    layout = layouts[path]
    if layout.kind == "conv":
        return "conv"
    return "2d" if len(layout.slice_shape) == 2 else "other"


def _by_position(candidates: list[tuple[str, tuple[int, ...]]], which: str, want_conv: bool,
                 layouts: Mapping[str, Layout] | None = None) -> str:
    """The first (or last) layer of the network: unambiguous from the paths alone only for a flat model (every
    kernel owned by one module level, e.g. "Dense_0".."Dense_3" or "Conv_0", "Dense_0"), where auto-names
    and natural order give the call order, or beside nested blocks when exactly one top-level kernel is of
    the wanted kind (a stem conv / patch embedding, or a 2-D classifier), or those are auto-named modules of
    one type (their counter is their call order)."""
    depths = _module_depths(candidates)
    top = [c for c, d in zip(candidates, depths) if d <= 1]
    wanted = "conv" if want_conv else "2d"
    kind = [c for c in top if _kind(c[0], c[1], layouts) == wanted]
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


def first_layer(candidates: list[tuple[str, tuple[int, ...]]], layouts: Mapping[str, Layout] | None = None) -> str:
    """The network's first layer (see ``_by_position``): the first conv kernel (else the first kernel) of a
    flat model, or the one top-level conv kernel (stem, patch embedding) beside nested blocks; else an error."""
    return _by_position(candidates, "first", True, layouts)


def default_classifier(candidates: list[tuple[str, tuple[int, ...]]],
                       layouts: Mapping[str, Layout] | None = None) -> str:
    """The classifier: the last 2-D kernel of a flat model, or the one top-level 2-D kernel beside nested
    blocks ("head/kernel" after "block3/..."); else an error asking for ``ablation_exempt``."""
    return _by_position(candidates, "last", False, layouts)


def erk_raw_density(shape: Sequence[int]) -> float:
    """Erdos-Renyi-Kernel score sum(shape) / prod(shape) (layout independent)."""
    return float(sum(shape)) / float(np.prod(shape))


def layer_sparsities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float | Mapping[str, float],
    distribution: str,
    forced_dense: set[str] = frozenset(),
    counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Per-layer sparsity so that the global nonzero budget (1 - S) * sum(numel) holds.

    ``shapes`` are the shapes of one layer; ``counts[path]`` (default 1) is how many such layers a stacked leaf
    holds: sums run over every layer in path order, exactly as for the same model unrolled.

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
    counts = counts or {}

    def total(paths, value) -> float:   # one term per layer, in path order, as the unrolled model sums
        return sum(value(p) for p in shapes if p in paths for _ in range(counts.get(p, 1)))

    numel = {p: float(np.prod(s)) for p, s in shapes.items()}
    budget = (1.0 - sparsity) * total(shapes, numel.get)
    dense = set(forced_dense)
    while True:
        free = [p for p in shapes if p not in dense]
        remaining = budget - total(dense, numel.get)
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
        eps = remaining / total(free, lambda p: raw[p] * numel[p])
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
    sparsity: float | Mapping[str, float | FanIn],
    distribution: str,
    *,
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN,
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS,
    dense_first_layer: bool | str = False,
    ablation_exempt: Sequence[str] | None = None,
    stack_axes: Mapping[str, Axes] | None = None,
    neuron_axes: Mapping[str, Axes] | None = None,
) -> dict[str, LayerPlan]:
    """LayerPlans for all sparse candidates of ``params`` (dense ones included with sparsity 0).

    Each leaf's :class:`~srigl_jax.layout.Layout` comes from :func:`~srigl_jax.layout.infer_layouts` with the
    ``stack_axes`` / ``neuron_axes`` declarations; budgets are per layer slice, and ERK treats every slice of
    a stacked leaf as its own layer. A dict ``sparsity`` may give :class:`FanIn` values.
    ``ablation_exempt=None`` exempts the classifier (``default_classifier``).
    Raises if a sparse layer would get a fan-in k0 of 0.
    """
    candidates, forced_dense = sparse_candidates(params, sparse_pattern=sparse_pattern, dense_paths=dense_paths)
    shapes = dict(candidates)
    layouts = infer_layouts(shapes, stack_axes=stack_axes, neuron_axes=neuron_axes, lenient=forced_dense)
    forced_dense = forced_dense | _first_layers_kept_dense(candidates, dense_first_layer, layouts)
    fan_in_k: dict[str, int] = {}
    if isinstance(sparsity, Mapping):
        sparsity = dict(sparsity)
        for path, value in list(sparsity.items()):
            if isinstance(value, FanIn) and path in layouts:
                layout = layouts[path]
                if value.k > layout.fan_in:
                    raise ValueError(f"{path!r}: FanIn({value.k}) exceeds the layer's fan-in {layout.fan_in}")
                fan_in_k[path] = value.k
                sparsity[path] = 1.0 - value.k / layout.fan_in   # reported sparsity; T = k * n_neurons exactly
    slice_shapes = {p: layouts[p].slice_shape for p in shapes}
    sparsities = layer_sparsities(slice_shapes, sparsity, distribution, forced_dense,
                                  counts={p: layouts[p].n_slices for p in shapes})
    if ablation_exempt is None:
        exempt = {default_classifier(candidates, layouts)}
    else:
        exempt = {p for p in shapes if matches_any(p, ablation_exempt)}
    plans = {}
    for path, shape in candidates:
        plan = LayerPlan(path, shape, sparsities[path], ablatable=path not in exempt, layout=layouts[path],
                         fan_in_k=fan_in_k.get(path))
        if plan.k0 < 1 and not plan.is_dense:
            raise ValueError(
                f"layer {path!r} {shape} at sparsity {plan.sparsity:.4f} keeps {plan.nnz_budget} weights "
                f"for {plan.n_neurons} neurons: fan-in k0 would be 0. Lower its sparsity or keep it dense."
            )
        plans[path] = plan
    return plans
