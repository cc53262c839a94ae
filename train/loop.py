"""The training loop: build model/data/algorithm/optimizer from a Config, train, evaluate, checkpoint, log."""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import srigl_jax as sj
from train import data as data_lib
from train import distributed
from train import report
from train.checkpoint import CheckpointError, Checkpointer, IncompatibleRunError, config_fingerprint
from train.configs import IDENTITY_FIELDS, SCHEDULE_FIELDS, Config, ConfigError, flag_name, resolve_steps, \
    show_value
from train.models import ModelSpec, build_model, init_variables
from train.steps import TrainState, get_state, init_sparse_training, init_train_state, make_eval_step, \
    make_train_step, put_state, shard_batch


class NonFiniteError(RuntimeError):
    """NaN/Inf appeared in the loss or gradients; training stopped (the last good checkpoint is kept)."""


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns: the summary dict (also in summary.json) and the final host-side state.

    ``status``: "finished", "stopped" (--stop-after), "interrupted" (SIGINT/SIGTERM: ``signal`` is set, no
    evaluation, summary.json untouched) or "already_complete" (the stored summary; ``state`` is None and nothing
    was written). ``checkpoint``: the checkpoint the run ended on (None if none was written)."""

    summary: dict[str, Any]
    state: TrainState | None
    status: str = "finished"
    signal: int | None = None
    checkpoint: Path | None = None


# What a workdir holds; a non-empty folder with none of these is not a run's and is never written into.
RUN_FILES = ("checkpoints", "config.json", "metrics.jsonl", "summary.json", "training.png", "damaged-checkpoints")


def default_workdir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.name}-{cfg.method}-{cfg.sparsity:g}-s{cfg.seed}"


def make_algo(cfg: Config, spec: ModelSpec, total_steps: int) -> sj.DynamicSparsity:
    """The sparse-training algorithm of ``cfg.method`` with the model's declared layers.

    "dense" is Static at sparsity 0 (all-True masks, the same code path). ``dense_first_layer`` names the
    model's first layer by its regex (``spec.first_layer``). ``sparsity_over="sparse"`` is the library's
    ``distribution="uniform_sparse"``: every non-dense layer at exactly ``sparsity``.
    """
    distribution = "uniform_sparse" if cfg.sparsity_over == "sparse" else cfg.distribution
    common = dict(distribution=distribution, dense_paths=tuple(sj.DEFAULT_DENSE_PATHS) + tuple(spec.dense_paths),
                  dense_first_layer=spec.first_layer if cfg.dense_first_layer else False,
                  ablation_exempt=spec.ablation_exempt)
    if cfg.method == "dense":
        return sj.Static(sparsity=0.0, **common)
    dynamic = dict(common, sparsity=cfg.sparsity, delta_t=cfg.delta_t, alpha=cfg.alpha,
                   t_end=int(cfg.t_end_frac * total_steps), grad_accumulation_steps=cfg.grad_accumulation_steps)
    if cfg.method == "static":
        return sj.Static(sparsity=cfg.sparsity, **common)
    if cfg.method == "set":
        return sj.SET(**dynamic)
    if cfg.method == "rigl":
        return sj.RigL(**dynamic)
    gamma = cfg.gamma_sal if cfg.method == "srigl" else None
    return sj.SRigL(**dynamic, gamma_sal=gamma)


def make_lr_schedule(cfg: Config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning rate per step: optional linear warm-up, then step decay / cosine / constant."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.lr_schedule == "step":
        # join_schedules hands the main schedule (step - warmup), so its boundaries are shifted by warmup
        boundaries = {int(round(e * steps_per_epoch)) - warmup: cfg.lr_decay_factor for e in cfg.lr_decay_epochs}
        main = optax.piecewise_constant_schedule(cfg.lr, boundaries)
        if warmup:
            return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])
        return main
    if cfg.lr_schedule == "cosine":
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    if cfg.lr_schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose step, cosine or constant")


def make_optimizer(cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The inner optimizer of the sparse one: optional global-norm clipping, then SGD+momentum with L2 weight
    decay, or AdamW (``sj.sparse_optimizer`` masks its gradients and updates)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    if cfg.optimizer == "sgd":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.optimizer == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")
    return optax.chain(*parts)


def make_model_fns(model: nn.Module, label_smoothing: float) -> tuple[Callable, Callable]:
    """(loss_fn, apply_fn) in the train.steps contract. model_state holds e.g. {"batch_stats": ...}."""

    def loss_fn(params, model_state, batch, rng):
        variables = {"params": params, **model_state}
        if model_state:
            logits, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng},
                                            mutable=list(model_state.keys()))
        else:
            logits, new_state = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng}), {}
        n_cls = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], n_cls), label_smoothing)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        return loss, (dict(new_state), logits)

    def apply_fn(params, model_state, batch):
        return model.apply({"params": params, **model_state}, batch["image"], train=False)

    return loss_fn, apply_fn


def evaluate(eval_fn: Callable, state: TrainState, source: data_lib.ExampleSource, cfg: Config,
             bundle: data_lib.DataBundle) -> dict[str, float]:
    """Test accuracy and mean loss over the whole test set."""
    totals = None
    for batch in data_lib.eval_batches(source, cfg.eval_batch_size, bundle.mean, bundle.std,
                                       jax.process_index(), jax.process_count()):
        sums = eval_fn(state, shard_batch(batch, cfg.mode))
        if jax.process_count() > 1:  # one cross-process reduction in flight at a time
            sums = jax.block_until_ready(sums)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return {"test_accuracy": float(totals["correct"] / totals["count"]),
            "test_loss": float(totals["loss"] / totals["count"])}


def layer_stats(sparsity: dict[str, Any], plans: dict[str, sj.LayerPlan]) -> dict[str, dict[str, Any]]:
    """Per-layer sparsity / active neurons / fan-in from a ``sj.sparsity_metrics`` result (host values)."""
    out = {}
    for path, plan in plans.items():
        fan_min = int(sparsity[f"fan_in_min/{path}"])
        out[path] = {"shape": list(plan.shape), "n_neurons": plan.n_neurons, "dense": plan.is_dense,
                     "sparsity": float(sparsity[f"sparsity/{path}"]),
                     "active_neurons": int(sparsity[f"active_neurons/{path}"]),
                     "fan_in": int(sparsity[f"fan_in/{path}"]),
                     "fan_in_min": min(fan_min, int(sparsity[f"fan_in/{path}"]))}
    return out


@dataclasses.dataclass
class RunSetup:
    """Everything built from a Config before training starts (initial state not yet placed on devices)."""

    bundle: data_lib.DataBundle
    spec: ModelSpec
    iterator: data_lib.BatchIterator
    total_steps: int
    algo: sj.DynamicSparsity
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    loss_fn: Callable
    apply_fn: Callable
    plans: dict[str, sj.LayerPlan]
    state: TrainState


def build_run(cfg: Config) -> RunSetup:
    """Data, model, algorithm, optimizer and the initial TrainState of ``cfg`` (deterministic in cfg.seed)."""
    bundle = data_lib.load_data(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.augment, cfg.image_size,
                                cfg.train_subset)
    model, spec = build_model(cfg.model, bundle.num_classes, **cfg.model_kwargs)
    # Each process builds only its rows of every global batch (the same global batches as one process).
    iterator = data_lib.BatchIterator(bundle.train, cfg.batch_size, cfg.seed, bundle.mean, bundle.std,
                                      process_index=jax.process_index(), process_count=jax.process_count())
    total_steps = resolve_steps(cfg, iterator.batches_per_epoch)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    # One jit for each init: op-by-op initialisation would compile every initializer separately.
    variables = jax.jit(lambda k: init_variables(model, bundle.input_shape, k))(init_key)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    algo = make_algo(cfg, spec, total_steps)
    schedule = make_lr_schedule(cfg, iterator.batches_per_epoch, total_steps)
    params, tx = init_sparse_training(algo, make_optimizer(cfg, schedule), params, state_key)
    loss_fn, apply_fn = make_model_fns(model, cfg.label_smoothing)
    state = init_train_state(tx, params, model_state, jax.random.fold_in(state_key, 1))
    return RunSetup(bundle, spec, iterator, total_steps, algo, schedule, tx, loss_fn, apply_fn,
                    algo.layer_plans(params), state)


# --------------------------------------------------------------------------------------------------------------
# train(): validation before anything is written, resume / extend / already-complete, signals, fallback.


class SetupError(ValueError):
    """The config passed every check, but building model/data/algorithm from it failed (nothing written)."""


class ResumeError(IncompatibleRunError):
    """Resuming would silently change the run's schedule (or --extend cannot extend it); nothing was touched."""


