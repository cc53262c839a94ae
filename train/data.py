"""Datasets (MNIST, CIFAR-10 in three file formats or tfds, ImageNet via tfds) and a resumable batch iterator.

Everything here is numpy on the host: batches are produced deterministically from (seed, epoch, index),
so the iterator's position (three integers) is all a checkpoint needs to resume bit-identically.

Where data is looked for (``--data-dir`` replaces the default folders; see :func:`default_data_dirs`):

* MNIST: the four original ``*-idx?-ubyte.gz`` files, in a folder or its ``mnist/`` subfolder.
* CIFAR-10, the first of these found (folders in order, formats in this order within a folder):
  ``cifar-10-batches-py/`` (the extracted standard download), ``cifar-10-python.tar.gz`` (the standard
  download, read as is), ``cifar10/<version>/`` (a tfds array_record preparation) and this project's
  ``cifar10-jpeg-q75.tar.gz`` (JPEG re-encoding, not pixel-exact).
* ImageNet: ``imagenet2012/<version>/`` prepared by tfds in array_record format (:func:`prepare_imagenet2012`,
  ``python -m train.data prepare-imagenet``), read with ``tfds.data_source``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import inspect
import io
import os
import pickle
import site
import sys
import tarfile
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where a non-editable install puts the MNIST files (pyproject [tool.setuptools.data-files]).
INSTALLED_DATA_SUBDIR = Path("share") / "srigl-jax" / "data"

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_BATCHES_DIR = "cifar-10-batches-py"
CIFAR10_PY_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_JPEG_TARBALL = "cifar10-jpeg-q75.tar.gz"
CIFAR10_TARBALL = CIFAR10_JPEG_TARBALL  # the name this project's shared data uses (kept for old callers)
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# What each CIFAR-10 format is, for the missing-data message (name as looked for, description).
CIFAR10_FORMATS = (
    (CIFAR10_BATCHES_DIR + "/", "the standard CIFAR-10 python version, extracted: data_batch_1..5 and test_batch"),
    (CIFAR10_PY_TARBALL, "the standard download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
                         "read as is (no need to extract)"),
    ("cifar10/<version>/", "a tfds preparation in array_record format, read with "
                           "tfds.data_source('cifar10', data_dir=FOLDER) (needs tensorflow-datasets)"),
    (CIFAR10_JPEG_TARBALL, "this project's JPEG (quality 75) re-encoding, cifar10_jpg/{train,test}/<class>/*.jpg "
                           "(in ../shared/data here; real images but not pixel-exact)"),
)


class DataError(RuntimeError):
    """Missing, corrupt or unreadable dataset files (the message says what is expected where)."""


def installed_data_dirs() -> list[Path]:
    """Where ``pip install .`` (non-editable) puts the shipped data: <prefix>/share/srigl-jax/data."""
    prefixes = [sys.prefix, getattr(site, "USER_BASE", None) or ""]
    return [Path(p) / INSTALLED_DATA_SUBDIR for p in prefixes if p]


def default_data_dirs(dataset: str) -> list[Path]:
    """Where a dataset is looked up when --data-dir is not given (in this order).

    MNIST: the repo's ``data/`` (a checkout or an editable install), the installed package data
    (a non-editable install), ``./data`` in the current directory. Every dataset: ``../shared/data`` seen from
    the current directory and from the repo.
    """
    dirs = [REPO_ROOT / "data", *installed_data_dirs(), Path.cwd() / "data"] if dataset == "mnist" else []
    dirs += [Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    return list(dict.fromkeys(p.resolve() for p in dirs))  # de-duplicated, order kept


def default_cache_dir() -> Path:
    """Where decoded datasets are cached when no cache dir is given: $SRIGL_CACHE or ./runs/cache."""
    return Path(os.environ.get("SRIGL_CACHE", Path.cwd() / "runs" / "cache"))


def _candidate_dirs(data_dir: str | os.PathLike | None, dataset: str) -> list[Path]:
    return [Path(data_dir)] if data_dir else default_data_dirs(dataset)


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
    source: str = ""  # what was read (format and path), for logs


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
    where = "\n  ".join(str(p) for p in tried)
    raise DataError(
        f"MNIST files ({names}) not found. Looked in:\n  {where}\n"
        f"The repo ships them in data/mnist/. From a non-editable install run from anywhere else, point at that "
        f"folder (or any folder holding the four files, or its parent): python -m train --data-dir "
        f"/path/to/srigl-jax/data/mnist. Originals: http://yann.lecun.com/exdb/mnist/ (md5-checked).")


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
                        MNIST_MEAN, MNIST_STD, source=f"idx files in {folder}")


# --------------------------------------------------------------------------------------------------- CIFAR-10

def _tfds_prepared_versions(folder: Path, array_record: bool = True) -> list[Path]:
    """``folder/<version>/`` subfolders holding a tfds ``dataset_info.json`` whose file format is array_record
    (``array_record=False``: the other ones, e.g. tfds's default tfrecord, which data_source cannot read)."""
    import json
    if not folder.is_dir():
        return []
    found = []
    for info in sorted(folder.glob("*/dataset_info.json")):
        try:
            fmt = json.loads(info.read_text()).get("fileFormat", "tfrecord")
        except (OSError, ValueError):
            fmt = "unreadable"
        if (fmt == "array_record") == array_record:
            found.append(info.parent)
    return found


def find_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """``(format, path)`` of the first CIFAR-10 found; format is "batches", "python_tarball", "tfds" or "jpeg".

    Folders are searched in order (``--data-dir`` alone if given, else :func:`default_data_dirs`); within
    a folder the formats are tried in the order of :data:`CIFAR10_FORMATS`.
    """
    tried = _candidate_dirs(data_dir, "cifar10")
    for base in tried:
        batches = base / CIFAR10_BATCHES_DIR
        if batches.is_dir():
            return "batches", batches
        if (base / CIFAR10_PY_TARBALL).is_file():
            return "python_tarball", base / CIFAR10_PY_TARBALL
        if _tfds_prepared_versions(base / "cifar10"):
            return "tfds", base
        if (base / CIFAR10_JPEG_TARBALL).is_file():
            return "jpeg", base / CIFAR10_JPEG_TARBALL
    formats = "\n".join(f"  {name:<25} {what}" for name, what in CIFAR10_FORMATS)
    where = "\n  ".join(str(p) for p in tried)
    skipped = [p for base in tried for p in _tfds_prepared_versions(base / "cifar10", array_record=False)]
    note = "".join(f"Skipped {p}: a tfds preparation not in array_record format (rebuild it with "
                   f"--file_format array_record).\n" for p in skipped)
    raise DataError(
        f"CIFAR-10 not found. Any one of these works (the first found is used; within a folder, in this order):\n"
        f"{formats}\nLooked in these folders (in order):\n  {where}\n{note}"
        f"Point --data-dir at the folder that holds one of them, e.g. --data-dir ~/datasets when "
        f"~/datasets/{CIFAR10_PY_TARBALL} exists.")


def find_cifar10_tarball(data_dir: str | os.PathLike | None = None) -> Path:
    """Where CIFAR-10 was found (any format of :func:`find_cifar10`; the name is kept for old callers)."""
    return find_cifar10(data_dir)[1]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 python batches hold (dicts, lists, bytes, numpy arrays)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch (dict with b"data" uint8 (N, 3072), CHW-flattened, and b"labels") -> NHWC, labels."""
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated or not a pickle
        raise DataError(f"{where} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"replace it with the original file") from e
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{where}: keys {sorted(batch)} lack 'data'/'labels' (is this CIFAR-100?)")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{where}: data {data.dtype} {data.shape} with {len(labels)} labels; expected uint8 "
                        f"(N, 3072) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _stack_cifar_batches(raw: dict[str, bytes], where: Path) -> dict[str, np.ndarray]:
    missing = [n for n in (*CIFAR10_TRAIN_BATCHES, "test_batch") if n not in raw]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)} (want {CIFAR10_BATCHES_DIR}/data_batch_1..5 and "
                        f"test_batch)")
    train = [_parse_cifar_batch(raw[n], f"{where}: {n}") for n in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _parse_cifar_batch(raw["test_batch"], f"{where}: test_batch")
    return {"train_images": np.concatenate([t[0] for t in train]),
            "train_labels": np.concatenate([t[1] for t in train]),
            "test_images": np.ascontiguousarray(test_images), "test_labels": test_labels}


def read_cifar10_batches(folder: Path) -> dict[str, np.ndarray]:
    """The extracted standard download: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (original order)."""
    raw = {n: (folder / n).read_bytes() for n in (*CIFAR10_TRAIN_BATCHES, "test_batch") if (folder / n).is_file()}
    return _stack_cifar_batches(raw, folder)


def read_cifar10_python_tarball(tarball: Path) -> dict[str, np.ndarray]:
    """``cifar-10-python.tar.gz`` read as is (streamed once; members ``cifar-10-batches-py/<batch>``)."""
    wanted = {*CIFAR10_TRAIN_BATCHES, "test_batch"}
    raw = {}
    try:
        with tarfile.open(tarball, "r|gz") as tar:
            for m in tar:
                if m.isfile() and Path(m.name).name in wanted:
                    raw[Path(m.name).name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tarball} is corrupt or unreadable ({e}); replace it with the original download") from e
    return _stack_cifar_batches(raw, tarball)


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


def read_cifar10_tfds(data_dir: Path) -> dict[str, np.ndarray]:
    """A tfds ``cifar10`` preparation (array_record) under ``data_dir``, via ``tfds.data_source``."""
    sources = _tfds_data_source("cifar10", data_dir, ("train", "test"))
    out = {}
    for split, source in sources.items():
        images, labels = [], []
        for start in tqdm(range(0, len(source), 1000), desc=f"decoding tfds cifar10 {split}", unit="kimg"):
            for rec in _get_records(source, range(start, min(start + 1000, len(source)))):
                images.append(np.asarray(rec["image"]))
                labels.append(int(rec["label"]))
        out[f"{split}_images"] = np.stack(images).astype(np.uint8)
        out[f"{split}_labels"] = np.asarray(labels, np.int32)
    if out["train_images"].shape[1:] != (32, 32, 3):
        raise DataError(f"{data_dir / 'cifar10'}: images {out['train_images'].shape[1:]}, expected (32, 32, 3)")
    return out


def _cached_arrays(cache: Path, prefix: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()`` once, then from ``cache/<prefix>_<key>.npy`` (written atomically; a broken cache is rebuilt)."""
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    paths = {k: cache / f"{prefix}_{k}.npy" for k in keys}
    if all(p.is_file() for p in paths.values()):
        try:
            return {k: np.load(p) for k, p in paths.items()}
        except (ValueError, OSError):
            pass  # a broken cache is rebuilt from the source
    arrays = build()
    cache.mkdir(parents=True, exist_ok=True)
    for k, p in paths.items():
        tmp = p.with_suffix(".tmp.npy")
        np.save(tmp, arrays[k])
        os.replace(tmp, p)  # atomic: a killed decode never leaves a half-written cache
    return arrays


def load_cifar10(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> ArrayDataset:
    """CIFAR-10 from the first format :func:`find_cifar10` finds.

    The pickled batches (folder or tarball) are read directly (a few seconds). The JPEG tarball and a tfds
    preparation are decoded once and cached as .npy files in ``cache_dir``.
    """
    fmt, path = find_cifar10(data_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if fmt == "batches":
        arrays, what = read_cifar10_batches(path), "CIFAR-10 (python batches)"
    elif fmt == "python_tarball":
        arrays, what = read_cifar10_python_tarball(path), "CIFAR-10 (python batches)"
    elif fmt == "tfds":
        arrays, what = _cached_arrays(cache, "cifar10_tfds", lambda: read_cifar10_tfds(path)), "CIFAR-10 (tfds)"
    else:
        arrays = _cached_arrays(cache, "cifar10_jpeg_q75", lambda: decode_cifar10_tarball(path))
        what = "CIFAR-10 (JPEG q75)"
    return ArrayDataset("cifar10", arrays["train_images"], arrays["train_labels"],
                        arrays["test_images"], arrays["test_labels"], CIFAR10_MEAN, CIFAR10_STD,
                        source=f"{what}: {path}")


# --------------------------------------------------------------------------------------------------- ImageNet

def _import_tfds(what: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{what} needs tensorflow-datasets (not TensorFlow): pip install -e '.[data]'") from e
    return tfds


def _tfds_data_source(name: str, data_dir: Path, splits: Sequence[str], **kwargs) -> dict[str, Sequence[dict]]:
    """``tfds.data_source(name, data_dir=...)`` with the splits checked; every failure becomes a DataError."""
    tfds = _import_tfds(f"the tfds preparation in {data_dir / name}")
    folder = data_dir / name
    try:
        sources = tfds.data_source(name, data_dir=str(data_dir), download=False, **kwargs)
    except Exception as e:  # tfds raises several types for missing/partial/tfrecord preparations
        raise DataError(f"{folder} exists but is not a usable tfds array_record preparation of {name} "
                        f"({type(e).__name__}: {e}). tfds.data_source reads only file_format=array_record; a "
                        f"tfrecord preparation must be rebuilt with --file_format array_record.") from e
    missing = [s for s in splits if s not in sources]
    if missing:
        raise DataError(f"{folder} (tfds {name}) lacks the split(s) {missing}; it has {sorted(sources)}")
    return {s: sources[s] for s in splits}


def _get_records(records: Sequence[dict], indices: Sequence[int]) -> list[dict]:
    """Records at ``indices``: one batched read where the source supports it (tfds: parallel reads)."""
    indices = [int(i) for i in indices]
    getitems = getattr(records, "__getitems__", None)
    return list(getitems(indices)) if getitems is not None else [records[i] for i in indices]


def load_imagenet_sources(data_dir: str | os.PathLike | None) -> tuple[Sequence[dict], Sequence[dict]]:
    """ImageNet-1k train/validation as tfds random-access data sources (array_record, no TensorFlow).

    Expects ``<data_dir>/imagenet2012/<version>/`` prepared by tfds in array_record format (see
    :func:`prepare_imagenet2012`). Images come back as encoded JPEG bytes (``SkipDecoding``) and are decoded
    by :class:`RecordSource` in worker threads.
    """
    tried = _candidate_dirs(data_dir, "imagenet2012")
    tfds = _import_tfds("ImageNet")
    for base in tried:
        if (base / "imagenet2012").is_dir():
            sources = _tfds_data_source("imagenet2012", base, ("train", "validation"),
                                        decoders={"image": tfds.decode.SkipDecoding()})
            return sources["train"], sources["validation"]
    where = "\n  ".join(str(p) for p in tried)
    raise DataError(
        f"tfds-prepared imagenet2012 (array_record) not found: want FOLDER/imagenet2012/5.1.0/ (dataset_info.json, "
        f"imagenet2012-train.array_record-*, imagenet2012-validation.array_record-*). Looked in:\n  {where}\n"
        f"Prepare it once from {IMAGENET_TARS[0]} and {IMAGENET_TARS[1]} (image-net.org), no TensorFlow needed:\n"
        f"  python -m train.data prepare-imagenet --manual-dir DIR_WITH_THE_TARS --data-dir FOLDER\n"
        f"then train with --data-dir FOLDER (see the README, Training).")


def _iter_tar_members(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, file object) of every file in a tar, streamed (what tfds's iter_archive yields, without tf.io)."""
    import tensorflow_datasets as tfds
    with open(path, "rb") as f:
        yield from tfds.download.iter_archive(f, tfds.download.ExtractMethod.TAR_STREAM)


def _imagenet_builder_class():
    """tfds's own ``imagenet2012`` builder with its file access done by Python instead of ``tf.io.gfile``.

    Same features, example keys, label mapping (tfds's validation_labels.txt), shuffling and array_record
    writer as ``tfds build imagenet2012``; only opening the manual tars and the two image fixes (CMYK ->
    RGB, one PNG -> JPEG, done by tfds with TensorFlow) use Python/PIL, so TensorFlow is never imported.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as ib

    class Imagenet2012NoTF(ib.Builder, skip_registration=True):
        name = "imagenet2012"

        @classmethod
        def _get_pkg_dir_path(cls):  # metadata (checksums, labels, README) of the real builder
            return ib.Builder._get_pkg_dir_path()

        def _split_generators(self, dl_manager):
            manual = Path(dl_manager.manual_dir)
            train, val = (manual / name for name in IMAGENET_TARS)
            splits = []
            if train.is_file():
                splits.append(tfds.core.SplitGenerator(name=tfds.Split.TRAIN,
                                                       gen_kwargs={"archive": _iter_tar_members(train)}))
            if val.is_file():
                labels = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text()
                with tarfile.open(val, "r:") as tar:
                    names = sorted(tar.getnames())
                splits.append(tfds.core.SplitGenerator(
                    name=tfds.Split.VALIDATION,
                    gen_kwargs={"archive": _iter_tar_members(val),
                                "validation_labels": dict(zip(names, labels.strip().splitlines()))}))
            if not splits:
                raise DataError(f"neither {train} nor {val} exists")
            return splits

        def _fix_image(self, image_fname, image):
            if image_fname in ib.CMYK_IMAGES or image_fname in ib.PNG_IMAGES:
                from PIL import Image
                buf = io.BytesIO()
                Image.open(image).convert("RGB").save(buf, format="JPEG", quality=100)
                buf.seek(0)
                return buf
            return image

    return Imagenet2012NoTF


def prepare_imagenet2012(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Build ``<data_dir>/imagenet2012/5.1.0/`` (tfds array_record) from the two ILSVRC2012 tars, without TF.

    ``manual_dir`` holds ``ILSVRC2012_img_train.tar`` (1000 per-class tars inside, as downloaded) and
    ``ILSVRC2012_img_val.tar`` (50000 JPEGs); a missing one is skipped (its split is not built). Returns the
    prepared folder. The result is what ``tfds build imagenet2012 --file_format array_record`` writes.
    """
    manual = Path(manual_dir)
    if not any((manual / n).is_file() for n in IMAGENET_TARS):
        raise DataError(f"{manual} holds neither {IMAGENET_TARS[0]} nor {IMAGENET_TARS[1]}")
    tfds = _import_tfds("preparing ImageNet")
    builder = _imagenet_builder_class()(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------------------------- transforms

def normalize(images_u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32 standardised per channel."""
    x = images_u8.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4, total: int | None = None,
                     rows: slice | None = None) -> np.ndarray:
    """Standard CIFAR augmentation: zero-pad by ``pad`` pixels, random crop back, random horizontal flip.

    ``images`` may be the ``rows`` of a batch of ``total`` examples (one process's share): the random draws
    are those of the whole batch, so each row gets the augmentation it gets in the whole batch."""
    n, h, w, _ = images.shape
    total = n if total is None else total
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, total)
    dx = rng.integers(0, 2 * pad + 1, total)
    flip = rng.random(total) < 0.5
    if rows is not None:
        dy, dx, flip = dy[rows], dx[rows], flip[rows]
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

    # Optional: ``get(indices, rng, rows=slice)`` builds only ``rows`` of the batch, with the augmentation those
    # rows get in the whole batch (multi-process runs: each process builds its share). Sources without it are
    # built whole and sliced.


@dataclasses.dataclass
class ArraySource:
    """In-memory arrays with an optional augmentation (applied only when an rng is given)."""

    images: np.ndarray
    labels: np.ndarray
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices, rng, rows: slice | None = None):
        if rows is None:
            images = self.images[indices]
            if self.augment is not None and rng is not None:
                images = self.augment(images, rng)
            return images, self.labels[indices]
        part = indices[rows]
        images = self.images[part]
        if self.augment is not None and rng is not None:
            if _takes_rows(self.augment):
                images = self.augment(images, rng, total=len(indices), rows=rows)
            else:  # an augmentation that draws for the whole batch only: build the whole batch, keep the rows
                images = self.augment(self.images[indices], rng)[rows]
        return images, self.labels[part]


def _decode_image(image: Any) -> np.ndarray:
    """HWC uint8 RGB from a decoded array (any channel count) or encoded bytes (JPEG/PNG, via PIL)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image
        with Image.open(io.BytesIO(bytes(image))) as im:
            return np.asarray(im.convert("RGB"))
    img = np.asarray(image)
    if img.ndim == 2 or img.shape[-1] == 1:
        img = np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=-1)
    return img


@dataclasses.dataclass
class RecordSource:
    """Random-access records ({"image": HWC uint8 or JPEG bytes, "label": int}, e.g. a tfds data source).

    A batch is read in one call (``__getitems__`` where the source has it), then decoded and transformed in
    ``num_workers`` threads (PIL releases the GIL; 0 = one per CPU). Each example's augmentation draws from
    its own generator seeded from the batch generator, so the result does not depend on the thread count.
    ``prefetch``: batches the :class:`BatchIterator` prepares ahead in the background.
    """

    records: Sequence[dict]
    image_size: int = 224
    train: bool = True
    num_workers: int = 0
    prefetch: int = 1
    _pool: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def _example(self, rec: dict, seed: int | None) -> tuple[np.ndarray, int]:
        img = _decode_image(rec["image"])
        if self.train and seed is not None:
            img = imagenet_train_transform(img, np.random.default_rng(seed), self.image_size)
        else:
            img = imagenet_eval_transform(img, self.image_size)
        return img, int(rec["label"])

    def get(self, indices, rng, rows: slice | None = None):
        seeds = rng.integers(0, 2 ** 63, len(indices)).tolist() if rng is not None else [None] * len(indices)
        if rows is not None:  # this process's share: the seeds are those of the whole batch
            indices, seeds = np.asarray(indices)[rows], seeds[rows]
        records = _get_records(self.records, indices)
        if self._pool is None:
            workers = self.num_workers or os.cpu_count() or 1
            self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
        out = list(self._pool.map(self._example, records, seeds))
        return np.stack([o[0] for o in out]), np.asarray([o[1] for o in out], np.int32)


@dataclasses.dataclass
class SubsetRecords:
    """The first ``n`` records of a random-access source (``train_subset`` for record sources)."""

    records: Sequence[dict]
    n: int

    def __len__(self) -> int:
        return min(self.n, len(self.records))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.records[i]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(indices)
        return _get_records(self.records, indices)


def _takes_rows(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rows" in params and "total" in params


def _source_rows(source: "ExampleSource", indices: np.ndarray, rng, rows: slice | None):
    """``source.get`` of the ``rows`` of a batch (all of it for None), for sources with or without ``rows``."""
    if rows is None:
        return source.get(indices, rng)
    try:
        takes = "rows" in inspect.signature(source.get).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return source.get(indices, rng, rows=rows)
    images, labels = source.get(indices, rng)
    return images[rows], labels[rows]


@dataclasses.dataclass
class BatchIterator:
    """Infinite, shuffled, resumable training batches.

    Batch ``index`` of ``epoch`` is a pure function of (seed, epoch, index): the permutation comes from
    ``default_rng([seed, epoch])`` and the augmentation from ``default_rng([seed, epoch, index])``. So
    :meth:`position` / :meth:`restore` are all that checkpointing needs. Incomplete last batches are dropped.
    If the source has ``prefetch > 0`` (record sources), the next batch is built in a background thread while
    the current one is used; the batches and positions are the same as without.

    Multi-process runs: with ``process_count > 1`` each iterator yields only rows
    ``[process_index * B / P, (process_index + 1) * B / P)`` of every global batch of ``batch_size`` B (the
    same global batches as one process, built only where needed; see ``train.distributed.process_rows``).
    """

    source: ExampleSource
    batch_size: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    epoch: int = 0
    index: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.batch_size > len(self.source):
            raise ValueError(f"batch size {self.batch_size} exceeds dataset size {len(self.source)}")
        if self.batch_size % self.process_count or not 0 <= self.process_index < self.process_count:
            raise ValueError(f"batch size {self.batch_size} does not split over {self.process_count} processes "
                             f"(or process index {self.process_index} is out of range)")
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pending: tuple[tuple[int, int], concurrent.futures.Future] | None = None
        self._prefetcher = None

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

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:  # the prefetch thread and the caller may ask at once
            if epoch not in self._perms:
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            return self._perms[epoch]

    def _batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        idx = self._permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, index])
        rows = None
        if self.process_count > 1:
            part = self.batch_size // self.process_count
            rows = slice(self.process_index * part, (self.process_index + 1) * part)
        images, labels = _source_rows(self.source, idx, rng, rows)
        return {"image": normalize(images, self.mean, self.std), "label": labels}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        key = (self.epoch, self.index)
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == key else self._batch(*key)
        self.index += 1
        if getattr(self.source, "prefetch", 0) > 0:
            nxt = (self.epoch, self.index) if self.index < self.batches_per_epoch else (self.epoch + 1, 0)
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
            self._pending = (nxt, self._prefetcher.submit(self._batch, *nxt))
        return batch


def eval_batches(source: ExampleSource, batch_size: int, mean, std, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size evaluation batches in order; the last one is zero-padded, ``valid`` flags real examples.

    With ``process_count > 1``: this process's rows of every global batch of ``batch_size`` (equal parts, in
    process order; padding included), so every process yields the same number of batches."""
    n = len(source)
    if batch_size % process_count:
        raise ValueError(f"eval batch size {batch_size} does not split over {process_count} processes")
    part = batch_size // process_count
    for start in range(0, n, batch_size):
        lo = start + process_index * part
        idx = np.arange(min(lo, n), min(lo + part, n))
        if len(idx):
            images, labels = source.get(idx, None)
        else:  # this process's share is all padding
            images, labels = source.get(np.arange(1), None)
            images, labels = images[:0], labels[:0]
        pad = part - len(idx)
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
        if train_subset:
            train = SubsetRecords(train, train_subset)
        return DataBundle(RecordSource(train, image_size, train=augment), RecordSource(val, image_size, False),
                          IMAGENET_MEAN, IMAGENET_STD, 1000, (image_size, image_size, 3))
    raise ValueError(f"unknown dataset {dataset!r}; known: mnist, cifar10, imagenet2012")


def input_throughput(data_dir: str | os.PathLike | None, image_size: int = 224, batch_size: int = 128,
                     batches: int = 5, num_workers: int = 0, train: bool = True) -> dict[str, float]:
    """Images/s of the ImageNet input pipeline (read, JPEG decode, crop/resize, flip, normalise), measured over
    ``batches`` batches after one warm-up batch, with prefetching off (the pipeline's own rate)."""
    import time
    train_records, val_records = load_imagenet_sources(data_dir)
    source = RecordSource(train_records if train else val_records, image_size, train, num_workers, prefetch=0)
    it = BatchIterator(source, min(batch_size, len(source)), 0, IMAGENET_MEAN, IMAGENET_STD)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return {"images_per_s": batches * it.batch_size / seconds, "batch_size": it.batch_size,
            "workers": source._pool._max_workers, "image_size": image_size, "cpus": os.cpu_count() or 0}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.data prepare-imagenet --manual-dir DIR --data-dir DIR`` | ``where [--data-dir DIR]`` |
    ``throughput --data-dir DIR [--image-size 224]``."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m train.data", description="Dataset preparation and lookup.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-imagenet", help="build the tfds array_record imagenet2012 (no TensorFlow)")
    prep.add_argument("--manual-dir", required=True, help=f"folder with {IMAGENET_TARS[0]} and {IMAGENET_TARS[1]}")
    prep.add_argument("--data-dir", required=True, help="tfds data dir to write (then train with --data-dir)")
    where = sub.add_parser("where", help="print where each dataset is found, or why not")
    where.add_argument("--data-dir", default=None)
    speed = sub.add_parser("throughput", help="images/s of the ImageNet input pipeline")
    speed.add_argument("--data-dir", default=None)
    speed.add_argument("--image-size", type=int, default=224)
    speed.add_argument("--batch-size", type=int, default=128)
    speed.add_argument("--batches", type=int, default=5)
    speed.add_argument("--workers", type=int, default=0, help="decode threads (0: one per CPU)")
    speed.add_argument("--eval", action="store_true", help="the validation transform instead of training's")
    args = parser.parse_args(argv)
    try:
        if args.command == "throughput":
            print(input_throughput(args.data_dir, args.image_size, args.batch_size, args.batches, args.workers,
                                   train=not args.eval))
            return 0
        if args.command == "prepare-imagenet":
            print(f"prepared: {prepare_imagenet2012(args.manual_dir, args.data_dir)}")
            return 0
        def imagenet(d):
            train, val = load_imagenet_sources(d)
            return f"{len(train)} train / {len(val)} validation records"

        for name, find in (("mnist", find_mnist_dir), ("cifar10", lambda d: "{} ({})".format(*find_cifar10(d)[::-1])),
                           ("imagenet2012", imagenet)):
            try:
                print(f"{name}: {find(args.data_dir)}")
            except DataError as e:
                print(f"{name}: {e}")
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
