"""ImageNet path end to end on real images: a small tfds ``imagenet2012`` array_record preparation is built here
by tfds's own imagenet2012 builder (via ``train.data.prepare_imagenet2012``, no TensorFlow) from manual tars in
image-net.org's layout, holding real CIFAR-10 images (shipped JPEG tarball) upscaled to 64x72 / 80x64. Then:

* ``tfds.data_source("imagenet2012", data_dir=...)`` reads it as it reads the real one (layout, splits, labels);
* the input pipeline (``RecordSource``: JPEG decode in threads, random-resized crop, prefetch) is deterministic
  whatever the thread count and prefetching;
* the ``imagenet_resnet50`` recipe, shrunk (width via model_kwargs, tiny image_size, few steps, small eval), trains
  through ``train.loop.train`` in ``pmap`` and ``sharded`` mode on 4 fake CPU devices (a subprocess, as in
  test_multidevice.py): masks (and the whole replicated state) identical on every device at every logged step,
  and ``stop_after`` + resume ends in exactly the state of an uninterrupted run.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.subprocess_env import fake_cpu_devices_env

from tests import real_data_files as rd
from train import data

N_DEVICES = 4
REPO = Path(__file__).resolve().parents[1]
# Small (CI) and slow (thorough) versions of the 4-device run.
# SMALL: ResNet-50's blocks (bottleneck v1.5, ImageNet stem + max-pool) in two stages of one block each (a
# stride-1 and a stride-2 block, both with projection shortcuts) instead of (3, 4, 6, 3), to keep the compile time
# (most of the cost on 2 CPU cores) small: 40% less CPU time than one block in each of the four stages;
# LONG: the full depth.
SMALL = dict(image_size=32, model_kwargs={"width": 2, "stage_sizes": [1, 1]}, steps=4, stop_after=2,
             delta_t=2, modes=("pmap", "sharded"), cli=False)
LONG = dict(image_size=64, model_kwargs={"width": 4}, steps=12, stop_after=5, delta_t=3, modes=("pmap", "sharded"),
            cli=True)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _prepare(root: Path) -> Path:
    """Manual tars from real images, then the TF-free tfds preparation (through the CLI entry point)."""
    sample = rd.shipped_cifar_sample(30, 10)  # 300 train (30 per class), 100 validation images
    rd.write_imagenet_manual_tars(root / "manual", sample)
    assert data.main(["prepare-imagenet", "--manual-dir", str(root / "manual"), "--data-dir", str(root / "tfds")]) == 0
    return root / "tfds"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    pytest.importorskip("tensorflow_datasets")
    if rd.shipped_tarball() is None:
        pytest.skip("shipped CIFAR-10 JPEG tarball not in ../shared/data")
    return _prepare(tmp_path_factory.mktemp("imagenet"))


def test_preparation_is_read_by_tfds_data_source(prepared):
    import tensorflow_datasets as tfds

    version_dir = prepared / "imagenet2012" / "5.1.0"
    files = sorted(p.name for p in version_dir.iterdir())
    assert "dataset_info.json" in files and "features.json" in files
    assert any(f.startswith("imagenet2012-train.array_record-") for f in files)
    assert any(f.startswith("imagenet2012-validation.array_record-") for f in files)
    sources = tfds.data_source("imagenet2012", data_dir=str(prepared), download=False)  # the registered builder
    train, val = sources["train"], sources["validation"]
    assert (len(train), len(val)) == (300, 100)
    assert train.dataset_info.file_format.value == "array_record" and str(train.dataset_info.version) == "5.1.0"
    synsets = rd.imagenet_synsets()
    counts = np.zeros(10, int)
    for i in range(len(train)):
        rec = train[i]
        name = rec["file_name"].decode()
        assert rec["label"] == synsets.index(name.split("_")[0]) < 10  # label = the synset of the inner tar
        assert rec["image"].dtype == np.uint8 and rec["image"].shape in ((72, 64, 3), (64, 80, 3))
        counts[rec["label"]] += 1
    assert counts.tolist() == [30] * 10
    val_labels = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    for i in range(0, 100, 7):  # validation labels: tfds's list, by file name, as for the real archive
        rec = val[i]
        idx = int(rec["file_name"].decode()[len("ILSVRC2012_val_"):-len(".JPEG")])
        assert rec["label"] == synsets.index(val_labels[idx - 1])


def test_record_source_decodes_like_tfds(prepared):
    """Our reader gets JPEG bytes (SkipDecoding) and decodes them itself: same pixels as tfds's own decode."""
    import tensorflow_datasets as tfds

    train, val = data.load_imagenet_sources(prepared)
    decoded = tfds.data_source("imagenet2012", data_dir=str(prepared), download=False)["validation"]
    source = data.RecordSource(val, image_size=48, train=False)
    images, labels = source.get(np.arange(8), None)
    for i in range(8):
        np.testing.assert_array_equal(images[i], data.imagenet_eval_transform(decoded[i]["image"], 48))
        assert labels[i] == decoded[i]["label"]
    assert isinstance(train[0]["image"], bytes)


