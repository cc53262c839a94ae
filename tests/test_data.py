"""Data: MNIST/CIFAR loaders (real files, md5, corrupt/missing errors), resumable iterator, augmentation.

The CIFAR-10 readers are tested on files written here in each format (python batches folder and tarball, a tfds
array_record preparation by tfds's own builder) from real images: a sample of the shipped JPEG tarball.
"""
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests import real_data_files as rd
from train import data

SHARED = rd.SHARED
REPO = Path(__file__).resolve().parents[1]


def test_mnist_real_files_load():
    ds = data.load_mnist()
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8
    assert sorted(np.unique(ds.train_labels).tolist()) == list(range(10))
    # the documented normalisation constants match the data
    assert abs(ds.train_images.mean() / 255 - data.MNIST_MEAN[0]) < 1e-3


def _copy_mnist(tmp_path):
    src = data.find_mnist_dir()
    for fname, _ in data.MNIST_FILES.values():
        shutil.copy(src / fname, tmp_path / fname)
    return tmp_path


def test_mnist_corrupt_file_is_named(tmp_path):
    folder = _copy_mnist(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz.*md5"):
        data.load_mnist(folder)


def test_mnist_missing_file_says_where(tmp_path):
    folder = _copy_mnist(tmp_path)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as err:
        data.load_mnist(folder)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(folder) in msg and "--data-dir" in msg


def _fake_cifar_tarball(path: Path, per_class: int = 2) -> dict:
    """A tiny tarball with the real layout; returns the expected (split, class) -> mean colour."""
    from PIL import Image
    rng = np.random.default_rng(0)
    colours = {}
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, cls in enumerate(data.CIFAR10_CLASSES):
                for i in range(per_class):
                    colour = rng.integers(0, 256, 3)
                    img = np.broadcast_to(colour, (32, 32, 3)).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"cifar10_jpg/{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
                    colours[(split, c, i)] = colour
    return colours


def test_cifar_decode_and_cache(tmp_path):
    colours = _fake_cifar_tarball(tmp_path / data.CIFAR10_TARBALL)
    ds = data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (20, 32, 32, 3)
    # sorted by member name: class-major order, labels follow the class folder
    assert ds.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    for i in range(20):  # each image is the colour it was written with (JPEG is lossy: tolerance)
        expected = colours[("train", i // 2, i % 2)]
        assert np.abs(ds.train_images[i].reshape(-1, 3).mean(0) - expected).max() < 4
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    # second load comes from the cache, even with the tarball's content gone
    (tmp_path / data.CIFAR10_TARBALL).write_bytes(b"")
    again = data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_cifar_missing_says_which_files_work_and_where(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    for name in ("cifar-10-batches-py/", "cifar-10-python.tar.gz", "cifar10/<version>/", "cifar10-jpeg-q75.tar.gz",
                 "data_batch_1..5", "test_batch", "array_record", "--data-dir", str(tmp_path)):
        assert name in msg, name


def test_cifar_missing_lists_default_folders(tmp_path, monkeypatch):
    folders = [tmp_path / "first", tmp_path / "second"]
    monkeypatch.setattr(data, "default_data_dirs", lambda dataset: folders)
    with pytest.raises(data.DataError) as err:
        data.find_cifar10(None)
    msg = str(err.value)
    assert msg.index(str(folders[0])) < msg.index(str(folders[1]))


def test_cifar_corrupt_jpeg_tarball(tmp_path):
    good = tmp_path / "good.tar.gz"
    _fake_cifar_tarball(good)
    (tmp_path / data.CIFAR10_TARBALL).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(data.DataError, match="corrupt"):
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))


@pytest.fixture(scope="module")
def real_sample():
    if rd.shipped_tarball() is None:
        pytest.skip("shipped CIFAR-10 JPEG tarball not in ../shared/data")
    return rd._shuffled(rd.shipped_cifar_sample(30, 10))  # 300 train / 100 test real images, classes mixed


def _assert_same_arrays(ds, arrays):
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), arrays[f"{split}_images"])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), arrays[f"{split}_labels"])
        assert getattr(ds, f"{split}_images").dtype == np.uint8 and getattr(ds, f"{split}_labels").dtype == np.int32


