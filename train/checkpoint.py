"""Orbax checkpointing of a whole training run: the TrainState pytree plus a JSON record.

A checkpoint holds two items: ``state`` (the TrainState: step, params, optimizer state, masks, model state such
as BatchNorm statistics, RNG key, ...; saved with ``StandardSave``) and ``meta`` (JSON: the data-iterator
position, the full config and its fingerprint, the total steps, the best eval accuracy so far, the training
seconds spent so far). Retention: the last ``keep_last`` checkpoints plus the best one by eval accuracy (orbax
preservation policies).

Errors are :class:`CheckpointError` with a one-sentence message naming the checkpoint (and the file, when one
file is at fault) and the problem; nothing is ever overwritten or deleted by a failed restore.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from train.configs import IDENTITY_FIELDS

# Config fields that must match between a checkpoint and the run resuming from it (see train.configs for the
# schedule fields, which may differ only with --extend, and the free ones).
COMPAT_FIELDS = IDENTITY_FIELDS


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or does not belong to this run (nothing was overwritten)."""


class IncompatibleRunError(CheckpointError):
    """The run's config differs from the checkpoint's in fields that may not change on resume."""


def config_fingerprint(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The JSON-normalised config fields that must match on resume."""
    return json.loads(json.dumps({k: cfg_dict.get(k) for k in COMPAT_FIELDS}, default=str))


def short_error(e: BaseException, limit: int = 240) -> str:
    """One line from an orbax/TensorStore exception: no TensorStore spec dumps, no Python reprs of specs."""
    text = str(e) or type(e).__name__
    for marker in (" [tensorstore_spec", "See full TensorStore details", "\n"):
        text = text.split(marker)[0]
    # 'Error opening "cast" driver: Error opening "zarr" driver: X' -> 'X'
    text = re.sub(r'(Error opening "\w+" driver: )+', "", text).strip().rstrip(".:")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _damage(e: BaseException, what: str) -> str:
    """'FILE is damaged (problem)' when a TensorStore message names a file, else 'WHAT cannot be read (...)'."""
    text = short_error(e, limit=100_000)
    named = list(re.finditer(r'local file "([^"]+)":?\s*', text))
    if named:
        detail = text[named[-1].end():].strip() or text
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        return f"{named[-1].group(1)} is damaged ({detail})"
    return f"{what} cannot be read ({short_error(e, 160)})"


def _is_orphan_report(unraisable) -> bool:
    """An 'Exception ignored' report left by a restore that failed part-way (see _collect_orphaned_reads)."""
    return isinstance(unraisable.object, types.CoroutineType) or (
        unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed")


_late_filter_installed = False


def _install_late_filter() -> None:
    """TensorStore reads still in flight when a restore failed complete later, on TensorStore's threads, and
    their callbacks find orbax's event loop closed ('Exception ignored in: None ... Event loop is closed'). They
    can arrive any time after the failure, so after the first failed restore this narrow filter stays in front
    of whatever hook is installed; every other unraisable exception still reaches it."""
    global _late_filter_installed
    if _late_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_orphan_report(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    _late_filter_installed = True


@contextlib.contextmanager
def _collect_orphaned_reads() -> Iterator[None]:
    """When an orbax restore fails part-way, its other array-read coroutines are never awaited and Python
    reports each one ('Exception ignored in: <coroutine ...>', under pytest ~150 lines of
    PytestUnraisableExceptionWarning) when it is garbage-collected. Collect them here, silently; every other
    unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_orphan_report(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _path_key(path: tuple) -> tuple[str, ...]:
    """A pytree key path as plain names, so that a dataclass (attribute keys) and orbax's metadata tree
    (dict keys) of the same state compare equal."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaf_specs(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    return {_path_key(p): (tuple(getattr(leaf, "shape", ())), str(np.dtype(leaf.dtype)) if
                           getattr(leaf, "dtype", None) is not None else "?")
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    """Save/restore TrainStates under ``directory`` (synchronous, so a killed run keeps finished saves)."""

    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.directory = Path(directory).absolute()
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=keep_last),
            ocm.BestN(get_metric_fn=lambda m: m["accuracy"], reverse=False, n=1,
                      keep_checkpoints_without_metrics=False),
        ])
        # best_fn is set only so that orbax writes each checkpoint's metrics to disk (the policy decides).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=False,
                                               best_fn=lambda m: m["accuracy"], best_mode="max")
        # Handlers named up front, so that item_metadata works on a manager that has not saved yet.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, meta: dict[str, Any], accuracy: float | None = None) -> None:
        """Save ``state`` and ``meta`` at ``step``; ``accuracy`` (eval) ranks it for keep-the-best."""
        metrics = None if accuracy is None else {"accuracy": float(accuracy)}
        state = _global_replicated(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def best_step(self) -> int | None:
        """The kept step with the highest eval accuracy (None if no checkpoint has one)."""
        scored = [(m["accuracy"], s) for s in self.all_steps() if (m := self.manager.metrics(s))]
        return max(scored)[1] if scored else None

    def _hint(self) -> str:
        return (f"Refusing to continue (nothing was overwritten). Move {self.directory} away or pass a "
                f"different --workdir to start fresh.")

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of ``step``; CheckpointError (one sentence, naming the file) when it is unusable."""
        where = self.step_dir(step)
        if where.is_dir() and not any(where.iterdir()):
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: it is an empty directory.")
        meta_file = where / "meta" / "metadata"
        if not meta_file.is_file():
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {meta_file} is missing "
                                  f"(an unfinished save?).")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for missing/garbled files
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {meta_file} is not valid JSON "
                                  f"({short_error(e, 120)}).") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {meta_file} holds no JSON object.")
        return meta

    def check_fits(self, step: int, abstract_state: Any) -> None:
        """Compare the stored array metadata of ``step`` with ``abstract_state`` (no array is read)."""
        where = self.step_dir(step)
        problem = None
        with _collect_orphaned_reads():
            try:
                stored = self.manager.item_metadata(step)["state"]
                stored = getattr(stored, "tree", stored)
            except Exception as e:
                problem = _damage(e, "the metadata of its state item")
        if problem is not None:
            _install_late_filter()  # after the block: it must wrap the hook the block restored
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {problem}.")
        if stored is None:
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: it has no state item "
                                  f"({where / 'state'} is missing).")
        have, want = _leaf_specs(stored), _leaf_specs(abstract_state)
        problems = [f"{'/'.join(k)} missing" for k in want if k not in have]
        problems += [f"{'/'.join(k)} unexpected" for k in have if k not in want]
        problems += [f"{'/'.join(k)} is {have[k][0]} {have[k][1]}, run needs {want[k][0]} {want[k][1]}"
                     for k in want if k in have and have[k][0] != want[k][0]]
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(f"checkpoint {where} does not fit this model/optimizer (other shapes or "
                                  f"structure: {'; '.join(problems[:3])}{more}). {self._hint()}")

    def restore(self, abstract_state: Any, step: int | None = None,
                expected_fingerprint: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) at ``step`` (default: latest) onto the structure of ``abstract_state``.

        Raises CheckpointError, naming the checkpoint (and the damaged file when known), when the checkpoint
        is unreadable, its config does not match ``expected_fingerprint``, or its arrays do not fit
        ``abstract_state``.
        """
        step = self.latest_step() if step is None else step
        where = self.step_dir(step)
        try:
            meta = self.read_meta(step)
        except CheckpointError as e:
            raise CheckpointError(f"{e} {self._hint()}") from None
        if expected_fingerprint is not None:
            saved = meta.get("fingerprint", {})
            diff = {k: (saved.get(k), v) for k, v in expected_fingerprint.items() if saved.get(k) != v}
            if diff:
                lines = ", ".join(f"{k}: checkpoint={a!r} run={b!r}" for k, (a, b) in diff.items())
                raise IncompatibleRunError(f"checkpoint {where} was written by an incompatible run ({lines}). "
                                           f"{self._hint()}")
        self.check_fits(step, abstract_state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        if jax.process_count() > 1:  # all processes read together, onto arrays replicated over every device
            replicated = _replicated_sharding()
            target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=replicated), target)
        problem = None
        with _collect_orphaned_reads():
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
                state = state["state"]
            except Exception as e:
                problem = _damage(e, "its arrays")
        if problem is not None:
            _install_late_filter()  # after the block: it must wrap the hook the block restored
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {problem}. {self._hint()}")
        _check_shapes(state, target, where, self._hint())
        if jax.process_count() > 1:  # this process's copy, as a single-process restore gives (host arrays)
            state = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x,
                                 state)
        return state, meta

    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self.manager.close()


def _replicated_sharding() -> jax.sharding.NamedSharding:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _global_replicated(state: Any) -> Any:
    """Multi-process runs: orbax saves global arrays, every process calling save together. Leaves that are
    process-local (a pmap run's unreplicated state, host arrays) become arrays replicated over all devices of
    all processes (the values are the same on every process); global ones are kept. One process: unchanged."""
    if jax.process_count() == 1:
        return state
    replicated = _replicated_sharding()

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        return jax.make_array_from_process_local_data(replicated, np.asarray(x))

    return jax.tree.map(one, state)


def _check_shapes(state: Any, target: Any, where: Path, hint: str) -> None:
    """Orbax may silently reshape/cast on restore; a mismatch here means the checkpoint is incompatible."""
    bad = [f"{jax.tree_util.keystr(p)}: {np.shape(a)} {np.asarray(a).dtype if a is not None else ''} vs "
           f"{t.shape} {t.dtype}"
           for (p, a), t in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(target))
           if np.shape(a) != tuple(t.shape)]
    if bad:
        raise CheckpointError(f"checkpoint {where} has arrays of other shapes than this run: {bad[:5]}. {hint}")
