"""Tests of medvlm.analysis.grounding on hand-made cases whose answers are known, and of the token-map to
pixel mapping against PyTorch's bilinear resize and the overlays' Geometry.to_image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medvlm.analysis import grounding as gr
from medvlm.core.geometry import shortest_side_center_crop_geometry, square_resize_geometry


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- the four metrics


def test_pointing_hit_one_hot_inside_outside_and_empty():
    mask = _box_mask(10, 12, 2, 3, 6, 7)  # columns 2..5, rows 3..6
    inside = np.zeros((10, 12))
    inside[4, 5] = 1.0
    outside = np.zeros((10, 12))
    outside[5, 4] = 0.2
    outside[8, 1] = 1.0
    assert gr.pointing_hit(inside, mask) == 1.0
    assert gr.pointing_hit(outside, mask) == 0.0
    assert math.isnan(gr.pointing_hit(inside, np.zeros_like(mask)))
    # [row, column]: (row 5, column 8) is outside the box even though (x 5, y 8) would be inside
    transposed = np.zeros((10, 12))
    transposed[5, 8] = 1.0
    assert gr.pointing_hit(transposed, mask) == 0.0


def test_pointing_ties_first_like_np_argmax_or_mean():
    mask = _box_mask(4, 4, 2, 0, 4, 4)  # right half
    flat = np.ones((4, 4))
    assert gr.pointing_hit(flat, mask) == 0.0  # np.argmax: pixel (0, 0), outside
    assert gr.pointing_hit(flat, mask, ties="mean") == 0.5  # half the tied maxima are inside
    with pytest.raises(ValueError, match="ties"):
        gr.pointing_hit(flat, mask, ties="random")


def test_energy_one_hot_uniform_and_known_fraction():
    mask = _box_mask(5, 8, 1, 1, 4, 3)  # 3 x 2 = 6 of 40 pixels
    one_hot = np.zeros((5, 8))
    one_hot[2, 3] = 7.0
    assert gr.energy_in_mask(one_hot, mask) == 1.0
    one_hot_out = np.zeros((5, 8))
    one_hot_out[3, 2] = 7.0
    assert gr.energy_in_mask(one_hot_out, mask) == 0.0
    assert gr.energy_in_mask(np.full((5, 8), 3.0), mask) == pytest.approx(6 / 40)  # the area fraction
    known = np.zeros((5, 8))
    known[1, 1], known[2, 3], known[0, 0], known[4, 7] = 1.0, 2.0, 3.0, 4.0  # 3 of 10 inside
    assert gr.energy_in_mask(known, mask) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="negative"):
        gr.energy_in_mask(known - 1.0, mask)
    with pytest.raises(ValueError, match="all zero"):
        gr.energy_in_mask(np.zeros((5, 8)), mask)
    with pytest.raises(ValueError, match=r"mask shape \(5, 7\) differs from saliency shape \(5, 8\)"):
        gr.energy_in_mask(known, mask[:, :7])


def test_cnr_hand_case():
    sal = np.array([[1.0, 3.0, 0.0], [0.0, 2.0, 2.0]])
    mask = np.array([[True, True, False], [False, False, False]])
    # inside [1, 3]: mean 2, var 1; outside [0, 0, 2, 2]: mean 1, var 1 -> 1 / sqrt(2)
    assert gr.cnr(sal, mask) == pytest.approx(1 / math.sqrt(2))
    assert gr.cnr(5 * sal + 7, mask) == pytest.approx(1 / math.sqrt(2))  # affine-invariant
    assert math.isnan(gr.cnr(np.ones((2, 3)), mask))
    assert math.isnan(gr.cnr(sal, np.zeros_like(mask)))
    assert gr.cnr(mask.astype(float), mask) == math.inf


def test_otsu_threshold_three_levels_by_hand():
    # 50 pixels at 0, 30 at 102, 20 at 255. Split {0} | {102, 255}: 0.5 * 0.5 * (0 - 163.2)^2 = 6658.56;
    # split {0, 102} | {255}: 0.8 * 0.2 * (38.25 - 255)^2 = 7516.89 wins, first reached at t = 102
    values = np.array([0] * 50 + [102] * 30 + [255] * 20, dtype=np.uint8).reshape(10, 10)
    assert gr.otsu_threshold(values) == 102
    sal = values / 255.0
    seg = gr.otsu_segmentation(sal)
    np.testing.assert_array_equal(seg, values == 255)
    assert gr.otsu_iou(sal, values == 255) == 1.0
    half = np.zeros((10, 10), dtype=bool)
    half[8, :] = True  # 10 of the 20 segmented pixels, nothing else
    assert gr.otsu_iou(sal, half) == 0.5
    assert gr.otsu_iou(sal, values == 102) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        gr.otsu_threshold(sal)


def test_otsu_fills_holes_drops_lone_pixels_and_is_nan_for_a_constant_map():
    ring = np.zeros((20, 20))
    ring[4:14, 4:14] = 1.0
    ring[7:11, 7:11] = 0.0  # a hole: CheXlocalize's contour fill fills it
    ring[17, 17] = 1.0  # an isolated pixel: its one-point contour is skipped
    ring[17, 1:3] = 1.0  # a two-pixel component: kept
    seg = gr.otsu_segmentation(ring)
    expected = _box_mask(20, 20, 4, 4, 14, 14)
    expected[17, 1:3] = True
    np.testing.assert_array_equal(seg, expected)
    assert gr.otsu_segmentation(np.full((5, 5), 0.3)) is None
    assert math.isnan(gr.otsu_iou(np.full((5, 5), 0.3), _box_mask(5, 5, 0, 0, 2, 2)))
    assert math.isnan(gr.otsu_iou(ring, np.zeros((20, 20), dtype=bool)))


# ----------------------------------------------------------------------------- token map -> pixels


def test_resize_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for rows, cols, h, w in ((16, 16, 61, 45), (5, 9, 20, 90), (37, 37, 37, 37), (3, 4, 2, 3)):
        grid = rng.random((rows, cols))
        ref = torch.nn.functional.interpolate(
            torch.tensor(grid)[None, None], size=(h, w), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(gr.resize_bilinear(grid, h, w), ref, atol=1e-12)
        geo = square_resize_geometry(w, h, 896, (rows, cols))  # MedGemma: the whole image squashed
        np.testing.assert_allclose(gr.token_map_to_pixels(grid.reshape(-1), geo), ref, atol=1e-12)


def test_crop_geometry_seen_region_and_nearest_mode_match_the_overlays():
    geo = shortest_side_center_crop_geometry(300, 200, 518, (37, 37))  # LLaVA-Rad on a wide image
    rng = np.random.default_rng(1)
    tokens = rng.random(37 * 37)
    painted = geo.to_image(tokens)
    np.testing.assert_array_equal(gr.token_map_to_pixels(tokens, geo, mode="nearest"), painted)
    seen = gr.seen_mask(geo)
    np.testing.assert_array_equal(seen, ~np.isnan(painted))
    assert seen[:, :50].sum() == 0 and seen[:, 50:250].all() and seen[:, 250:].sum() == 0
    bil = gr.token_map_to_pixels(tokens, geo)
    np.testing.assert_array_equal(np.isnan(bil), ~seen)
    # where the crop box falls on pixel edges (718 x 518: columns 100..617 at scale 1), the bilinear map
    # inside it is the crop's own bilinear resize (300 x 200's box starts at x = 50.19, torchvision's rounding)
    exact = shortest_side_center_crop_geometry(718, 518, 518, (37, 37))
    assert exact.crop_box == (100.0, 0.0, 618.0, 518.0)
    bil = gr.token_map_to_pixels(tokens, exact)
    np.testing.assert_allclose(bil[:, 100:618], gr.resize_bilinear(tokens.reshape(37, 37), 518, 518), atol=1e-12)
    assert np.isnan(bil[:, :100]).all() and np.isnan(bil[:, 618:]).all()
    with pytest.raises(ValueError, match="37 x 37 grid needs 1369"):
        gr.token_map_to_pixels(tokens[:-1], geo)


def test_gaussian_prior_by_hand():
    geo = square_resize_geometry(100, 60, 896, (2, 2))
    # cell centres (25, 15), (75, 15), ... are a quarter of each side from the centre: one sigma each way
    np.testing.assert_allclose(gr.gaussian_prior_token_map(geo, 0.25), np.full((2, 2), math.exp(-1.0)))
    g = gr.gaussian_prior_token_map(square_resize_geometry(100, 100, 896, (3, 3)), 0.25)
    assert g[1, 1] == 1.0 and g[0, 0] == pytest.approx(math.exp(-2 * (100 / 3) ** 2 / (2 * 25**2)))


# ----------------------------------------------------------------------------- one map + one region


def test_grounding_row_one_hot_token_inside_and_the_uniform_lift():
    geo = square_resize_geometry(64, 64, 896, (4, 4))  # 16 x 16 pixel cells
    mask = _box_mask(64, 64, 32, 16, 48, 32)  # exactly cell (1, 2)
    tokens = np.zeros((4, 4))
    tokens[1, 2] = 1.0
    row = gr.grounding_row(tokens, geo, mask, mode="nearest")
    assert row["status"] == "ok" and row["seen_fraction"] == 1.0 and row["area_fraction"] == 1 / 16
    assert row["pointing_hit"] == 1.0 and row["energy"] == 1.0 and row["energy_lift"] == 16.0
    assert row["otsu_iou"] == 1.0
    far = np.zeros((4, 4))
    far[3, 0] = 1.0
    row = gr.grounding_row(far, geo, mask, mode="nearest")
    assert row["pointing_hit"] == 0.0 and row["energy"] == 0.0 and row["otsu_iou"] == 0.0
    uniform = gr.grounding_row(np.ones(16), geo, mask)
    assert uniform["energy"] == pytest.approx(1 / 16) and uniform["energy_lift"] == pytest.approx(1.0)
    assert uniform["uniform_energy_lift"] == pytest.approx(1.0)
    assert uniform["uniform_pointing_hit"] == pytest.approx(1 / 16)  # expected hit under random ties
    assert math.isnan(uniform["uniform_otsu_iou"]) and math.isnan(uniform["uniform_cnr"])
    # the prior's four central cells tie; bilinear makes a flat top between their centres, pixels 24..39 each
    # way, a quarter of which (rows 24..31, columns 32..39) lies in cell (1, 2)
    assert uniform["prior_pointing_hit"] == 0.25
    centre = gr.grounding_row(tokens, geo, _box_mask(64, 64, 24, 24, 40, 40))
    assert centre["prior_pointing_hit"] == 1.0
    corner = gr.grounding_row(tokens, geo, _box_mask(64, 64, 0, 0, 16, 16))
    assert corner["prior_pointing_hit"] == 0.0


def test_grounding_row_crop_not_seen_and_partly_seen():
    geo = shortest_side_center_crop_geometry(300, 200, 518, (37, 37))  # sees columns 50..249
    tokens = np.ones(37 * 37)
    left = gr.grounding_row(tokens, geo, _box_mask(200, 300, 5, 50, 45, 150))
    assert left["status"] == "not seen" and left["seen_fraction"] == 0.0
    assert all(math.isnan(left[k]) for k in gr.METRICS)  # not a miss
    assert all(math.isnan(left["uniform_" + k]) for k in gr.METRICS)
    half = gr.grounding_row(tokens, geo, _box_mask(200, 300, 25, 50, 75, 150))  # columns 25..74
    assert half["status"] == "ok" and half["seen_fraction"] == 0.5
    assert half["area_fraction"] == pytest.approx(25 * 100 / (200 * 200))  # of the seen pixels only
    assert half["energy_lift"] == pytest.approx(1.0)
    empty = gr.grounding_row(tokens, geo, np.zeros((200, 300), dtype=bool))
    assert empty["status"] == "empty region"
    with pytest.raises(ValueError, match=r"region mask is 300 x 199 \(W x H\) but the geometry's image is 300 x 200"):
        gr.grounding_row(tokens, geo, np.zeros((199, 300), dtype=bool))


def test_grounding_row_signed_map_has_no_energy_and_max_side_is_recorded():
    geo = square_resize_geometry(400, 300, 896, (8, 8))
    mask = _box_mask(300, 400, 100, 76, 200, 150)  # even edges: the half-size copy holds it exactly
    rng = np.random.default_rng(2)
    signed = rng.normal(size=64)
    row = gr.grounding_row(signed, geo, mask)
    assert math.isnan(row["energy"]) and not math.isnan(row["cnr"])
    tokens = rng.random(64)
    full = gr.grounding_row(tokens, geo, mask)
    small = gr.grounding_row(tokens, geo, mask, max_side=200)
    assert (small["eval_width"], small["eval_height"], small["eval_scale"]) == (200, 150, 0.5)
    assert small["energy"] == pytest.approx(full["energy"], abs=0.01)
    assert small["area_fraction"] == full["area_fraction"]  # the box lies on even pixel edges
    base = gr.baseline_values(geo, mask)
    assert gr.grounding_row(tokens, geo, mask, baselines=base) == full
