"""SRigL and the baselines it is compared with (RigL, SET, Static), as configured objects whose
methods are pure functions over pytrees (params, grads, masks) and run under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from srigl_jax import layer_updates as lu
from srigl_jax import schedule
from srigl_jax.paths import named_leaves
from srigl_jax.plans import DEFAULT_DENSE_PATHS, DEFAULT_SPARSE_PATTERN, DISTRIBUTIONS, LayerPlan, build_plans
from srigl_jax.selection import magnitude_score, perturb_ties

PyTree = Any
_INITS = ("sparse_he", "reference_2_over_k", "keep")
_MASK_STREAM, _WEIGHT_STREAM = 0x6D61736B, 0x77676874  # independent random streams for masks and weights


class MaskUpdateInfo(NamedTuple):
    """What one ``update_masks`` call did (all traced scalars, no host sync)."""

    updated: jax.Array  # bool: this step was a mask-update step
    nonfinite: jax.Array  # bool: NaN/Inf found in params or grads (masks stay valid regardless)
    drop_fraction: jax.Array  # float32: d(step)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class DynamicSparsity:
    """Shared configuration and machinery of all sparse-training methods.

    Args:
      sparsity: global target sparsity S in [0, 1), or a ``{path: S}`` dict (unlisted layers dense).
      distribution: "erk", "uniform" (one global budget, forced-dense layers included) or "uniform_sparse"
        (exactly ``sparsity`` on every layer not forced dense); ignored for a dict.
      delta_t: steps between mask updates.
      t_end: no mask updates at or after this step (75% of training in the paper).
      alpha: initial drop fraction of the cosine schedule.
      grad_accumulation_steps: growth scores use the mean gradient of this many steps before an update.
      sparse_pattern: regex selecting sparse-candidate leaves (those with ndim >= 2).
      dense_paths: regexes of candidates kept dense (default: attention in-projections).
      dense_first_layer: keep the network's first layer dense: True finds it by position (a flat model's
        first conv else first kernel, or the single top-level conv beside nested blocks; otherwise an error
        asks for a path), a string is a regex of the layer(s) to keep dense.
      ablation_exempt: regexes of layers never ablated; None = the classifier, found by position (a flat
        model's last 2-D kernel, or the single top-level 2-D kernel beside nested blocks; else an error).
      init: "sparse_he" (std sqrt(2/k)), "reference_2_over_k" (the released code's std 2/k) or "keep".
      random_tie_break: break score ties with a seeded tiny perturbation instead of lower index first.
    """

    sparsity: float | Mapping[str, float]
    distribution: str = "erk"
    delta_t: int = 100
    t_end: int
    alpha: float = 0.3
    grad_accumulation_steps: int = 1
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS
    dense_first_layer: bool | str = False
    ablation_exempt: Sequence[str] | None = None
    init: str = "sparse_he"
    random_tie_break: bool = False

    performs_updates: ClassVar[bool] = True
    constant_fan_in: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, Mapping):
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, numbers.Real) or not (
                0.0 <= float(self.sparsity) < 1.0
            ):
                raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not (isinstance(self.delta_t, int) and self.delta_t >= 1):
            raise ValueError(f"delta_t must be an int >= 1, got {self.delta_t!r}")
        if not (isinstance(self.t_end, int) and self.t_end >= 0):
            raise ValueError(f"t_end must be an int >= 0, got {self.t_end!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not 1 <= self.grad_accumulation_steps <= self.delta_t:
            raise ValueError(
                f"grad_accumulation_steps must be in [1, delta_t={self.delta_t}], "
                f"got {self.grad_accumulation_steps!r}"
            )
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        for name in ("dense_paths", "ablation_exempt"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of regexes, not a single string {value!r}")
        object.__setattr__(self, "_plan_cache", {})

    # ----------------------------------------------------------------------------------- plans
    def layer_plans(self, params: PyTree) -> dict[str, LayerPlan]:
        """Static per-layer plans (sparsity, nnz budget T, k0, ablatable), keyed by path."""
        leaves, treedef = named_leaves(params)
        cache_key = (treedef, tuple((p, tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "")))
                                    for p, x in leaves))
        if cache_key not in self._plan_cache:
            self._plan_cache[cache_key] = build_plans(
                params,
                self.sparsity,
                self.distribution,
                sparse_pattern=self.sparse_pattern,
                dense_paths=tuple(self.dense_paths),
                dense_first_layer=self.dense_first_layer,
                ablation_exempt=None if self.ablation_exempt is None else tuple(self.ablation_exempt),
            )
        return self._plan_cache[cache_key]

    def _sparse_leaves(self, params: PyTree) -> list[tuple[int, LayerPlan]]:
        """(leaf index, plan) of the leaves that are actually sparse (sparsity > 0)."""
        plans = self.layer_plans(params)
        leaves, _ = named_leaves(params)
        return [(i, plans[p]) for i, (p, _) in enumerate(leaves) if p in plans and not plans[p].is_dense]

    # ------------------------------------------------------------------------------------ init
    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        """Boolean masks with the structure and shapes of ``params``; non-sparse leaves all True."""
        leaves, treedef = jax.tree.flatten(params)
        masks = [jnp.ones(jnp.shape(x), bool) for x in leaves]
        # Own key stream: with the same key as init_params the kept positions (top uniform draws) would
        # get the top normal draws too, i.e. all-positive initial weights.
        key = jax.random.fold_in(key, _MASK_STREAM)
        for j, (i, plan) in enumerate(self._sparse_leaves(params)):
            matrix = self._init_layer_mask(jax.random.fold_in(key, j), plan)
            masks[i] = matrix.reshape(plan.shape)
        return jax.tree.unflatten(treedef, masks)

    def _init_layer_mask(self, key: jax.Array, plan: LayerPlan) -> jax.Array:
        if self.constant_fan_in:
            return lu.constant_fan_in_mask(key, plan.n_neurons, plan.fan_in, plan.k0)
        return lu.uniform_random_mask(key, plan.n_neurons, plan.fan_in, plan.nnz_budget)

    def init_params(self, params: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
        """Sparse-aware init: active weights ~ N(0, 2/k) (k = the neuron's fan-in), inactive exactly 0."""
        check_same_structure(params, masks, "masks", same_shapes=True)
        leaves, treedef = jax.tree.flatten(params)
        mask_leaves = jax.tree.leaves(masks)
        out = list(leaves)
        key = jax.random.fold_in(key, _WEIGHT_STREAM)
        for j, (i, plan) in enumerate(self._sparse_leaves(params)):
            w, m = leaves[i], mask_leaves[i]
            if self.init == "keep":
                out[i] = jnp.where(m, w, jnp.zeros((), w.dtype))
                continue
            safe_fan_in = jnp.maximum(lu.neuron_fan_in(m), 1).astype(jnp.float32)
            std = jnp.sqrt(2.0 / safe_fan_in) if self.init == "sparse_he" else 2.0 / safe_fan_in
            noise = jax.random.normal(jax.random.fold_in(key, j), w.shape, jnp.float32)
            out[i] = jnp.where(m, noise * std, 0.0).astype(w.dtype)  # std broadcasts over the last axis
        return jax.tree.unflatten(treedef, out)

    # -------------------------------------------------------------------------------- schedule
    def is_update_step(self, step: jax.Array) -> jax.Array:
        """True where ``update_masks`` changes the masks."""
        if not self.performs_updates:
            return jnp.zeros((), bool)
        return schedule.is_update_step(step, self.delta_t, self.t_end)

    def drop_fraction(self, step: jax.Array) -> jax.Array:
        """Cosine-decayed drop fraction d(step)."""
        return schedule.drop_fraction(step, self.alpha, max(self.t_end, 1))

    # ------------------------------------------------------------------------------ mask update
    def update_masks(
        self, params: PyTree, grads: PyTree, masks: PyTree, key: jax.Array, step: jax.Array
    ) -> tuple[PyTree, PyTree]:
        """Prune/regrow on update steps (via ``lax.cond``); identity otherwise. Pure, jit-able."""
        params, masks, _ = self.update_masks_with_info(params, grads, masks, key, step)
        return params, masks

    def update_masks_with_info(
        self, params: PyTree, grads: PyTree, masks: PyTree, key: jax.Array, step: jax.Array
    ) -> tuple[PyTree, PyTree, MaskUpdateInfo]:
        """``update_masks`` plus a ``MaskUpdateInfo`` (was it an update step, NaN/Inf seen)."""
        check_same_structure(params, grads, "grads", same_shapes=True)
        check_same_structure(params, masks, "masks", same_shapes=True)
        p_leaves, treedef = jax.tree.flatten(params)
        g_leaves, m_leaves = jax.tree.leaves(grads), jax.tree.leaves(masks)
        for path_mask in m_leaves:
            if path_mask.dtype != jnp.bool_:
                raise TypeError(f"masks must be boolean, got {path_mask.dtype}")
        step = jnp.asarray(step, jnp.int32)
        updated = self.is_update_step(step)
        drop_frac = self.drop_fraction(step)
        info = MaskUpdateInfo(updated, any_nonfinite(grads) | any_nonfinite(params), drop_frac)
        sparse = self._sparse_leaves(params)
        if not sparse or not self.performs_updates:
            return params, masks, info

        def new_layers(operand):
            ws, ms = operand
            out_w, out_m = [], []
            for j, (i, plan) in enumerate(sparse):
                layer_key = jax.random.fold_in(key, j)
                new_m = self._update_layer(
                    lu.as_matrix(ws[j]), lu.as_matrix(g_leaves[i]), lu.as_matrix(ms[j]), drop_frac, plan, layer_key
                ).reshape(plan.shape)
                # Grown weights start at 0; weights kept (or dropped and regrown) keep their value.
                out_w.append(jnp.where(new_m & ms[j], ws[j], jnp.zeros((), ws[j].dtype)))
                out_m.append(new_m)
            return out_w, out_m

        operand = ([p_leaves[i] for i, _ in sparse], [m_leaves[i] for i, _ in sparse])
        new_w, new_m = lax.cond(updated, new_layers, lambda o: o, operand)
        p_out, m_out = list(p_leaves), list(m_leaves)
        for j, (i, _) in enumerate(sparse):
            p_out[i], m_out[i] = new_w[j], new_m[j]
        return jax.tree.unflatten(treedef, p_out), jax.tree.unflatten(treedef, m_out), info

    def _scores(self, w, g, key):
        w_score, g_score = magnitude_score(w), magnitude_score(g)
        if self.random_tie_break:
            kw, kg = jax.random.split(key)
            w_score, g_score = perturb_ties(w_score, kw), perturb_ties(g_score, kg)
        return w_score, g_score

    def _update_layer(self, w, g, m, drop_frac, plan, key) -> jax.Array:
        raise NotImplementedError

    # ------------------------------------------------------------ growth-gradient averaging
    def init_grad_accumulator(self, params: PyTree) -> PyTree:
        """Zeros like ``params``: running sum of the gradients in the averaging window."""
        return jax.tree.map(jnp.zeros_like, params)

    def accumulate_grads(self, acc: PyTree, grads: PyTree, step: jax.Array) -> PyTree:
        """Add ``grads`` of ``step`` if it lies in the last ``grad_accumulation_steps`` steps up to and
        including the next update step; the window's first step restarts the sum."""
        n, dt = self.grad_accumulation_steps, self.delta_t
        pos = (jnp.asarray(step, jnp.int32) - 1) % dt  # update steps sit at pos == dt - 1
        first, inside = pos == dt - n, pos >= dt - n
        return jax.tree.map(
            lambda a, g: jnp.where(first, g, jnp.where(inside, a + g, a)).astype(a.dtype), acc, grads
        )

    def averaged_grads(self, acc: PyTree) -> PyTree:
        """Mean gradient of the window (valid at update steps)."""
        return jax.tree.map(lambda a: a / self.grad_accumulation_steps, acc)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SRigL(DynamicSparsity):
    """Structured RigL: constant fan-in masks, per-neuron regrowth and neuron ablation.

    ``gamma_sal``: ablate neurons with fewer than max(1, floor(gamma_sal * k0)) salient weights
    (>= 1: an absolute count); ``None`` disables ablation.

    >>> import jax, jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
    ...           "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> algo = SRigL(sparsity=0.5, distribution="uniform", t_end=100)
    >>> masks = algo.init_masks(params, jax.random.key(0))
    >>> masks["Dense_0"]["kernel"].sum(axis=0).tolist()   # constant fan-in k0 = 4
    [4, 4, 4, 4]
    """

    gamma_sal: float | None = 0.3
    constant_fan_in: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma_sal is not None and not self.gamma_sal >= 0:
            raise ValueError(f"gamma_sal must be >= 0 or None, got {self.gamma_sal!r}")

    def _update_layer(self, w, g, m, drop_frac, plan, key):
        w_score, g_score = self._scores(w, g, key)
        return lu.srigl_layer_mask(w_score, g_score, m, drop_frac, plan, self.gamma_sal)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class RigL(DynamicSparsity):
    """Unstructured RigL (Evci et al. 2020): magnitude drop, dense-gradient growth, per layer."""

    def _update_layer(self, w, g, m, drop_frac, plan, key):
        w_score, g_score = self._scores(w, g, key)
        return lu.unstructured_layer_mask(w_score, g_score, m, drop_frac)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SET(DynamicSparsity):
    """Sparse Evolutionary Training: magnitude drop, random growth."""

    def _update_layer(self, w, g, m, drop_frac, plan, key):
        kw, kg = jax.random.split(key)
        w_score, _ = self._scores(w, g, kw)
        random_score = jax.random.uniform(kg, m.shape, jnp.float32)
        return lu.unstructured_layer_mask(w_score, random_score, m, drop_frac)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Static(DynamicSparsity):
    """Static sparse training: the initial random mask is never updated."""

    t_end: int = 0
    performs_updates: ClassVar[bool] = False

    def _update_layer(self, w, g, m, drop_frac, plan, key):
        return m


def any_nonfinite(tree: PyTree) -> jax.Array:
    """True if any floating leaf of ``tree`` holds NaN or Inf."""
    flags = [
        jnp.any(~jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


def check_same_structure(reference: PyTree, other: PyTree, name: str, same_shapes: bool) -> None:
    """Raise a ValueError naming ``name`` if ``other`` does not match ``reference``'s tree (and shapes)."""
    ref_def, other_def = jax.tree.structure(reference), jax.tree.structure(other)
    if ref_def != other_def:
        raise ValueError(f"{name} must have the same tree structure as params:\n  params: {ref_def}\n  {name}: {other_def}")
    if same_shapes:
        ref_leaves, _ = named_leaves(reference)
        for (path, r), o in zip(ref_leaves, jax.tree.leaves(other)):
            if jnp.shape(r) != jnp.shape(o):
                raise ValueError(f"{name} leaf {path!r} has shape {jnp.shape(o)}, params has {jnp.shape(r)}")
