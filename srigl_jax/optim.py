"""Optax integration: ``sparse_optimizer`` (one transformation that owns masks, step, growth window and key), and
the pieces it is built from (``apply_masks``, ``reset_optimizer_state``), which stay public for custom loops."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from srigl_jax.algorithms import DynamicSparsity, MaskUpdateInfo, check_same_structure
from srigl_jax.paths import named_leaves

PyTree = Any


def apply_masks() -> optax.GradientTransformationExtraArgs:
    """Optax transform that makes ``optax.apply_updates`` land inactive weights exactly on 0.

    Masks are passed as an extra argument: ``tx.update(grads, state, params, masks=masks)``. Where a
    mask is False the update becomes ``-params`` (so ``params + update == 0`` exactly), or 0 when
    ``params`` is not given. Put it last in an ``optax.chain``. (``sparse_optimizer`` does this itself.)

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


def _pure(tree: PyTree) -> PyTree:
    """``tree`` with Flax NNX Variable wrappers (``nnx.Optimizer`` keeps its state as ``OptVariable``s)
    replaced by their values; any other tree is returned as is."""
    from flax import nnx  # flax is a dependency; imported here so the core does not load it eagerly

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if not any(is_var(x) for x in jax.tree.leaves(tree, is_leaf=is_var)):
        return tree
    return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def reset_optimizer_state(
    tx: optax.GradientTransformation, opt_state: PyTree, old_masks: PyTree, new_masks: PyTree
) -> PyTree:
    """Zero every per-parameter optimizer-state entry (momentum, Adam moments, ...) that is not active in
    both ``old_masks`` and ``new_masks``: newly grown weights start with fresh state.

    Works for any optax optimizer (chains, ``inject_hyperparams``, ...) through
    ``optax.tree_map_params``; non-parameter state (counts, hyperparameters) is untouched. Flax NNX
    ``Variable`` wrappers on either side (an ``nnx.Optimizer``'s ``OptVariable`` state, ``nnx.State`` masks)
    do not matter: the result has the structure of ``opt_state`` (write an ``nnx.Optimizer``'s back with
    ``nnx.update(optimizer.opt_state, nnx.state(new_state))``).
    """
    pure_state = _pure(opt_state)
    kept = jax.tree.map(jnp.logical_and, _pure(old_masks), _pure(new_masks))

    def reset(state_leaf, kept_leaf):
        if not hasattr(state_leaf, "shape") or state_leaf.shape != kept_leaf.shape:
            return state_leaf  # e.g. optax.MaskedNode or a factored statistic
        return jnp.where(kept_leaf, state_leaf, jnp.zeros((), state_leaf.dtype))

    new_state = optax.tree_map_params(tx, reset, pure_state, kept, transform_non_params=lambda x: x)
    # Unwrapping replaced each Variable by its one value leaf, so the leaves line up with opt_state's tree.
    return jax.tree.unflatten(jax.tree.structure(opt_state), jax.tree.leaves(new_state))


class SparseStepResult(NamedTuple):
    """One sparse step as updates relative to the incoming params (the optax contract)."""

    updates: PyTree
    inner_state: PyTree
    masks: PyTree
    grad_acc: PyTree | None
    info: MaskUpdateInfo


