"""End-to-end training: CLI, logs/plot/summary, NaN handling, the accuracy floor with SRigL invariants."""
import json

import jax
import numpy as np
import pytest

from train import data as data_lib
from train.__main__ import build_parser, main
from train.configs import CONFIGS, METHODS, get_config
from train.loop import NonFiniteError, make_algo, make_lr_schedule, train
from train.models import build_model, init_variables
from train.testing import TINY_RUN as TINY
from train.testing import constant_fan_in_violations


pytestmark = pytest.mark.usefixtures("compile_cache")


def _cli_args(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_cli_run_writes_log_plot_summary(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(_cli_args({**TINY, "workdir": workdir})) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "fan-in k'" in out and "fc1/kernel" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    evals = [r for r in records if "test_accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    layers = evals[-1]["layers"]
    assert set(layers) == {"fc1/kernel", "fc2/kernel", "head/kernel"}
    assert {"sparsity", "active_neurons", "fan_in", "fan_in_min"} <= set(layers["fc1/kernel"])
    assert all(0 <= r["itop_rate"] <= 1 for r in records)
    assert records[-1]["itop_rate"] >= records[0]["itop_rate"]  # ITOP only grows
    assert (workdir / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 24
    assert abs(summary["global_sparsity"] - 0.9) < 0.01

    # The same command again: "already complete", the stored summary, and not one byte changed.
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert main(_cli_args({**TINY, "workdir": workdir, "eval_every": 4})) == 0  # cadence may differ
    out = capsys.readouterr().out
    assert out.startswith(f"already complete: {workdir} finished all 24 steps")
    assert f"train time (s, all sessions)  {summary['train_seconds']:.1f}" in out
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files
    # A longer schedule without --extend: a one-line usage error naming the field; still nothing changed.
    with pytest.raises(SystemExit) as exit_info:
        main(_cli_args({**TINY, "workdir": workdir, "steps": 30}))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has another schedule (--steps 24 -> 30); pass --extend" in err
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files


def test_nonfinite_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_next = data_lib.BatchIterator.__next__

    def poisoned(self):
        batch = real_next(self)
        if self.epoch * self.batches_per_epoch + self.index >= 14:  # from step 14 on
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    monkeypatch.setattr(data_lib.BatchIterator, "__next__", poisoned)
    cfg = get_config("mnist_mlp", workdir=str(tmp_path / "nan"), **TINY)
    with pytest.raises(NonFiniteError, match=r"NaN/Inf.*Last good checkpoint: step 8"):
        train(cfg)
    steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [8]  # the check at step 16 found the bad steps: nothing saved after them


def test_srigl_mnist_accuracy_floor_and_invariants(tmp_path):
    """SRigL 90% on real MNIST: a broken mask update or optimizer masking would miss 95%."""
    cfg = get_config("mnist_mlp", method="srigl", sparsity=0.9, steps=800, delta_t=50, eval_every=800,
                     ckpt_every=800, log_every=200, workdir=str(tmp_path / "floor"), progress=False)
    result = train(cfg)
    assert result.summary["test_accuracy"] >= 0.95, result.summary["test_accuracy"]
    model, spec = build_model(cfg.model)
    params_shape = jax.eval_shape(lambda k: init_variables(model, spec.input_shape, k), jax.random.PRNGKey(0))
    plans = make_algo(cfg, spec, 800).layer_plans(params_shape["params"])
    assert constant_fan_in_violations(result.state.params, result.state.masks, plans) == []
    # masks really moved (ITOP > initial density) and the global budget holds
    assert result.summary["itop_rate"] > 0.1 + 0.01
    assert abs(result.summary["global_sparsity"] - 0.9) < 0.005


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "srigl"])
def test_every_method_trains(tmp_path, method):
    cfg = get_config("mnist_mlp", method=method, sparsity=0.95, steps=400, eval_every=400, ckpt_every=400,
                     delta_t=50, workdir=str(tmp_path / method), progress=False)
    result = train(cfg)
    assert result.summary["test_accuracy"] > 0.9
    if method == "dense":
        assert abs(result.summary["global_sparsity"]) < 1e-6  # core metrics are float32
    else:
        assert abs(result.summary["global_sparsity"] - 0.95) < 0.01


@pytest.mark.slow
def test_cifar_resnet18_tiny_runs(tmp_path):
    try:
        data_lib.find_cifar10_tarball(None)
    except data_lib.DataError:
        pytest.skip("CIFAR-10 tarball not found in ../shared/data")
    cfg = get_config("cifar10_resnet18_tiny", steps=60, eval_every=60, ckpt_every=60,
                     workdir=str(tmp_path / "c10"), cache_dir=str(tmp_path / "cache"), progress=False)
    result = train(cfg)
    assert result.summary["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert "batch_stats" in result.state.model_state


def test_cli_overrides_are_typed():
    args = vars(build_parser().parse_args(["--config", "cifar10_resnet18", "--sparsity", "0.95", "--steps", "7",
                                           "--dense-first-layer", "true", "--lr-decay-epochs", "[1, 2]",
                                           "--model-kwargs", '{"width": 8}', "--grad-clip-norm", "none",
                                           "--method", "rigl"]))
    cfg = get_config(args.pop("config"), **args)
    assert cfg.sparsity == 0.95 and cfg.steps == 7 and cfg.dense_first_layer is True
    assert cfg.lr_decay_epochs == (1, 2) and cfg.model_kwargs == {"width": 8} and cfg.grad_clip_norm is None
    assert cfg.method == "rigl" and cfg.model == "resnet18"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method", "magic"])
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("mnist_mlp", sparsty=0.9)
    with pytest.raises(ValueError, match="--config mnist_transformer is invalid; allowed: mnist_mlp"):
        get_config("mnist_transformer")


def test_methods_map_to_algorithms():
    model, spec = build_model("mlp")
    params = jax.eval_shape(lambda k: init_variables(model, spec.input_shape, k), jax.random.PRNGKey(0))["params"]
    algos = {m: make_algo(get_config("mnist_mlp", method=m), spec, 1000) for m in METHODS}
    assert algos["srigl"].gamma_sal == 0.3 and algos["srigl_noablation"].gamma_sal is None
    assert type(algos["rigl"]).__name__ == "RigL" and type(algos["set"]).__name__ == "SET"
    assert all(p.is_dense for p in algos["dense"].layer_plans(params).values())
    assert algos["srigl"].t_end == 750  # 75% of training


def test_paper_lr_schedules():
    cifar = get_config("cifar10_resnet18")
    spe = 390  # 50000 // 128
    sched = make_lr_schedule(cifar, spe, 250 * spe)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(77 * spe - 1)) == pytest.approx(0.1)
    assert float(sched(77 * spe + 1)) == pytest.approx(0.02)
    assert float(sched(240 * spe)) == pytest.approx(0.1 * 0.2 ** 3)
    imnet = get_config("imagenet_resnet50")
    spe = 1281167 // 512
    sched = make_lr_schedule(imnet, spe, 100 * spe)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(5 * spe)) == pytest.approx(0.2)  # warm-up to 0.2 over 5 epochs
    assert float(sched(31 * spe)) == pytest.approx(0.02)
    assert float(sched(95 * spe)) == pytest.approx(0.2 * 0.1 ** 3)
    assert imnet.grad_accumulation_steps == 8 and imnet.delta_t == 800 and imnet.label_smoothing == 0.1
    vit = CONFIGS["imagenet_vit_b16"]
    assert vit.optimizer == "adamw" and vit.distribution == "uniform" and vit.gamma_sal == 0.95


@pytest.mark.slow
def test_mnist_cnn_config_runs(tmp_path):
    cfg = get_config("mnist_cnn", steps=150, eval_every=150, ckpt_every=150, delta_t=50,
                     workdir=str(tmp_path / "cnn"), progress=False)
    result = train(cfg)
    assert result.summary["test_accuracy"] > 0.9