def test_cifar_python_batches_folder(tmp_path, real_sample):
    rd.write_cifar_python_folder(tmp_path, real_sample)
    assert data.find_cifar10(tmp_path) == ("batches", tmp_path / "cifar-10-batches-py")
    ds = data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    _assert_same_arrays(ds, real_sample)  # pixel-exact, batch order kept (data_batch_1..5, then test_batch)
    assert "python batches" in ds.source and not (tmp_path / "cache").exists()  # read directly, no cache


def test_cifar_python_tarball(tmp_path, real_sample):
    rd.write_cifar_python_tarball(tmp_path / "cifar-10-python.tar.gz", real_sample)
    assert data.find_cifar10(tmp_path) == ("python_tarball", tmp_path / "cifar-10-python.tar.gz")
    _assert_same_arrays(data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache"), real_sample)
    # through the public entry point the loop uses, with a train subset
    bundle = data.load_data("cifar10", str(tmp_path), str(tmp_path / "cache"), train_subset=100)
    assert len(bundle.train) == 100 and len(bundle.test) == 100 and bundle.input_shape == (32, 32, 3)


def test_cifar_python_batches_errors(tmp_path, real_sample):
    folder = rd.write_cifar_python_folder(tmp_path, real_sample)
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="lacks data_batch_3"):
        data.load_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_2").read_bytes()[:500])  # truncated
    with pytest.raises(data.DataError, match="data_batch_3.*not a readable CIFAR-10 python batch"):
        data.load_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(data.DataError, match="refusing to load"):  # no arbitrary code from a data file
        data.load_cifar10(tmp_path)
    shutil.rmtree(folder)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(data.DataError, match="corrupt or unreadable"):
        data.load_cifar10(tmp_path)


def test_cifar_tfds_preparation(tmp_path, real_sample):
    pytest.importorskip("tensorflow_datasets")
    rd.write_tfds_cifar10(tmp_path, real_sample)
    assert data.find_cifar10(tmp_path) == ("tfds", tmp_path)
    ds = data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    for split in ("train", "test"):  # tfds shuffles at write time: same (image, label) pairs, tfds's order
        got = sorted((img.tobytes(), int(lab)) for img, lab in zip(getattr(ds, f"{split}_images"),
                                                                      getattr(ds, f"{split}_labels")))
        want = sorted((img.tobytes(), int(lab)) for img, lab in zip(real_sample[f"{split}_images"],
                                                                      real_sample[f"{split}_labels"]))
        assert got == want
    assert len(list((tmp_path / "cache").glob("cifar10_tfds_*.npy"))) == 4  # decoded once, then cached
    # a tfrecord preparation (tfds's default) cannot be read by data_source: skipped, and the message says so
    shutil.rmtree(tmp_path / "cifar10")
    info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text('{"name": "cifar10", "fileFormat": "tfrecord"}')
    with pytest.raises(data.DataError, match="(?s)Skipped .*3.0.2: a tfds preparation not in array_record"):
        data.find_cifar10(tmp_path)


def test_cifar_lookup_order(tmp_path, real_sample):
    """Within a folder: batches folder, python tarball, tfds, JPEG tarball; folders in the given order."""
    _fake_cifar_tarball(tmp_path / data.CIFAR10_JPEG_TARBALL, per_class=1)
    assert data.find_cifar10(tmp_path)[0] == "jpeg"
    rd.write_cifar_python_tarball(tmp_path / data.CIFAR10_PY_TARBALL, real_sample)
    assert data.find_cifar10(tmp_path)[0] == "python_tarball"
    rd.write_cifar_python_folder(tmp_path, real_sample)
    assert data.find_cifar10(tmp_path)[0] == "batches"
    assert data.find_cifar10_tarball(tmp_path) == tmp_path / data.CIFAR10_BATCHES_DIR  # old name, same lookup


