"""Train and eval steps for SRigL: one step body shared by single-device, ``pmap`` and jit+NamedSharding runs.

Sparse training is the optimizer: ``tx`` is a ``srigl_jax.sparse_optimizer``, whose state holds the masks. Data
parallelism and masks: every device must hold the same masks, so the gradients are averaged over devices
*before* ``tx.update`` scores them, and the mask-update key lives in the replicated optimizer state (never
derived from the device index). Modes:

- ``"single"``: ``jax.jit`` on one device; the batch is the global batch.
- ``"pmap"``: ``jax.pmap`` over the local devices; the state is replicated (leading device axis), the batch is
  reshaped to ``(n_devices, per_device, ...)``; gradients are averaged with :func:`device_mean` (one summation
  order for every element, so exact ties in the growth scores survive), loss, accuracy and float model state
  (BatchNorm running stats) with ``lax.pmean``, inside the step.
- ``"sharded"``: ``jax.jit`` with ``NamedSharding``: the state is replicated over a 1-D mesh, the batch is split
  along its leading axis (``PartitionSpec(axis_name)``). The loss is the global-batch mean, so XLA inserts the
  cross-device gradient reduction itself; BatchNorm statistics are global-batch statistics. Across processes
  that reduction has the hazard :func:`device_mean` avoids under pmap (values equal on every device may come out
  1 ulp apart), so an exact tie in the growth scores may be broken differently than in one process.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import srigl_jax as sj

Mode = Literal["single", "pmap", "sharded"]
MODES: tuple[str, ...] = ("single", "pmap", "sharded")

Batch = dict[str, Any]
# loss_fn(params, model_state, batch, rng) -> (mean loss, (new model_state, logits))
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, tuple[Any, jax.Array]]]
# apply_fn(params, model_state, batch) -> logits, in inference mode (BatchNorm running averages, no dropout)
ApplyFn = Callable[[Any, Any, Batch], jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a sparse training step reads and writes; a pytree, so it can be jitted, replicated, saved.

    ``step`` counts the optimizer steps already taken (int32 scalar); ``opt_state`` is the state of the
    ``srigl_jax.sparse_optimizer`` (masks, its own step count, growth-gradient window, mask-update key, last
    ``MaskUpdateInfo``, the inner optimizer's state: read them with ``sj.get_sparse_state``); ``itop`` marks the
    positions ever active; ``model_state`` holds non-trained collections (e.g. ``{"batch_stats": ...}``, ``{}``
    if none); ``rng`` is the base key of the forward pass (dropout): step t uses ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    itop: Any
    model_state: Any
    rng: jax.Array

    @property
    def masks(self) -> Any:
        """The current masks (held by the sparse optimizer's state)."""
        return sj.get_masks(self.opt_state)


def init_sparse_training(algo: Any, inner: optax.GradientTransformation, params: Any,
                         key: jax.Array) -> tuple[Any, optax.GradientTransformationExtraArgs]:
    """(sparse-initialised params, ``sj.sparse_optimizer(inner, algo, ...)``) for dense initial ``params``.

    Masks come from ``algo.init_masks``, weights from ``algo.init_params`` (both compiled: op-by-op they would
    compile every layer separately); the optimizer gets the masks and its own mask-update key.
    """
    mask_key, param_key, opt_key = jax.random.split(key, 3)
    masks = jax.jit(algo.init_masks)(params, mask_key)
    params = jax.jit(algo.init_params)(params, masks, param_key)
    return params, sj.sparse_optimizer(inner, algo, masks=masks, key=opt_key)


def init_train_state(tx: optax.GradientTransformation, params: Any, model_state: Any,
                     key: jax.Array) -> TrainState:
    """Step 0: ``tx.init(params)`` (for a sparse optimizer this holds the initial masks), ITOP = initial masks."""
    opt_state = tx.init(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        itop=sj.init_itop(sj.get_masks(opt_state)),
        model_state={} if model_state is None else model_state,
        rng=key,
    )


def forward_key(state: TrainState) -> jax.Array:
    """The forward-pass (dropout) key of ``state.step``: a function of ``(rng, step)`` only."""
    return jax.random.fold_in(state.rng, state.step)


def device_mean(tree: Any, axis_name: str) -> Any:
    """Mean of every (float) leaf over the devices of ``axis_name``, each element summed in one fixed order
    (device 0, 1, 2, ...): values equal on every device stay equal. Use inside ``pmap`` / ``shard_map``.

    ``lax.pmean`` does not promise that: XLA's cross-process all-reduce on CPU (gloo) is a ring that adds each
    chunk of a buffer starting at another device, so a value equal on every device can come out 1 ulp apart
    in different chunks. Growth scores that tie exactly (MNIST's constant background pixels give equal
    gradients) are then ordered by where they sit in the buffer instead of by index, and a multi-process run
    picks other weights than a single-process one. Here ``all_to_all`` hands every device one part of every
    device's values (no arithmetic), each device adds its part in device order, and ``all_gather`` joins the
    parts: the communication of a ring all-reduce (reduce-scatter + all-gather), with the order made explicit.
    """
    n = lax.axis_size(axis_name)

    def one(x: jax.Array) -> jax.Array:
        part = -(-x.size // n)
        flat = jnp.pad(x.reshape(-1), (0, part * n - x.size)).reshape(n, part)
        parts = lax.all_to_all(flat, axis_name, 0, 0)   # parts[j]: device j's values of this device's part
        total = functools.reduce(lambda acc, j: acc + parts[j], range(1, n), parts[0])
        return lax.all_gather(total / n, axis_name, tiled=True)[:x.size].reshape(x.shape).astype(x.dtype)

    return jax.tree.map(lambda x: one(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def _pmean_floats(tree: Any, axis_name: str) -> Any:
    """Average the float leaves over ``axis_name``; integer leaves (counters) are identical and kept."""
    return jax.tree.map(
        lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) else x, tree)


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"batch['label'] must hold integer class ids of shape {logits.shape[:-1]} "
                         f"(logits {logits.shape}), got shape {labels.shape}")


def _train_step_body(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation,
                     axis_name: str | None) -> tuple[TrainState, dict]:
    """The one training step every mode runs. ``axis_name`` is set only under ``pmap`` (explicit averaging)."""
    key = forward_key(state)
    if axis_name is not None:
        # Stochastic layers (dropout) must differ between devices, which see different examples. The mask-update
        # key lives in the (replicated) optimizer state, so every replica takes the same mask decision.
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, logits)), grads = grad_fn(state.params, state.model_state, batch, key)
    _check_labels(logits, batch["label"])
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32))
    if axis_name is not None:
        # Average before scoring: growth scores and therefore masks must be identical on every device, and
        # exact ties between them must survive the average as in a single-process run (see device_mean).
        grads = device_mean(grads, axis_name)
        loss, accuracy = lax.pmean((loss, accuracy), axis_name)
        model_state = _pmean_floats(model_state, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    info = sj.get_sparse_state(opt_state).info
    # A skipped (NaN/Inf) step must not leak into BatchNorm statistics either.
    model_state = jax.tree.map(lambda old, new: jnp.where(info.nonfinite, old, new), state.model_state,
                               model_state)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        itop=sj.update_itop(state.itop, sj.get_masks(opt_state)),
        model_state=model_state,
    )
    metrics = {"loss": loss, "accuracy": accuracy, "nonfinite": info.nonfinite, "updated": info.updated}
    return new_state, metrics


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def make_mesh(axis_name: str = "batch", devices: Any = None) -> Mesh:
    """1-D data-parallel mesh over ``devices`` (default: all devices; on one host these are the local ones)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def _resolve_mesh(mesh: Mesh | None, axis_name: str) -> Mesh:
    mesh = make_mesh(axis_name) if mesh is None else mesh
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} do not include the batch axis {axis_name!r}")
    return mesh


def _first_replica(tree: Any) -> Any:
    """Device 0's copy of a pmap output whose replicas are equal (lazy: no host sync)."""
    return jax.tree.map(lambda x: x[0], tree)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mode: Mode = "single",
                    mesh: Mesh | None = None, axis_name: str = "batch",
                    donate: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Compiled ``step_fn(state, batch) -> (state, metrics)`` for ``mode``.

    ``state`` must be placed with :func:`put_state` and ``batch`` with :func:`shard_batch` (same ``mode``).
    ``metrics`` (device scalars, no host sync): ``loss`` and ``accuracy`` (global-batch means, before the
    update), ``nonfinite`` (bool: NaN/Inf seen, the step was skipped: params, masks, optimizer and model state
    kept) and ``updated`` (bool: the masks were updated this step). Under ``pmap`` the
    returned state keeps its device axis; metrics are taken from device 0 (all replicas are equal).
    ``donate``: reuse the input state's buffers (do not touch the old state after the call).
    """
    _check_mode(mode)
    donate_argnums = (0,) if donate else ()
    body = functools.partial(_train_step_body, loss_fn=loss_fn, tx=tx,
                             axis_name=axis_name if mode == "pmap" else None)
    if mode == "single":
        return jax.jit(body, donate_argnums=donate_argnums)
    if mode == "sharded":
        mesh = _resolve_mesh(mesh, axis_name)
        replicated = NamedSharding(mesh, PartitionSpec())
        split = NamedSharding(mesh, PartitionSpec(axis_name))
        return jax.jit(body, in_shardings=(replicated, split), out_shardings=(replicated, replicated),
                       donate_argnums=donate_argnums)
    pmapped = jax.pmap(body, axis_name=axis_name, donate_argnums=donate_argnums)

    def pmap_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        state, metrics = pmapped(state, batch)
        return state, _first_replica(metrics)

    pmap_step.pmapped = pmapped  # the underlying pmapped function, e.g. for lowering/inspection
    return pmap_step


def _eval_step_body(state: TrainState, batch: Batch, *, apply_fn: ApplyFn, axis_name: str | None) -> dict:
    """Sums over the batch (so partial batches combine exactly): correct predictions, CE loss, example count."""
    logits = apply_fn(state.params, state.model_state, batch)
    labels = batch["label"]
    _check_labels(logits, labels)
    valid = batch.get("valid", jnp.ones(labels.shape, bool)).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    sums = {"correct": jnp.sum((jnp.argmax(logits, axis=-1) == labels) * valid),
            "loss": jnp.sum(ce * valid), "count": jnp.sum(valid)}
    return lax.psum(sums, axis_name) if axis_name is not None else sums


def make_eval_step(apply_fn: ApplyFn, mode: Mode = "single", mesh: Mesh | None = None,
                   axis_name: str = "batch") -> Callable[[TrainState, Batch], dict]:
    """Compiled ``eval_fn(state, batch) -> {"correct", "loss", "count"}``: float sums over the (global) batch.

    Accuracy = sum(correct) / sum(count), mean loss = sum(loss) / sum(count) over all eval batches. An optional
    ``batch["valid"]`` (0/1 per example, see :func:`pad_batch`) excludes padding from every sum.
    """
    _check_mode(mode)
    body = functools.partial(_eval_step_body, apply_fn=apply_fn, axis_name=axis_name if mode == "pmap" else None)
    if mode == "single":
        return jax.jit(body)
    if mode == "sharded":
        mesh = _resolve_mesh(mesh, axis_name)
        return jax.jit(body, in_shardings=(NamedSharding(mesh, PartitionSpec()),
                                           NamedSharding(mesh, PartitionSpec(axis_name))),
                       out_shardings=NamedSharding(mesh, PartitionSpec()))
    pmapped = jax.pmap(body, axis_name=axis_name)
    return lambda state, batch: _first_replica(pmapped(state, batch))


def pad_batch(batch: Batch, multiple: int) -> Batch:
    """Pad every array's leading axis up to a multiple of ``multiple`` and add ``valid`` (1 real, 0 padding).

    Use on the last, short eval batch so it splits evenly over devices and keeps a static shape.
    """
    n = _batch_size(batch)
    padded = -(-n // multiple) * multiple
    out = {k: np.concatenate([np.asarray(v), np.zeros((padded - n,) + np.shape(v)[1:], np.asarray(v).dtype)])
           for k, v in batch.items()}
    out["valid"] = np.concatenate([np.asarray(batch.get("valid", np.ones(n, bool)), bool),
                                   np.zeros(padded - n, bool)])
    return out


def _batch_size(batch: Batch) -> int:
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch arrays must share one leading (example) axis, got leading sizes {sizes}")
    return next(iter(sizes.values()))


def _pmap_mesh(axis_name: str) -> Mesh:
    """The layout ``jax.pmap`` uses for its mapped axis: local devices in pmap order."""
    return Mesh(np.asarray(jax.local_devices()), (axis_name,))


def shard_batch(batch: Batch, mode: Mode = "single", mesh: Mesh | None = None, axis_name: str = "batch") -> Batch:
    """Place a host batch (this process's examples) for ``mode``; the leading axis must split evenly.

    single: put on the default device. pmap: reshape to ``(n_local_devices, per_device, ...)`` and put shard i on
    device i. sharded: a global array split along ``axis_name`` of ``mesh``; with several processes each one
    passes its own slice of the global batch (``jax.make_array_from_process_local_data``).
    """
    _check_mode(mode)
    n = _batch_size(batch)
    if mode == "single":
        return jax.device_put(batch)
    if mode == "pmap":
        n_dev = jax.local_device_count()
        if n % n_dev:
            raise ValueError(f"batch size {n} is not divisible by the {n_dev} local devices (see pad_batch)")
        sharding = NamedSharding(_pmap_mesh(axis_name), PartitionSpec(axis_name))
        return {k: jax.device_put(np.reshape(v, (n_dev, n // n_dev) + np.shape(v)[1:]), sharding)
                for k, v in batch.items()}
    mesh = _resolve_mesh(mesh, axis_name)
    n_shards = mesh.shape[axis_name]
    n_global = n * jax.process_count()
    if n_global % n_shards:
        raise ValueError(f"global batch size {n_global} is not divisible by the {n_shards} devices of mesh axis "
                         f"{axis_name!r} (see pad_batch)")
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
    return jax.device_put(batch, sharding)


def replicate(tree: Any, axis_name: str = "batch") -> Any:
    """Copy every leaf to each local device, stacked on a new leading device axis (pmap's input layout)."""
    devices = jax.local_devices()
    sharding = NamedSharding(_pmap_mesh(axis_name), PartitionSpec(axis_name))

    def one(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        return jax.make_array_from_single_device_arrays(
            (len(devices),) + x.shape, sharding, [jax.device_put(x[None], d) for d in devices])

    return jax.tree.map(one, tree)


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a replicated tree (inverse of :func:`replicate`)."""
    def one(x: jax.Array) -> jax.Array:
        shards = getattr(x, "addressable_shards", None)
        if shards and shards[0].data.shape[:1] == (1,) and x.shape[0] == len(shards):
            return shards[0].data[0]   # avoids gathering all copies
        return x[0]

    return jax.tree.map(one, tree)


def put_state(state: TrainState, mode: Mode = "single", mesh: Mesh | None = None,
              axis_name: str = "batch") -> TrainState:
    """Place a state for ``mode``: on the default device, replicated per device (pmap) or over the mesh.

    Always returns fresh buffers, never aliases of ``state``'s (or of each other: e.g. initial ``itop`` may be
    ``masks``), because the train step donates its input state.
    """
    _check_mode(mode)
    if mode == "pmap":
        return replicate(state, axis_name)
    target = None if mode == "single" else NamedSharding(_resolve_mesh(mesh, axis_name), PartitionSpec())
    # Copy first: device_put to a replicated sharding reuses the source buffer on its device (even with
    # may_alias=False), so two leaves holding the same array would share one donated buffer.
    return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), target), state)


def get_state(state: TrainState, mode: Mode = "single") -> TrainState:
    """One copy of a placed state (for checkpoints, eval on the host, inspection): inverse of :func:`put_state`."""
    _check_mode(mode)
    return unreplicate(state) if mode == "pmap" else state
