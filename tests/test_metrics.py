"""anomalens.metrics against sklearn, slow reference implementations and hand-computed values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from anomalens.metrics import (
    PixelMetricAccumulator,
    UndefinedMetricWarning,
    aupro,
    evaluate,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    resize_for_eval,
)

TOL = 1e-12

# ------------------------------------------------ references (slow, obviously correct)


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def reference_pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[list, list]:
    """Official MVTec curve: one point per distinct threshold, pixels scoring >= t, regions pooled."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == k) for k in range(1, count + 1)]
    n_normal = sum(int((~m).sum()) for m in masks)
    xs, ys = [0.0], [0.0]
    for t in sorted({float(v) for amap in maps for v in amap.ravel()}, reverse=True):
        false_pos = sum(int(((amap >= t) & ~mask).sum()) for mask, amap in zip(masks, maps, strict=True))
        overlaps = [(maps[image][region] >= t).mean() for image, region in regions]
        xs.append(false_pos / n_normal)
        ys.append(float(np.mean(overlaps)))
    return xs + [1.0], ys + [1.0]


def official_style_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[list, list]:
    """The same curve the way the MVTec AD code builds it: one argsort, cumulative sums, last of each tie."""
    fp_step = (~masks).astype(float)
    pro_step = np.zeros(masks.shape)
    n_regions = 0
    for image, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            pro_step[image][labelled == k] = 1 / (labelled == k).sum()
        n_regions += count
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    last_of_tie = np.append(np.diff(scores) != 0, True)
    fprs = np.cumsum(fp_step.ravel()[order])[last_of_tie] / fp_step.sum()
    pros = np.cumsum(pro_step.ravel()[order])[last_of_tie] / n_regions
    return [0.0, *fprs, 1.0], [0.0, *pros, 1.0]


def integrate_to(xs: list, ys: list, limit: float) -> float:
    """Trapezoids segment by segment, the last one cut at `limit` by linear interpolation."""
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def reference_sampled_aupro(masks: list[np.ndarray], maps: list[np.ndarray], limit: float = 0.3) -> float:
    """cal_pro_score of AnomalyCLIP / APRIL-GAN / Crane, written as a plain loop over thresholds."""
    scores = np.concatenate([m.ravel() for m in maps])
    lo, hi = scores.min(), scores.max()
    regions = [
        (i, r.coords) for i, mask in enumerate(masks) for r in measure.regionprops(measure.label(mask))
    ]
    n_normal = sum(int((~m).sum()) for m in masks)
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = [amap > th for amap in maps]
        pros.append(np.mean([binary[i][c[:, 0], c[:, 1]].sum() / len(c) for i, c in regions]))
        fprs.append(sum(int((b & ~m).sum()) for b, m in zip(binary, masks, strict=True)) / n_normal)
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs < limit
    x = fprs[kept]
    return float(auc((x - x.min()) / (x.max() - x.min()), pros[kept]))


# ------------------------------------------------ data


def blob_mask(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=2.0)
    return smooth > np.quantile(smooth, 1 - fraction)


def noisy_map(rng: np.random.Generator, mask: np.ndarray, dtype=np.float32) -> np.ndarray:
    return (1.2 * mask + rng.normal(size=mask.shape)).astype(dtype)


def sparse_mask(shape: tuple[int, int]) -> np.ndarray:
    """Single pixels, a diagonal chain (one 8-connected region) and two corner-touching pixels."""
    mask = np.zeros(shape, bool)
    mask[1, 1] = mask[5, shape[1] - 2] = True
    for k in range(4):
        mask[3 + k, 3 + k] = True
    mask[shape[0] - 3, 1] = mask[shape[0] - 2, 2] = True
    return mask


