"""Semantic anomaly detection on MNIST and CIFAR-10 (`mnist:<dir>`, `cifar10:<dir>`), paper 001 §5.1.

Both read the files as distributed: MNIST's IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
``.gz``) in the folder, its ``raw/`` or ``MNIST/raw/`` (torchvision's layout); CIFAR-10's python batches
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``) in ``cifar-10-batches-py/`` or the folder itself.
The batches are pickles: they are read with an unpickler that builds only dicts, lists, bytes, numbers
and numpy arrays, so a tampered file cannot run code.

Protocols (parameter ``protocol``):

* ``one-vs-all`` (default): one class is normal, the nine others anomalous. Each normal class is a
  `class_name` of the dataset: its train split is that class's training images, its test split every
  test image labelled against it. ``normal=<class>`` picks one class; without it every class is a task
  (`classes` narrows them), each scored separately as MVTec classes are.
* ``multi-class``: even digits (MNIST) or the six animal classes (CIFAR-10) are normal, the other
  classes anomalous; one `class_name`, "even digit" or "animal".

Class names: "0" .. "9" for MNIST; airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck
for CIFAR-10. Images are uint8 RGB (MNIST's gray repeated into three channels), without masks; each
sample's `meta["class"]` is its original class. A record's path is ``<file>#<index in file>``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from anomalens.data.types import DataError, Dataset, Record, Sample, check_classes, split_parts

MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
# Multi-class protocol: (class_name of the task, normal classes).
MULTI_CLASS = {
    "mnist": ("even digit", ("0", "2", "4", "6", "8")),
    "cifar10": ("animal", ("bird", "cat", "deer", "dog", "frog", "horse")),
}
PROTOCOLS = ("one-vs-all", "multi-class")
IDX_UBYTE = 0x08


def load_mnist(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """`mnist:<root>[?protocol=one-vs-all|multi-class&normal=<digit>]` (see the module docstring)."""
    folder = _find_folder(Path(root), ("", "raw", "MNIST/raw"), MNIST_FILES["test"][0], "MNIST IDX files")
    parts = {}
    for part in split_parts(split):
        images_file, labels_file = (_idx_path(folder, name) for name in MNIST_FILES[part])
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{images_file}: expected N images and N labels, got arrays {images.shape} and {labels.shape}"
            )
        parts[part] = [(str(images_file), images, labels)]
    return _semantic_dataset("mnist", root, parts, MNIST_CLASSES, split, classes, params)


def load_cifar10(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """`cifar10:<root>[?protocol=one-vs-all|multi-class&normal=<name>]` (see the module docstring)."""
    folder = _find_folder(Path(root), ("cifar-10-batches-py", ""), "test_batch", "CIFAR-10 python batches")
    parts = {}
    for part in split_parts(split):
        parts[part] = []
        for name in CIFAR10_FILES[part]:
            images, labels = read_cifar_batch(folder / name)
            parts[part].append((str(folder / name), images, labels))
    return _semantic_dataset("cifar10", root, parts, CIFAR10_CLASSES, split, classes, params)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: big-endian header, then the data) as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: IDX data type 0x{data[2]:02x} is not supported (expected 0x08, unsigned byte)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected, found = int(np.prod(shape)), len(data) - header
    if found != expected:
        raise DataError(
            f"{path}: the IDX header announces {shape} = {expected} bytes of data, the file has {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images uint8 (N, 32, 32, 3) RGB and labels int64 (N,)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 batch not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as error:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from error
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    # Each row holds the red plane, then green, then blue, each 32x32 in row-major order.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only; any other global in the pickle is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return allowed


def _semantic_dataset(
    kind: str,
    root: str,
    parts: Mapping[str, list[tuple[str, np.ndarray, np.ndarray]]],
    class_names: Sequence[str],
    split: str,
    classes: Sequence[str] | None,
    params: Mapping[str, str] | None,
) -> Dataset:
    """Records of every task of the protocol; `parts` maps a set to (file, images, labels) per file."""
    source = f"{kind}:{root}"
    tasks = _tasks(kind, source, class_names, classes, params)
    arrays = {file: images for files in parts.values() for file, images, _ in files}
    for file, _, labels in (f for files in parts.values() for f in files):
        bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
        if bad.size:
            raise DataError(f"{file}: label {labels[bad[0]]} of image {bad[0]} is not a class index 0..9")
    records = []
    for task, normal in tasks.items():
        is_normal = np.isin(np.arange(len(class_names)), [class_names.index(c) for c in normal])
        for part, files in parts.items():
            for file, _, labels in files:
                # The train split of a task holds its normal images only (one-class training data).
                keep = is_normal[labels] if part == "train" else np.ones(len(labels), dtype=bool)
                records += [
                    Record(
                        path=f"{file}#{i}",
                        label=int(not is_normal[y]),
                        class_name=task,
                        meta=(("class", class_names[y]),),
                    )
                    for i, y in zip(np.flatnonzero(keep).tolist(), labels[keep].tolist(), strict=True)
                ]

    def decode(record: Record) -> Sample:
        file, _, index = record.path.rpartition("#")
        image = arrays[file][int(index)]
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image.copy()
        return Sample(
            image=image,
            mask=None,
            label=record.label,
            class_name=record.class_name,
            path=record.path,
            meta=dict(record.meta),
        )

    return Dataset(source, records, decode)


def _tasks(
    kind: str,
    source: str,
    class_names: Sequence[str],
    classes: Sequence[str] | None,
    params: Mapping[str, str] | None,
) -> dict[str, tuple[str, ...]]:
    """Each task's class_name and its normal classes, from the protocol parameters and `classes`."""
    params = dict(params or {})
    unknown = sorted(set(params) - {"protocol", "normal"})
    if unknown:
        raise DataError(f"{source}: unknown parameter {', '.join(unknown)}; accepted: protocol, normal")
    protocol = params.get("protocol", "one-vs-all")
    if protocol not in PROTOCOLS:
        raise DataError(f"{source}: parameter protocol must be one-vs-all or multi-class, got {protocol!r}")
    if protocol == "multi-class":
        if "normal" in params:
            raise DataError(f"{source}: parameter normal applies to protocol=one-vs-all only")
        name, normal = MULTI_CLASS[kind]
        tasks = {name: normal}
    else:
        normal = params.get("normal")
        if normal is not None and normal not in class_names:
            raise DataError(
                f"{source}: parameter normal={normal!r} is not a class; classes: {', '.join(class_names)}"
            )
        tasks = {c: (c,) for c in ([normal] if normal is not None else class_names)}
    if classes is not None:
        check_classes(classes, list(tasks), source)
        tasks = {c: normal for c, normal in tasks.items() if c in classes}
    return tasks


def _find_folder(root: Path, candidates: Sequence[str], marker: str, what: str) -> Path:
    """The first of root/<candidate> holding `marker` (or `marker`.gz)."""
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    for candidate in candidates:
        folder = root / candidate
        if (folder / marker).is_file() or (folder / f"{marker}.gz").is_file():
            return folder
    places = ", ".join(str(root / c) for c in candidates)
    raise DataError(f"no {what} ({marker}) in {places}")


def _idx_path(folder: Path, name: str) -> Path:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"MNIST file not found: {folder / name}[.gz]")