def sparse_step(
    algo: DynamicSparsity,
    inner: optax.GradientTransformation,
    params: PyTree,
    inner_state: PyTree,
    masks: PyTree,
    grads: PyTree,
    key: jax.Array,
    step: jax.Array,
    grad_acc: PyTree | None,
    skip_nonfinite: bool,
    **extra_args: Any,
) -> SparseStepResult:
    """The one implementation of a sparse training update (``sparse_optimizer`` and ``sparse_apply`` call it).

    1. growth gradients: ``grads``, or the window mean when ``grad_acc`` is given;
    2. ``algo.update_masks_with_info`` (a no-op except on update steps), with ``key`` for this step;
    3. on update steps, ``inner_state`` of weights not active before and after is reset to 0;
    4. ``inner`` steps on the gradient of the weights active before and after (inactive positions never reach
       it, so clipping sees the sparse gradient) with ``params`` as the mask update left them and
       ``masks=`` the new masks as an extra argument;
    5. the updates land kept weights on ``params + inner update``, grown weights on ``inner update`` (0 with
       a fresh state for every optax optimizer) and inactive weights on exactly 0.
    With ``skip_nonfinite`` a step whose grads or params hold NaN/Inf returns zero updates and leaves every
    state untouched (``info.nonfinite``; ``info.updated`` is then False: a mask update due on such a step is
    skipped, not retried). Without it nothing is checked (``info.nonfinite`` is always False) and the step
    saves that check's extra read of every gradient and parameter: NaN/Inf then reach the params.
    """
    if algo.grad_accumulation_steps > 1 and grad_acc is None:
        raise ValueError(
            f"algo.grad_accumulation_steps={algo.grad_accumulation_steps} needs the growth-gradient window: "
            "pass grad_acc=algo.init_grad_accumulator(params) (sparse_optimizer keeps it for you)")
    # Without the skip nothing looks for NaN/Inf: the check is a pass over every array (see _any_nonfinite_pair).
    nonfinite = _any_nonfinite_pair(grads, params) if skip_nonfinite else jnp.zeros((), bool)
    updated = algo.is_update_step(step)
    acc = None if grad_acc is None else algo.accumulate_grads(grad_acc, grads, step)
    # A skipped step (NaN/Inf) updates no mask; without the skip the update runs on whatever the grads hold.
    mask_update = updated & ~nonfinite

    def updated_masks():
        growth = grads if acc is None else algo.averaged_grads(acc)
        return algo.update_masks_with_info(params, growth, masks, key, step)[1]

    # Only the mask selection is a branch. Everything else is elementwise over (masks, new_masks) and stays
    # outside any conditional, so XLA fuses it with the inner optimizer and with the caller's
    # ``optax.apply_updates``: a branch around the whole step forced its updates through the branch's output
    # buffers, one extra read and write of every array per step (bench/train_step.py: 1.14x -> 0.93x dense).
    # The rule's outputs are unchanged by this (golden test); only the fused optimizer arithmetic may round
    # differently (1-2 ulp of some Adam updates against the branched version).
    new_masks = lax.cond(mask_update, updated_masks, lambda: masks)
    kept = jax.tree.map(jnp.logical_and, masks, new_masks)  # == masks on every step without a mask update
    # Optimizer state of weights not active before and after is reset, on mask-update steps only.
    state_kept = jax.tree.map(lambda k: k | ~mask_update, kept)
    state = reset_optimizer_state(inner, inner_state, state_kept, state_kept)
    # Weights kept keep their value (also when dropped and regrown in the same update), grown ones start at 0:
    # the same expression as update_masks (non-sparse leaves are all-True, so they pass through).
    new_params = jax.tree.map(lambda p, k: jnp.where(k, p, jnp.zeros((), p.dtype)), params, kept)
    opt_grads = jax.tree.map(lambda g, k: jnp.where(k, g, jnp.zeros((), g.dtype)), grads, kept)
    inner_updates, state = inner.update(opt_grads, state, new_params, masks=new_masks, **extra_args)
    # Kept weights: the inner update as is (new_params == params there, so params + u is exactly what an
    # optimizer step on them gives). Elsewhere land exactly on the new value: u where grown, 0 where inactive.
    updates = jax.tree.map(
        lambda u, k, m, p: jnp.where(k, u, jnp.where(m, u, jnp.zeros((), u.dtype)) - p.astype(u.dtype)),
        inner_updates, kept, new_masks, params)
    if skip_nonfinite:  # a skipped step: zero updates, every state as it came in (selects fuse with the step)
        keep_old = lambda old, new: jnp.where(nonfinite, old, new)  # noqa: E731
        updates = jax.tree.map(lambda u: jnp.where(nonfinite, jnp.zeros((), u.dtype), u), updates)
        state = jax.tree.map(keep_old, inner_state, state)
        acc = None if acc is None else jax.tree.map(keep_old, grad_acc, acc)
    info = MaskUpdateInfo(mask_update, nonfinite, algo.drop_fraction(step))
    return SparseStepResult(updates, state, new_masks, acc, info)


