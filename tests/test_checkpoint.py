"""Checkpoints: kill-and-resume is bit-identical, retention (last n + best), clear errors, nothing overwritten."""
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from train import report
from train.checkpoint import Checkpointer, CheckpointError, IncompatibleRunError, config_fingerprint
from train.configs import get_config
from train.loop import ResumeError, make_lr_schedule, train
from train.testing import TINY_RUN as TINY
from train.testing import trees_equal


pytestmark = pytest.mark.usefixtures("compile_cache")


def _snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


def _files(directory: Path) -> dict:
    """Every file with its bytes (for 'nothing changed' checks that also catch same-size rewrites)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_same_state(a, b):
    for field in ("step", "params", "opt_state"):
        assert trees_equal(getattr(a, field), getattr(b, field)), f"{field} differs after resume"
    assert trees_equal(a, b), "some other TrainState field differs after resume"  # masks, ITOP, rng, ...


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 24-step reference run."""
    return train(get_config("mnist_mlp", workdir=str(tmp_path_factory.mktemp("full") / "run"), **TINY))


def test_kill_and_resume_is_bit_identical(tmp_path, full_run, capsys):
    split = tmp_path / "split"
    part = train(get_config("mnist_mlp", workdir=str(split), stop_after=10, **TINY))
    assert part.summary["steps"] == 10 and not part.summary["finished"] and part.status == "stopped"
    before = _files(split)
    again = train(get_config("mnist_mlp", workdir=str(split), stop_after=10, **TINY))  # the same command again
    assert again.status == "stopped" and again.summary == part.summary and _files(split) == before

    # Resuming with an incompatible setting is refused, naming the field, and touches nothing.
    before = _files(split)
    with pytest.raises(IncompatibleRunError, match=r"--sparsity 0.9 -> 0.95.*not even with --extend"):
        train(get_config("mnist_mlp", workdir=str(split), **{**TINY, "sparsity": 0.95}))
    # So is a changed schedule without --extend (naming every changed field).
    with pytest.raises(ResumeError, match=r"--steps 24 -> 30, --lr 0.1 -> 0.2\); pass --extend"):
        train(get_config("mnist_mlp", workdir=str(split), **{**TINY, "steps": 30, "lr": 0.2}))
    assert _files(split) == before
    capsys.readouterr()

    # Non-schedule fields (eval/log cadence) may change on resume.
    resumed = train(get_config("mnist_mlp", workdir=str(split), **{**TINY, "eval_every": 12, "log_every": 6}))
    assert "resuming from step 10 of 24 (checkpoint " in capsys.readouterr().err
    assert resumed.summary["steps"] == 24 and resumed.summary["finished"]
    # the masks changed after the resume point (mask update at 15: ITOP grew), so resuming crossed an update
    # (read from the metrics, not from TrainState fields, whose layout may change)
    assert resumed.summary["itop_rate"] > part.summary["itop_rate"]
    _assert_same_state(full_run.state, resumed.state)
    assert full_run.summary["test_accuracy"] == resumed.summary["test_accuracy"]
    assert resumed.summary["train_seconds"] > part.summary["train_seconds"]  # both sessions counted

    # Re-running the finished run changes nothing and reports it as already complete.
    before = _files(split)
    again = train(get_config("mnist_mlp", workdir=str(split), **TINY))
    assert again.status == "already_complete" and again.state is None
    assert again.summary == resumed.summary
    assert _files(split) == before


def _garble_arrays(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\x00garbage" * 4)


def test_damaged_latest_checkpoint_falls_back_to_newest_intact(tmp_path, full_run, capsys):
    run = tmp_path / "run"
    train(get_config("mnist_mlp", workdir=str(run), stop_after=16, **TINY))  # checkpoints 8 and 16
    ckpt_dir = run / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [8, 16]
    _garble_arrays(ckpt_dir / "16")
    (ckpt_dir / "20").mkdir()  # an empty step folder (e.g. a copy that never finished)
    damaged = _files(ckpt_dir / "16")
    capsys.readouterr()
    resumed = train(get_config("mnist_mlp", workdir=str(run), **TINY))
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt_dir / '20'} is corrupt or unreadable: it is an empty directory" in err
    assert re.search(rf"checkpoint {ckpt_dir / '16'} is corrupt or unreadable: \S+/16/state/\S+ is damaged", err)
    assert "resuming from step 8 of 24" in err
    assert "tensorstore" not in err.lower() and "{" not in err  # one sentence per problem, no spec dumps
    assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 2
    # nothing deleted: the damaged checkpoints were moved aside, byte for byte
    assert _files(run / "damaged-checkpoints" / "16") == damaged
    assert (run / "damaged-checkpoints" / "20").is_dir()
    _assert_same_state(full_run.state, resumed.state)