def _say(message: str) -> None:
    """A status line for the person running the job (stderr, so stdout keeps only the result tables); in a
    multi-process run only process 0 speaks."""
    if distributed.is_primary():
        print(message, file=sys.stderr, flush=True)


def mask_fingerprint(masks: Any) -> jax.Array:
    """A uint32 fingerprint of a mask tree (which positions of which leaf are active), exact integer arithmetic
    (sums mod 2^32, so the reduction order does not matter): equal masks give equal fingerprints everywhere."""
    total = jnp.zeros((), jnp.uint32)
    for i, m in enumerate(jax.tree.leaves(masks)):
        idx = jnp.arange(m.size, dtype=jnp.uint32)
        h = (idx * jnp.uint32(2654435761)) ^ jnp.uint32((i * 40503 + 1) & 0xFFFFFFFF)
        h = h * jnp.uint32(2246822519) + jnp.uint32(i)
        total = total + jnp.sum(jnp.where(m.reshape(-1), h, jnp.uint32(0)), dtype=jnp.uint32)
    return total


def _validate_runtime(cfg: Config) -> None:
    """Checks that need jax or the model code (the rest is done when the Config is made); ConfigError."""
    try:
        build_model(cfg.model, None, **cfg.model_kwargs)
    except TypeError as e:
        raise ConfigError("model_kwargs", cfg.model_kwargs, f"constructor arguments of model {cfg.model}",
                          str(e).split("\n")[0]) from None
    if cfg.mode == "single" and jax.process_count() > 1:
        raise ConfigError("mode", cfg.mode, "pmap | sharded",
                          f"a run of {jax.process_count()} processes needs data parallelism over all of them")
    if cfg.mode != "single":
        n_dev = jax.local_device_count() if cfg.mode == "pmap" else jax.device_count()
        n_dev *= jax.process_count() if cfg.mode == "pmap" else 1
        for name in ("batch_size", "eval_batch_size"):
            if getattr(cfg, name) % n_dev:
                raise ConfigError(name, getattr(cfg, name), f"a multiple of the {n_dev} devices of --mode {cfg.mode}")