def make_case(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "blobs_nonsquare":
        masks = [blob_mask(rng, (20, 28), 0.1) for _ in range(4)]
        return masks, [noisy_map(rng, m) for m in masks]
    if name == "heavy_ties":
        masks = [blob_mask(rng, (18, 22), 0.15) for _ in range(3)]
        return masks, [np.round(noisy_map(rng, m)) for m in masks]
    if name == "sparse_regions":
        masks = [sparse_mask((14, 17)), sparse_mask((12, 12))]
        return masks, [noisy_map(rng, m) for m in masks]
    if name == "empty_masks_sizes":
        masks = [blob_mask(rng, (9, 14), 0.2), np.zeros((16, 11), bool), blob_mask(rng, (12, 12), 0.1)]
        return masks, [noisy_map(rng, m, np.float64) for m in masks]
    if name == "on_sampled_thresholds":  # map values equal to the sampled thresholds: tests `>` vs `>=`
        masks = [blob_mask(rng, (16, 16), 0.2) for _ in range(2)]
        grid = np.append(np.arange(0.0, 1.0, 1 / 200), 1.0)
        maps = [grid[rng.integers(0, 160, m.shape) + 40 * m] for m in masks]
        maps[0][0, 0], maps[0][0, 1] = 0.0, 1.0  # so that the thresholds are grid[:200]
        return masks, maps
    if name == "constant_map_image":
        masks = [blob_mask(rng, (15, 15), 0.2) for _ in range(3)]
        maps = [noisy_map(rng, m) for m in masks]
        maps[1][:] = 0.5
        return masks, maps
    raise KeyError(name)


CASES = [
    "blobs_nonsquare",
    "heavy_ties",
    "sparse_regions",
    "empty_masks_sizes",
    "on_sampled_thresholds",
    "constant_map_image",
]


def as_input(masks: list[np.ndarray], maps: list[np.ndarray]):
    """Stacked (N, H, W) arrays where the sizes agree (0/1 ints for masks), else the lists."""
    if len({m.shape for m in masks}) == 1:
        return np.stack(masks).astype(np.uint8), np.stack(maps)
    return masks, maps


# ------------------------------------------------ image metrics


def image_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        n = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        cases += [
            (f"random{i}", labels, rng.random(n)),
            (f"ties{i}", labels, rng.integers(0, 3, n).astype(float)),
            (f"imbalanced{i}", (rng.random(n) < 0.1) | (np.arange(n) == 0), rng.normal(size=n)),
        ]
    cases += [
        ("constant", np.array([0, 1, 1, 0, 1]), np.full(5, 0.3)),
        ("tiny", np.array([1, 0]), np.array([0.2, 0.7])),
        ("tiny_tie", np.array([0, 1, 1]), np.array([0.5, 0.5, 0.1])),
        ("int_scores", np.array([True, False, True]), np.array([3, 1, 3])),
    ]
    return cases


@pytest.mark.parametrize(
    ("name", "labels", "scores"), image_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_image_metrics_match_sklearn(name, labels, scores):
    labels = labels.astype(int)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=TOL)


def test_image_metrics_hand_checked():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == 0.75  # 3 of 4 (anomalous, normal) pairs ordered correctly
    assert image_ap(labels, scores) == pytest.approx((1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert f1_max(labels, scores) == pytest.approx(0.8)  # threshold 0.35: TP 2, FP 1
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert isinstance(image_auroc(np.array([0, 1]), np.array([0.1, 0.9], np.float32)), float)


@pytest.mark.parametrize("metric", [image_auroc, image_ap, f1_max])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_image_metrics_single_class_is_none_with_warning(metric, labels):
    with pytest.warns(UndefinedMetricWarning, match=metric.__name__.replace("f1_max", "image_f1_max")):
        assert metric(labels, np.arange(len(labels), dtype=float)) is None


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "equal length"),
        ([0, 2], [0.1, 0.2], "0/1"),
        ([0, 1], ["a", "b"], "numeric"),
    ],
)
def test_image_metrics_reject_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


# ------------------------------------------------ pixel metrics


@pytest.mark.parametrize("name", CASES)
def test_pixel_metrics_match_sklearn(name):
    masks, maps = make_case(name)
    labels = np.concatenate([m.ravel() for m in masks]).astype(int)
    scores = np.concatenate([m.ravel() for m in maps])
    masks_in, maps_in = as_input(masks, maps)
    assert pixel_auroc(masks_in, maps_in) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert pixel_ap(masks_in, maps_in) == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert pixel_f1_max(masks_in, maps_in) == pytest.approx(sklearn_f1_max(labels, scores), abs=TOL)


