"""Checkpoints: kill-and-resume is bit-identical, retention (last n + best), clear errors, nothing overwritten."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import Checkpointer, CheckpointError, config_fingerprint
from train.configs import get_config
from train.loop import train
from train.testing import TINY_RUN as TINY
from train.testing import persistent_compile_cache


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with persistent_compile_cache():
        yield


def _tree_equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def _snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax read of garbage
def test_kill_and_resume_is_bit_identical(tmp_path):
    full = train(get_config("mnist_mlp", workdir=str(tmp_path / "full"), **TINY))
    part = train(get_config("mnist_mlp", workdir=str(tmp_path / "split"), stop_after=10, **TINY))
    assert part.summary["steps"] == 10 and not part.summary["finished"]
    resumed = train(get_config("mnist_mlp", workdir=str(tmp_path / "split"), **TINY))
    assert resumed.summary["steps"] == 24 and resumed.summary["finished"]
    a, b = full.state, resumed.state
    # the masks changed during the run (mask updates at 5, 10, 15: so resuming crossed update steps)
    assert any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), part.state.masks, b.masks)))
    for field in ("params", "masks", "opt_state", "itop", "rng", "step"):
        assert _tree_equal(getattr(a, field), getattr(b, field)), f"{field} differs after resume"
    assert full.summary["test_accuracy"] == resumed.summary["test_accuracy"]

    # Resuming with an incompatible setting is refused, naming the field, and touches nothing.
    ckpt_dir = tmp_path / "split" / "checkpoints"
    before = _snapshot(tmp_path / "split")
    with pytest.raises(CheckpointError, match="sparsity"):
        train(get_config("mnist_mlp", workdir=str(tmp_path / "split"), **{**TINY, "sparsity": 0.95}))
    assert _snapshot(tmp_path / "split") == before
    # Corrupt the newest checkpoint's array data: clear error, nothing overwritten.
    latest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    for f in (ckpt_dir / str(latest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\x00garbage" * 4)
    before = _snapshot(tmp_path / "split")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(get_config("mnist_mlp", workdir=str(tmp_path / "split"), **TINY))
    assert _snapshot(tmp_path / "split") == before


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
    assert _tree_equal(state, _tiny_state())
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
