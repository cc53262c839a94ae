"""Datasets (MNIST, CIFAR-10 JPEG, ImageNet via tfds) and a resumable, seeded batch iterator.

Everything here is numpy on the host: batches are produced deterministically from (seed, epoch, index),
so the iterator's position (three integers) is all a checkpoint needs to resume bit-identically.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_TARBALL = "cifar10-jpeg-q75.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """Missing, corrupt or unreadable dataset files (the message says what is expected where)."""


def default_data_dirs(dataset: str) -> list[Path]:
    """Where a dataset is looked up when --data-dir is not given (in this order)."""
    dirs = [REPO_ROOT / "data"] if dataset == "mnist" else []
    dirs += [Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    return list(dict.fromkeys(p.resolve() for p in dirs))  # de-duplicated, order kept


def default_cache_dir() -> Path:
    """Where decoded datasets are cached when no cache dir is given: $SRIGL_CACHE or ./runs/cache."""
    return Path(os.environ.get("SRIGL_CACHE", Path.cwd() / "runs" / "cache"))


def _candidate_dirs(data_dir: str | os.PathLike | None, dataset: str) -> list[Path]:
    return [Path(data_dir)] if data_dir else default_data_dirs(dataset)


def _missing(what: str, tried: Sequence[Path]) -> DataError:
    where = "\n  ".join(str(p) for p in tried)
    return DataError(f"{what} not found. Looked in:\n  {where}\n"
                     f"Put the file(s) there, or point --data-dir at the folder holding them "
                     f"(default lookup: the repo's data/ for MNIST, then ../shared/data).")


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory image classification dataset (uint8 NHWC images, int32 labels)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped idx file (MNIST format): magic (0,0,dtype,ndim), big-endian dims, then data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def find_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The first candidate folder that holds all four MNIST files (directly or in a mnist/ subfolder)."""
    tried = []
    for base in _candidate_dirs(data_dir, "mnist"):
        for folder in (base, base / "mnist"):
            tried.append(folder)
            if all((folder / fname).is_file() for fname, _ in MNIST_FILES.values()):
                return folder
    names = ", ".join(fname for fname, _ in MNIST_FILES.values())
    raise _missing(f"MNIST files ({names})", tried)


def load_mnist(data_dir: str | os.PathLike | None = None, check_md5: bool = True) -> ArrayDataset:
    """MNIST from the original idx.gz files, md5-checked. Images (N, 28, 28, 1) uint8."""
    folder = find_mnist_dir(data_dir)
    arrays = {}
    for key, (fname, expected_md5) in MNIST_FILES.items():
        path = folder / fname
        if check_md5 and (got := md5sum(path)) != expected_md5:
            raise DataError(f"{path} is corrupt or not the original MNIST file: md5 {got}, expected "
                            f"{expected_md5}. Replace it with the original file.")
        arrays[key] = _read_idx(path)
    return ArrayDataset("mnist", arrays["train_images"][..., None], arrays["train_labels"].astype(np.int32),
                        arrays["test_images"][..., None], arrays["test_labels"].astype(np.int32),
                        MNIST_MEAN, MNIST_STD)


def find_cifar10_tarball(data_dir: str | os.PathLike | None = None) -> Path:
    """Locate cifar10-jpeg-q75.tar.gz in --data-dir or ../shared/data."""
    tried = []
    for base in _candidate_dirs(data_dir, "cifar10"):
        path = base / CIFAR10_TARBALL
        tried.append(path)
        if path.is_file():
            return path
    raise _missing(f"CIFAR-10 tarball {CIFAR10_TARBALL}", [p.parent for p in tried])