def test_pipeline_deterministic_across_threads_and_prefetch(prepared):
    train, _ = data.load_imagenet_sources(prepared)

    def batches(workers, prefetch, n=6, start=None):
        it = data.BatchIterator(data.RecordSource(train, 40, True, num_workers=workers, prefetch=prefetch), 64, 3,
                                data.IMAGENET_MEAN, data.IMAGENET_STD)
        if start:
            it.restore(start)
        return [next(it) for _ in range(n)], it

    ref, it = batches(1, 0)
    assert it.position() == {"epoch": 1, "index": 2, "seed": 3}  # 4 batches per epoch: crossed an epoch
    got, _ = batches(4, 2)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert ref[0]["image"].shape == (64, 40, 40, 3) and ref[0]["image"].dtype == np.float32
    resumed, _ = batches(3, 1, n=3, start={"epoch": 0, "index": 3, "seed": 3})
    for a, b in zip(ref[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_imagenet_missing_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DataError) as err:
        data.load_imagenet_sources(tmp_path)
    msg = str(err.value)
    assert "prepare-imagenet" in msg and "ILSVRC2012_img_train.tar" in msg and str(tmp_path) in msg
    with pytest.raises(data.DataError, match="holds neither"):
        data.prepare_imagenet2012(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------
# 4-device runs of the imagenet_resnet50 recipe (worker in a subprocess)
# --------------------------------------------------------------------------------------------------------------

def _worker_main(tfds_dir: str, work: str, settings_json: str, out_path: str) -> None:
    import jax

    from train import loop
    from train.configs import get_config

    settings = json.loads(settings_json)
    assert jax.device_count() == N_DEVICES, jax.devices()
    checks: list[dict] = []
    real_get_state = loop.get_state

    def spying_get_state(state, mode):
        """Before the loop takes one copy of the state: every device's copy must be identical."""
        differing = []
        for name in ("masks", "params", "model_state", "opt_state", "itop", "step"):
            for leaf in jax.tree.leaves(getattr(state, name)):
                if mode == "pmap":
                    copies = np.asarray(leaf)
                else:
                    copies = np.stack([np.asarray(s.data) for s in leaf.addressable_shards])
                assert copies.shape[0] == N_DEVICES, (mode, copies.shape)
                if any(not np.array_equal(c, copies[0]) for c in copies[1:]):
                    differing.append(name)
        checks.append({"mode": mode, "step": int(np.asarray(real_get_state(state, mode).step)),
                       "differing": sorted(set(differing))})
        return real_get_state(state, mode)

    loop.get_state = spying_get_state

    def cfg(mode, workdir, **over):
        return get_config(
            "imagenet_resnet50", data_dir=tfds_dir, workdir=workdir, mode=mode, progress=False,
            model_kwargs=settings["model_kwargs"], image_size=settings["image_size"], batch_size=16,
            steps=settings["steps"], delta_t=settings["delta_t"], grad_accumulation_steps=2, warmup_epochs=0.5,
            eval_every=1000, ckpt_every=1000, log_every=1, eval_batch_size=100, **over)

    results = {"checks": checks, "runs": {}}
    for mode in settings["modes"]:
        clock = time.perf_counter()
        full = loop.train(cfg(mode, f"{work}/{mode}-full"))
        t_full = time.perf_counter() - clock
        part_dir = f"{work}/{mode}-resumed"
        if settings["cli"]:   # the interrupted half through the CLI, the resume through the Python API
            from train.__main__ import main
            assert main(["--config", "imagenet_resnet50", "--data-dir", tfds_dir, "--workdir", part_dir,
                         "--mode", mode, "--progress", "false", "--model-kwargs", json.dumps(settings["model_kwargs"]),
                         "--image-size", str(settings["image_size"]), "--batch-size", "16",
                         "--steps", str(settings["steps"]), "--delta-t", str(settings["delta_t"]),
                         "--grad-accumulation-steps", "2", "--warmup-epochs", "0.5", "--eval-every", "1000",
                         "--ckpt-every", "1000", "--log-every", "1", "--eval-batch-size", "100",
                         "--stop-after", str(settings["stop_after"])]) == 0
        else:
            part = loop.train(cfg(mode, part_dir, stop_after=settings["stop_after"]))
            assert not part.summary["finished"]
        resumed = loop.train(cfg(mode, part_dir))
        results["runs"][mode] = {
            "full": jax.device_get(full.state.replace(rng=None)),
            "resumed": jax.device_get(resumed.state.replace(rng=None)),
            "full_summary": full.summary, "resumed_summary": resumed.summary,
            "full_metrics": [json.loads(x) for x in Path(f"{work}/{mode}-full/metrics.jsonl").read_text().splitlines()],
            "resumed_metrics": [json.loads(x) for x in Path(f"{part_dir}/metrics.jsonl").read_text().splitlines()],
            "seconds": {"full": t_full, "all": time.perf_counter() - clock}}
        print(f"{mode}: {results['runs'][mode]['seconds']}", file=sys.stderr)
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def _run_worker(prepared: Path, work: Path, settings: dict) -> dict:
    out = work / "results.pkl"
    env = fake_cpu_devices_env(N_DEVICES, REPO)
    proc = subprocess.run([sys.executable, __file__, str(prepared), str(work), json.dumps(settings), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"4-device ImageNet worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-8000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _check_runs(results: dict, settings: dict) -> None:
    checks = results["checks"]
    for mode in settings["modes"]:
        mode_checks = [c for c in checks if c["mode"] == mode]
        # every logged step of the full, the interrupted and the resumed run was checked
        assert {c["step"] for c in mode_checks} >= set(range(1, settings["steps"] + 1))
        assert all(not c["differing"] for c in mode_checks), [c for c in mode_checks if c["differing"]]
        run = results["runs"][mode]
        full, resumed = run["full"], run["resumed"]
        assert int(full.step) == int(resumed.step) == settings["steps"]
        assert run["full_summary"]["finished"] and run["resumed_summary"]["finished"]
        for name in ("masks", "params", "model_state", "opt_state", "itop"):   # opt_state holds the growth window
            for a, b in zip(_leaves(getattr(full, name)), _leaves(getattr(resumed, name)), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{mode} {name}")
        losses = lambda ms: {r["step"]: r["loss"] for r in ms}
        assert losses(run["full_metrics"]) == losses(run["resumed_metrics"])
        summary = run["full_summary"]
        assert abs(summary["global_sparsity"] - 0.9) < 0.02
        # the masks did change (mask updates ran): more positions were ever active than are active now
        assert sum(int(x.sum()) for x in _leaves(full.itop)) > sum(int(x.sum()) for x in _leaves(full.masks))
        assert summary["test_accuracy"] >= 0.0 and np.isfinite(summary["test_loss"])
        assert run["resumed_summary"]["test_accuracy"] == summary["test_accuracy"]


def test_imagenet_resnet50_4_devices_small(prepared, tmp_path):
    _check_runs(_run_worker(prepared, tmp_path, SMALL), SMALL)


@pytest.mark.slow
def test_imagenet_resnet50_4_devices_long(prepared, tmp_path):
    _check_runs(_run_worker(prepared, tmp_path, LONG), LONG)


if __name__ == "__main__":
    _worker_main(*sys.argv[1:5])