def test_pixel_metrics_accept_none_masks_for_normal_images():
    masks, maps = make_case("empty_masks_sizes")
    with_none = [masks[0], None, masks[2]]
    assert pixel_auroc(with_none, maps) == pixel_auroc(masks, maps)
    assert aupro(with_none, maps) == aupro(masks, maps)


@pytest.mark.parametrize("metric", [pixel_auroc, pixel_ap, pixel_f1_max, aupro])
@pytest.mark.parametrize("fill", [False, True])
def test_pixel_metrics_single_class_is_none_with_warning(metric, fill):
    masks = np.full((2, 4, 5), fill)
    with pytest.warns(UndefinedMetricWarning, match=metric.__name__):
        assert metric(masks, np.random.default_rng(0).random((2, 4, 5))) is None


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), "shape"),
        (np.zeros((2, 3, 3)), np.zeros((3, 3, 3)), "2 masks but 3 maps"),
        (np.full((1, 3, 3), 255), np.zeros((1, 3, 3)), "0/1"),
        (np.zeros((3, 3)), np.zeros((3, 3)), r"\(N, H, W\)"),
        ([np.zeros((3, 3))], [np.full((3, 3), np.inf)], "infinite"),
    ],
)
def test_pixel_metrics_reject_bad_input(masks, maps, message):
    with pytest.raises(ValueError, match=message):
        pixel_auroc(masks, maps)


# ------------------------------------------------ AUPRO, MVTec AD definition


@pytest.mark.parametrize("name", CASES)
def test_aupro_mvtec_matches_reference(name):
    masks, maps = make_case(name)
    xs, ys = reference_pro_curve(masks, maps)
    masks_in, maps_in = as_input(masks, maps)
    for limit in (0.3, 0.02, 0.5, 1.0):
        expected = integrate_to(xs, ys, limit)
        assert aupro(masks_in, maps_in, fpr_limit=limit) == pytest.approx(expected, abs=1e-10), limit


def test_aupro_mvtec_matches_official_style_curve_on_many_pixels():
    rng = np.random.default_rng(7)
    masks = np.stack([blob_mask(rng, (64, 48), 0.05) for _ in range(8)])
    maps = np.stack([noisy_map(rng, m) for m in masks])
    maps[0] = np.round(maps[0], 1)  # some ties across classes as well
    xs, ys = official_style_pro_curve(masks, maps)
    for limit in (0.3, 0.01):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(integrate_to(xs, ys, limit), abs=1e-9)


def test_aupro_mvtec_hand_checked_curve():
    # Region {0.9, 0.5}, normals {0.7, 0.1}: (0,0) -> (0,.5) -> (.5,.5) -> (.5,1) -> (1,1).
    mask, amap = np.array([[1, 1, 0, 0]]), np.array([[0.9, 0.5, 0.7, 0.1]])
    assert aupro([mask], [amap], fpr_limit=0.3) == pytest.approx(0.5)
    assert aupro([mask], [amap], fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_mvtec_interpolates_across_a_tie():
    # The anomalous pixel ties with one of 3 normals: the curve rises straight from (0,0) to (1/3, 1).
    # At FPR 0.3 the PRO is 0.9, so the area is 0.3 * 0.9 / 2 = 0.135, normalised 0.45.
    mask, amap = np.array([[1, 0, 0, 0]]), np.array([[0.5, 0.5, 0.1, 0.1]])
    assert aupro([mask], [amap]) == pytest.approx(0.45)


def test_aupro_mvtec_diagonal_pixels_form_one_region():
    # Diagonal pair {0.9, 0.1} and a lone pixel {0.1}; 9 normals at 0.5. With 8-connectivity
    # PRO = mean(1/2, 0) = 0.25 up to FPR 1; with 4-connectivity it would be mean(1, 0, 0) = 1/3.
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[0, 3] = True
    amap = np.where(mask, 0.1, 0.5)
    amap[0, 0] = 0.9
    assert aupro([mask], [amap]) == pytest.approx(0.25)


def test_aupro_mvtec_constant_maps_give_the_diagonal():
    masks = [blob_mask(np.random.default_rng(1), (10, 10), 0.3)]
    assert aupro(masks, [np.zeros((10, 10))]) == pytest.approx(0.15)  # area 0.3^2 / 2, over 0.3
    assert pixel_auroc(masks, [np.zeros((10, 10))]) == 0.5


def test_aupro_rejects_bad_arguments():
    masks, maps = make_case("blobs_nonsquare")
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="variant"):
        aupro(masks, maps, variant="pro")


