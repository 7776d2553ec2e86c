"""Readers for the on-disk layouts of public anomaly-detection datasets (layouts in docs/datasets.md).

Every reader has the signature `read_<kind>(root, split, classes, params) -> Dataset`: it lists records
without decoding any pixels (files are only checked to exist) and the returned `Dataset` decodes a sample
on access. `split` is "train", "test" or "all"; `classes` None means every class; `params` are the
`?k=v` options of the dataset spec. Directory listings are sorted, so record order never depends on the
file system; readers of list files (CSV, JSON, JSONL) keep the order of the list.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

from anomalens.data.io import decode_record
from anomalens.data.types import DataError, Dataset, Record, check_classes, split_parts
from anomalens_onnx.files import IMAGE_SUFFIXES

# Folder names that mean "normal" / "anomalous" in MVTec (good), BTAD (ok/ko) and generic folder layouts.
NORMAL_DIRS = ("good", "normal", "ok")
ANOMALY_DIRS = ("anomaly", "anomalous", "abnormal", "bad", "defect", "ko")
MASK_DIRS = ("masks", "mask", "ground_truth")
GROUND_TRUTH_DIR = "ground_truth"

Reader = Callable[[str, str, Sequence[str] | None, Mapping[str, str] | None], Dataset]


# --- readers ---------------------------------------------------------------------------------------


def read_mvtec(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """MVTec AD layout: <cls>/train/good, <cls>/test/<defect>, <cls>/ground_truth/<defect>/<stem>_mask.png.

    `root` is the folder holding the class folders, or one class folder itself (how InCTRL's converted
    BrainMRI/HeadCT/SDD/... sets and other single-class sets ship). A class without a `ground_truth/`
    folder is classification-only (anomalous masks are None); a class with one must have a mask for every
    anomalous image.
    """
    return _read_mvtec_layout("mvtec", root, split, classes, params)


def read_mpdd(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """MPDD: the MVTec AD layout (see `read_mvtec`)."""
    return _read_mvtec_layout("mpdd", root, split, classes, params)


def read_btad(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """BTAD: <cls>/train/ok, <cls>/test/ok|ko, <cls>/ground_truth/ko/<stem>.png|.bmp, matched by stem.

    BTAD's image and mask extensions differ between classes (class 01: .bmp images with .png masks).
    """
    return _read_mvtec_layout("btad", root, split, classes, params)


def read_visa(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """VisA via <root>/split_csv/1cls.csv (columns object,split,label,image,mask; paths under root).

    Option `csv=NAME` reads split_csv/NAME.csv instead (e.g. 2cls_highshot). VisA masks store small
    values (1, 2, ...) rather than 255; they are binarised with > 0 like every mask.
    """
    source = f"visa:{root}"
    params = _check_params(params, ("csv",), source)
    _require_dir(root, source)
    name = params.get("csv", "1cls")
    csv_path = os.path.join(root, "split_csv", name if name.endswith(".csv") else name + ".csv")
    if not os.path.isfile(csv_path):
        raise DataError(f"VisA split file not found: {csv_path} (expected <root>/split_csv/1cls.csv)")
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        for line, raw in enumerate(reader, start=2):
            row = {key: (value or "").strip() for key, value in raw.items() if key is not None}
            label = {"normal": 0, "anomaly": 1}.get(row["label"])
            if label is None or row["split"] not in ("train", "test") or not row["image"]:
                raise DataError(
                    f"{csv_path}:{line}: expected label normal|anomaly, split train|test and an image, "
                    f"got {row['label']!r}, {row['split']!r} and {row['image']!r}"
                )
            mask = row["mask"] if label else ""
            record = Record(
                path=_resolve(root, row["image"]),
                label=label,
                class_name=row["object"],
                mask_path=_resolve(root, mask) if mask else None,
                meta=(("split", row["split"]),),
            )
            rows.append((row["split"], record))
    return _from_listed("visa", root, split, classes, rows, source)


def read_meta(
    path: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """AnomalyCLIP / APRIL-GAN / AdaCLIP / Crane `meta.json`: {"train"|"test": {cls: [sample, ...]}}.

    A sample is {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}; paths are relative to
    the folder holding meta.json (option `root=DIR` changes that). `path` may also be that folder. A
    `mask_path` that is "" or names a directory means "no mask" (classification-only sets).
    """
    source = f"meta:{path}"
    params = _check_params(params, ("root",), source)
    if os.path.isdir(path):
        path = os.path.join(path, "meta.json")
    data = _read_json(path)
    base = _base(params, os.path.dirname(path), source)
    if not isinstance(data, dict) or not set(data) & {"train", "test"}:
        raise DataError(f"{path}: expected an object with 'train' and/or 'test' keys (AnomalyCLIP meta.json)")
    rows = []
    for part in ("train", "test"):
        per_class = data.get(part, {})
        if not isinstance(per_class, dict):
            raise DataError(f"{path}: '{part}' must map class names to lists of samples")
        for cls, items in per_class.items():
            if not isinstance(items, list):
                raise DataError(f"{path}: '{part}/{cls}' must be a list of samples")
            for i, item in enumerate(items):
                where = f"{path}: {part}/{cls}[{i}]"
                image, label = _field(item, "img_path", where), _label(_field(item, "anomaly", where), where)
                mask = str(item.get("mask_path") or "") if label else ""
                mask_path = _resolve(base, mask) if mask else None
                if mask_path is not None and os.path.isdir(mask_path):
                    mask_path = None
                defect = str(item.get("specie_name") or "")
                meta = (("defect", defect), ("split", part)) if defect else (("split", part),)
                rows.append((part, Record(_resolve(base, str(image)), label, str(cls), mask_path, meta=meta)))
    return _from_listed("meta", os.path.dirname(path), split, classes, rows, source)


def read_jsonl(
    path: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """AA-CLIP training list: one {"image_path", "label", "mask_path", "class_name"} object per line.

    Relative paths are resolved against the file's folder, or `root=DIR` (AA-CLIP's own lists, e.g.
    dataset/metadata/VisA/full-shot.jsonl, are relative to the dataset root). The file has no split: every
    split returns all of its lines. Labels may be written 1.0/0.0; "mask_path" may be absent for normals.
    """
    source = f"jsonl:{path}"
    params = _check_params(params, ("root",), source)
    if not os.path.isfile(path):
        raise DataError(f"JSONL file not found: {path}")
    base = _base(params, os.path.dirname(path), source)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg})") from error
            label = _label(_field(item, "label", where), where)
            mask = str(item.get("mask_path") or "") if label else ""
            record = Record(
                path=_resolve(base, str(_field(item, "image_path", where))),
                label=label,
                class_name=str(_field(item, "class_name", where)),
                mask_path=_resolve(base, mask) if mask else None,
            )
            rows.append((None, record))
    return _from_listed("jsonl", os.path.dirname(path), split, classes, rows, source)


def read_inctrl(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """InCTRL data lists: {name}_normal.json + {name}_outlier.json (train), {name}_val_*.json (test).

    Each file is a JSON list of {"image_path", "target" 0/1, "type" <class>}. InCTRL writes image paths
    relative to the folder its scripts ran in; they are resolved against `root` (the folder holding the
    JSON files) unless `root=DIR` is given. The lists carry no masks: every sample's mask is None.
    """
    source = f"inctrl:{root}"
    params = _check_params(params, ("root",), source)
    _require_dir(root, source)
    base = _base(params, root, source)
    lists = {"train": [], "test": []}
    for name in sorted(os.listdir(root)):
        stem, is_json = name[: -len(".json")], name.endswith(".json")
        if is_json and stem.endswith(("_val_normal", "_val_outlier")):
            lists["test"].append(name)
        elif is_json and stem.endswith(("_normal", "_outlier")):
            lists["train"].append(name)
    if not lists["train"] and not lists["test"]:
        raise DataError(f"no InCTRL data lists (<name>_normal.json, <name>_val_normal.json, ...) in {root}")
    rows = []
    for part, names in lists.items():
        for name in names:
            json_path = os.path.join(root, name)
            items = _read_json(json_path)
            if not isinstance(items, list):
                raise DataError(f"{json_path}: expected a JSON list of samples")
            default_label = 1 if name.endswith("_outlier.json") else 0
            for i, item in enumerate(items):
                where = f"{json_path}[{i}]"
                image, cls = _field(item, "image_path", where), _field(item, "type", where)
                label = _label(item.get("target", default_label), where)
                rows.append(
                    (part, Record(_resolve(base, str(image)), label, str(cls), meta=(("list", name),)))
                )
    return _from_listed("inctrl", root, split, classes, rows, source)


def read_folder(
    root: str,
    split: str = "test",
    classes: Sequence[str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Dataset:
    """A plain folder: normal/ and anomaly/ (aliases below), optional masks/, optional class folders.

    Per class folder (the root itself when it directly holds label folders):
      [train/|test/] normal/ (or good/, ok/) and anomaly/ (or anomalous/, abnormal/, bad/, defect/, ko/),
      images directly inside or in sub-folders (the sub-folder name becomes the defect type), and an
      optional masks/ (or mask/, ground_truth/) matched to anomalous images by stem (`<stem>` or
      `<stem>_mask`, any image extension, any depth).
    With train/ and test/ folders those are the splits. Without them the whole folder is the test split
    and the train split is its normal images (the same files: fine for zero-shot and for sampling
    few-shot support, wrong for training a method that is then tested on the same folder).
    If a masks folder exists every anomalous image must have a mask.
    """
    source = f"folder:{root}"
    params = _check_params(params, (), source)
    _require_dir(root, source)
    class_dirs = _class_dirs(
        root, _is_folder_class, "class folders with normal/ and anomaly/ (or train/, test/)"
    )
    rows = []
    for cls in _select(sorted(class_dirs), classes, source):
        cls_dir = class_dirs[cls]
        split_dirs = [s for s in ("train", "test") if os.path.isdir(os.path.join(cls_dir, s))]
        if split_dirs:
            for part in split_dirs:
                rows += [(part, r) for r in _scan_label_folders(os.path.join(cls_dir, part), cls, part)]
        else:
            # No split folders: normal images belong to both splits, anomalous ones to test only.
            rows += [(None if r.label == 0 else "test", r) for r in _scan_label_folders(cls_dir, cls, "test")]
    return _dataset("folder", root, split, _in_split(rows, split), source)


# Readers whose modules are imported only when used (generators, archives, manifests).
def read_synthetic(
    kind: str, split: str, classes: Sequence[str] | None, params: Mapping[str, str] | None
) -> Dataset:
    """`synthetic:<kind>[?n=..&size=..&seed=..]` (`data.synthetic.load_synthetic`)."""
    from anomalens.data.synthetic import load_synthetic

    return load_synthetic(kind, params, split, classes)


def read_contextual(
    root: str, split: str, classes: Sequence[str] | None, params: Mapping[str, str] | None
) -> Dataset:
    """`contextual:<dir>[?part=ss|cc]` (`data.contextual.load_contextual`)."""
    from anomalens.data.contextual import load_contextual

    params = _check_params(params, ("part",), f"contextual:{root}")
    return load_contextual(root, split, classes, part=params.get("part"))


def read_mnist(
    root: str, split: str, classes: Sequence[str] | None, params: Mapping[str, str] | None
) -> Dataset:
    """`mnist:<root>[?protocol=..&normal=..]` (`data.classic.load_mnist`)."""
    from anomalens.data.classic import load_mnist

    return load_mnist(root, split, classes, params)


def read_cifar10(
    root: str, split: str, classes: Sequence[str] | None, params: Mapping[str, str] | None
) -> Dataset:
    """`cifar10:<root>[?protocol=..&normal=..]` (`data.classic.load_cifar10`)."""
    from anomalens.data.classic import load_cifar10

    return load_cifar10(root, split, classes, params)


# The one table of dataset kinds: `data.load("<kind>:<path>")` calls READERS[kind].
READERS: dict[str, Reader] = {
    "btad": read_btad,
    "cifar10": read_cifar10,
    "contextual": read_contextual,
    "folder": read_folder,
    "inctrl": read_inctrl,
    "jsonl": read_jsonl,
    "meta": read_meta,
    "mnist": read_mnist,
    "mpdd": read_mpdd,
    "mvtec": read_mvtec,
    "synthetic": read_synthetic,
    "visa": read_visa,
}


def dataset_name(kind: str, path: str) -> str:
    """`kind` when the dataset's folder is named like the kind (mvtec:/data/mvtec), else kind-folder.

    For a list file (meta.json, *.jsonl) the folder holding it names the dataset.
    """
    path = os.path.normpath(os.path.abspath(path))
    base = os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)
    return kind if base.lower() in ("", kind) else f"{kind}-{base}"


# --- MVTec-style layout ----------------------------------------------------------------------------


def _read_mvtec_layout(
    kind: str, root: str, split: str, classes: Sequence[str] | None, params: Mapping[str, str] | None
) -> Dataset:
    source = f"{kind}:{root}"
    params = _check_params(params, (), source)
    _require_dir(root, source)
    class_dirs = _class_dirs(root, _has_split_dir, "class folders (<class>/train, <class>/test)")
    rows = []
    for cls in _select(sorted(class_dirs), classes, source):
        cls_dir = class_dirs[cls]
        gt_root = os.path.join(cls_dir, GROUND_TRUTH_DIR)
        for part in split_parts(split):
            split_dir = os.path.join(cls_dir, part)
            for defect in _subdirs(split_dir):
                label = 0 if defect.lower() in NORMAL_DIRS else 1
                masks = (
                    _MaskIndex(os.path.join(gt_root, defect)) if label and os.path.isdir(gt_root) else None
                )
                for image in _list_images(os.path.join(split_dir, defect)):
                    mask = masks.find(image) if masks else None
                    meta = (("defect", defect), ("split", part))
                    rows.append((part, Record(image, label, cls, mask, meta=meta)))
    return _dataset(kind, root, split, _in_split(rows, split), source)


class _MaskIndex:
    """Masks of one folder, looked up by an image's stem or `<stem>_mask`.

    MVTec-style ground_truth/<defect>/ folders are not searched recursively: MVTec LOCO keeps several
    masks per image in sub-folders, which a stem match would silently mis-pair.
    """

    def __init__(self, directory: str, recursive: bool = False):
        self.directory = directory
        self.by_stem: dict[str, list[str]] = {}
        for path in _list_images(directory, recursive=recursive):
            self.by_stem.setdefault(_stem(path), []).append(path)

    def find(self, image: str) -> str:
        stem = _stem(image)
        for key in (f"{stem}_mask", stem):
            found = self.by_stem.get(key, [])
            if len(found) > 1:
                raise DataError(f"ambiguous masks for image {image}: {', '.join(found)}")
            if found:
                return found[0]
        raise DataError(
            f"missing mask for anomalous image {image}: no {stem}_mask.* or {stem}.* in {self.directory}"
        )


# --- generic folder layout -------------------------------------------------------------------------


def _is_folder_class(path: str) -> bool:
    names = {n.lower() for n in _subdirs(path)}
    return bool(names & {"train", "test", *NORMAL_DIRS, *ANOMALY_DIRS})


def _scan_label_folders(directory: str, cls: str, part: str) -> list[Record]:
    subdirs = _subdirs(directory)
    labelled = [(d, 0) for d in subdirs if d.lower() in NORMAL_DIRS]
    labelled += [(d, 1) for d in subdirs if d.lower() in ANOMALY_DIRS]
    if not labelled:
        raise DataError(f"no normal/ or anomaly/ folder (or an alias: good, ok, bad, ko, ...) in {directory}")
    mask_dirs = [os.path.join(directory, d) for d in subdirs if d.lower() in MASK_DIRS]
    if len(mask_dirs) > 1:
        raise DataError(f"more than one mask folder in {directory}: {', '.join(mask_dirs)}")
    masks = _MaskIndex(mask_dirs[0], recursive=True) if mask_dirs else None
    records = []
    for name, label in sorted(labelled, key=lambda x: (x[1], x[0])):
        label_dir = os.path.join(directory, name)
        for image in _list_images(label_dir, recursive=True):
            defect = os.path.relpath(os.path.dirname(image), label_dir)
            meta = (("defect", name if defect == "." else defect.replace(os.sep, "/")), ("split", part))
            mask = masks.find(image) if masks and label else None
            records.append(Record(image, label, cls, mask, meta=meta))
    return records


# --- shared helpers --------------------------------------------------------------------------------


def _class_dirs(root: str, is_class: Callable[[str], bool], expected: str) -> dict[str, str]:
    """{class: folder}: the root itself if it is a class folder, else its sub-folders that are."""
    if is_class(root):
        return {os.path.basename(os.path.normpath(os.path.abspath(root))): root}
    found = {d: os.path.join(root, d) for d in _subdirs(root) if is_class(os.path.join(root, d))}
    if not found:
        raise DataError(f"no {expected} under {root}")
    return found


def _has_split_dir(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, s)) for s in ("train", "test"))


def _from_listed(
    kind: str,
    root: str,
    split: str,
    classes: Sequence[str] | None,
    rows: list[tuple[str | None, Record]],
    source: str,
) -> Dataset:
    """Filter (split, record) rows of a list file by split and class, and check the files exist."""
    wanted = set(_select(sorted({r.class_name for _, r in rows}), classes, source))
    rows = [(part, r) for part, r in rows if r.class_name in wanted]
    records = _in_split(rows, split)
    for r in records:
        if not os.path.isfile(r.path):
            raise DataError(f"image listed in {source} not found: {r.path}")
        if r.mask_path is not None and not os.path.isfile(r.mask_path):
            raise DataError(f"mask listed in {source} for image {r.path} not found: {r.mask_path}")
    return _dataset(kind, root, split, records, source)


def _dataset(kind: str, root: str, split: str, records: list[Record], source: str) -> Dataset:
    if not records:
        raise DataError(f"no images in split '{split}' of {source}")
    return Dataset(dataset_name(kind, root), records, decode_record)


def _in_split(rows: Iterable[tuple[str | None, Record]], split: str) -> list[Record]:
    """Records of the requested split; a row whose split is None belongs to every split."""
    parts = split_parts(split)
    return [r for part, r in rows if part is None or part in parts]


def _select(available: Sequence[str], classes: Sequence[str] | None, source: str) -> list[str]:
    """The requested classes (all when None), each checked to exist in `available`."""
    check_classes(classes, available, source)
    return list(available) if classes is None else list(dict.fromkeys(classes))


def _check_params(params: Mapping[str, str] | None, allowed: Sequence[str], source: str) -> dict[str, str]:
    """The spec's options as a dict, refusing any the reader does not know."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise DataError(f"unknown option(s) {', '.join(unknown)} for {source}; accepted: {accepted}")
    return params