def test_mnist_lookup_from_another_cwd(tmp_path, monkeypatch):
    """A non-editable install has no repo around the package: MNIST comes from the installed data files
    (<prefix>/share/srigl-jax/data/mnist), else ./data, else the error says how to pass --data-dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "site-packages")  # where an installed package lives
    monkeypatch.setattr(data, "installed_data_dirs", lambda: [tmp_path / "prefix" / data.INSTALLED_DATA_SUBDIR])
    with pytest.raises(data.DataError) as err:
        data.find_mnist_dir()
    msg = str(err.value)
    assert "--data-dir" in msg and "data/mnist" in msg and str(tmp_path / "prefix" / data.INSTALLED_DATA_SUBDIR) in msg
    installed = tmp_path / "prefix" / data.INSTALLED_DATA_SUBDIR / "mnist"
    shutil.copytree(REPO / "data" / "mnist", installed)
    assert data.find_mnist_dir() == installed
    assert data.load_mnist().train_images.shape == (60000, 28, 28, 1)
    shutil.rmtree(installed)
    shutil.copytree(REPO / "data" / "mnist", tmp_path / "data" / "mnist")  # ./data/mnist in the cwd
    assert data.find_mnist_dir() == (tmp_path / "data" / "mnist").resolve()


def test_mnist_default_lookup_from_another_cwd_subprocess(tmp_path):
    """`python -c` from an unrelated cwd with the package imported from the repo: the default job's data is found."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", "from train import data; print(data.find_mnist_dir())"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == (REPO / "data" / "mnist").resolve()


def test_packaging_declares_mnist():
    """pyproject's data-files install data/mnist to <prefix>/share/srigl-jax/data/mnist (where the lookup looks);
    MANIFEST.in puts the files into an sdist."""
    import tomllib
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    target = (data.INSTALLED_DATA_SUBDIR / "mnist").as_posix()
    assert list(spec) == [target]
    declared = sorted(p.name for pattern in spec[target] for p in REPO.glob(pattern))
    assert declared == sorted(fname for fname, _ in data.MNIST_FILES.values())
    assert "include data/mnist/*.gz" in (REPO / "MANIFEST.in").read_text()