# ------------------------------------------------ AUPRO, sampled (AnomalyCLIP, APRIL-GAN, Crane)


@pytest.mark.parametrize("name", CASES)
def test_aupro_sampled_matches_reference(name):
    masks, maps = make_case(name)
    expected = reference_sampled_aupro(masks, maps)
    assert aupro(*as_input(masks, maps), variant="sampled") == pytest.approx(expected, abs=TOL)


def test_aupro_sampled_hand_checked():
    # Lone anomalous pixels at 0.4 and 0.75; normals 7 x 0.0, 0.3, 0.5, 1.0. Thresholds k/200 in [0, 1):
    # FPR = 0.3 below 0.3 (not kept: strictly < 0.3), 0.2 below 0.5, then 0.1. Rescaled, FPR drops
    # from 1 to 0 where the threshold passes 0.5, with PRO = 1/2 there.
    amap = np.array([[0.4, 0.0, 0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5, 1.0]])
    mask = np.zeros_like(amap, bool)
    mask[0, [0, 2]] = True
    assert aupro([mask], [amap], variant="sampled") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "amap",
    [
        np.full((4, 4), 0.7),  # constant: no threshold
        np.where(np.eye(4, dtype=bool), 0.0, 1.0),  # every normal above every threshold: no FPR < 0.3
        np.where(np.eye(4, dtype=bool), 1.0, 0.0),  # every kept FPR is 0: nothing to rescale
    ],
)
def test_aupro_sampled_degenerate_is_none_with_warning(amap):
    with pytest.warns(UndefinedMetricWarning, match="aupro"):
        assert aupro(np.eye(4, dtype=bool)[None], amap[None], variant="sampled") is None


# ------------------------------------------------ streaming accumulator


def test_accumulator_is_exact_for_scores_on_the_bin_grid():
    rng = np.random.default_rng(3)
    masks = [blob_mask(rng, (24, 30), 0.1) for _ in range(4)]
    maps = [rng.integers(0, 2**10, m.shape) / 2**10 for m in masks]  # on the grid, heavy ties
    accumulator = PixelMetricAccumulator((0.0, 1.0), bins=2**16)
    accumulator.add(masks, maps)
    result = accumulator.compute()
    expected = evaluate([0, 1], [0, 1], masks, maps)
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert result[name] == pytest.approx(expected[name], abs=TOL), name


def test_accumulator_equals_exact_metrics_of_binned_scores():
    rng = np.random.default_rng(4)
    masks = [blob_mask(rng, (20, 25), 0.15) for _ in range(3)]
    maps = [rng.random(m.shape) * 0.5 + 0.4 * m for m in masks]
    accumulator = PixelMetricAccumulator((0.0, 1.0), bins=16)
    accumulator.add(masks, maps)
    result = accumulator.compute(fpr_limit=0.2)
    binned = [np.floor(m * 16) / 16 for m in maps]
    for name, metric in [
        ("pixel_auroc", pixel_auroc),
        ("pixel_ap", pixel_ap),
        ("pixel_f1_max", pixel_f1_max),
    ]:
        assert result[name] == pytest.approx(metric(masks, binned), abs=TOL), name
    assert result["aupro"] == pytest.approx(aupro(masks, binned, fpr_limit=0.2), abs=TOL)
    assert abs(result["pixel_auroc"] - pixel_auroc(masks, maps)) > 1e-4  # 16 bins do lose ties


def test_accumulator_default_bins_close_to_exact_on_continuous_scores():
    rng = np.random.default_rng(5)
    masks = [blob_mask(rng, (40, 40), 0.1) for _ in range(6)]
    maps = [1 / (1 + np.exp(-noisy_map(rng, m))) for m in masks]
    accumulator = PixelMetricAccumulator()
    for mask, amap in zip(masks, maps, strict=True):
        accumulator.add([mask], [amap])
    result = accumulator.compute()
    expected = evaluate([0, 1], [0, 1], masks, maps)
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert result[name] == pytest.approx(expected[name], abs=1e-4), name


