"""An optional on-disk cache of frozen-backbone features, memory-mapped, to make multi-epoch training cheap.

When a stage trains only small heads or adapters *after* a frozen backbone, the backbone's features
of a training image are the same in every epoch (as long as the image is not augmented), so a method's
loss may compute them once and read them back from here afterwards::

    cache = FeatureCache(".anomalens_cache/features")
    key = FeatureKey.for_file(backbone.name, backbone.pretrained, 518, (6, 12, 18, 24), sample.path)
    tokens = cache.get_or_compute(key, lambda: backbone_tokens(image))  # np.memmap, read-only

No built-in method uses it yet. Entries are ``.npy`` files named by a hash of the key, which holds the
backbone name, pretrained tag, image size, layer set, the sample's path and its modification time (so an
edited image gets new features), plus a free-form `variant` for anything else that changes the features
(resize policy, a masked view...). Writes are atomic, concurrent writers of one key are harmless (the
last complete file wins), an unreadable entry is recomputed, and the folder can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class FeatureKey:
    """What determines a cached feature array."""

    backbone: str
    pretrained: str | None
    image_size: int
    layers: tuple[int, ...]
    path: str
    mtime_ns: int | None  # None when `path` is not a file (e.g. a generated sample)
    variant: str = ""

    @classmethod
    def for_file(
        cls,
        backbone: str,
        pretrained: str | None,
        image_size: int,
        layers: tuple[int, ...],
        path: str | os.PathLike,
        variant: str = "",
    ) -> FeatureKey:
        """A key for the image at `path`, with its current modification time."""
        mtime = os.stat(path).st_mtime_ns if os.path.isfile(path) else None
        return cls(backbone, pretrained, image_size, tuple(layers), os.fspath(path), mtime, variant)

    def digest(self) -> str:
        """Stable hex name of this key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """A folder of memory-mapped ``.npy`` feature arrays keyed by `FeatureKey`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: FeatureKey) -> Path:
        digest = key.digest()
        return self.root / digest[:2] / f"{digest}.npy"

    def __contains__(self, key: FeatureKey) -> bool:
        return self.path(key).is_file()

    def get_or_compute(self, key: FeatureKey, compute: Callable[[], np.ndarray | torch.Tensor]) -> np.ndarray:
        """The cached array for `key` (read-only memory map), computing and storing it on a miss.

        `compute` may return a numpy array or a tensor (moved to CPU; bfloat16, which numpy lacks, is
        stored as float32).
        """
        path = self.path(key)
        if path.is_file():
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError):
                pass  # written by something else or damaged: recompute below
        value = compute()
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        self._write(path, np.ascontiguousarray(value))
        return np.load(path, mmap_mode="r")

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
