"""Figures: overlays land where the model looked, on the original image, at its native aspect.

The geometry tests check medvlm.core.geometry against the real preprocessing (torchvision's
Resize + CenterCrop for LLaVA-Rad / open_clip, a square resize for MedGemma); the overlay
tests render with Agg and find the painted cell and a planted marker in the pixels.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from PIL import Image
from torchvision import transforms as T

from medvlm.core.geometry import Geometry, shortest_side_center_crop_geometry, square_resize_geometry
from medvlm.report import figures

LLAVA = ("LLaVA-Rad", lambda w, h: shortest_side_center_crop_geometry(w, h, 518, (37, 37)))
MEDGEMMA = ("MedGemma", lambda w, h: square_resize_geometry(w, h, 896, (16, 16)))
SIZES = [(300, 200), (200, 300)]


# ----------------------------------------------------------------------------- helpers


def _all_texts(fig: Figure) -> list[str]:
    return [" ".join(t.get_text().split()) for t in fig.findobj(Text) if t.get_text()]


def _render(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255.0


def _to_pixels(ax, fig: Figure, x: float, y: float) -> tuple[float, float]:
    """Data (original-image) coordinates -> (column, row) in the rendered buffer."""
    dx, dy = ax.transData.transform((x, y))
    return dx, fig.canvas.get_width_height()[1] - dy


def _box_to_pixels(ax, fig, box) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    c0, r0 = _to_pixels(ax, fig, x0, y0)
    c1, r1 = _to_pixels(ax, fig, x1, y1)
    return min(c0, c1), min(r0, r1), max(c0, c1), max(r0, r1)


def _one_hot(geometry: Geometry, cell: tuple[int, int]) -> np.ndarray:
    m = np.zeros(geometry.n_tokens)
    m[geometry.token_index(*cell)] = 1.0
    return m


def _snap_to_cell_centre(geometry: Geometry, x: float, y: float) -> tuple[int, int]:
    """An integer pixel near (x, y) whose whole 1-px square lies inside one grid cell."""
    cell = geometry.point_to_cell(x, y)
    assert cell is not None
    bx0, by0, bx1, by1 = geometry.cell_box(*cell)
    return int((bx0 + bx1) / 2), int((by0 + by1) / 2)


# ----------------------------------------------------------------------------- geometry vs torchvision


def _check_against_transform(geometry: Geometry, transform, side: int, rng) -> tuple[int, int]:
    """Plant 3 x 3 bright blocks on a jittered lattice (far enough apart not to mix), run the
    real `transform`, and compare where each block lands with the geometry's prediction: the
    continuous position to a third of a pixel, and the grid cell. Blocks the geometry says
    are cropped away must leave no trace. Returns (blocks seen, blocks cropped away)."""
    width, height = geometry.image_size
    rows, cols = geometry.grid
    x0, y0, x1, y1 = geometry.crop_box
    sx, sy = side / (x1 - x0), side / (y1 - y0)
    arr = np.zeros((height, width), np.uint8)
    blocks = []
    for by0 in range(0, height - 23, 24):
        for bx0 in range(0, width - 23, 24):
            bx, by = bx0 + int(rng.integers(6, 15)), by0 + int(rng.integers(6, 15))
            cx, cy = bx + 1.5, by + 1.5  # the block covers [bx, bx + 3) x [by, by + 3)
            # a block straddling the crop edge is partly visible: keep out of that band
            if min(abs(cx - x0), abs(cx - x1), abs(cy - y0), abs(cy - y1)) < 4:
                continue
            arr[by: by + 3, bx: bx + 3] = 255
            blocks.append((cx, cy))
    out = T.functional.to_tensor(transform(Image.fromarray(arr)))
    assert out.shape == (1, side, side)
    out = out[0].numpy().astype(np.float64)
    claimed = np.zeros(out.shape, bool)
    seen = hidden = 0
    cw, ch = side / cols, side / rows
    for cx, cy in blocks:
        cell = geometry.point_to_cell(cx, cy)
        if cell is None:
            hidden += 1
            continue
        u_pred, v_pred = (cx - x0) * sx, (cy - y0) * sy
        r0, c0 = max(int(v_pred) - 10, 0), max(int(u_pred) - 10, 0)
        window = out[r0: int(v_pred) + 11, c0: int(u_pred) + 11]
        claimed[r0: int(v_pred) + 11, c0: int(u_pred) + 11] = True
        assert window.max() > 0.25, f"block at ({cx}, {cy}) predicted visible in cell {cell}, not found"
        w = np.clip(window, 0, None) * (window > 0.1 * window.max())
        ys, xs = np.nonzero(w)
        wt = w[ys, xs]
        u = c0 + float((xs + 0.5) @ wt / wt.sum())
        v = r0 + float((ys + 0.5) @ wt / wt.sum())
        assert u == pytest.approx(u_pred, abs=0.35), (cx, cy, u, u_pred)
        assert v == pytest.approx(v_pred, abs=0.35), (cx, cy, v, v_pred)
        # the cell read off the transformed tensor, unless the blob sits on a cell border
        if min(u % cw, cw - u % cw) > 0.5 and min(v % ch, ch - v % ch) > 0.5:
            assert (int(v // ch), int(u // cw)) == cell
        seen += 1
    # nothing bright anywhere else: the blocks the geometry calls unseen really were cropped
    assert not claimed.all()
    assert out[~claimed].max() < 0.05
    return seen, hidden


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (333, 200), (173, 301)])
def test_center_crop_geometry_matches_torchvision(size):
    width, height = size
    geometry = shortest_side_center_crop_geometry(width, height, 518, (37, 37))
    transform = T.Compose([T.Resize(518, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(518)])
    seen, hidden = _check_against_transform(geometry, transform, 518, np.random.default_rng(width * height))
    assert seen >= 30 and hidden >= 4
    # the crop drops both ends of the long side: some of the image is never seen
    x0, y0, x1, y1 = geometry.crop_box
    assert (x1 - x0) * (y1 - y0) < width * height


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (333, 200)])
def test_square_resize_geometry_matches_resize(size):
    width, height = size
    geometry = square_resize_geometry(width, height, 896, (16, 16))
    transform = T.Resize((896, 896), interpolation=T.InterpolationMode.BICUBIC)
    seen, hidden = _check_against_transform(geometry, transform, 896, np.random.default_rng(width + height))
    assert seen >= 60 and hidden == 0  # nothing is cropped: every block lands
    assert geometry.crop_box == (0.0, 0.0, float(width), float(height))


def test_geometry_check_catches_a_one_pixel_shift():
    """The comparison above is sharp enough to see a crop box off by one resized pixel
    (e.g. floor instead of round for CenterCrop's offset)."""
    good = shortest_side_center_crop_geometry(300, 200, 518, (37, 37))
    x0, y0, x1, y1 = good.crop_box
    step = (x1 - x0) / 518
    shifted = Geometry(good.image_size, (x0 - step, y0, x1 - step, y1), good.grid, good.input_size)
    transform = T.Compose([T.Resize(518, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(518)])
    with pytest.raises(AssertionError):
        _check_against_transform(shifted, transform, 518, np.random.default_rng(0))


# ----------------------------------------------------------------------------- overlay geometry


@pytest.mark.parametrize("model", [LLAVA, MEDGEMMA], ids=lambda m: m[0])
@pytest.mark.parametrize("size", SIZES + [(1500, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_overlay_hot_cell_lands_on_marker(model, size):
    width, height = size
    _, make_geometry = model
    geometry = make_geometry(width, height)
    mx, my = _snap_to_cell_centre(geometry, 0.42 * width, 0.37 * height)
    cell = geometry.point_to_cell(mx + 0.5, my + 0.5)
    assert cell is not None
    img = np.zeros((height, width, 3), np.uint8)
    half = 0 if max(size) <= figures._MAX_DISPLAY_SIDE else 2  # drawn reduced: a 5 x 5 block
    img[my - half: my + half + 1, mx - half: mx + half + 1] = (0, 0, 255)  # pure blue: the marker
    fig = figures.new_figure((6, 6))
    ax = fig.add_subplot()
    overlay_img = figures.overlay(ax, Image.fromarray(img), _one_hot(geometry, cell), geometry, alpha=0.5)
    buf = _render(fig)
    assert isinstance(overlay_img, AxesImage)

    # native aspect: the drawn image box has the original's width/height ratio
    bbox = ax.get_window_extent()
    assert bbox.width / bbox.height == pytest.approx(width / height, rel=0.01)

    # the painted cell: 'hot' at the top of the scale is white, blended 50 % over black
    c0, r0, c1, r1 = _box_to_pixels(ax, fig, geometry.crop_box)
    inside = np.zeros(buf.shape[:2], bool)
    inside[int(np.ceil(r0)) + 1: int(r1) - 1, int(np.ceil(c0)) + 1: int(c1) - 1] = True
    hot = inside & (buf[..., 0] > 0.4) & (buf[..., 1] > 0.4)
    rows_hot, cols_hot = np.nonzero(hot)
    assert rows_hot.size > 0
    expect = _box_to_pixels(ax, fig, geometry.cell_box(*cell))
    got = (cols_hot.min(), rows_hot.min(), cols_hot.max() + 1, rows_hot.max() + 1)
    assert np.allclose(got, expect, atol=1.5), (got, expect)

    # the marker as rendered (blue, brighter under the painted cell) lies inside that cell
    marker = (buf[..., 2] > 0.9) & (buf[..., 0] < 0.7)
    rows_m, cols_m = np.nonzero(marker)
    assert rows_m.size > 0
    assert got[0] <= cols_m.min() and cols_m.max() < got[2]
    assert got[1] <= rows_m.min() and rows_m.max() < got[3]
    pc, pr = _to_pixels(ax, fig, mx + 0.5, my + 0.5)
    assert abs(cols_m.mean() + 0.5 - pc) < 1.5 and abs(rows_m.mean() + 0.5 - pr) < 1.5


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_unseen_strips_are_nan_and_shaded(size):
    width, height = size
    geometry = LLAVA[1](width, height)
    x0, y0, x1, y1 = geometry.crop_box
    painted = geometry.to_image(np.full(geometry.n_tokens, 1.0))
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    seen = ((xs >= x0) & (xs < x1))[None, :] & ((ys >= y0) & (ys < y1))[:, None]
    assert np.isnan(painted[~seen]).all() and np.isfinite(painted[seen]).all()
    assert (~seen).sum() > 0.2 * width * height  # 1/6 of each end is cropped away

    fig = figures.new_figure((6, 6))
    ax = fig.add_subplot()
    grey = Image.fromarray(np.zeros((height, width), np.uint8))
    figures.overlay(ax, grey, np.ones(geometry.n_tokens), geometry, alpha=1.0)
    buf = _render(fig)
    strips = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_gid() == figures.UNSEEN_GID]
    assert len(strips) == 2
    labels = [t for t in ax.texts if t.get_text() == figures.NOT_SEEN_LABEL]
    assert len(labels) == 2
    renderer = fig.canvas.get_renderer()
    for strip, label in zip(strips, sorted(labels, key=lambda t: t.get_position()), strict=True):
        sb = strip.get_window_extent(renderer)
        tb = label.get_window_extent(renderer)
        assert sb.x0 <= tb.x0 and tb.x1 <= sb.x1 and sb.y0 <= tb.y0 and tb.y1 <= sb.y1
    # the strips render as grey (the image is black, the map is not painted there)
    for x, y in [(x0 / 2, height / 2), (width - (width - x1) / 2, height / 2)] if width > height else [
        (width / 2, y0 / 2), (width / 2, height - (height - y1) / 2)
    ]:
        c, r = _to_pixels(ax, fig, x, y)
        patch = buf[int(r) - 3: int(r) + 3, int(c) - 3: int(c) + 3]
        assert 0.3 < patch.mean() < 0.9
        assert np.ptp(patch.mean(axis=(0, 1))) < 0.05  # grey, not 'hot'
    # inside the crop box the uniform map at alpha 1 shows the colormap's top colour
    c, r = _to_pixels(ax, fig, width / 2, height / 2)
    assert buf[int(r), int(c)].min() > 0.95


def test_thin_unseen_strips_are_labelled_below_the_image():
    geometry = LLAVA[1](210, 200)  # 5 px cropped at each side: too thin to hold the label
    fig = figures.new_figure((4, 4))
    ax = fig.add_subplot()
    figures.overlay(ax, Image.new("L", (210, 200)), np.ones(1369), geometry)
    assert len([p for p in ax.patches if p.get_gid() == figures.UNSEEN_GID]) == 2
    assert figures.NOT_SEEN_LABEL not in [t.get_text() for t in ax.texts]
    assert ax.get_xlabel() == f"hatched: {figures.NOT_SEEN_LABEL}"
    _render(fig)


def test_medgemma_sees_everything():
    geometry = MEDGEMMA[1](300, 200)
    assert np.isfinite(geometry.to_image(np.ones(256))).all()
    fig = figures.new_figure((5, 4))
    ax = fig.add_subplot()
    figures.overlay(ax, Image.new("L", (300, 200)), np.ones(256), geometry)
    assert not [p for p in ax.patches if p.get_gid() == figures.UNSEEN_GID]
    assert figures.NOT_SEEN_LABEL not in _all_texts(fig)


def test_large_image_paints_on_a_proportional_grid():
    geometry = LLAVA[1](5000, 3000)
    proxy = figures._paint_geometry(geometry)
    assert max(proxy.image_size) == figures._MAX_DISPLAY_SIDE
    cell = (20, 11)
    painted = proxy.to_image(_one_hot(geometry, cell))
    rows, cols = np.nonzero(painted == 1.0)
    sx = proxy.image_size[0] / 5000
    sy = proxy.image_size[1] / 3000
    bx0, by0, bx1, by1 = geometry.cell_box(*cell)
    assert cols.min() == pytest.approx(bx0 * sx, abs=1) and cols.max() + 1 == pytest.approx(bx1 * sx, abs=1)
    assert rows.min() == pytest.approx(by0 * sy, abs=1) and rows.max() + 1 == pytest.approx(by1 * sy, abs=1)


def test_overlay_accepts_16_bit_and_rejects_bad_maps():
    geometry = MEDGEMMA[1](64, 48)
    img16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    fig = figures.new_figure((3, 3))
    ax = fig.add_subplot()
    figures.overlay(ax, img16, np.ones((16, 16)), geometry, colorbar=True)
    label = ax.child_axes[0].get_ylabel()
    assert figures.COLORBAR_LABEL in label
    bad = [np.ones(255), np.full(256, np.nan), -np.ones(256), np.zeros(256)]
    for m in bad:
        with pytest.raises(ValueError):
            figures.overlay(ax, img16, m, geometry)
    with pytest.raises(ValueError, match="geometry was built for"):
        figures.overlay(ax, Image.new("L", (48, 64)), np.ones(256), geometry)


def test_image_shares_sum_to_one():
    geometry = MEDGEMMA[1](10, 10)
    s = figures.image_shares(np.arange(256, dtype=float) + 1, geometry)
    assert s.sum() == pytest.approx(1.0) and s.shape == (256,)


# ----------------------------------------------------------------------------- grid, side by side


def _grid_inputs(width=300, height=200):
    geometry = LLAVA[1](width, height)
    rng = np.random.default_rng(0)
    maps = {k: rng.random(geometry.n_tokens) for k in (0, 1, 2, 4)}
    questions = {k: f"Is there a pleural effusion on this film, wording number {k}?" for k in range(6)}
    answers = {k: ("yes" if k % 2 else "no", 0.1 * (k + 1)) for k in range(5)}
    image = Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8))
    return image, maps, questions, answers, geometry


def test_paraphrase_grid_missing_and_failed_variants_show_text_not_maps():
    image, maps, questions, answers, geometry = _grid_inputs()
    fig = figures.paraphrase_grid(
        image, maps, questions, answers, geometry, finding="Pleural effusion", model_name="LLaVA-Rad",
        colormap="hot", failures={3: "attention extraction: CUDA out of memory"},
    )
    panels = fig.axes[:6]
    assert len([a for a in fig.axes if a.get_visible()]) == 7  # six panels + the shared colour bar
    for k, ax in enumerate(panels):
        if k in maps:
            assert len(ax.images) == 2  # the image and its map
        else:
            assert len(ax.images) == 0, f"variant {k} has no map but an image was drawn"
    texts3 = " ".join(" ".join(t.get_text().split()) for t in panels[3].texts)
    assert "failed: attention extraction: CUDA out of memory" in texts3
    assert [t.get_text() for t in panels[5].texts] == ["missing"]
    # one shared colour scale over the maps
    clims = {ax.images[1].get_clim() for ax in panels if len(ax.images) == 2}
    assert len(clims) == 1
    assert clims.pop()[1] == pytest.approx(max(figures.image_shares(m, geometry).max() for m in maps.values()))
    # titles: question, answer and P(yes)
    assert "wording number 1" in panels[1].get_title(loc="left").replace("\n", " ")
    assert "answer: yes" in panels[1].get_title(loc="left")
    assert "P(yes) = 0.20" in panels[1].get_title(loc="left")
    assert "answer: n/a" in panels[5].get_title(loc="left")
    assert fig.get_suptitle() == "Pleural effusion \u2014 LLaVA-Rad"
    assert figures.RANDOM_WEIGHTS_TEXT not in _all_texts(fig)


PROVENANCE = ("attention: mean over layers 0\u201331 (32 layers) \u00b7 heads: mean (at capture) \u00b7 query: the "
              "question's tokens (their rows averaged) and some more words to make this line wrap at least once")


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _assert_no_overlap(fig: Figure) -> None:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fb = fig.bbox
    boxes = [t.get_window_extent(r) for t in fig.texts if t.get_text()]  # banner, headings, footer
    for ax in fig.axes:
        boxes += [t.get_window_extent(r) for t in (ax.title, ax._left_title) if t.get_text()]
    boxes += [ax.get_tightbbox(r) if _is_colorbar(ax) else ax.get_window_extent(r)
              for ax in fig.axes if ax.get_visible()]
    boxes = [b for b in boxes if b.width > 0]
    for i, a in enumerate(boxes):
        assert fb.x0 - 1 <= a.x0 and a.x1 <= fb.x1 + 1 and fb.y0 - 1 <= a.y0 and a.y1 <= fb.y1 + 1, (a, fb)
        for b in boxes[i + 1:]:
            overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert overlap_w <= 1 or overlap_h <= 1, (a, b)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_side_by_side_labels_do_not_overlap(size, shared):
    width, height = size
    geos = {"llava_rad": LLAVA[1](width, height), "medgemma": MEDGEMMA[1](width, height)}
    rng = np.random.default_rng(2)
    fig = figures.side_by_side(
        Image.new("L", size), {"llava_rad": rng.random(1369), "medgemma": rng.random(256)}, geos,
        question="Looking carefully at both costophrenic angles, is there any radiographic evidence of fluid?",
        answers_by_model={"llava_rad": ("yes", 0.8), "medgemma": ("no", 0.1)}, random_weights=True,
        shared_scale=shared, study_id="s-001", finding="pleural_effusion", ground_truth="yes",
        provenance={"llava_rad": PROVENANCE, "medgemma": PROVENANCE},
    )
    _assert_no_overlap(fig)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_paraphrase_grid_labels_do_not_overlap(size):
    image, maps, questions, answers, geometry = _grid_inputs(*size)
    long_q = {k: "Looking carefully at the costophrenic angles, is there any radiographic evidence of "
              f"fluid in the pleural space (variant {k})?" for k in range(6)}
    fig = figures.paraphrase_grid(
        image, maps, long_q, answers, geometry, finding="Pleural effusion", model_name="LLaVA-Rad",
        random_weights=True, study_id="s-001", ground_truth="yes", provenance=PROVENANCE,
    )
    _assert_no_overlap(fig)


def test_paraphrase_grid_rejects_map_with_failure_and_unknown_variant():
    image, maps, questions, answers, geometry = _grid_inputs()
    with pytest.raises(ValueError, match="both a map and a failure"):
        figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="f", model_name="m",
                                failures={0: "x"})
    with pytest.raises(ValueError, match="not in the grid"):
        figures.paraphrase_grid(image, {**maps, 7: maps[0]}, questions, answers, geometry,
                                finding="f", model_name="m")


def test_side_by_side_two_models():
    width, height = 300, 200
    geos = {"LLaVA-Rad": LLAVA[1](width, height), "MedGemma": MEDGEMMA[1](width, height)}
    rng = np.random.default_rng(1)
    maps = {"LLaVA-Rad": rng.random(1369), "MedGemma": rng.random(256)}
    fig = figures.side_by_side(
        Image.new("L", (width, height)), maps, geos, question="Is there cardiomegaly?",
        answers_by_model={"LLaVA-Rad": ("yes", 0.81), "MedGemma": ("no", 0.12)}, colormap="inferno",
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("LLaVA-Rad" in t and "P(yes) = 0.81" in t for t in titles)
    assert any("MedGemma" in t and "P(yes) = 0.12" in t for t in titles)
    assert fig.get_suptitle() == "Is there cardiomegaly?"
    image_axes = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(image_axes) == 2
    # a failed model is an empty panel, not a map
    fig2 = figures.side_by_side(
        Image.new("L", (width, height)), {"LLaVA-Rad": maps["LLaVA-Rad"]}, geos, question="q",
        failures_by_model={"MedGemma": "load failed"},
    )
    assert "failed: load failed" in _all_texts(fig2)
    assert len([ax for ax in fig2.axes if len(ax.images) == 2]) == 1


# ----------------------------------------------------------------------------- forest plot


def _forest_table():
    return pd.DataFrame({
        "model": ["LLaVA-Rad"] * 3 + ["MedGemma"] * 3,
        "metric": ["accuracy", "flip rate", "Fleiss kappa"] * 2,
        "estimate": [0.71, 0.12, np.nan, 0.78, 0.08, 0.55],
        "ci_low": [0.62, 0.07, np.nan, 0.70, np.nan, 0.41],
        "ci_high": [0.79, 0.19, np.nan, 0.85, np.nan, 0.69],
    })


def test_forest_plot_handles_nan():
    fig = figures.forest_plot(_forest_table(), title="Robustness", ref_line=0.0)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n/a") == 2  # in the row and in the numbers column
    assert "no CI" in texts
    points = [ln for ln in ax.lines if ln.get_marker() not in (None, "None", "")]
    assert len(points) == 5  # the NaN estimate is not a point
    for ln in points:
        assert np.isfinite(np.asarray(ln.get_xdata(), float)).all()
    ref = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(ref) == 1 and list(ref[0].get_xdata()) == [0.0, 0.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["accuracy", "flip rate", "Fleiss kappa"]
    assert "0.710 [0.620, 0.790]" in texts  # three decimals, as report.md prints them
    assert fig.get_suptitle() == "Robustness"
    _render(fig)


def test_forest_plot_validates_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        figures.forest_plot(_forest_table().drop(columns="ci_low"))
    bad = _forest_table()
    bad.loc[0, "ci_low"] = 0.9
    with pytest.raises(ValueError, match="ci_low > ci_high"):
        figures.forest_plot(bad)
    single = _forest_table().query("model == 'MedGemma'").drop(columns="model")
    fig = figures.forest_plot(single, group_col=None)
    assert fig.legends == []


# ----------------------------------------------------------------------------- banner, colormap, save


def _every_figure(random_weights: bool) -> list[Figure]:
    image, maps, questions, answers, geometry = _grid_inputs()
    out = [
        figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="Effusion",
                                model_name="LLaVA-Rad", random_weights=random_weights),
        figures.side_by_side(image, {"LLaVA-Rad": maps[0]}, {"LLaVA-Rad": geometry}, question="q?",
                             random_weights=random_weights),
        figures.forest_plot(_forest_table(), random_weights=random_weights),
    ]
    fig = figures.new_figure((3, 2.5))  # narrow: the banner must shrink or wrap to fit
    figures.overlay(fig.add_subplot(), image, maps[0], geometry, random_weights=random_weights)
    return out + [fig]


def test_random_weights_banner_on_every_figure():
    banner = " ".join(figures.RANDOM_WEIGHTS_TEXT.split())
    for fig in _every_figure(random_weights=True):
        assert banner in _all_texts(fig)
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        [text] = [t for t in fig.texts if t.get_gid() == figures.BANNER_GID]
        patch = text.get_bbox_patch().get_window_extent(r)
        assert text.get_color() == "white" and patch.width > 0
        fb = fig.bbox
        assert fb.x0 <= patch.x0 and patch.x1 <= fb.x1 + 1 and patch.y1 <= fb.y1 + 1
        others = [t.get_window_extent(r) for t in fig.texts if t is not text and t.get_text()]
        others += [ax.get_tightbbox(r) for ax in fig.axes if ax.get_visible()]
        for b in others:
            assert b.y1 <= patch.y0 + 1 or b.x1 <= patch.x0 or b.x0 >= patch.x1, (b, patch)
        # idempotent
        assert figures.random_weights_banner(fig) is text
    for fig in _every_figure(random_weights=False):
        assert banner not in _all_texts(fig)


def test_colormap_validation():
    assert figures.check_colormap("hot").name == "hot"
    with pytest.raises(ValueError, match="viridis"):
        figures.check_colormap("hottt")
    image, maps, questions, answers, geometry = _grid_inputs()
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="f", model_name="m",
                                colormap="nope")
    fig = figures.new_figure((3, 3))
    with pytest.raises(ValueError, match="did you mean"):
        figures.overlay(fig.add_subplot(), image, maps[0], geometry, colormap="magam")


def test_save_writes_png(tmp_path):
    fig = figures.forest_plot(_forest_table())
    out = figures.save(fig, tmp_path / "sub" / "forest.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size == (round(fig.get_figwidth() * figures.DEFAULT_DPI),
                           round(fig.get_figheight() * figures.DEFAULT_DPI))
    with pytest.raises(ValueError, match="PNG"):
        figures.save(fig, tmp_path / "forest.pdf")


# ----------------------------------------------------------------------------- what every figure states


def test_paraphrase_grid_states_study_truth_correctness_and_provenance():
    image, maps, questions, answers, geometry = _grid_inputs()
    fig = figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="effusion",
                                  model_name="llava_rad", study_id="s-042", ground_truth="yes",
                                  provenance=PROVENANCE)  # fmt: skip
    texts = " | ".join(_all_texts(fig))
    assert "study s-042" in texts and "ground truth: yes" in texts
    assert fig.get_suptitle() == "effusion \u2014 llava_rad"
    assert "layers 0\u201331" in texts and "heads: mean" in texts and "query:" in texts
    panels = fig.axes[:6]
    for k, ax in enumerate(panels):  # answers: v0 no, v1 yes, ... (k % 2); truth yes
        title = ax.get_title(loc="left")
        if k in answers:
            verdict = "correct" if answers[k][0] == "yes" else "wrong"
            assert f"answer: {answers[k][0]} ({verdict})" in title and f"P(yes) = {answers[k][1]:.2f}" in title
        else:
            assert "answer: n/a" in title
    # a negated wording has the opposite truth: its panel judges it by its own, and says so
    neg = figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="effusion", model_name="m",
                                  ground_truth="yes", truths={2: "no"})  # fmt: skip
    title2 = neg.axes[2].get_title(loc="left")
    assert "answer: no (correct)" in title2 and "negated wording: its truth is no" in title2
    assert "negated" not in neg.axes[1].get_title(loc="left")