def test_accumulator_does_not_depend_on_batching():
    masks, maps = make_case("blobs_nonsquare")
    maps = [1 / (1 + np.exp(-m)) for m in maps]
    whole, one_by_one = PixelMetricAccumulator(bins=1000), PixelMetricAccumulator(bins=1000)
    whole.add(np.stack(masks), np.stack(maps))
    for mask, amap in zip(masks, maps, strict=True):
        one_by_one.add([mask], [amap])
    assert whole.compute() == one_by_one.compute()


def test_accumulator_rejects_out_of_range_and_reports_undefined():
    accumulator = PixelMetricAccumulator((0.0, 1.0))
    with pytest.raises(ValueError, match="score_range"):
        accumulator.add([np.zeros((2, 2), bool)], [np.full((2, 2), 1.5)])
    with pytest.raises(ValueError, match="score_range"):
        PixelMetricAccumulator((1.0, 1.0))
    accumulator.add([None], [np.full((2, 2), 0.5)])
    with pytest.warns(UndefinedMetricWarning):
        assert accumulator.compute() == dict.fromkeys(["pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"])


# ------------------------------------------------ evaluate


def test_evaluate_matches_individual_functions():
    masks, maps = make_case("empty_masks_sizes")
    labels = [int(m.any()) for m in masks]
    scores = [float(m.max()) for m in maps]
    for variant in ("mvtec", "sampled"):
        result = evaluate(labels, scores, masks, maps, aupro_variant=variant)
        assert result == {
            "image_auroc": image_auroc(labels, scores),
            "image_ap": image_ap(labels, scores),
            "image_f1_max": f1_max(labels, scores),
            "pixel_auroc": pixel_auroc(masks, maps),
            "pixel_ap": pixel_ap(masks, maps),
            "pixel_f1_max": pixel_f1_max(masks, maps),
            "aupro": aupro(masks, maps, variant=variant),
        }
    assert set(evaluate(labels, scores)) == {"image_auroc", "image_ap", "image_f1_max"}


def test_evaluate_reports_undefined_image_metrics_without_failing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate([0, 0], [0.2, 0.4], np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3)))
    assert all(value is None for value in result.values()) and len(result) == 7
    assert {str(w.message).split()[0] for w in caught} == set(result)


def test_evaluate_rejects_half_pixel_input():
    with pytest.raises(ValueError, match="both masks and maps"):
        evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="aupro_variant"):
        evaluate([0, 1], [0.1, 0.2], aupro_variant="exact")


# ------------------------------------------------ evaluation at model resolution


def test_resize_for_eval_matches_the_official_torchvision_pipeline():
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    mask = blob_mask(np.random.default_rng(6), (50, 70), 0.2)
    resized_mask, resized_map = resize_for_eval(mask, mask.astype(np.float32), (24, 33))
    official = transforms.Compose([transforms.Resize((24, 33)), transforms.ToTensor()])
    expected = official(Image.fromarray(mask.astype(np.uint8) * 255)).numpy()[0] > 0.5
    np.testing.assert_array_equal(resized_mask, expected)
    assert resized_map.shape == (24, 33) and resized_map.dtype == np.float32
    assert 0 < resized_mask.sum() < resized_mask.size


def test_resize_for_eval_shapes_and_edge_cases():
    lone = np.zeros((64, 64), bool)
    lone[10, 10] = True
    small_mask, small_map = resize_for_eval(lone, np.full((64, 64), 0.25), 16)
    assert small_mask.shape == (16, 16) and not small_mask.any()  # a 1-pixel defect vanishes, as officially
    np.testing.assert_allclose(small_map, 0.25, rtol=1e-6)
    empty, _ = resize_for_eval(None, np.zeros((5, 7)), (10, 14))
    assert empty.shape == (10, 14) and not empty.any()
    with pytest.raises(ValueError, match="shape"):
        resize_for_eval(np.zeros((4, 4), bool), np.zeros((4, 5)), 8)
