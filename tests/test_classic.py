"""MNIST (IDX files) and CIFAR-10 (python batches) readers and their semantic-AD protocols."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from anomalens.data.classic import CIFAR10_CLASSES, load_cifar10, load_mnist, read_cifar_batch, read_idx
from anomalens.data.types import DataError


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (unsigned byte), number of dimensions, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist(root, gz: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = root / f"{prefix}-{name}-ubyte"
            data = _idx_bytes(array)
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(data)
            else:
                path.write_bytes(data)
        sets[prefix] = (images, labels)
    return sets


def _python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the CIFAR-10 release is (Python 2 cPickle, protocol 0: str keys, numpy array)."""
    raw = "".join(f"\\x{b:02x}" for b in data.tobytes())
    rows, cols = data.shape
    return (
        "(dp0\nS'batch_label'\np1\nS'testing batch 1 of 1'\np2\nsS'data'\np3\n"
        "cnumpy.core.multiarray\n_reconstruct\np4\n(cnumpy\nndarray\np5\n(I0\ntp6\nS'b'\np7\ntp8\nRp9\n"
        f"(I1\n(I{rows}\nI{cols}\ntp10\ncnumpy\ndtype\np11\n(S'u1'\np12\nI0\nI1\ntp13\nRp14\n"
        "(I3\nS'|'\np15\nNNNI-1\nI-1\nI0\ntp16\nbI00\n"
        f"S'{raw}'\np17\ntp18\nbsS'labels'\np19\n(lp20\n" + "".join(f"I{y}\na" for y in labels) + "s."
    ).encode("latin1")


def _cifar(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
        labels = (np.arange(12) + len(files)) % 10
        (folder / name).write_bytes(_python2_cifar_pickle(data, labels.tolist()))
        files[name] = (data, labels)
    return files


def test_idx_reader_plain_and_gzip(tmp_path):
    for gz in (False, True):
        root = tmp_path / str(gz)
        root.mkdir()
        images, labels = _mnist(root, gz)["t10k"]
        suffix = ".gz" if gz else ""
        assert np.array_equal(read_idx(root / f"t10k-images-idx3-ubyte{suffix}"), images)
        assert np.array_equal(read_idx(root / f"t10k-labels-idx1-ubyte{suffix}"), labels)


def test_mnist_one_vs_all(tmp_path):
    sets = _mnist(tmp_path, gz=False)
    train = load_mnist(str(tmp_path), "train", None, {"normal": "3"})
    assert train.class_names == ["3"] and len(train) == 3 and train.labels.sum() == 0
    assert all(s.meta["class"] == "3" for s in train)
    test = load_mnist(str(tmp_path), "test", None, {"normal": "3"})
    images, labels = sets["t10k"]
    assert len(test) == 20 and list(test.labels) == [int(y != 3) for y in labels]
    sample = test[7]
    assert sample.image.shape == (28, 28, 3) and sample.image.dtype == np.uint8 and sample.mask is None
    assert all(np.array_equal(sample.image[..., c], images[7]) for c in range(3))
    assert sample.path.endswith("t10k-images-idx3-ubyte#7")


def test_mnist_all_classes_and_multi_class(tmp_path):
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    _mnist(raw, gz=True)
    every = load_mnist(str(tmp_path), "test", None, None)
    assert every.class_names == [str(d) for d in range(10)] and len(every) == 10 * 20
    assert load_mnist(str(tmp_path), "test", ["1", "4"], None).class_names == ["1", "4"]
    multi = load_mnist(str(tmp_path), "all", None, {"protocol": "multi-class"})
    assert multi.class_names == ["even digit"]
    for s in multi:
        assert s.label == int(s.meta["class"] not in "02468")
    assert sum(r.path.split("#")[0].endswith("train-images-idx3-ubyte.gz") for r in multi.records) == 15


def test_cifar10_python_batches(tmp_path):
    files = _cifar(tmp_path)
    test = load_cifar10(str(tmp_path), "test", None, {"normal": "airplane"})
    data, labels = files["test_batch"]
    assert test.class_names == ["airplane"] and list(test.labels) == [int(y != 0) for y in labels]
    image = test[5].image
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # Rows hold the red plane, then green, then blue: pixel (row 1, col 2) of channel c.
    assert [image[1, 2, c] for c in range(3)] == [data[5, c * 1024 + 32 + 2] for c in range(3)]
    train = load_cifar10(str(tmp_path), "train", None, {"normal": "airplane"})
    expected = sum(int((y == 0).sum()) for name, (_, y) in files.items() if name != "test_batch")
    assert len(train) == expected and train.labels.sum() == 0
    multi = load_cifar10(str(tmp_path / "cifar-10-batches-py"), "test", None, {"protocol": "multi-class"})
    animals = {"bird", "cat", "deer", "dog", "frog", "horse"}
    assert multi.class_names == ["animal"]
    assert [s.label for s in multi] == [int(CIFAR10_CLASSES[y] not in animals) for y in labels]


def test_cifar_unpickler_refuses_code(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_batch(path)


@pytest.mark.parametrize(
    ("params", "classes", "named"),
    [
        ({"normal": "11"}, None, "normal"),
        ({"protocol": "few-vs-few"}, None, "protocol"),
        ({"protocol": "multi-class", "normal": "3"}, None, "normal"),
        ({"shots": "4"}, None, "shots"),
        ({"normal": "3"}, ["4"], "'4'"),
    ],
)
def test_bad_protocol_params(tmp_path, params, classes, named):
    _mnist(tmp_path, gz=False)
    with pytest.raises(DataError, match=named):
        load_mnist(str(tmp_path), "test", classes, params)


def test_corrupt_and_missing_files_are_named(tmp_path):
    _mnist(tmp_path, gz=False)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: the IDX header announces"):
        load_mnist(str(tmp_path), "test", None, None)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x08\x03\x00\x00junk")
    with pytest.raises(DataError, match="train-images-idx3-ubyte is not an IDX file"):
        load_mnist(str(tmp_path), "train", None, None)
    with pytest.raises(DataError, match="CIFAR-10 python batches"):
        load_cifar10(str(tmp_path), "test", None, None)