def test_side_by_side_offers_one_shared_scale_and_says_which():
    width, height = 300, 200
    geos = {"llava_rad": LLAVA[1](width, height), "medgemma": MEDGEMMA[1](width, height)}
    rng = np.random.default_rng(1)
    maps = {"llava_rad": rng.random(1369) ** 4, "medgemma": rng.random(256)}
    kw = dict(question="Is there cardiomegaly?", study_id="s7", finding="cardiomegaly", ground_truth="no",
              answers_by_model={"llava_rad": ("yes", 0.81), "medgemma": ("no", 0.12)})  # fmt: skip
    fig = figures.side_by_side(Image.new("L", (width, height)), maps, geos, shared_scale=True, **kw)
    texts = " | ".join(_all_texts(fig))
    assert "study s7" in texts and "finding cardiomegaly" in texts and "ground truth: no" in texts
    assert "answer: yes (wrong)" in texts and "answer: no (correct)" in texts
    assert " ".join(figures.SHARED_SCALE_TEXT.split()) in " ".join(texts.split())
    bars = [ax for ax in fig.axes if _is_colorbar(ax)]
    assert len(bars) == 1 and figures.RELATIVE_LABEL.split(" (")[0] in bars[0].get_ylabel()
    panels = [ax for ax in fig.axes if len(ax.images) == 2]
    clims = {ax.images[1].get_clim() for ax in panels}
    relative = {m: figures.image_shares(maps[m], geos[m]) * geos[m].n_tokens for m in maps}
    assert len(clims) == 1 and clims.pop() == (0.0, pytest.approx(max(v.max() for v in relative.values())))
    # on the shared scale a uniform token reads 1 in both grids, whatever their size
    fig1 = figures.side_by_side(Image.new("L", (width, height)), {m: np.ones(geos[m].n_tokens) for m in geos},
                                geos, question="q")  # fmt: skip
    assert [ax.images[1].get_clim()[1] for ax in fig1.axes if len(ax.images) == 2] == [pytest.approx(1.0)] * 2

    sep = figures.side_by_side(Image.new("L", (width, height)), maps, geos, shared_scale=False, **kw)
    assert " ".join(figures.SEPARATE_SCALE_TEXT.split()) in " ".join(" | ".join(_all_texts(sep)).split())
    insets = [c for ax in sep.axes for c in ax.child_axes]  # each panel's own bar hugs its image
    assert len([ax for ax in sep.axes + insets if _is_colorbar(ax)]) == 2


