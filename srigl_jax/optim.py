"""Optax integration: the mask-applying transform, optimizer-state reset, and one sparse step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from srigl_jax.algorithms import DynamicSparsity, MaskUpdateInfo, any_nonfinite, check_same_structure

PyTree = Any


def apply_masks() -> optax.GradientTransformationExtraArgs:
    """Optax transform that makes ``optax.apply_updates`` land inactive weights exactly on 0.

    Masks are passed as an extra argument: ``tx.update(grads, state, params, masks=masks)``. Where a
    mask is False the update becomes ``-params`` (so ``params + update == 0`` exactly), or 0 when
    ``params`` is not given. Put it last in an ``optax.chain``.

    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(1.0), apply_masks())
    >>> p = jnp.array([1.0, 2.0]); m = jnp.array([True, False])
    >>> u, _ = tx.update(jnp.array([0.5, 0.5]), tx.init(p), p, masks=m)
    >>> optax.apply_updates(p, u).tolist()
    [0.5, 0.0]
    """

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del extra_args
        if masks is None:
            raise ValueError("apply_masks() needs the masks: call tx.update(grads, state, params, masks=masks)")
        check_same_structure(updates, masks, "masks", same_shapes=True)
        if params is None:
            masked = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, masks)
        else:
            masked = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)), updates, masks, params)
        return masked, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reset_optimizer_state(
    tx: optax.GradientTransformation, opt_state: PyTree, old_masks: PyTree, new_masks: PyTree
) -> PyTree:
    """Zero every per-parameter optimizer-state entry (momentum, Adam moments, ...) that is not active in
    both ``old_masks`` and ``new_masks``: newly grown weights start with fresh state.

    Works for any optax optimizer (chains, ``inject_hyperparams``, ...) through
    ``optax.tree_map_params``; non-parameter state (counts, hyperparameters) is untouched.
    """
    kept = jax.tree.map(jnp.logical_and, old_masks, new_masks)

    def reset(state_leaf, kept_leaf):
        if not hasattr(state_leaf, "shape") or state_leaf.shape != kept_leaf.shape:
            return state_leaf  # e.g. optax.MaskedNode or a factored statistic
        return jnp.where(kept_leaf, state_leaf, jnp.zeros((), state_leaf.dtype))

    return optax.tree_map_params(tx, reset, opt_state, kept, transform_non_params=lambda x: x)


class SparseApplyResult(NamedTuple):
    """Output of ``sparse_apply``."""

    params: PyTree
    opt_state: PyTree
    masks: PyTree
    grad_acc: PyTree | None
    info: MaskUpdateInfo


def sparse_apply(
    algo: DynamicSparsity,
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    masks: PyTree,
    grads: PyTree,
    key: jax.Array,
    step: jax.Array,
    grad_acc: PyTree | None = None,
    skip_nonfinite: bool = True,
) -> SparseApplyResult:
    """One sparse training update, jit-able with a traced ``step``.

    1. growth gradients: ``grads``, or the window mean if a ``grad_acc`` (from
       ``algo.init_grad_accumulator``) is given;
    2. ``algo.update_masks`` (a no-op except on update steps);
    3. optimizer state of weights not active before and after is reset to 0 (update steps only);
    4. the optimizer step on the gradient of the weights active before and after the update (so grown
       weights leave this step at exactly 0 with zero optimizer state), with ``masks=`` passed to the
       transform (use ``apply_masks()`` in ``tx``).
    With ``skip_nonfinite`` a step whose grads or params hold NaN/Inf leaves params, masks and optimizer
    state untouched (``info.nonfinite`` reports it), so one bad batch never poisons the run; a mask update
    due on such a step is skipped, not retried.
    With several devices, pass grads already averaged across devices so masks agree everywhere.
    """
    nonfinite = any_nonfinite(grads)
    if skip_nonfinite:  # checked before any work, so the cond below skips it all
        info = MaskUpdateInfo(
            algo.is_update_step(step), nonfinite | any_nonfinite(params), algo.drop_fraction(step)
        )

    def step_once(_):
        growth, acc = grads, grad_acc
        if acc is not None:
            acc = algo.accumulate_grads(acc, grads, step)
            growth = algo.averaged_grads(acc)
        new_params, new_masks, step_info = algo.update_masks_with_info(params, growth, masks, key, step)
        new_opt_state = lax.cond(
            step_info.updated,
            lambda s: reset_optimizer_state(tx, s, masks, new_masks),
            lambda s: s,
            opt_state,
        )
        # Only weights active before and after see this step's gradient: inactive positions never reach
        # the optimizer (global-norm clipping sees the sparse gradient), grown weights stay at 0 with zero
        # optimizer state.
        opt_grads = jax.tree.map(
            lambda g, old, new: jnp.where(old & new, g, jnp.zeros((), g.dtype)), grads, masks, new_masks
        )
        updates, new_opt_state = tx.update(opt_grads, new_opt_state, new_params, masks=new_masks)
        return optax.apply_updates(new_params, updates), new_opt_state, new_masks, acc, step_info

    if not skip_nonfinite:
        new_params, new_opt_state, new_masks, grad_acc, info = step_once(None)
        info = info._replace(nonfinite=info.nonfinite | nonfinite)
        return SparseApplyResult(new_params, new_opt_state, new_masks, grad_acc, info)

    def unchanged(_):
        return params, opt_state, masks, grad_acc

    new_params, new_opt_state, new_masks, grad_acc = lax.cond(
        info.nonfinite, unchanged, lambda _: step_once(_)[:4], None
    )
    return SparseApplyResult(new_params, new_opt_state, new_masks, grad_acc, info)