def _require_dir(path: str, source: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"dataset root not found: {path} ({source})")
    if not os.path.isdir(path):
        raise DataError(f"dataset root is not a directory: {path} ({source})")


def _base(params: Mapping[str, str], default: str, source: str) -> str:
    """The folder relative paths of a list file are resolved against: option `root=DIR` or `default`."""
    if "root" not in params:
        return default
    base = os.path.abspath(os.path.expanduser(params["root"]))
    if not os.path.isdir(base):
        raise DataError(f"root={params['root']} is not a directory ({source})")
    return base


def _subdirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(
        n for n in os.listdir(path) if not n.startswith(".") and os.path.isdir(os.path.join(path, n))
    )


def _list_images(directory: str, recursive: bool = False) -> list[str]:
    """Image files under `directory`, sorted; hidden files (macOS ._* copies, .DS_Store) are skipped."""
    found = []
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [
            os.path.join(current, f)
            for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(found)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _read_json(path: str) -> object:
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error


def _field(item: object, key: str, where: str) -> object:
    if not isinstance(item, dict) or key not in item:
        raise DataError(f"{where}: missing field {key!r}")
    return item[key]


def _label(value: object, where: str) -> int:
    """0/1 from 0, 1, 0.0, 1.0, True, False, "0", "1"."""
    try:
        label = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        label = -1.0
    if label not in (0.0, 1.0):
        raise DataError(f"{where}: label must be 0 or 1, got {value!r}")
    return int(label)