def _any_nonfinite_pair(grads: PyTree, params: PyTree) -> jax.Array:
    """True when a floating leaf of ``grads`` or ``params`` holds NaN or +-Inf.

    This reduction is the one pass of the skip that cannot fuse with the step: it must finish before any
    update is written, so it costs one extra read of every gradient and parameter. ``isfinite(x).all()``
    measured the cheapest exact form inside a whole train step (the bench/train_step.py MLP on a 2-vCPU AMD
    EPYC, four interleaved runs: the step was cheaper by 0.04-0.12 of a dense step than with ``sum(x * 0)``,
    whose zero operand XLA materialises as a full-size broadcast; ``max(|x|)`` and ``sum(x)`` were no faster,
    and ``sum`` can overflow)."""
    flags = [~(jnp.isfinite(g).all() & jnp.isfinite(p).all())
             for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params))
             if jnp.issubdtype(g.dtype, jnp.floating) and jnp.issubdtype(p.dtype, jnp.floating)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


class SparseState(NamedTuple):
    """State of :func:`sparse_optimizer`: everything sparse training needs besides the params.

    ``step`` counts ``update`` calls so far (a skipped non-finite step counts too, so the mask schedule stays
    aligned with the data); ``grad_acc`` is the growth-gradient window (None when
    ``grad_accumulation_steps == 1``); ``key`` is the base key (raw key data, uint32) from which step t's key
    is ``fold_in(key, t)``; ``info`` is the last step's ``MaskUpdateInfo``; ``inner_state`` the wrapped
    optimizer's state.
    """

    masks: PyTree
    step: jax.Array
    grad_acc: PyTree | None
    key: jax.Array
    info: MaskUpdateInfo
    inner_state: PyTree


