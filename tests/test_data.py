"""Dataset readers, image/mask decoding and few-shot samplers, on small trees with each layout's quirks."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomalens import data
from anomalens.data import DataError, Dataset, Record, read_image, read_mask


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def square_mask(size: int = 16, value: int = 255) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[4:8, 4:8] = value
    return mask


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *names: object) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    for name in names:
        assert str(name) in message, f"{name} not named in: {message}"
    return message


# --- read_image ------------------------------------------------------------------------------------


def test_grayscale_and_bilevel_become_three_equal_channels(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    image = read_image(save(gray, tmp_path / "l.png"))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], gray)
    np.testing.assert_array_equal(image[..., 2], gray)
    bilevel = Image.fromarray(gray > 100).convert("1")
    bilevel.save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 1], np.where(gray > 100, 255, 0))


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((6, 7, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent: compositing on black would give 0
    image = read_image(save(rgba, tmp_path / "rgba.png"))
    assert image.shape == (6, 7, 3)
    assert tuple(image[0, 0]) == (200, 100, 50)
    la = Image.fromarray(np.full((5, 5), 77, np.uint8)).convert("LA")
    la.putalpha(0)
    la.save(tmp_path / "la.png")
    assert tuple(read_image(tmp_path / "la.png")[2, 2]) == (77, 77, 77)


def test_palette_png_is_expanded_through_its_palette(tmp_path):
    im = Image.new("P", (4, 3))
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.putpixel((1, 2), 1)
    im.save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    assert image.shape == (3, 4, 3)
    assert tuple(image[2, 1]) == (10, 20, 30) and tuple(image[0, 0]) == (0, 0, 0)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = save(values, tmp_path / "16.png")
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    assert image[0, :, 0].tolist() == [0, 1, 128, 255]


def test_big_endian_16bit_and_32bit_integer_tiffs(tmp_path):
    values = np.array([[0, 32768, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", values.astype(">u2"), byteorder=">")
    assert read_image(tmp_path / "be.tif")[0, :, 0].tolist() == [0, 128, 255]
    tifffile.imwrite(tmp_path / "i32.tif", values.astype(np.int32))
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert read_image(tmp_path / "i32.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiffs_gray_by_pillow_and_rgb_by_tifffile(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 0.5, 1.0]], np.float32))
    assert read_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    rgb = np.zeros((5, 6, 3), np.float32)
    rgb[..., 1] = 1.0
    tifffile.imwrite(tmp_path / "rgbf.tif", rgb, photometric="rgb")
    with pytest.raises(OSError):
        Image.open(tmp_path / "rgbf.tif")  # Pillow cannot decode it: the tifffile path is exercised
    image = read_image(tmp_path / "rgbf.tif")
    assert image.shape == (5, 6, 3) and tuple(image[0, 0]) == (0, 255, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8) + np.array([10, 200, 30], np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    image = read_image(tmp_path / "cmyk.jpg")
    assert image.shape == (8, 8, 3)
    assert np.abs(image.astype(int) - rgb).max() <= 8


def test_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high
    stored[:3, :3] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "rot.jpg")
    assert image.shape == (20, 10, 3)
    assert image[1, -2, 0] > 200 and image[-2, 1, 0] < 50  # top-left moved to the top-right


def test_npy_arrays_are_read(tmp_path):
    np.save(tmp_path / "slice.npy", np.array([[0.0, 1.0]], np.float64))
    assert read_image(tmp_path / "slice.npy")[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "not_an_image", "directory"])
def test_unreadable_images_raise_one_line_data_error_naming_the_file(tmp_path, case):
    path = tmp_path / "bad.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        save(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "not_an_image":
        path.write_text("hello")
    elif case == "directory":
        path.mkdir()
    with pytest.raises(DataError) as excinfo:
        read_image(path)
    assert isinstance(excinfo.value, ValueError)
    message = assert_one_line_error(excinfo, path)
    assert {"missing": "not found", "empty": "0 bytes", "directory": "directory"}.get(case, "") in message


def test_pixel_limit_is_configurable_and_pillow_global_is_restored(tmp_path, monkeypatch):
    path = save(np.zeros((20, 30), np.uint8), tmp_path / "big.png")
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "500")
    with pytest.raises(DataError) as excinfo:
        read_image(path)
    assert_one_line_error(excinfo, path, "600 pixels", "ANOMALENS_MAX_PIXELS")
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "250")  # Pillow itself refuses at twice the limit
    with pytest.raises(DataError) as excinfo:
        read_image(path)
    assert_one_line_error(excinfo, path, "too large", "ANOMALENS_MAX_PIXELS")
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "600")
    assert read_image(path).shape == (20, 30, 3)
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="ANOMALENS_MAX_PIXELS"):
        read_image(path)
    assert before == Image.MAX_IMAGE_PIXELS


# --- read_mask -------------------------------------------------------------------------------------


def test_masks_are_binarised_above_zero_from_any_format(tmp_path):
    ones = read_mask(save(square_mask(value=1), tmp_path / "m1.png"), (16, 16))
    assert ones.dtype == np.bool_ and ones.sum() == 16 and ones[5, 5]
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[0, 0, 2] = 1  # only the blue channel set: a luminance conversion would round it to 0
    assert read_mask(save(rgb, tmp_path / "rgb.bmp"), (16, 16, 3)).sum() == 1
    sixteen = np.zeros((16, 16), np.uint16)
    sixteen[3, 3] = 1
    assert read_mask(save(sixteen, tmp_path / "m16.png"), (16, 16)).sum() == 1


def test_mask_size_mismatch_names_both_files_and_sizes(tmp_path):
    mask = save(square_mask(16), tmp_path / "m.png")
    with pytest.raises(DataError) as excinfo:
        read_mask(mask, (16, 20), image_path=tmp_path / "img.png")
    assert_one_line_error(excinfo, mask, tmp_path / "img.png", "16x16", "20x16")


# --- MVTec / MPDD / BTAD ---------------------------------------------------------------------------


def test_mvtec_splits_classes_masks_and_grayscale_class(mvtec_root):
    test = data.load(f"mvtec:{mvtec_root}")
    assert test.name == "mvtec" and test.class_names == ["bottle", "grid"]
    assert len(test) == 8 and test.labels.sum() == 4
    assert not any(os.path.basename(r.path).startswith(".") for r in test.records)
    assert len(data.load(f"mvtec:{mvtec_root}", split="train")) == 8
    assert len(data.load(f"mvtec:{mvtec_root}", split="all")) == 16
    grid = data.load(f"mvtec:{mvtec_root}", classes=["grid"])
    for sample in grid:
        assert sample.image.shape == (16, 16, 3) and sample.image.dtype == np.uint8
        np.testing.assert_array_equal(sample.image[..., 0], sample.image[..., 1])
        if sample.label:
            assert sample.mask.dtype == np.bool_ and sample.mask.sum() == 16
            assert sample.meta == {"defect": "crack", "split": "test"}
        else:
            assert sample.mask is None
    assert data.load(f"mpdd:{mvtec_root}", classes=["bottle"]).name == "mpdd-mvtec"


def test_mvtec_single_class_root_and_classification_only_class(mvtec_root):
    shutil.rmtree(mvtec_root / "grid" / "ground_truth")
    grid = data.load(f"mvtec:{mvtec_root / 'grid'}")
    assert grid.class_names == ["grid"] and grid.name == "mvtec-grid"
    anomalous = [s for s in grid if s.label]
    assert len(anomalous) == 2 and all(s.mask is None for s in anomalous)


def test_mvtec_missing_mask_names_the_image(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as excinfo:
        data.load(f"mvtec:{mvtec_root}")
    assert_one_line_error(excinfo, mvtec_root / "bottle" / "test" / "crack" / "001.png")
    assert len(data.load(f"mvtec:{mvtec_root}", classes=["grid"])) == 4


def test_mask_size_mismatch_surfaces_when_the_sample_is_read(mvtec_root):
    bad = mvtec_root / "grid" / "ground_truth" / "crack" / "000_mask.png"
    save(square_mask(12), bad)
    dataset = data.load(f"mvtec:{mvtec_root}", classes=["grid"])
    index = next(i for i, r in enumerate(dataset.records) if r.mask_path == str(bad))
    with pytest.raises(DataError) as excinfo:
        dataset[index]
    assert_one_line_error(excinfo, bad, dataset.records[index].path, "12x12", "16x16")
    assert data.verify(dataset) == [str(excinfo.value)]


def test_btad_bmp_images_with_png_masks(tmp_path):
    root = tmp_path / "BTAD"
    rng = np.random.default_rng(1)
    for part, folder in (("train", "ok"), ("test", "ok"), ("test", "ko")):
        for i in range(2):
            save(
                rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                root / "01" / part / folder / f"{i:04d}.bmp",
            )
    for i in range(2):
        save(square_mask(), root / "01" / "ground_truth" / "ko" / f"{i:04d}.png")
    dataset = data.load(f"btad:{root}")
    assert dataset.name == "btad" and len(dataset) == 4
    anomalous = [s for s in dataset if s.label]
    assert [Path(s.path).suffix for s in anomalous] == [".bmp", ".bmp"]
    assert all(s.mask.sum() == 16 for s in anomalous)


# --- VisA ------------------------------------------------------------------------------------------


def write_visa(root: Path) -> Path:
    rows = [["object", "split", "label", "image", "mask"]]
    rng = np.random.default_rng(2)
    for i in range(3):
        image = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), root / image)
        rows.append(["candle", "train" if i < 2 else "test", "normal", image, ""])
    image, mask = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    save(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), root / image)
    save(square_mask(value=1), root / mask)  # VisA masks hold 1, not 255
    rows.append(["candle", "test", "anomaly", image, mask])
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def test_visa_split_csv_and_masks_with_value_one(tmp_path):
    root = write_visa(tmp_path / "visa")
    test = data.load(f"visa:{root}")
    assert test.name == "visa" and len(test) == 2 and test.labels.tolist() == [0, 1]
    assert test[1].mask.sum() == 16 and test[0].mask is None
    assert len(data.load(f"visa:{root}", split="train")) == 2
    assert len(data.load(f"visa:{root}", split="all")) == 4


def test_visa_bad_label_names_csv_line(tmp_path):
    root = write_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("anomaly", "broken"))
    with pytest.raises(DataError) as excinfo:
        data.load(f"visa:{root}")
    assert_one_line_error(excinfo, f"{csv_path}:5", "broken")


# --- meta.json, JSONL, InCTRL lists ----------------------------------------------------------------


def test_meta_json_with_empty_and_directory_mask_paths(tmp_path):
    root = tmp_path / "visa_meta"
    rng = np.random.default_rng(3)
    for name in ("n.png", "a.png", "c.png"):
        save(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), root / "imgs" / name)
    save(square_mask(), root / "masks" / "a.png")
    sample = {"cls_name": "pcb", "specie_name": ""}
    meta = {
        "train": {"pcb": [{**sample, "img_path": "imgs/n.png", "mask_path": "", "anomaly": 0}]},
        "test": {
            "pcb": [
                {**sample, "img_path": "imgs/n.png", "mask_path": "", "anomaly": 0},
                {**sample, "img_path": "imgs/a.png", "mask_path": "masks/a.png", "anomaly": 1},
                {**sample, "img_path": "imgs/c.png", "mask_path": "masks", "anomaly": 1, "specie_name": "x"},
            ]
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    test = data.load(f"meta:{root / 'meta.json'}")
    assert test.name == "meta-visa_meta" and test.labels.tolist() == [0, 1, 1]
    samples = list(test)
    assert samples[0].mask is None and samples[1].mask.sum() == 16 and samples[2].mask is None
    assert samples[2].meta["defect"] == "x"
    assert len(data.load(f"meta:{root}", split="all")) == 4


def test_meta_json_errors_name_the_file(tmp_path):
    (tmp_path / "meta.json").write_text('{"test": {"pcb": [')
    with pytest.raises(DataError) as excinfo:
        data.load(f"meta:{tmp_path / 'meta.json'}")
    assert_one_line_error(excinfo, tmp_path / "meta.json", "invalid JSON")
    (tmp_path / "meta.json").write_text(json.dumps({"test": {"pcb": [{"img_path": "x.png", "anomaly": 0}]}}))
    with pytest.raises(DataError) as excinfo:
        data.load(f"meta:{tmp_path / 'meta.json'}")
    assert_one_line_error(excinfo, tmp_path / "x.png", "not found")


def test_aaclip_jsonl_with_float_labels_and_root_option(tmp_path, mvtec_root):
    root = mvtec_root
    lines = [
        {"image_path": "bottle/test/good/000.png", "label": 0.0, "class_name": "bottle"},
        {"image_path": "bottle/test/crack/000.png", "label": 1.0, "class_name": "bottle",
         "mask_path": "bottle/ground_truth/crack/000_mask.png"},
    ]  # fmt: skip
    listing = tmp_path / "metadata" / "MVTec" / "full-shot.jsonl"
    listing.parent.mkdir(parents=True)
    listing.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    for split in ("train", "test", "all"):
        dataset = data.load(f"jsonl:{listing}?root={root}", split=split)
        assert dataset.name == "jsonl-MVTec" and dataset.labels.tolist() == [0, 1]
    assert data.load(f"jsonl:{listing}?root={root}")[1].mask.sum() == 16
    with pytest.raises(DataError) as excinfo:
        data.load(f"jsonl:{listing}")
    assert_one_line_error(excinfo, listing.parent / "bottle" / "test" / "good" / "000.png")


def test_inctrl_data_lists(tmp_path):
    rng = np.random.default_rng(4)
    files = {}
    for part, label, n in (("train/good", 0, 3), ("test/good", 0, 2), ("test/defect", 1, 2)):
        for i in range(n):
            path = f"BrainMRI_anomaly_detection/brainmri/{part}/{i}.png"
            save(rng.integers(0, 256, (16, 16), dtype=np.uint8), tmp_path / path)
            files.setdefault(part, []).append({"image_path": path, "target": label, "type": "brainmri"})
    lists = tmp_path / "AD_json"
    lists.mkdir()
    written = {
        "brainmri_normal.json": files["train/good"] + files["test/good"],
        "brainmri_outlier.json": files["test/defect"],
        "brainmri_val_normal.json": files["test/good"],
        "brainmri_val_outlier.json": files["test/defect"],
    }
    for name, items in written.items():
        (lists / name).write_text(json.dumps(items))
    test = data.load(f"inctrl:{lists}?root={tmp_path}")
    assert test.class_names == ["brainmri"] and test.labels.tolist() == [0, 0, 1, 1]
    assert all(s.mask is None and s.image.shape == (16, 16, 3) for s in test)
    assert len(data.load(f"inctrl:{lists}?root={tmp_path}", split="train")) == 7
    with pytest.raises(DataError) as excinfo:
        data.load(f"inctrl:{lists}")
    assert_one_line_error(excinfo, lists / "BrainMRI_anomaly_detection", "not found")


# --- generic folder --------------------------------------------------------------------------------


def test_folder_without_splits_aliases_nested_defects_and_masks(tmp_path):
    root = tmp_path / "headct"
    rng = np.random.default_rng(5)
    for i in range(3):
        save(rng.integers(0, 256, (16, 16), dtype=np.uint8), root / "good" / f"n{i}.png")
    save(rng.integers(0, 256, (16, 16), dtype=np.uint8), root / "bad" / "a0.jpg")
    save(rng.integers(0, 256, (16, 16), dtype=np.uint8), root / "bad" / "bleed" / "a1.png")
    save(square_mask(), root / "masks" / "a0_mask.png")
    save(square_mask(), root / "masks" / "bleed" / "a1.bmp")
    test = data.load(f"folder:{root}")
    assert test.name == "folder-headct" and test.class_names == ["headct"]
    assert test.labels.tolist() == [0, 0, 0, 1, 1]
    assert [dict(r.meta)["defect"] for r in test.records[3:]] == ["bad", "bleed"]
    assert all(test[i].mask.sum() == 16 for i in (3, 4))
    train = data.load(f"folder:{root}", split="train")
    assert train.labels.tolist() == [0, 0, 0]
    assert len(data.load(f"folder:{root}", split="all")) == 5
    (root / "masks" / "a0_mask.png").unlink()
    with pytest.raises(DataError) as excinfo:
        data.load(f"folder:{root}")
    assert_one_line_error(excinfo, root / "bad" / "a0.jpg")


def test_folder_with_classes_and_split_folders(tmp_path):
    rng = np.random.default_rng(6)
    for cls in ("cable", "wood"):
        for part, label_dir in (("train", "normal"), ("test", "normal"), ("test", "anomaly")):
            save(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), tmp_path / cls / part / label_dir / "x.png")
    train = data.load(f"folder:{tmp_path}", split="train")
    assert train.class_names == ["cable", "wood"] and train.labels.tolist() == [0, 0]
    assert data.load(f"folder:{tmp_path}", classes=["wood"]).labels.tolist() == [0, 1]


# --- load() errors and describe --------------------------------------------------------------------


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(DataError) as excinfo:
        data.load("mvtc:/data/mvtec")
    assert_one_line_error(excinfo, "mvtc", "mvtec", "visa", "folder", "synthetic")


def test_nonexistent_and_empty_roots_name_the_path(tmp_path):
    with pytest.raises(DataError) as excinfo:
        data.load(f"mvtec:{tmp_path / 'nope'}")
    assert_one_line_error(excinfo, tmp_path / "nope", "not found")
    (tmp_path / "empty").mkdir()
    for kind in ("mvtec", "btad", "folder", "visa", "inctrl"):
        with pytest.raises(DataError) as excinfo:
            data.load(f"{kind}:{tmp_path / 'empty'}")
        assert_one_line_error(excinfo, tmp_path / "empty")


def test_unknown_class_split_and_option(mvtec_root):
    with pytest.raises(DataError) as excinfo:
        data.load(f"mvtec:{mvtec_root}", classes=["bottle", "carpet"])
    assert_one_line_error(excinfo, "'carpet'", "bottle, grid", mvtec_root)
    with pytest.raises(DataError, match="unknown split 'val'"):
        data.load(f"mvtec:{mvtec_root}", split="val")
    with pytest.raises(DataError) as excinfo:
        data.load(f"mvtec:{mvtec_root}?size=256")
    assert_one_line_error(excinfo, "size", mvtec_root)


def test_parse_spec_reads_query_options():
    assert data.parse_spec("synthetic:defects?n=40&seed=0") == (
        "synthetic",
        "defects",
        {"n": "40", "seed": "0"},
    )
    assert data.parse_spec("VisA:/d/visa") == ("visa", "/d/visa", {})
    with pytest.raises(DataError, match="repeated"):
        data.parse_spec("synthetic:defects?n=1&n=2")


def test_describe_counts_per_class_and_defect(mvtec_root):
    summary = data.describe(data.load(f"mvtec:{mvtec_root}"))
    assert (summary["images"], summary["normal"], summary["anomalous"], summary["with_mask"]) == (8, 4, 4, 4)
    assert summary["classes"]["grid"] == {
        "images": 4, "normal": 2, "anomalous": 2, "with_mask": 2, "defects": {"crack": 2}
    }  # fmt: skip
    json.dumps(summary)


# --- few-shot samplers -----------------------------------------------------------------------------


def toy_dataset(root: str = "/data/toy", n_normal: int = 20, n_anomalous: int = 5) -> Dataset:
    records = [
        Record(f"{root}/{cls}/{'good' if label == 0 else 'bad'}/{i:03d}.png", label, cls)
        for cls in ("a", "b")
        for label, n in ((0, n_normal), (1, n_anomalous))
        for i in range(n)
    ]
    return Dataset("toy", records, lambda r: None)


def files(dataset: Dataset, indices: list[int], root: str) -> list[str]:
    return [os.path.relpath(dataset.records[i].path, root) for i in indices]


def test_support_is_deterministic_order_and_location_independent():
    ds = toy_dataset()
    chosen = data.sample_support(ds, 4, seed=1, class_name="a")
    assert chosen == data.sample_support(ds, 4, seed=1, class_name="a")
    assert all(ds.records[i].label == 0 and ds.records[i].class_name == "a" for i in chosen)
    shuffled = Dataset("toy", ds.records[::-1], lambda r: None)
    again = data.sample_support(shuffled, 4, seed=1, class_name="a")
    assert files(shuffled, again, "/data/toy") == files(ds, chosen, "/data/toy")
    moved = toy_dataset("/mnt/elsewhere/toy")
    assert files(moved, data.sample_support(moved, 4, 1, "a"), "/mnt/elsewhere/toy") == files(
        ds, chosen, "/data/toy"
    )
    assert chosen[:2] == data.sample_support(ds, 2, seed=1, class_name="a")


def test_different_seeds_give_different_supports_and_exclusion_works():
    ds = toy_dataset()
    supports = {tuple(sorted(data.sample_support(ds, 3, seed, "b"))) for seed in range(5)}
    assert len(supports) == 5
    first = data.sample_support(ds, 3, 0, "b")
    excluded = [ds.records[i].path for i in first]
    assert not set(first) & set(data.sample_support(ds, 3, 0, "b", exclude=excluded))


def test_support_errors_name_the_class():
    ds = toy_dataset(n_normal=2)
    with pytest.raises(DataError) as excinfo:
        data.sample_support(ds, 3, 0, "a")
    assert_one_line_error(excinfo, "'a'", "has 2 normal images", "3 requested")
    with pytest.raises(DataError) as excinfo:
        data.sample_support(ds, 1, 0, "zzz")
    assert_one_line_error(excinfo, "'zzz'", "a, b")


def test_support_sets_record_indices_and_files():
    ds = toy_dataset()
    sets = data.sample_support_sets(ds, 2, seeds=[0, 1], classes=None)
    assert sorted(sets) == [0, 1] and sorted(sets[0]) == ["a", "b"]
    support = sets[1]["b"]
    assert support.k == 2 and support.seed == 1 and support.class_name == "b"
    assert list(support.indices) == data.sample_support(ds, 2, 1, "b")
    assert support.files == tuple(ds.records[i].path for i in support.indices)


def test_balanced_subset_is_one_to_one_per_class():
    ds = toy_dataset()
    subset = data.balanced_subset(ds, 3, seed=0)
    for cls in ("a", "b"):
        labels = [r.label for r in subset.records if r.class_name == cls]
        assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    assert subset.records == data.balanced_subset(ds, "3", seed=0).records
    assert subset.records != data.balanced_subset(ds, 3, seed=1).records
    assert data.balanced_subset(ds, "full", seed=0) is ds and data.balanced_subset(ds, None) is ds
    with pytest.raises(DataError) as excinfo:
        data.balanced_subset(ds, 6, seed=0)
    assert_one_line_error(excinfo, "'a'", "5 anomalous", "6 requested")


def test_shot_subset_follows_each_method_s_shot_semantics():
    ds = toy_dataset()
    per_label = data.shot_subset(ds, 2, "per_label", seed=0)  # CoRe-CLIP: N normal + N anomalous
    assert per_label.records == data.balanced_subset(ds, 2, seed=0).records
    per_class = data.shot_subset(ds, 2, "per_class", seed=0)  # AA-CLIP: 2-shot = 1 normal + 1 anomalous
    for cls in ("a", "b"):
        assert sorted(r.label for r in per_class.records if r.class_name == cls) == [0, 1]
    assert data.shot_subset(ds, "full", "support") is ds
    for shots, semantics, message in ((3, "per_class", "even"), (2, "support", "eval --shots")):
        with pytest.raises(DataError) as excinfo:
            data.shot_subset(ds, shots, semantics)
        assert_one_line_error(excinfo, f"shots={shots}", message)


def test_normal_only_keeps_label_zero():
    ds = toy_dataset()
    normals = data.normal_only(ds)
    assert len(normals) == 40 and normals.labels.sum() == 0
    with pytest.raises(DataError, match="no normal images"):
        data.normal_only(Dataset("x", [Record("/x.png", 1, "a")], lambda r: None))