def decode_cifar10_tarball(tarball: Path) -> dict[str, np.ndarray]:
    """Decode every JPEG of ``cifar10_jpg/{train,test}/<class>/NNNN.jpg`` (sorted, so the order is fixed)."""
    from PIL import Image  # only needed for this one-off decode

    found: list[tuple[str, str, int, np.ndarray]] = []
    try:
        # Stream members in archive order: random access into a .tar.gz re-decompresses from the start.
        with tarfile.open(tarball, "r|gz") as tar:
            for m in tqdm(tar, desc="decoding CIFAR-10 JPEGs", unit="img", total=60000):
                if not (m.isfile() and m.name.endswith(".jpg")):
                    continue
                parts = Path(m.name).parts
                split, cls = parts[-3], parts[-2]
                if split not in ("train", "test") or cls not in CIFAR10_CLASSES:
                    raise DataError(f"{tarball}: unexpected member {m.name} (want cifar10_jpg/<split>/<class>/)")
                img = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                if img.shape != (32, 32, 3):
                    raise DataError(f"{tarball}: {m.name} has shape {img.shape}, expected (32, 32, 3)")
                found.append((m.name, split, CIFAR10_CLASSES.index(cls), img))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tarball} is corrupt or unreadable ({e}); replace it with the original tarball") from e
    out: dict[str, list] = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    for _, split, label, img in sorted(found, key=lambda f: f[0]):  # sorted by name: a fixed order
        out[f"{split}_images"].append(img)
        out[f"{split}_labels"].append(label)
    if not out["train_images"] or not out["test_images"]:
        raise DataError(f"{tarball} holds no train or no test JPEGs")
    return {k: np.stack(v).astype(np.uint8 if "images" in k else np.int32) for k, v in out.items()}