def sparse_optimizer(
    inner: optax.GradientTransformation,
    algo: DynamicSparsity,
    *,
    masks: PyTree,
    key: jax.Array,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Sparse training as one optax transformation: ``inner`` (any optax optimizer) plus the masks.

    The state (:class:`SparseState`) holds the masks, the step count, the growth-gradient window (when
    ``algo.grad_accumulation_steps > 1``), the key, the last ``MaskUpdateInfo`` and ``inner``'s state, so the
    training loop stays the user's own: plain ``tx.update`` + ``optax.apply_updates``, a Flax ``TrainState``,
    or an ``nnx.Optimizer``. ``grads`` are the dense gradients of the model (inactive weights are exact zeros
    in ``params``, so the forward pass needs no mask); ``params`` must be passed to ``update``.

    Each ``update`` is :func:`sparse_step`: mask update on update steps (``algo.update_masks``), optimizer state
    reset for grown weights, ``inner`` on the kept weights' gradients, updates landing inactive weights on 0.
    A step with NaN/Inf in grads or params changes nothing and reports ``info.nonfinite`` (read it with
    :func:`get_sparse_state`). Clipping and weight decay belong in ``inner`` (they then see the sparse
    gradient); wrap the whole thing in ``optax.MultiSteps`` for gradient accumulation (the mask schedule then
    counts real optimizer steps). With data parallelism pass gradients already averaged over devices (e.g.
    ``lax.pmean``) so every device takes the same mask decision.

    ``masks``: boolean masks from ``algo.init_masks`` (same paths and shapes as params; NNX ``Variable``
    wrappers are ignored). ``key``: a PRNG key (typed or raw) for the mask updates.

    >>> import jax, jax.numpy as jnp, optax, srigl_jax as sj
    >>> params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
    ...           "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    >>> algo = sj.SRigL(sparsity=0.5, distribution="uniform", delta_t=2, t_end=10)
    >>> masks = algo.init_masks(params, jax.random.key(0))
    >>> params = algo.init_params(params, masks, jax.random.key(1))
    >>> tx = sj.sparse_optimizer(optax.sgd(0.1), algo, masks=masks, key=jax.random.key(2))
    >>> opt_state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(sj.get_sparse_state(opt_state).step), sj.get_masks(opt_state)["Dense_0"]["kernel"].sum(axis=0).tolist()
    (1, [4, 4, 4, 4])
    """
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(key) if typed else None
    key_data = jax.random.key_data(key) if typed else key
    inner = optax.with_extra_args_support(inner)

    def step_key(data: jax.Array, step: jax.Array) -> jax.Array:
        base = jax.random.wrap_key_data(data, impl=impl) if typed else data
        return jax.random.fold_in(base, step)

    def init_fn(params: PyTree) -> SparseState:
        init_masks = _masks_like(params, masks)
        step = jnp.zeros((), jnp.int32)
        acc = algo.init_grad_accumulator(params) if algo.grad_accumulation_steps > 1 else None
        info = MaskUpdateInfo(jnp.zeros((), bool), jnp.zeros((), bool), algo.drop_fraction(step))
        return SparseState(init_masks, step, acc, key_data, info, inner.init(params))

    def update_fn(grads, state: SparseState, params=None, **extra_args):
        if params is None:
            raise ValueError("sparse_optimizer needs the params: call tx.update(grads, state, params)")
        if not isinstance(state, SparseState):
            raise TypeError(f"sparse_optimizer's update got a {type(state).__name__} state; pass the state that "
                            "its init returned (search a bigger state with sj.get_sparse_state)")
        res = sparse_step(algo, inner, params, state.inner_state, state.masks, grads,
                          step_key(state.key, state.step), state.step, state.grad_acc, skip_nonfinite, **extra_args)
        new_state = SparseState(res.masks, state.step + 1, res.grad_acc, state.key, res.info, res.inner_state)
        return res.updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masks_like(params: PyTree, masks: PyTree) -> PyTree:
    """``masks`` re-shaped onto ``params``' tree (so NNX Variable wrappers on either side do not matter), after
    checking that both name the same leaves with the same shapes and that the masks are boolean."""
    p_leaves, treedef = named_leaves(params)
    m_leaves, _ = named_leaves(_pure(masks))
    p_paths, m_paths = [p for p, _ in p_leaves], [p for p, _ in m_leaves]
    if p_paths != m_paths:
        missing, extra = sorted(set(p_paths) - set(m_paths)), sorted(set(m_paths) - set(p_paths))
        raise ValueError(f"masks must name the same leaves as params: params leaves missing from masks: {missing}; "
                         f"masks leaves not in params: {extra}")
    for (path, p), (_, m) in zip(p_leaves, m_leaves):
        if jnp.shape(p) != jnp.shape(m):
            raise ValueError(f"masks leaf {path!r} has shape {jnp.shape(m)}, params has {jnp.shape(p)}")
        if jnp.result_type(m) != jnp.bool_:
            raise TypeError(f"masks must be boolean, leaf {path!r} is {jnp.result_type(m)}")
    return jax.tree.unflatten(treedef, [jnp.asarray(m) for _, m in m_leaves])


def get_sparse_state(opt_state: PyTree) -> SparseState:
    """The :class:`SparseState` inside any optimizer state (chains, ``MultiSteps``, ``inject_hyperparams``,
    a Flax ``TrainState``, an ``nnx.Optimizer`` or its ``opt_state``), with NNX wrappers removed.

    Raises if there is none or more than one.
    """
    found: list[SparseState] = []
    tree = getattr(opt_state, "opt_state", opt_state)

    def visit(x: Any) -> bool:
        if isinstance(x, SparseState):
            found.append(x)
            return True
        return False

    jax.tree.leaves(tree, is_leaf=visit)
    if len(found) != 1:
        raise ValueError(f"expected exactly one sparse_optimizer state in the given optimizer state, found "
                         f"{len(found)}" + ("; was the optimizer built with sj.sparse_optimizer?" if not found else ""))
    return _pure(found[0])


def get_masks(opt_state: PyTree) -> PyTree:
    """The current masks held by the :func:`sparse_optimizer` state inside ``opt_state`` (see
    :func:`get_sparse_state`)."""
    return get_sparse_state(opt_state).masks


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
    """One sparse training update with the state threaded by hand (prefer :func:`sparse_optimizer`).

    A thin wrapper over :func:`sparse_step` (the code ``sparse_optimizer`` runs) that applies the updates:
    ``key`` is this step's key, ``step`` the steps already taken (traced), ``grad_acc`` the growth window
    from ``algo.init_grad_accumulator`` (required when ``grad_accumulation_steps > 1``), ``tx`` any optax
    optimizer (an ``apply_masks()`` at its end is allowed, not needed). Returns the new params, optimizer
    state, masks, window and ``MaskUpdateInfo``.
    """
    res = sparse_step(algo, optax.with_extra_args_support(tx), params, opt_state, masks, grads, key,
                      jnp.asarray(step, jnp.int32), grad_acc, skip_nonfinite)
    new_params = optax.apply_updates(params, res.updates)
    if skip_nonfinite:  # exactly the old params (x + 0 would turn -0.0 into 0.0)
        new_params = jax.tree.map(lambda old, new: jnp.where(res.info.nonfinite, old, new), params, new_params)
    return SparseApplyResult(new_params, res.inner_state, res.masks, res.grad_acc, res.info)