def _plain_config(cfg: Config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _changes(saved: dict[str, Any], now: dict[str, Any], names: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint value, run value)} for the fields of ``names`` that differ (fields the checkpoint's
    record lacks, from older versions, are not compared)."""
    return {k: (saved[k], now[k]) for k in names if k in saved and saved[k] != now[k]}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{flag_name(k)} {show_value(a)} -> {show_value(b)}" for k, (a, b) in changes.items())


def _check_resumable(meta: dict[str, Any], cfg_dict: dict[str, Any], where: Path, extend: bool
                     ) -> dict[str, tuple[Any, Any]]:
    """Raise if the run may not resume from a checkpoint with this record; return the schedule changes."""
    saved = meta.get("config")
    if not isinstance(saved, dict):  # very old record: only the fingerprint
        saved = meta.get("fingerprint", {})
    identity = _changes(saved, cfg_dict, IDENTITY_FIELDS)
    if identity:
        raise IncompatibleRunError(
            f"checkpoint {where} was written by an incompatible run ({_describe(identity)}); these fields cannot "
            f"change on resume, not even with --extend. Nothing was touched: use a new --workdir, or the "
            f"checkpoint's values.")
    schedule = _changes(saved, cfg_dict, SCHEDULE_FIELDS)
    if schedule and not extend:
        raise ResumeError(
            f"the run in {where.parent.parent} (checkpoint {where}) has another schedule ({_describe(schedule)}); "
            f"pass --extend to continue it under the new one (lr schedule and t_end recomputed for the new total, "
            f"from step {meta.get('step', where.name)}), or use a new --workdir. Nothing was touched.")
    return schedule


def _move_aside(path: Path, workdir: Path) -> Path:
    """Move a damaged checkpoint out of the manager's folder (never delete it): workdir/damaged-checkpoints/."""
    dest_dir = workdir.absolute() / "damaged-checkpoints"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, k = dest_dir / path.name, 1
    while dest.exists():
        dest, k = dest_dir / f"{path.name}-{k}", k + 1
    shutil.move(str(path), str(dest))
    return dest


