"""Orbax checkpointing of a whole training run: the TrainState pytree plus a JSON record.

A checkpoint holds two items: ``state`` (step, params, masks, optimizer state, growth-gradient accumulator,
ITOP, model state such as BatchNorm statistics, RNG key; saved with ``StandardSave``) and ``meta`` (JSON:
the data-iterator position, the config fingerprint, the best eval accuracy so far). Retention: the last
``keep_last`` checkpoints plus the best one by eval accuracy (orbax preservation policies).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

# Config fields that must match between a checkpoint and the run resuming from it (others, such as
# eval_every, workdir or stop_after, may change across a resume).
COMPAT_FIELDS = ("model", "model_kwargs", "dataset", "train_subset", "batch_size", "optimizer", "method",
                 "sparsity", "distribution", "delta_t", "gamma_sal", "grad_accumulation_steps",
                 "dense_first_layer", "seed", "mode")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or does not belong to this run (nothing was overwritten)."""


def config_fingerprint(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The JSON-normalised config fields that must match on resume."""
    return json.loads(json.dumps({k: cfg_dict.get(k) for k in COMPAT_FIELDS}))


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], accuracy: float | None = None) -> None:
        """Save ``state`` and ``meta`` at ``step``; ``accuracy`` (eval) ranks it for keep-the-best."""
        metrics = None if accuracy is None else {"accuracy": float(accuracy)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def best_step(self) -> int | None:
        """The kept step with the highest eval accuracy (None if no checkpoint has one)."""
        scored = [(m["accuracy"], s) for s in self.all_steps() if (m := self.manager.metrics(s))]
        return max(scored)[1] if scored else None

    def restore(self, abstract_state: Any, step: int | None = None,
                expected_fingerprint: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore (state, meta) at ``step`` (default: latest) onto the structure of ``abstract_state``.

        Raises CheckpointError, naming the directory, when the checkpoint is unreadable, its config does not
        match ``expected_fingerprint``, or its arrays do not fit ``abstract_state``.
        """
        step = self.latest_step() if step is None else step
        where = self.directory / str(step)
        hint = (f"Refusing to continue (nothing was overwritten). Move {self.directory} away or pass a "
                f"different --workdir to start fresh.")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for missing/garbled files
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable (meta: {type(e).__name__}: "
                                  f"{e}). {hint}") from e
        if expected_fingerprint is not None:
            saved = meta.get("fingerprint", {})
            diff = {k: (saved.get(k), v) for k, v in expected_fingerprint.items() if saved.get(k) != v}
            if diff:
                lines = ", ".join(f"{k}: checkpoint={a!r} run={b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"checkpoint {where} was written by an incompatible run ({lines}). {hint}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
            state = state["state"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is corrupt or does not fit this model/optimizer "
                                  f"({type(e).__name__}: {str(e)[:500]}). {hint}") from e
        _check_shapes(state, target, where, hint)
        return state, meta

    def close(self) -> None:
        self.manager.close()


def _check_shapes(state: Any, target: Any, where: Path, hint: str) -> None:
    """Orbax may silently reshape/cast on restore; a mismatch here means the checkpoint is incompatible."""
    bad = [f"{jax.tree_util.keystr(p)}: {np.shape(a)} {np.asarray(a).dtype if a is not None else ''} vs "
           f"{t.shape} {t.dtype}"
           for (p, a), t in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(target))
           if np.shape(a) != tuple(t.shape)]
    if bad:
        raise CheckpointError(f"checkpoint {where} has arrays of other shapes than this run: {bad[:5]}. {hint}")
