"""Test helpers: real images from the shipped CIFAR-10 JPEG tarball, written out in the other formats the
readers accept (CIFAR-10 python batches, folder and tarball; tfds array_record preparations of ``cifar10`` and
``imagenet2012`` written by tfds's own builders and writer, without TensorFlow)."""
from __future__ import annotations

import functools
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from train import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shipped_tarball() -> Path | None:
    path = SHARED / data.CIFAR10_JPEG_TARBALL
    return path if path.is_file() else None


@functools.lru_cache(maxsize=4)
def shipped_cifar_sample(train_per_class: int = 30, test_per_class: int = 10) -> dict[str, np.ndarray]:
    """The first ``*_per_class`` images of each class of each split of the shipped JPEG tarball, decoded.

    Order: class-major by member name (as :func:`train.data.decode_cifar10_tarball` sorts). ~1.5 s.
    """
    from PIL import Image

    want = {"train": train_per_class, "test": test_per_class}
    found: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(shipped_tarball(), "r|gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".jpg")):
                continue
            split, cls = Path(m.name).parts[-3:-1]
            got = found.setdefault((split, cls), [])
            if len(got) < want[split]:
                got.append((m.name, tar.extractfile(m).read()))
    out = {}
    for split in ("train", "test"):
        items = sorted((name, data.CIFAR10_CLASSES.index(cls), raw)
                       for (s, cls), members in found.items() if s == split for name, raw in members)
        out[f"{split}_images"] = np.stack([np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
                                           for _, _, raw in items])
        out[f"{split}_labels"] = np.asarray([label for _, label, _ in items], np.int32)
    return out


def _shuffled(arrays: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Classes interleaved (like the real batches, whose order is random)."""
    out = dict(arrays)
    for split in ("train", "test"):
        perm = np.random.default_rng(seed).permutation(len(arrays[f"{split}_labels"]))
        out[f"{split}_images"] = arrays[f"{split}_images"][perm]
        out[f"{split}_labels"] = arrays[f"{split}_labels"][perm]
    return out


def cifar_python_batches(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The standard ``cifar-10-batches-py`` files (pickled dicts, bytes keys, CHW-flattened uint8 rows).

    The train images are split into data_batch_1..5 in order; protocol 2, as the originals (Python 2 cPickle).
    """
    def batch(name, images, labels):
        return pickle.dumps({b"batch_label": name.encode(), b"labels": [int(x) for x in labels],
                             b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
                             b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}, protocol=2)

    files = {}
    for i, (imgs, labels) in enumerate(zip(np.array_split(arrays["train_images"], 5),
                                           np.array_split(arrays["train_labels"], 5))):
        files[f"data_batch_{i + 1}"] = batch(f"training batch {i + 1} of 5", imgs, labels)
    files["test_batch"] = batch("testing batch 1 of 1", arrays["test_images"], arrays["test_labels"])
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES],
                                          b"num_cases_per_batch": 10000, b"num_vis": 3072}, protocol=2)
    return files


def write_cifar_python_folder(base: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder = base / data.CIFAR10_BATCHES_DIR
    folder.mkdir(parents=True)
    for name, raw in cifar_python_batches(arrays).items():
        (folder / name).write_bytes(raw)
    return folder


def write_cifar_python_tarball(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in cifar_python_batches(arrays).items():
            info = tarfile.TarInfo(f"{data.CIFAR10_BATCHES_DIR}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_tfds_cifar10(data_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A tfds ``cifar10`` array_record preparation by tfds's own Cifar10 builder (its features, PNG encoding,
    example keys and writer), without TensorFlow: only the download and the file reads (``tf.io.gfile`` in
    tfds) are replaced by reading the binary-version files this writes, parsed as tfds's ``_load_data`` does,
    and images are handed over as PIL images (lossless PNG by PIL instead of by TensorFlow)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar

    bin_dir = data_dir / "_cifar_bin" / "cifar-10-batches-bin"
    bin_dir.mkdir(parents=True)

    def write_bin(name, images, labels):  # binary version: per row 1 label byte + 3072 CHW bytes
        rows = np.concatenate([labels.astype(np.uint8)[:, None],
                               images.transpose(0, 3, 1, 2).reshape(len(images), -1)], axis=1)
        (bin_dir / name).write_bytes(rows.tobytes())

    for i, (imgs, labels) in enumerate(zip(np.array_split(arrays["train_images"], 5),
                                           np.array_split(arrays["train_labels"], 5))):
        write_bin(f"data_batch_{i + 1}.bin", imgs, labels)
    write_bin("test_batch.bin", arrays["test_images"], arrays["test_labels"])
    (bin_dir / "batches.meta.txt").write_text("\n".join(data.CIFAR10_CLASSES) + "\n")

    class LocalCifar10(cifar.Cifar10, skip_registration=True):
        name = "cifar10"

        @classmethod
        def _get_pkg_dir_path(cls):
            return cifar.Cifar10._get_pkg_dir_path()

        def _split_generators(self, dl_manager):  # the real one downloads; the rest is the real builder
            names = (bin_dir / "batches.meta.txt").read_text().split()
            self.info.features["label"].names = names
            return {tfds.Split.TRAIN: self._generate_examples(
                        "train_", [str(bin_dir / f"data_batch_{i}.bin") for i in range(1, 6)]),
                    tfds.Split.TEST: self._generate_examples("test_", [str(bin_dir / "test_batch.bin")])}

        def _generate_examples(self, split_prefix, filepaths):  # tfds's, with open() instead of tf.io.gfile
            from PIL import Image  # tfds PNG-encodes numpy images with TensorFlow, PIL images with PIL

            index = 0
            for path in filepaths:
                rows = np.frombuffer(Path(path).read_bytes(), np.uint8).reshape(-1, 3073)
                for row in rows:
                    image = row[1:].reshape(3, 32, 32).transpose(1, 2, 0)
                    yield index, {"label": int(row[0]), "id": f"{split_prefix}{index:05d}",
                                  "image": Image.fromarray(image)}
                    index += 1

    builder = LocalCifar10(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def imagenet_synsets() -> list[str]:
    import tensorflow_datasets as tfds
    return tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()


def _jpeg(img: np.ndarray, size: tuple[int, int]) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, raw: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def write_imagenet_manual_tars(manual_dir: Path, arrays: dict[str, np.ndarray], sizes=((64, 72), (80, 64))
                               ) -> dict[str, int]:
    """``ILSVRC2012_img_train.tar`` (one ``<synset>.tar`` of ``<synset>_<i>.JPEG`` per class inside) and
    ``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_<8 digits>.JPEG``), as image-net.org ships them, from real
    CIFAR images upscaled to the (width, height) ``sizes`` in turn. CIFAR class c goes to the c-th synset.
    Validation labels come from tfds's validation_labels.txt (by file name), as for the real archive.
    Returns the image counts."""
    manual_dir.mkdir(parents=True, exist_ok=True)
    synsets = imagenet_synsets()
    with tarfile.open(manual_dir / data.IMAGENET_TARS[0], "w") as outer:
        for c in range(10):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i, img in enumerate(arrays["train_images"][arrays["train_labels"] == c]):
                    _add(inner, f"{synsets[c]}_{i}.JPEG", _jpeg(img, sizes[i % len(sizes)]))
            _add(outer, f"{synsets[c]}.tar", buf.getvalue())
    with tarfile.open(manual_dir / data.IMAGENET_TARS[1], "w") as tar:
        for i, img in enumerate(arrays["test_images"]):
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(img, sizes[i % len(sizes)]))
    return {"train": len(arrays["train_images"]), "validation": len(arrays["test_images"])}