def test_overlay_draws_the_image_at_the_size_it_is_shown():
    """A 2000 x 1500 radiograph in a 3-inch panel is reduced once to about the panel's pixels at
    the save resolution, not to a fixed 640 px, and the map is blended into that one image."""
    geometry = MEDGEMMA[1](2000, 1500)
    fig = figures.new_figure((3, 3), layout=False)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    figures.overlay(ax, Image.new("L", (2000, 1500), 80), np.ones(256), geometry)
    drawn = ax.images[0].get_array()
    assert 360 <= drawn.shape[1] <= 364 and drawn.shape[0] == round(drawn.shape[1] * 0.75)  # 0.8 x 3 in x 150 dpi
    assert not ax.images[1].get_visible()  # the map's own image: colour scale only


# ----------------------------------------------------------------------------- forest plot: panels, note, decimals


def _summary_like() -> pd.DataFrame:
    rows = []
    for model, shift in (("llava_rad", 0.0), ("medgemma", 0.05)):
        for metric, est in (("accuracy", 0.7), ("flip_rate", 0.0), ("attn_entropy", 0.95), ("auroc", 0.61)):
            exact = metric == "flip_rate"
            rows.append({"model": model, "metric": metric, "estimate": est + (0 if exact else shift),
                         "ci_low": 0.0 if exact else est - 0.1, "ci_high": 0.283 if exact else est + 0.1234,
                         "ci_method": "exact_one_sided_clusters" if exact else "bca", "level": 0.95,
                         "n_clusters": 7})  # fmt: skip
    return pd.DataFrame(rows)