def test_no_usable_checkpoint_is_an_error_that_touches_nothing(tmp_path):
    run = tmp_path / "run"
    train(get_config("mnist_mlp", workdir=str(run), stop_after=8, **TINY))
    _garble_arrays(run / "checkpoints" / "8")
    before = _files(run)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*checkpoints/8/state/\S+ is damaged"):
        train(get_config("mnist_mlp", workdir=str(run), **TINY))
    assert _files(run) == before


def test_extend_continues_to_the_new_total_with_a_recomputed_schedule(tmp_path, full_run, capsys):
    """--extend on a finished 24-step run with --steps 40: steps 25..40 follow the lr schedule and t_end of a
    40-step config (mask update at 25, since t_end = 0.75 * 40 = 30); the first 24 steps are kept."""
    run = tmp_path / "run"
    shutil.copytree(Path(full_run.summary["workdir"]), run)
    cfg = get_config("mnist_mlp", workdir=str(run), **{**TINY, "steps": 40})
    capsys.readouterr()
    with pytest.raises(ResumeError, match="--steps 24 -> 40"):
        train(cfg)
    with pytest.raises(ResumeError, match="ends at step 20"):
        train(get_config("mnist_mlp", workdir=str(run), **{**TINY, "steps": 20}), extend=True)
    result = train(cfg, extend=True)
    err = capsys.readouterr().err
    assert "resuming from step 24 of 40" in err and "--extend: --steps 24 -> 40" in err
    assert result.status == "finished" and result.summary["steps"] == 40 and result.summary["total_steps"] == 40
    assert result.summary["extensions"] == [{"at_step": 24, "changed": {"steps": [24, 40]}}]
    records = report.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(4, 41, 4))
    schedule = make_lr_schedule(cfg, 60000 // 128, 40)
    for r in records:
        if r["step"] > 24:
            assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)))
    itop = {r["step"]: r["itop_rate"] for r in records}
    assert itop[28] > itop[24] == full_run.summary["itop_rate"]  # t_end moved from 18 to 30: update at 25
    assert result.summary["test_accuracy"] != full_run.summary["test_accuracy"]


def _tiny_state(scale=1.0):
    return {"w": jnp.arange(6.0).reshape(2, 3) * scale, "step": jnp.asarray(3, jnp.int32),
            "mask": jnp.array([True, False])}


def test_retention_keeps_last_n_and_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2)
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: None, 5: 0.65}
    for step, acc in accuracies.items():
        ckpt.save(step, _tiny_state(step), {"data_position": {"epoch": 0, "index": step, "seed": 0}}, acc)
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    state, meta = ckpt.restore(_tiny_state(), 2)
    np.testing.assert_array_equal(state["w"], _tiny_state(2)["w"])
    assert meta["data_position"]["index"] == 2
    ckpt.close()


def test_shape_mismatch_and_fingerprint_errors(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    fp = config_fingerprint({"model": "mlp", "sparsity": 0.9, "seed": 0})
    ckpt.save(1, _tiny_state(), {"fingerprint": fp})
    before = _snapshot(tmp_path / "ck")
    wrong = {**_tiny_state(), "w": jnp.zeros((3, 3))}
    with pytest.raises(CheckpointError, match="does not fit|other shapes"):
        ckpt.restore(wrong, 1)
    with pytest.raises(CheckpointError, match="seed: checkpoint=0 run=1"):
        ckpt.restore(_tiny_state(), 1, config_fingerprint({"model": "mlp", "sparsity": 0.9, "seed": 1}))
    state, _ = ckpt.restore(_tiny_state(), 1, fp)  # the matching run restores fine
    assert trees_equal(state, _tiny_state())
    assert _snapshot(tmp_path / "ck") == before
    ckpt.close()


def test_unreadable_meta_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(1, _tiny_state(), {"a": 1})
    for f in (tmp_path / "ck" / "1" / "meta").rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable.*--workdir"):
        ckpt.restore(_tiny_state(), 1)
    ckpt.close()