class _StopOnSignal:
    """Inside the block, SIGINT/SIGTERM only set ``signum``: the loop finishes its step, checkpoints and
    returns. A second SIGINT raises KeyboardInterrupt at once (abort without saving). The previous handlers
    are restored on exit. Outside the main thread (where handlers cannot be set) nothing changes.

    Multi-process runs: no handler is installed (a stop must happen at the same step on every process). JAX's
    own SIGTERM handler (its preemption notifier) tells every process, and :meth:`poll` returns SIGTERM on all
    of them at the same step (``multihost_utils.reached_preemption_sync_point``). SIGINT keeps Python's default
    (KeyboardInterrupt: that process aborts without a checkpoint; the others stop when its heartbeats do)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def poll(self, step: int) -> int | None:
        """The signal to stop on after ``step`` (None: go on); collective in multi-process runs (every process
        calls it at every step)."""
        if self._multi:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signum = signal.SIGTERM
            except RuntimeError:  # no preemption service (e.g. initialised without it): signals not handled
                self._multi = None
        return self.signum

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread() and self._multi is False:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def train(cfg: Config, extend: bool = False) -> RunResult:
    """Run, resume or extend the training described by ``cfg``; returns the summary and final state.

    Nothing is written before every check passed: config values (ConfigError), data (DataError), the
    workdir's checkpoints against ``cfg`` (IncompatibleRunError / ResumeError / CheckpointError). A workdir
    whose run already finished with this config is reported as already complete and left untouched
    (``status="already_complete"``, ``state=None``). Schedule fields (steps/epochs, lr schedule, delta_t,
    t_end_frac, alpha) may differ from the checkpoint's only with ``extend=True``: the run then continues from
    its checkpoint to the new total, with the lr schedule and t_end recomputed for the new config (as if it had
    been the config from the start; optimizer state, masks and data position carry over). A damaged newest
    checkpoint is skipped for the newest intact one, with a warning, and moved to ``damaged-checkpoints/``.
    SIGINT/SIGTERM during the loop: the current step finishes, a checkpoint is written, ``status="interrupted"``.
    """
    t_start = time.time()
    workdir = Path(cfg.workdir) if cfg.workdir else default_workdir(cfg)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError("workdir", str(workdir), "a new or empty folder, or an earlier run's", "it is a file")
    if workdir.is_dir() and not any((workdir / n).exists() for n in RUN_FILES):
        others = sorted(p.name for p in workdir.iterdir())
        if others:  # never write run files into a folder of the user's other files
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise ConfigError("workdir", str(workdir), "a new or empty folder, or an earlier run's",
                              f"it holds other files ({shown}) and no run")
    _validate_runtime(cfg)
    cfg_dict = _plain_config(cfg)
    ckpt_dir = workdir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.keep_checkpoints) if ckpt_dir.is_dir() else None
    try:
        return _train(cfg, extend, workdir, cfg_dict, ckpt, t_start)
    finally:
        if ckpt is not None:
            ckpt.close()


def _train(cfg: Config, extend: bool, workdir: Path, cfg_dict: dict[str, Any], ckpt: Checkpointer | None,
           t_start: float) -> RunResult:
    # 1. What the workdir holds (read only).
    readable, skipped = [], []  # [(step, meta)] newest first; [(step, reason)]
    for s in sorted(ckpt.all_steps() if ckpt else [], reverse=True):
        try:
            readable.append((s, ckpt.read_meta(s)))
        except CheckpointError as e:
            skipped.append((s, str(e)))
    if skipped and not readable:
        raise CheckpointError(f"no usable checkpoint in {ckpt.directory}: " + " ".join(r for _, r in skipped) +
                              f" Nothing was touched; move {workdir} away or pass a different --workdir.")
    schedule_changes: dict[str, tuple[Any, Any]] = {}
    if readable:
        newest, meta = readable[0]
        schedule_changes = _check_resumable(meta, cfg_dict, ckpt.step_dir(newest), extend)
        summary_file = workdir / "summary.json"
        if not schedule_changes and summary_file.is_file():
            try:
                stored = json.loads(summary_file.read_text())
            except ValueError:
                stored = {}
            if stored.get("steps") == newest and stored.get("finished"):
                return RunResult(stored, None, status="already_complete", checkpoint=ckpt.step_dir(newest))
            if stored.get("steps") == newest and cfg.stop_after is not None and newest >= cfg.stop_after:
                # the same --stop-after again: already stopped there, nothing to do either
                return RunResult(stored, None, status="stopped", checkpoint=ckpt.step_dir(newest))

    # 2. Build (data, model, algorithm, optimizer, initial state): still nothing written.
    try:
        run = build_run(cfg)
    except (ValueError, TypeError) as e:  # a combination the checks above do not know (e.g. model vs input)
        if isinstance(e, ConfigError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"cannot build this run from its flags ({type(e).__name__}: {first}); nothing was "
                         f"written. Check --model/--model-kwargs against --dataset.") from e
    iterator, total_steps, state = run.iterator, run.total_steps, run.state

    # 3. Restore the newest intact checkpoint (older ones if the newest are damaged).
    resume_step, meta = None, {}
    for s, m in readable:
        changes = _check_resumable(m, cfg_dict, ckpt.step_dir(s), extend)
        if s >= total_steps and changes:
            raise ResumeError(
                f"--extend: the run in {workdir} is at step {s}, and the new schedule ends at step {total_steps}; "
                f"give a larger --steps/--epochs to extend it. Nothing was touched.")
        try:
            state, meta = ckpt.restore(state, s)
        except IncompatibleRunError:
            raise
        except CheckpointError as e:
            skipped.append((s, str(e).replace(" " + ckpt._hint(), "")))
            continue
        resume_step, schedule_changes = s, changes
        break
    if readable and resume_step is None:
        raise CheckpointError(f"no usable checkpoint in {ckpt.directory}: " + " ".join(r for _, r in skipped) +
                              f" Nothing was touched; move {workdir} away or pass a different --workdir.")

    # 4. From here on the run writes: move damaged checkpoints aside (never deleted), create the workdir.
    for s, reason in sorted(skipped, reverse=True):
        if distributed.is_primary():
            dest = _move_aside(ckpt.step_dir(s), workdir)
            _say(f"warning: {reason.rstrip('.')}; skipped it and moved it to {dest} (nothing deleted).")
    if skipped:  # the manager caches its step list (and every process waits until process 0 moved them)
        distributed.barrier("damaged checkpoints moved aside")
        ckpt.close()
        ckpt = None
    if resume_step is not None:
        iterator.restore(meta["data_position"])
        where = (workdir / "checkpoints" / str(resume_step)).absolute()
        _say(f"resuming from step {resume_step} of {total_steps} (checkpoint {where})"
             + (f"; --extend: {_describe(schedule_changes)}" if schedule_changes else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    own_ckpt = ckpt is None
    if own_ckpt:
        ckpt = Checkpointer(workdir / "checkpoints", keep_last=cfg.keep_checkpoints)
    try:
        return _run_loop(cfg, workdir, cfg_dict, ckpt, run, state, meta, resume_step, schedule_changes, t_start)
    finally:
        if own_ckpt:
            ckpt.close()


def _run_loop(cfg: Config, workdir: Path, cfg_dict: dict[str, Any], ckpt: Checkpointer, run: RunSetup,
              state: TrainState, meta: dict[str, Any], resume_step: int | None,
              schedule_changes: dict[str, tuple[Any, Any]], t_start: float) -> RunResult:
    bundle, iterator, total_steps, tx, plans, schedule = (run.bundle, run.iterator, run.total_steps, run.tx,
                                                         run.plans, run.schedule)
    fingerprint = config_fingerprint(cfg_dict)
    best = meta.get("best", {"accuracy": None, "step": None})
    seconds_before = float(meta.get("train_seconds", 0.0))
    extensions = list(meta.get("extensions", []))
    if schedule_changes:
        extensions.append({"at_step": resume_step, "changed": {k: list(v) for k, v in schedule_changes.items()}})
    primary = distributed.is_primary()  # only process 0 writes the run's files and prints
    if primary:
        (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        log = report.MetricsLog(workdir / "metrics.jsonl", resume_step)
    else:
        log = report.NullLog()

    state = put_state(state, cfg.mode)
    step_fn = make_train_step(run.loss_fn, tx, mode=cfg.mode)
    eval_fn = make_eval_step(run.apply_fn, mode=cfg.mode)
    metrics_fn = jax.jit(lambda masks, itop: {**sj.sparsity_metrics(masks, plans),
                                              "itop_rate": sj.itop_rate(itop, plans),
                                              "mask_fingerprint": mask_fingerprint(masks)})
    has_sparse = any(not p.is_dense for p in plans.values())

    def mask_metrics(host_state: TrainState) -> dict[str, Any]:
        m = jax.device_get(metrics_fn(host_state.masks, host_state.itop))
        if not has_sparse:  # dense run: every neuron is active by construction
            m["active_neuron_fraction"] = 1.0
        return m

    start = int(jax.device_get(get_state(state, cfg.mode).step))
    end = total_steps if cfg.stop_after is None else max(start, min(total_steps, cfg.stop_after))
    bad_steps = jnp.zeros((), jnp.int32)  # device counter: no host sync per step
    # pmap across processes: one step in flight at a time (with several in flight, runs of 2 processes on CPU
    # occasionally deadlocked in the cross-process reduction; "sharded" keeps asynchronous dispatch).
    sync_each_step = cfg.mode == "pmap" and jax.process_count() > 1
    last_good_ckpt = resume_step
    last = {}
    interrupted = None
    bar = tqdm(total=end, initial=start, desc=f"{cfg.name} {cfg.method}", unit="step",
               disable=not (cfg.progress and primary), dynamic_ncols=True)
    with _StopOnSignal() as stop:
        for step in range(start + 1, end + 1):
            batch = shard_batch(next(iterator), cfg.mode)
            state, metrics = step_fn(state, batch)
            if sync_each_step:
                state = jax.block_until_ready(state)
            bad_steps = bad_steps + metrics["nonfinite"]
            bar.update(1)
            interrupted = stop.poll(step)
            do_eval = step % cfg.eval_every == 0 or step == end
            do_ckpt = do_eval or step % cfg.ckpt_every == 0 or step == end or interrupted is not None
            if not (do_eval or do_ckpt or step % cfg.log_every == 0):
                continue
            host_metrics, n_bad = jax.device_get((metrics, bad_steps))
            host_state = get_state(state, cfg.mode)
            sparsity = mask_metrics(host_state)
            record = {"step": step, "epoch": step / iterator.batches_per_epoch, "lr": float(schedule(step - 1)),
                      "loss": float(host_metrics["loss"]), "train_accuracy": float(host_metrics["accuracy"]),
                      "global_sparsity": sparsity["global_sparsity"],
                      "active_neuron_fraction": sparsity["active_neuron_fraction"],
                      "itop_rate": sparsity["itop_rate"], "nonfinite_steps": int(n_bad),
                      "mask_fingerprint": int(sparsity["mask_fingerprint"])}
            if jax.process_count() > 1:  # every process must hold the same masks: check, and record the proof
                record["mask_fingerprints"] = distributed.check_masks_agree(record["mask_fingerprint"], step)
            if n_bad or not np.isfinite(record["loss"]):
                log.write(record)
                bar.close()
                where = f"step {last_good_ckpt} in {ckpt.directory}" if last_good_ckpt is not None else "none saved"
                raise NonFiniteError(
                    f"NaN/Inf in the loss or gradients: {int(n_bad)} step(s) between step {start} and {step} were "
                    f"non-finite (loss now {record['loss']}); stopped instead of training on garbage. Last good "
                    f"checkpoint: {where}. Try a lower --lr or gradient clipping (--grad-clip-norm).")
            if do_eval:
                record.update(evaluate(eval_fn, state, bundle.test, cfg, bundle))
                record["layers"] = layer_stats(sparsity, plans)
                if best["accuracy"] is None or record["test_accuracy"] > best["accuracy"]:
                    best = {"accuracy": record["test_accuracy"], "step": step}
            log.write(record)
            last = record
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}",
                            **({"test": f"{record['test_accuracy']:.3f}"} if do_eval else {}))
            if do_ckpt:
                meta = {"step": step, "total_steps": total_steps, "data_position": iterator.position(),
                        "fingerprint": fingerprint, "best": best, "config": cfg_dict,
                        "train_seconds": round(seconds_before + time.time() - t_start, 1),
                        "extensions": extensions}
                ckpt.save(step, host_state, meta, accuracy=record.get("test_accuracy"))
                last_good_ckpt = step
            if interrupted is not None:
                break
    bar.close()

    final_state = jax.device_get(get_state(state, cfg.mode))
    steps_done = int(final_state.step)
    if interrupted is not None and steps_done < end:  # (at the last step the run simply finishes)
        summary = {"config": cfg.name, "method": cfg.method, "steps": steps_done, "total_steps": total_steps,
                   "finished": False, "interrupted": signal.Signals(interrupted).name,
                   "checkpoint": str(ckpt.step_dir(steps_done)), "workdir": str(workdir)}
        return RunResult(summary, final_state, status="interrupted", signal=interrupted,
                         checkpoint=ckpt.step_dir(steps_done))
    if not last or "test_accuracy" not in last:  # resumed at the end (or no steps): evaluate once
        last = {"step": start, **evaluate(eval_fn, state, bundle.test, cfg, bundle)}
        sparsity = mask_metrics(final_state)
        last.update(global_sparsity=sparsity["global_sparsity"],
                    active_neuron_fraction=sparsity["active_neuron_fraction"], itop_rate=sparsity["itop_rate"],
                    layers=layer_stats(sparsity, plans))
    finished = steps_done == total_steps
    summary = {"config": cfg.name, "method": cfg.method, "sparsity": cfg.sparsity, "seed": cfg.seed,
               "steps": steps_done, "total_steps": total_steps, "finished": finished,
               "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
               "best_accuracy": best["accuracy"], "best_step": best["step"],
               "global_sparsity": float(last["global_sparsity"]),
               "active_neuron_fraction": float(last["active_neuron_fraction"]),
               "itop_rate": float(last["itop_rate"]),
               "train_seconds": round(seconds_before + time.time() - t_start, 1),
               "workdir": str(workdir), "layers": last["layers"]}
    if extensions:
        summary["extensions"] = extensions
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        report.plot_metrics(report.read_metrics(workdir / "metrics.jsonl"), workdir / "training.png",
                            title=f"{cfg.name} {cfg.method} S={cfg.sparsity:g} seed {cfg.seed}")
    return RunResult(summary, final_state, status="finished" if finished else "stopped",
                     checkpoint=ckpt.step_dir(steps_done) if ckpt.step_dir(steps_done).is_dir() else None)
