"""`contextual:<dir>`: contextual anomaly datasets in the CAAD-3K schema of paper 000 (CoRe-CLIP).

A contextual anomaly is a normal-looking subject in a context it does not belong to; the label belongs to
the subject-context pair. The folder holds one manifest, ``manifest.csv`` (with a header row) or
``manifest.json`` (a list of objects with the same fields), one row per image:

===============  =========  ===================================================================
field            required   meaning
===============  =========  ===================================================================
image            yes        image path, relative to the folder
subject_mask     yes        subject mask path (any pixel > 0 is subject); may be empty when unknown
class            yes        the subject class (the `class_name` of the sample)
context          yes        the context or scene name
label            yes        0 / normal, or 1 / anomalous
split            yes        SS (seen subject-context pairs) or CC (cross-context, unseen pairs)
set              no         train or test
mask             no         anomaly mask path; default for anomalous rows: the subject mask
===============  =========  ===================================================================

Without a `set` field, the paper's protocol applies: split "train" = the SS rows (few-shot supports of
both labels are drawn from them), "test" = the CC rows. Normal rows never carry a mask (a `mask` given on
a normal row is ignored). Other fields are kept, as strings, in each sample's `meta`, next to subject,
context, split and set.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from anomalens.data.io import decode_record
from anomalens.data.types import DataError, Dataset, Record, check_classes, split_parts

MANIFESTS = ("manifest.csv", "manifest.json")
REQUIRED = ("image", "subject_mask", "class", "context", "label", "split")
LABELS = {"0": 0, "1": 1, "normal": 0, "anomalous": 1}
PARTS = ("SS", "CC")
SETS = ("train", "test")


def load_contextual(
    root: str, split: str = "test", classes: Sequence[str] | None = None, part: str | None = None
) -> Dataset:
    """Read a `contextual:<root>` dataset (format in the module docstring).

    part: "ss" or "cc" keeps only the seen-context or cross-context rows (``contextual:<root>?part=cc``
    evaluates the SS→CC protocol); None keeps both.
    """
    records = select_records(read_manifest(root), split, classes, root)
    if part is not None:
        if part.upper() not in ("SS", "CC"):
            raise DataError(f"contextual:{root}: part must be 'ss' or 'cc', got {part!r}")
        records = [r for r in records if dict(r.meta).get("split") == part.upper()]
    return Dataset(f"contextual:{root}", records, decode_record)


def read_manifest(root: str | os.PathLike) -> list[Record]:
    """Every row of the folder's manifest as a `Record`, checked (fields, labels, files) in file order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"contextual dataset folder not found: {root}")
    found = [root / name for name in MANIFESTS if (root / name).is_file()]
    if not found:
        raise DataError(f"no manifest.csv or manifest.json in {root}")
    if len(found) > 1:
        raise DataError(f"both manifest.csv and manifest.json in {root}; keep one")
    manifest = found[0]
    rows = _read_csv(manifest) if manifest.suffix == ".csv" else _read_json(manifest)
    if not rows:
        raise DataError(f"{manifest} has no rows")
    return [_record(root, manifest, i, row) for i, row in enumerate(rows, start=1)]


def write_manifest(root: str | os.PathLike, rows: Sequence[dict[str, object]]) -> Path:
    """Write `rows` (one dict per image, the fields above) as `<root>/manifest.csv`."""
    path = Path(root) / MANIFESTS[0]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def select_records(
    records: Sequence[Record], split: str, classes: Sequence[str] | None, source: str | os.PathLike
) -> list[Record]:
    """The records of a split ("train", "test" or "all") and of the given subject classes (None: all)."""
    split_parts(split)  # refuses an unknown split
    check_classes(classes, sorted({r.class_name for r in records}), str(source))
    selected = [
        r
        for r in records
        if (split == "all" or dict(r.meta)["set"] == split) and (classes is None or r.class_name in classes)
    ]
    if not selected:
        raise DataError(f"no images in split {split!r} of {source}")
    return selected


def _read_csv(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        _check_fields(manifest, header)
        # Short rows give None for missing cells; extra cells land under the None key and are dropped.
        return [
            {key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
            for row in reader
        ]


def _read_json(manifest: Path) -> list[dict[str, str]]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{manifest}: invalid JSON at line {error.lineno} ({error.msg})") from error
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{manifest}: expected a JSON list of objects, one per image")
    for i, row in enumerate(data, start=1):
        missing = [name for name in REQUIRED if name not in row]
        if missing:
            raise DataError(f"{manifest} row {i}: missing field(s) {', '.join(missing)}")
    return [{key: "" if value is None else str(value).strip() for key, value in row.items()} for row in data]


def _check_fields(manifest: Path, header: Sequence[str]) -> None:
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}")


def _record(root: Path, manifest: Path, row_number: int, row: dict[str, str]) -> Record:
    where = f"{manifest} row {row_number} ({row['image'] or 'no image'})"
    label = LABELS.get(row["label"].lower())
    if label is None:
        raise DataError(f"{where}: bad label {row['label']!r}; expected 0, 1, normal or anomalous")
    part = row["split"].upper()
    if part not in PARTS:
        raise DataError(f"{where}: bad split {row['split']!r}; expected SS or CC")
    set_name = row["set"].lower() if "set" in row else ("train" if part == "SS" else "test")
    if set_name not in SETS:
        raise DataError(f"{where}: bad set {row['set']!r}; expected train or test")
    if not row["class"]:
        raise DataError(f"{where}: empty class")
    image = _existing(root, row["image"], "image", where)
    subject_mask = (
        _existing(root, row["subject_mask"], "subject mask", where) if row["subject_mask"] else None
    )
    mask = None
    if label == 1:
        mask = _existing(root, row["mask"], "mask", where) if row.get("mask") else subject_mask
    known = {*REQUIRED, "set", "mask"}
    extra = {key: value for key, value in row.items() if key not in known}
    meta = {**extra, "subject": row["class"], "context": row["context"], "split": part, "set": set_name}
    return Record(
        path=image,
        label=label,
        class_name=row["class"],
        mask_path=mask,
        subject_mask_path=subject_mask,
        meta=tuple(sorted(meta.items())),
    )


def _existing(root: Path, relative: str, what: str, where: str) -> str:
    if not relative:
        raise DataError(f"{where}: empty {what} path")
    path = root / relative
    if not path.is_file():
        raise DataError(f"{where}: {what} file not found: {path}")
    return str(path)