def test_wheel_ships_mnist(tmp_path):
    """The built wheel holds the four MNIST files as data (needs setuptools>=77 here: skipped otherwise)."""
    import zipfile
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 in this environment (pyproject needs >= 77)")
    env = dict(os.environ, SRIGL_JAX_NO_KERNEL="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for fname, _ in data.MNIST_FILES.values():
        assert any(n.endswith(f".data/data/share/srigl-jax/data/mnist/{fname}") for n in names), fname
    assert "train/data.py" in names


@pytest.mark.slow
def test_cifar_real_tarball(tmp_path):
    if not (SHARED / data.CIFAR10_TARBALL).is_file():
        pytest.skip("CIFAR-10 tarball not present in ../shared/data")
    ds = data.load_cifar10(SHARED, cache_dir=tmp_path)
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    np.testing.assert_allclose(ds.train_images.reshape(-1, 3).mean(0) / 255, data.CIFAR10_MEAN, atol=1e-3)


def _iterator(seed=0, n=50, batch=8, augment=None):
    images = np.arange(n * 4 * 4, dtype=np.uint8).reshape(n, 4, 4, 1) % 251
    source = data.ArraySource(images, np.arange(n, dtype=np.int32), augment)
    return data.BatchIterator(source, batch, seed, (0.0,), (1.0,))


def test_iterator_epochs_are_permutations():
    it = _iterator()
    assert it.batches_per_epoch == 6
    epoch0 = np.concatenate([next(it)["label"] for _ in range(6)])
    epoch1 = np.concatenate([next(it)["label"] for _ in range(6)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48  # no repeats within an epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    assert it.position() == {"epoch": 1, "index": 6, "seed": 0}


def test_iterator_resume_is_exact():
    aug = lambda x, rng: data.random_crop_flip(x, rng, pad=1)
    ref = _iterator(augment=aug)
    batches = [next(ref) for _ in range(15)]
    it = _iterator(augment=aug)
    for _ in range(9):
        next(it)
    resumed = _iterator(augment=aug)
    resumed.restore(it.position())
    for b in batches[9:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], b["image"])
        np.testing.assert_array_equal(got["label"], b["label"])
    with pytest.raises(ValueError, match="seed"):
        _iterator(seed=1).restore(it.position())


def test_iterator_seed_changes_order():
    a, b = _iterator(seed=0), _iterator(seed=1)
    assert not np.array_equal(next(a)["label"], next(b)["label"])


def test_random_crop_flip():
    rng = np.random.default_rng(0)
    imgs = np.random.default_rng(1).integers(1, 255, (200, 8, 8, 3)).astype(np.uint8)
    out = data.random_crop_flip(imgs, rng, pad=1)  # 9 offsets x 2 flips
    assert out.shape == imgs.shape
    n_identity = n_flip = 0
    for src, dst in zip(imgs, out):
        n_identity += np.array_equal(src, dst)
        n_flip += np.array_equal(src[:, ::-1], dst)
        # every output pixel is either padding (0) or a pixel of the same image
        assert set(np.unique(dst)) <= set(np.unique(src)) | {0}
    assert n_identity > 0 and n_flip > 0  # centre crops, unflipped and flipped, occur (1/18 each)
    assert n_identity + n_flip < 100  # but most crops are shifted
    np.testing.assert_array_equal(data.random_crop_flip(imgs, np.random.default_rng(5)),
                                  data.random_crop_flip(imgs, np.random.default_rng(5)))


def test_eval_batches_pad_and_flag():
    source = data.ArraySource(np.zeros((25, 2, 2, 1), np.uint8), np.arange(25, dtype=np.int32))
    batches = list(data.eval_batches(source, 10, (0.0,), (1.0,)))
    assert [b["image"].shape[0] for b in batches] == [10, 10, 10]
    assert [int(b["valid"].sum()) for b in batches] == [10, 10, 5]
    assert np.concatenate([b["label"][b["valid"]] for b in batches]).tolist() == list(range(25))


def test_imagenet_missing_data_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DataError, match="imagenet2012"):
        data.load_imagenet_sources(tmp_path)
    (tmp_path / "imagenet2012").mkdir()  # present but not prepared
    with pytest.raises(data.DataError, match="not a usable tfds"):
        data.load_imagenet_sources(tmp_path)


def test_imagenet_record_source_on_fake_records():
    # the same Sequence-of-dicts interface a tfds data source provides
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8), "label": i} for i in range(6)]
    train = data.BatchIterator(data.RecordSource(records, image_size=24, train=True), 4, 0,
                               data.IMAGENET_MEAN, data.IMAGENET_STD)
    batch = next(train)
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
    val = list(data.eval_batches(data.RecordSource(records, 24, train=False), 4, data.IMAGENET_MEAN,
                                 data.IMAGENET_STD))
    assert [int(b["valid"].sum()) for b in val] == [4, 2]
    assert val[0]["label"].tolist() == [0, 1, 2, 3]


def test_cli_missing_cifar_explains_formats(tmp_path, capsys):
    """The reported case: `python -m train --config cifar10_resnet18_tiny` with no CIFAR-10 anywhere."""
    from train.__main__ import main
    assert main(["--config", "cifar10_resnet18_tiny", "--data-dir", str(tmp_path), "--workdir",
                 str(tmp_path / "run"), "--progress", "false"]) == 1   # a data error (exit 2 is for bad flags)
    err = capsys.readouterr().err
    assert not (tmp_path / "run").exists()   # a failed start leaves nothing behind
    for name in ("cifar-10-python.tar.gz", "cifar-10-batches-py/", "cifar10-jpeg-q75.tar.gz", "array_record",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(tmp_path)):
        assert name in err, name


def test_where_command(tmp_path, capsys):
    assert data.main(["where", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist: MNIST files" in out and "cifar10: CIFAR-10 not found" in out and "imagenet2012:" in out