def load_cifar10(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> ArrayDataset:
    """CIFAR-10 (JPEG q75). Decoded once and cached as .npy files in ``cache_dir``."""
    tarball = find_cifar10_tarball(data_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    paths = {k: cache / f"cifar10_jpeg_q75_{k}.npy" for k in keys}
    arrays = None
    if all(p.is_file() for p in paths.values()):
        try:
            arrays = {k: np.load(p) for k, p in paths.items()}
        except (ValueError, OSError):
            arrays = None  # a broken cache is rebuilt from the tarball
    if arrays is None:
        arrays = decode_cifar10_tarball(tarball)
        cache.mkdir(parents=True, exist_ok=True)
        for k, p in paths.items():
            tmp = p.with_suffix(".tmp.npy")
            np.save(tmp, arrays[k])
            os.replace(tmp, p)  # atomic: a killed decode never leaves a half-written cache
    return ArrayDataset("cifar10", arrays["train_images"], arrays["train_labels"],
                        arrays["test_images"], arrays["test_labels"], CIFAR10_MEAN, CIFAR10_STD)


def load_imagenet_sources(data_dir: str | os.PathLike | None) -> tuple[Sequence[dict], Sequence[dict]]:
    """ImageNet-1k train/validation as tfds random-access data sources (array_record, no TensorFlow).

    Expects a tfds-prepared ``imagenet2012`` in array_record format under ``data_dir`` (prepare it once with
    ``tfds build imagenet2012 --manual_dir <dir with ILSVRC2012_img_*.tar> --file_format array_record``).
    """
    tried = _candidate_dirs(data_dir, "imagenet2012")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("ImageNet needs tensorflow-datasets: pip install -e '.[data]'") from e
    for base in tried:
        if (base / "imagenet2012").is_dir():
            try:
                sources = tfds.data_source("imagenet2012", data_dir=str(base), download=False)
            except Exception as e:  # tfds raises several types for missing/partial preparation
                raise DataError(f"{base / 'imagenet2012'} exists but is not a usable tfds array_record "
                                f"preparation of imagenet2012 ({type(e).__name__}: {e})") from e
            return sources["train"], sources["validation"]
    raise _missing("tfds-prepared imagenet2012 (array_record; a folder named imagenet2012/)", tried)


# ----------------------------------------------------------------------------------------------- transforms

def normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32 standardised per channel."""
    x = images_u8.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Standard CIFAR augmentation: zero-pad by ``pad`` pixels, random crop back, random horizontal flip."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for i in range(n):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def _resize_crop(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR, box=box))


def imagenet_train_transform(img: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Inception-style random-resized crop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip."""
    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(h, w)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    out = _resize_crop(img, (x0, y0, x0 + cw, y0 + ch), size)
    return out[:, ::-1] if rng.random() < 0.5 else out


def imagenet_eval_transform(img: np.ndarray, size: int = 224) -> np.ndarray:
    """Center crop of size/0.875 (resize 256 -> crop 224 for size 224)."""
    h, w = img.shape[:2]
    side = int(min(h, w) * 0.875)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return _resize_crop(img, (x0, y0, x0 + side, y0 + side), size)


# ------------------------------------------------------------------------------------------------ iterators

class ExampleSource(Protocol):
    """What a batch iterator reads from: a length and a batch getter (indices -> uint8 images, labels)."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass
class ArraySource:
    """In-memory arrays with an optional augmentation (applied only when an rng is given)."""

    images: np.ndarray
    labels: np.ndarray
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices, rng):
        images = self.images[indices]
        if self.augment is not None and rng is not None:
            images = self.augment(images, rng)
        return images, self.labels[indices]


@dataclasses.dataclass
class RecordSource:
    """Random-access records ({"image": HWC uint8, "label": int}, e.g. a tfds data source), decoded per item."""

    records: Sequence[dict]
    image_size: int = 224
    train: bool = True

    def __len__(self) -> int:
        return len(self.records)

    def get(self, indices, rng):
        images, labels = [], []
        for i in indices:
            rec = self.records[int(i)]
            img = np.asarray(rec["image"])
            if img.ndim == 2 or img.shape[-1] == 1:
                img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
            img = (imagenet_train_transform(img, rng, self.image_size) if self.train and rng is not None
                   else imagenet_eval_transform(img, self.image_size))
            images.append(img)
            labels.append(int(rec["label"]))
        return np.stack(images), np.asarray(labels, np.int32)


@dataclasses.dataclass
class BatchIterator:
    """Infinite, shuffled, resumable training batches.

    Batch ``index`` of ``epoch`` is a pure function of (seed, epoch, index): the permutation comes from
    ``default_rng([seed, epoch])`` and the augmentation from ``default_rng([seed, epoch, index])``. So
    :meth:`position` / :meth:`restore` are all that checkpointing needs. Incomplete last batches are dropped.
    """

    source: ExampleSource
    batch_size: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    epoch: int = 0
    index: int = 0

    def __post_init__(self):
        if self.batch_size > len(self.source):
            raise ValueError(f"batch size {self.batch_size} exceeds dataset size {len(self.source)}")
        self._perm_epoch, self._perm = -1, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.source) // self.batch_size

    def position(self) -> dict[str, int]:
        """The iterator state to checkpoint."""
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

    def restore(self, position: dict[str, int]) -> None:
        """Resume at a position from :meth:`position` (the seed must match the run's)."""
        if int(position["seed"]) != self.seed:
            raise ValueError(f"data iterator seed mismatch: checkpoint {position['seed']}, run {self.seed}")
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        idx = self._permutation()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, self.index])
        images, labels = self.source.get(idx, rng)
        self.index += 1
        return {"image": normalize(images, self.mean, self.std), "label": labels}


def eval_batches(source: ExampleSource, batch_size: int, mean, std) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size evaluation batches in order; the last one is zero-padded, ``valid`` flags real examples."""
    n = len(source)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        images, labels = source.get(idx, None)
        pad = batch_size - len(idx)
        valid = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        yield {"image": normalize(images, mean, std), "label": labels, "valid": valid}


@dataclasses.dataclass
class DataBundle:
    """What the training loop needs: train/test sources, normalisation, classes, input shape."""

    train: ExampleSource
    test: ExampleSource
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    input_shape: tuple[int, ...]


def load_data(dataset: str, data_dir: str | None = None, cache_dir: str | None = None, augment: bool = True,
              image_size: int = 224, train_subset: int | None = None) -> DataBundle:
    """Build the train/test sources of ``dataset`` ("mnist", "cifar10", "imagenet2012")."""
    if dataset in ("mnist", "cifar10"):
        ds = load_mnist(data_dir) if dataset == "mnist" else load_cifar10(data_dir, cache_dir)
        aug = random_crop_flip if (augment and dataset == "cifar10") else None
        tx, ty = ds.train_images, ds.train_labels
        if train_subset:
            tx, ty = tx[:train_subset], ty[:train_subset]
        return DataBundle(ArraySource(tx, ty, aug), ArraySource(ds.test_images, ds.test_labels),
                          ds.mean, ds.std, ds.num_classes, ds.train_images.shape[1:])
    if dataset == "imagenet2012":
        train, val = load_imagenet_sources(data_dir)
        return DataBundle(RecordSource(train, image_size, train=augment), RecordSource(val, image_size, False),
                          IMAGENET_MEAN, IMAGENET_STD, 1000, (image_size, image_size, 3))
    raise ValueError(f"unknown dataset {dataset!r}; known: mnist, cifar10, imagenet2012")
