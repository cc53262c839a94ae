"""The driver of every sparse-training method, and SRigL and its baselines (RigL, SET, Static) as configured
objects whose methods are pure functions over pytrees (params, grads, masks) and run under ``jax.jit``.

A method is a per-layer rule (:mod:`srigl_jax.rules`); :class:`DynamicSparsity` does the rest: plans, slicing
of stacked kernels, batching of equal layers into one compiled update, the schedule, the checks.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from srigl_jax import schedule
from srigl_jax.layout import Axes
from srigl_jax.paths import named_leaves
from srigl_jax.plans import DEFAULT_DENSE_PATHS, DEFAULT_SPARSE_PATTERN, DISTRIBUTIONS, LayerPlan, build_plans
from srigl_jax.rules import LayerRule, LayerView, NMRule, RigLRule, SETRule, SRigLRule, StaticRule

PyTree = Any
_INITS = ("sparse_he", "reference_2_over_k", "keep")
_MASK_STREAM, _WEIGHT_STREAM = 0x6D61736B, 0x77676874  # independent random streams for masks and weights


class MaskUpdateInfo(NamedTuple):
    """What one ``update_masks`` call did (all traced scalars, no host sync)."""

    updated: jax.Array  # bool: this step was a mask-update step
    # bool: NaN/Inf found in params or grads (masks stay valid regardless); sparse_optimizer with
    # skip_nonfinite=False does not look, and reports False
    nonfinite: jax.Array
    drop_fraction: jax.Array  # float32: d(step)


class _Group(NamedTuple):
    """Slices that share one compiled update: (leaf index, plan, first global slice index) of each member."""

    plan: LayerPlan
    members: tuple[tuple[int, LayerPlan, int], ...]


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class DynamicSparsity:
    """The driver shared by all sparse-training methods: configuration, plans, init, schedule and the mask
    update over the parameter tree. The method itself is a per-layer rule (:mod:`srigl_jax.rules`): pass one as
    ``rule=`` to use a new method, or use the configured subclasses (:class:`SRigL`, :class:`RigL`, :class:`SET`,
    :class:`Static`, :class:`srigl_jax.NM`).

    Args:
      rule: the per-layer rule (subclasses provide it from their own fields).
      sparsity: global target sparsity S in [0, 1), or a ``{path: S or FanIn(k)}`` dict (unlisted layers dense).
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
      stack_axes: ``{regex: axis or axes}``: axes whose slices are separate layers (``nn.scan`` / ``nnx.vmap``
        stacks): every slice gets its own budget, ERK share, ablation and constant fan-in, as if unrolled.
      neuron_axes: ``{regex: axis or axes}``: which axes index a kernel's neurons (the rest are its fan-in),
        e.g. ``(1, 2)`` for a DenseGeneral ``(in, heads, head_dim)``. See :mod:`srigl_jax.layout`.
      init: "sparse_he" (std sqrt(2/k)), "reference_2_over_k" (the released code's std 2/k) or "keep".
      random_tie_break: break score ties with a seeded tiny perturbation instead of lower index first.
    """

    rule: LayerRule | None = None
    sparsity: float | Mapping[str, Any]
    distribution: str = "erk"
    delta_t: int = 100
    t_end: int
    alpha: float = 0.3
    grad_accumulation_steps: int = 1
    sparse_pattern: str = DEFAULT_SPARSE_PATTERN
    dense_paths: Sequence[str] = DEFAULT_DENSE_PATHS
    dense_first_layer: bool | str = False
    ablation_exempt: Sequence[str] | None = None
    stack_axes: Mapping[str, Axes] | None = None
    neuron_axes: Mapping[str, Axes] | None = None
    init: str = "sparse_he"
    random_tie_break: bool = False

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
        for name in ("stack_axes", "neuron_axes"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"{name} must be a {{regex: axis or axes}} dict, got {getattr(self, name)!r}")
        rule = self.make_rule()
        if not isinstance(rule, LayerRule):
            raise TypeError(f"rule must implement srigl_jax.rules.LayerRule (updates, init_mask, update_mask), "
                            f"got {rule!r}")
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_plan_cache", {})

    def make_rule(self) -> LayerRule:
        """The per-layer rule; subclasses build it from their fields (see ``_own_rule``)."""
        if self.rule is None:
            raise TypeError("DynamicSparsity needs rule=<a srigl_jax.rules.LayerRule>")
        return self.rule

    def _own_rule(self, built: LayerRule) -> LayerRule:
        """A subclass's rule comes from its fields; a ``rule=`` would be silently ignored: refuse it."""
        if self.rule is not None:
            raise TypeError(f"{type(self).__name__} builds its own rule from its fields; got rule={self.rule!r}. "
                            "Use sj.DynamicSparsity(rule=...) for a custom rule.")
        return built

    @property
    def layer_rule(self) -> LayerRule:
        """The per-layer rule in use (``rule``, or the one a subclass built from its fields)."""
        return self._rule

    @property
    def performs_updates(self) -> bool:
        return bool(self._rule.updates)

    # ----------------------------------------------------------------------------------- plans
    def layer_plans(self, params: PyTree) -> dict[str, LayerPlan]:
        """Static per-layer plans (sparsity, per-slice nnz budget T, k0, ablatable, layout), keyed by path."""
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
                stack_axes=self.stack_axes,
                neuron_axes=self.neuron_axes,
            )
        return self._plan_cache[cache_key]

    def _sparse_leaves(self, params: PyTree) -> list[tuple[int, LayerPlan, int]]:
        """(leaf index, plan, first global slice index) of the leaves that are actually sparse. Slices are
        numbered in leaf order, each slice of a stacked leaf counting as one layer (its key stream)."""
        plans = self.layer_plans(params)
        leaves, _ = named_leaves(params)
        out, first = [], 0
        for i, (p, _) in enumerate(leaves):
            if p in plans and not plans[p].is_dense:
                out.append((i, plans[p], first))
                first += plans[p].n_slices
        return out

    def _groups(self, params: PyTree) -> list[_Group]:
        """Sparse leaves whose slices have equal plans (shape, budget, ablation) share one compiled update."""
        groups: dict[tuple, list] = {}
        for member in self._sparse_leaves(params):
            groups.setdefault(member[1].budget_key(), []).append(member)
        return [_Group(members[0][1], tuple(members)) for members in groups.values()]

    # ------------------------------------------------------------------------------------ init
    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        """Boolean masks with the structure and shapes of ``params``; non-sparse leaves all True."""
        leaves, treedef = jax.tree.flatten(params)
        masks = [jnp.ones(jnp.shape(x), bool) for x in leaves]
        # Own key stream: with the same key as init_params the kept positions (top uniform draws) would
        # get the top normal draws too, i.e. all-positive initial weights.
        key = jax.random.fold_in(key, _MASK_STREAM)
        for i, plan, first in self._sparse_leaves(params):
            slices = [self._rule.init_mask(jax.random.fold_in(key, first + s), plan) for s in range(plan.n_slices)]
            masks[i] = plan.layout.from_slices(jnp.stack(slices))
        return jax.tree.unflatten(treedef, masks)

    def init_params(self, params: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
        """Sparse-aware init: active weights ~ N(0, 2/k) (k = the neuron's fan-in), inactive exactly 0."""
        check_same_structure(params, masks, "masks", same_shapes=True)
        leaves, treedef = jax.tree.flatten(params)
        mask_leaves = jax.tree.leaves(masks)
        out = list(leaves)
        key = jax.random.fold_in(key, _WEIGHT_STREAM)
        for i, plan, first in self._sparse_leaves(params):
            w, m, layout = leaves[i], mask_leaves[i], plan.layout
            if self.init == "keep":
                out[i] = jnp.where(m, w, jnp.zeros((), w.dtype))
                continue
            safe_fan_in = jnp.maximum(layout.neuron_fan_in(m), 1).astype(jnp.float32)[:, None, :]
            std = jnp.sqrt(2.0 / safe_fan_in) if self.init == "sparse_he" else 2.0 / safe_fan_in
            # Each slice draws from its own key in its own shape, exactly as the unrolled layer would.
            noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, first + s), layout.slice_shape,
                                                 jnp.float32) for s in range(plan.n_slices)])
            stack = layout.stack_axes
            noise = noise.reshape(tuple(layout.shape[a] for a in stack) + layout.slice_shape)
            noise = jnp.moveaxis(noise, tuple(range(len(stack))), stack)
            scaled = layout.from_slices(layout.to_slices(noise) * std)
            out[i] = jnp.where(m, scaled, 0.0).astype(w.dtype)
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
        groups = self._groups(params)

        def new_layers(operand):
            ws, ms = operand
            out_w, out_m = dict(ws), {}
            for group in groups:
                new = self._update_group(group, ws, g_leaves, ms, drop_frac, key)
                for (i, _, _), new_m in zip(group.members, new):
                    # Grown weights start at 0; weights kept (or dropped and regrown) keep their value.
                    out_w[i] = jnp.where(new_m & ms[i], ws[i], jnp.zeros((), ws[i].dtype))
                    out_m[i] = new_m
            return out_w, out_m

        operand = ({i: p_leaves[i] for i, _, _ in sparse}, {i: m_leaves[i] for i, _, _ in sparse})
        new_w, new_m = lax.cond(updated, new_layers, lambda o: o, operand)
        p_out, m_out = list(p_leaves), list(m_leaves)
        for i, _, _ in sparse:
            p_out[i], m_out[i] = new_w[i], new_m[i]
        return jax.tree.unflatten(treedef, p_out), jax.tree.unflatten(treedef, m_out), info

    def _update_group(self, group: _Group, ws, g_leaves, ms, drop_frac, key) -> list[jax.Array]:
        """New masks of every member leaf of ``group``: one compiled per-slice update, mapped over all slices
        (``lax.map`` rather than ``vmap``: per-slice ``lax.cond`` branches stay real branches instead of both
        running; the slices still run one after another, see bench/train_step.py for the cost vs unrolled)."""
        plan = group.plan

        def one_slice(w, g, m, index):
            return self._rule.update_mask(LayerView(w, g, m, drop_frac), plan, jax.random.fold_in(key, index))

        views = [tuple(p.layout.to_slices(x[i]) for x in (ws, g_leaves, ms)) for i, p, _ in group.members]
        indices = [jnp.arange(first, first + p.n_slices, dtype=jnp.int32) for _, p, first in group.members]
        if len(views) == 1 and views[0][0].shape[0] == 1:   # a single layer: no mapping
            new = one_slice(views[0][0][0], views[0][1][0], views[0][2][0], indices[0][0])[None]
        else:
            w, g, m = (jnp.concatenate([v[j] for v in views]) for j in range(3))
            new = lax.map(lambda xs: one_slice(*xs), (w, g, m, jnp.concatenate(indices)))
        out, start = [], 0
        for i, member_plan, _ in group.members:
            n = member_plan.n_slices
            out.append(member_plan.layout.from_slices(new[start:start + n]))
            start += n
        return out

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

    def make_rule(self) -> LayerRule:
        if self.gamma_sal is not None and not self.gamma_sal >= 0:
            raise ValueError(f"gamma_sal must be >= 0 or None, got {self.gamma_sal!r}")
        return self._own_rule(SRigLRule(self.gamma_sal, self.random_tie_break))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class NM(DynamicSparsity):
    """N:M constant fan-in (:mod:`srigl_jax.rules.nm`): every active neuron keeps exactly ``n`` of each block of
    ``m`` consecutive fan-in positions; SRigL's drop, regrowth and ablation (``gamma_sal``) otherwise. Every
    sparse layer gets sparsity 1 - n/m (``sparsity`` is implied; layers forced dense stay dense).

    >>> import jax, jax.numpy as jnp
    >>> algo = NM(n=2, m=4, t_end=100)
    >>> masks = algo.init_masks({"Dense_0": {"kernel": jnp.ones((8, 3))}}, jax.random.key(0))
    >>> masks["Dense_0"]["kernel"].reshape(2, 4, 3).sum(axis=1).tolist()   # 2 of every 4 inputs, per neuron
    [[2, 2, 2], [2, 2, 2]]
    """

    n: int
    m: int
    sparsity: float | Mapping[str, Any] | None = None
    gamma_sal: float | None = 0.3

    def __post_init__(self) -> None:
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NM: {name} must be an int >= 1, got {value!r}")
        if self.n >= self.m:
            raise ValueError(f"NM: n must be < m (n={self.n}, m={self.m} keeps every weight)")
        if self.sparsity is not None:
            raise ValueError("NM implies the sparsity 1 - n/m; do not pass sparsity")
        object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        object.__setattr__(self, "distribution", "uniform_sparse")
        super().__post_init__()

    def make_rule(self) -> LayerRule:
        return self._own_rule(NMRule(self.n, self.m, self.gamma_sal, self.random_tie_break))

    def layer_plans(self, params: PyTree) -> dict[str, LayerPlan]:
        plans = super().layer_plans(params)
        for plan in plans.values():
            if not plan.is_dense and (plan.fan_in % self.m or plan.k0 != self.n * plan.fan_in // self.m):
                raise ValueError(f"NM {self.n}:{self.m}: layer {plan.path!r} has fan-in {plan.fan_in}, not a "
                                 f"multiple of m={self.m}; keep it dense (dense_paths) or choose another m")
        return plans


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class RigL(DynamicSparsity):
    """Unstructured RigL (Evci et al. 2020): magnitude drop, dense-gradient growth, per layer."""

    def make_rule(self) -> LayerRule:
        return self._own_rule(RigLRule(self.random_tie_break))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class SET(DynamicSparsity):
    """Sparse Evolutionary Training: magnitude drop, random growth."""

    def make_rule(self) -> LayerRule:
        return self._own_rule(SETRule(self.random_tie_break))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Static(DynamicSparsity):
    """Static sparse training: the initial random mask is never updated."""

    t_end: int = 0

    def make_rule(self) -> LayerRule:
        return self._own_rule(StaticRule())


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