def test_forest_plot_splits_directions_and_states_the_intervals():
    table = _summary_like()
    panels = {"accuracy": "higher is better", "auroc": "higher is better", "flip_rate": "lower is better",
              "attn_entropy": "no better direction"}  # fmt: skip
    fig = figures.forest_plot(table, panels=panels, cluster_unit="studies")
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["higher is better", "lower is better", "no better direction"]
    rows = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert rows == [["accuracy", "auroc"], ["flip_rate"], ["attn_entropy"]]
    note = " ".join(fig._supxlabel.get_text().split())
    assert "95% cluster-bootstrap intervals" in note and "BCa: 6 rows" in note
    assert "clusters: 7 studies" in note and "fewer than 25 studies" in note
    assert "* exact one-sided bound" in note
    numbers = [t.get_text() for ax in fig.axes for t in ax.texts if "[" in t.get_text()]
    assert len(numbers) == 8
    assert all(re.fullmatch(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]( \*)?", t) for t in numbers), numbers
    assert "0.000 [0.000, 0.283] *" in numbers and "0.750 [0.600, 0.823]" in numbers


# ----------------------------------------------------------------------------- saved files: size, legibility, one draw


def _radiograph(width=1841, height=1955, seed=0) -> Image.Image:
    """A radiograph-like test image: smooth anatomy-sized shapes plus film noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = 120 + 60 * np.sin(6 * x) * np.cos(4 * y) - 50 * np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.02)
    img = img - 50 * np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.02) + rng.normal(0, 6, (height, width))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _demo_like_figures() -> list[Figure]:
    image = _radiograph()
    geos = {"llava_rad": LLAVA[1](*image.size), "medgemma": MEDGEMMA[1](*image.size)}
    rng = np.random.default_rng(0)
    q = {k: f"Does this chest radiograph show a pleural effusion (wording {k})?" for k in range(6)}
    out = []
    for m in geos:
        maps = {k: rng.random(geos[m].n_tokens) ** 6 for k in range(6)}
        out.append(figures.paraphrase_grid(image, maps, q, {k: ("no", 0.31) for k in range(6)}, geos[m],
                                           finding="pleural_effusion", model_name=m, random_weights=True,
                                           study_id="s1", ground_truth="yes", provenance=PROVENANCE))  # fmt: skip
    out.append(figures.side_by_side(image, {m: rng.random(geos[m].n_tokens) for m in geos}, geos, question=q[0],
                                    random_weights=True, study_id="s1", finding="pleural_effusion"))  # fmt: skip
    return out


def test_saved_figures_are_small_and_keep_their_resolution(tmp_path):
    for i, fig in enumerate(_demo_like_figures()):
        full = figures.render_rgb(fig)  # the full-colour render the PNG is made from
        path = figures.save(fig, tmp_path / f"f{i}.png")
        assert path.stat().st_size < 400_000, (path.name, path.stat().st_size)
        with Image.open(path) as im:
            assert im.mode == "P"  # a palette PNG
            saved = np.asarray(im.convert("RGB")).astype(int)
        # same pixels as rendered (text keeps its resolution): at least 1400 px wide at 150 dpi
        assert saved.shape == full.shape and saved.shape[1] >= 1400 and saved.shape[0] >= 800
        diff = np.abs(saved - full.astype(int))
        assert diff.mean() < 3 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))
        assert (saved[full.min(axis=2) == 255] == 255).all()  # the white page stays white
        dark = full.max(axis=2) < 60  # text and lines
        assert (saved[dark].max(axis=1) < 90).mean() > 0.98  # and stays dark


def test_save_draws_each_figure_once(tmp_path, monkeypatch):
    calls = []
    real = Figure.draw

    def counting(self, renderer):
        calls.append(self)
        return real(self, renderer)

    monkeypatch.setattr(Figure, "draw", counting)
    image, maps, questions, answers, geometry = _grid_inputs()
    for name, fig in (("grid", figures.paraphrase_grid(image, maps, questions, answers, geometry, finding="f",
                                                        model_name="m", random_weights=True)),
                      ("forest", figures.forest_plot(_forest_table(), random_weights=True))):  # fmt: skip
        calls.clear()
        figures.save(fig, tmp_path / f"{name}.png")
        assert len(calls) == 1, f"{name} drawn {len(calls)} times"
