"""Data: MNIST/CIFAR loaders (real files, md5, corrupt/missing errors), resumable iterator, augmentation."""
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from train import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(data.DataError, match="cifar10-jpeg-q75.tar.gz.*not found"):
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    good = tmp_path / "good.tar.gz"
    _fake_cifar_tarball(good)
    (tmp_path / data.CIFAR10_TARBALL).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(data.DataError, match="corrupt"):
        data.load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))


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
