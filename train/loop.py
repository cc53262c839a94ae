"""The training loop: build model/data/algorithm/optimizer from a Config, train, evaluate, checkpoint, log."""
from __future__ import annotations

import dataclasses
import json
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
from train import report
from train.checkpoint import Checkpointer, config_fingerprint
from train.configs import Config, resolve_steps
from train.models import ModelSpec, build_model, init_variables
from train.steps import TrainState, get_state, init_sparse_training, init_train_state, make_eval_step, \
    make_train_step, put_state, shard_batch


class NonFiniteError(RuntimeError):
    """NaN/Inf appeared in the loss or gradients; training stopped (the last good checkpoint is kept)."""


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns: the summary dict (also in summary.json) and the final host-side state."""

    summary: dict[str, Any]
    state: TrainState


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
    for batch in data_lib.eval_batches(source, cfg.eval_batch_size, bundle.mean, bundle.std):
        sums = eval_fn(state, shard_batch(batch, cfg.mode))
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
    iterator = data_lib.BatchIterator(bundle.train, cfg.batch_size, cfg.seed, bundle.mean, bundle.std)
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


def train(cfg: Config) -> RunResult:
    """Run (or resume) the training described by ``cfg``; returns the summary and final state."""
    t_start = time.time()
    workdir = Path(cfg.workdir) if cfg.workdir else default_workdir(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg)
    bundle, iterator, total_steps, algo, tx, plans, schedule = (run.bundle, run.iterator, run.total_steps,
                                                               run.algo, run.tx, run.plans, run.schedule)
    state = run.state

    cfg_dict = dataclasses.asdict(cfg)
    fingerprint = config_fingerprint(cfg_dict)
    ckpt = Checkpointer(workdir / "checkpoints", keep_last=cfg.keep_checkpoints)
    best = {"accuracy": None, "step": None}
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        state, meta = ckpt.restore(state, resume_step, fingerprint)
        iterator.restore(meta["data_position"])
        best = meta.get("best", best)
    (workdir / "config.json").write_text(json.dumps(cfg_dict, indent=2, default=str))
    log = report.MetricsLog(workdir / "metrics.jsonl", resume_step)

    state = put_state(state, cfg.mode)
    step_fn = make_train_step(run.loss_fn, tx, mode=cfg.mode)
    eval_fn = make_eval_step(run.apply_fn, mode=cfg.mode)
    metrics_fn = jax.jit(lambda masks, itop: {**sj.sparsity_metrics(masks, plans),
                                              "itop_rate": sj.itop_rate(itop, plans)})
    has_sparse = any(not p.is_dense for p in plans.values())

    def mask_metrics(host_state: TrainState) -> dict[str, Any]:
        m = jax.device_get(metrics_fn(host_state.masks, host_state.itop))
        if not has_sparse:  # dense run: every neuron is active by construction
            m["active_neuron_fraction"] = 1.0
        return m

    start = int(jax.device_get(get_state(state, cfg.mode).step))
    end = total_steps if cfg.stop_after is None else min(total_steps, cfg.stop_after)
    bad_steps = jnp.zeros((), jnp.int32)  # device counter: no host sync per step
    last_good_ckpt = resume_step
    last = {}
    bar = tqdm(total=end, initial=start, desc=f"{cfg.name} {cfg.method}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    for step in range(start + 1, end + 1):
        batch = shard_batch(next(iterator), cfg.mode)
        state, metrics = step_fn(state, batch)
        bad_steps = bad_steps + metrics["nonfinite"]
        bar.update(1)
        do_eval = step % cfg.eval_every == 0 or step == end
        do_ckpt = do_eval or step % cfg.ckpt_every == 0 or step == end
        if not (do_eval or do_ckpt or step % cfg.log_every == 0):
            continue
        host_metrics, n_bad = jax.device_get((metrics, bad_steps))
        host_state = get_state(state, cfg.mode)
        sparsity = mask_metrics(host_state)
        record = {"step": step, "epoch": step / iterator.batches_per_epoch, "lr": float(schedule(step - 1)),
                  "loss": float(host_metrics["loss"]), "train_accuracy": float(host_metrics["accuracy"]),
                  "global_sparsity": sparsity["global_sparsity"],
                  "active_neuron_fraction": sparsity["active_neuron_fraction"],
                  "itop_rate": sparsity["itop_rate"], "nonfinite_steps": int(n_bad)}
        if n_bad or not np.isfinite(record["loss"]):
            log.write(record)
            bar.close()
            where = f"step {last_good_ckpt} in {ckpt.directory}" if last_good_ckpt is not None else "none saved"
            raise NonFiniteError(
                f"NaN/Inf in the loss or gradients: {int(n_bad)} step(s) between step {start} and {step} were "
                f"non-finite (loss now {record['loss']}); stopped instead of training on garbage. Last good "
                f"checkpoint: {where}. Try a lower --lr or gradient clipping (--grad_clip_norm).")
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
            meta = {"data_position": iterator.position(), "fingerprint": fingerprint, "best": best,
                    "config": json.loads(json.dumps(cfg_dict, default=str))}
            ckpt.save(step, host_state, meta, accuracy=record.get("test_accuracy"))
            last_good_ckpt = step
    bar.close()

    final_state = jax.device_get(get_state(state, cfg.mode))
    if not last or "test_accuracy" not in last:  # resumed at the end (or no steps): evaluate once
        last = {"step": start, **evaluate(eval_fn, state, bundle.test, cfg, bundle)}
        sparsity = mask_metrics(final_state)
        last.update(global_sparsity=sparsity["global_sparsity"],
                    active_neuron_fraction=sparsity["active_neuron_fraction"], itop_rate=sparsity["itop_rate"],
                    layers=layer_stats(sparsity, plans))
    summary = {"config": cfg.name, "method": cfg.method, "sparsity": cfg.sparsity, "seed": cfg.seed,
               "steps": int(final_state.step), "total_steps": total_steps, "finished": end == total_steps,
               "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
               "best_accuracy": best["accuracy"], "best_step": best["step"],
               "global_sparsity": float(last["global_sparsity"]),
               "active_neuron_fraction": float(last["active_neuron_fraction"]),
               "itop_rate": float(last["itop_rate"]), "train_seconds": round(time.time() - t_start, 1),
               "workdir": str(workdir), "layers": last["layers"]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    report.plot_metrics(report.read_metrics(workdir / "metrics.jsonl"), workdir / "training.png",
                        title=f"{cfg.name} {cfg.method} S={cfg.sparsity:g} seed {cfg.seed}")
    ckpt.close()
    return RunResult(summary, final_state)
