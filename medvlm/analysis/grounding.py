"""Grounding: does a saliency map point at the expert's region?

Four metrics, each a plain numpy function of a saliency map ``saliency`` float [H, W] and a
boolean region ``mask`` bool [H, W] of the same shape, in original image pixels, indexed
[row, column] = [y, x]. They score maps from any tool, not only this package's attention.

- :func:`pointing_hit`: the hit of CheXlocalize's pointing game (Saporta et al., "Benchmarking
  saliency methods for chest X-ray interpretation", Nat Mach Intell 2022; their eval.py
  ``get_hitrates``): the map is resized bilinearly (``F.interpolate(..., mode='bilinear',
  align_corners=False)``) to the image's size, the argmax pixel is taken (``np.argmax``: the first
  maximum in row-major order when several pixels tie), and it is a hit (1.0) when that pixel lies
  in the mask, a miss (0.0) otherwise, undefined (NaN) when the mask is empty.
- :func:`otsu_iou`: CheXlocalize's default segmentation (their heatmap_to_segmentation.py
  ``cam_to_segmentation`` and eval.py ``calculate_iou``): min-max normalise the map, quantise as
  ``np.uint8(255 * m)``, threshold with Otsu's method as OpenCV computes it (foreground = value >
  threshold), fill the foreground's contours as they do (holes filled; a component whose contour
  is a single point, i.e. one isolated pixel, is skipped), then IoU with the mask. NaN when the
  mask or the segmentation is empty (their ``true_pos_only=True`` default) or the map is constant
  (min-max normalisation is undefined).
- :func:`energy_in_mask`: the energy-based pointing game of Score-CAM (Wang et al., "Score-CAM:
  Score-weighted visual explanations for convolutional neural networks", CVPRW 2020): the map's
  mass inside the region over its total mass. Their reference code indexes the box as
  ``[x1:x2, y1:y2]`` on a [row, column] array (transposed); here the mask is [row, column]. The
  map must be non-negative; it is used as given: Score-CAM's maps are ReLU'd and min-max
  normalised, a pure rescaling when their minimum is 0, to which the ratio is invariant; an
  attention map is a probability mass, so no minimum is subtracted. Its value for a uniform map is
  the region's area fraction; :func:`grounding_row` reports both and their ratio, the "lift".
- :func:`cnr`: the contrast-to-noise ratio of BioViL / MS-CXR (Boecking et al., "Making the most
  of text semantics to improve biomedical vision-language processing", ECCV 2022):
  ``|mean_in - mean_out| / sqrt(var_in + var_out)`` over the pixels inside and outside the region,
  with population variances (ddof 0). Invariant to a positive rescaling or a shift of the map.

A model's token map reaches image pixels through the same :class:`medvlm.core.geometry.Geometry` the
overlays use (:func:`token_map_to_pixels`): bilinear by default, as CheXlocalize resizes, or
nearest (each pixel takes its cell's value, as the overlays paint). Where the model never saw
the image (outside LLaVA-Rad's center crop) the map is NaN; :func:`grounding_row` computes every
metric over the seen pixels only, reports the fraction of the region that was seen, and gives a
region that lies entirely outside the seen part the status "not seen", never a miss.

Baselines, computed the same way (same grid, same mapping to pixels, same seen region):
the uniform token map, and a centred Gaussian prior: token value exp(-(dx^2 / (2 (s W)^2) +
dy^2 / (2 (s H)^2))) at the cell's centre, (dx, dy) its offset from the image's centre in original
pixels, W x H the image size, s = ``prior_sigma`` (default 0.25: one sigma is a quarter of each
side, so the image's edges lie at two sigma). Both baselines have tied maxima by construction
(the uniform map everywhere; an even grid's four central cells), where "the first argmax" would
only measure the tie-breaking order; their pointing value is therefore the expected hit under
random tie-breaking (``ties="mean"``). The uniform map's Otsu IoU and CNR are NaN by definition.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from medvlm.core.geometry import Geometry
from medvlm.data.regions import resample_mask

DEFAULT_PRIOR_SIGMA = 0.25
STATUS_OK = "ok"
STATUS_NOT_SEEN = "not seen"
STATUS_EMPTY = "empty region"
METRICS = ("pointing_hit", "energy", "energy_lift", "otsu_iou", "cnr")

__all__ = [
    "DEFAULT_PRIOR_SIGMA",
    "METRICS",
    "baseline_values",
    "cnr",
    "energy_in_mask",
    "gaussian_prior_token_map",
    "grounding_row",
    "otsu_iou",
    "otsu_segmentation",
    "otsu_threshold",
    "pointing_hit",
    "resize_bilinear",
    "seen_mask",
    "seen_slices",
    "token_map_to_pixels",
]


# ----------------------------------------------------------------------------- checks


def _check_pair(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(saliency, dtype=np.float64)
    m = np.asarray(mask)
    if s.ndim != 2:
        raise ValueError(f"saliency must be 2-D [H, W], got {s.ndim}-D shape {s.shape}")
    if m.shape != s.shape:
        raise ValueError(f"mask shape {m.shape} differs from saliency shape {s.shape}")
    if m.dtype != bool:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("mask must be boolean (or 0/1)")
        m = m.astype(bool)
    bad = int(np.sum(~np.isfinite(s)))
    if bad:
        raise ValueError(f"saliency has {bad} non-finite values of {s.size}")
    return s, m


# ----------------------------------------------------------------------------- metrics


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, ties: str = "first") -> float:
    """CheXlocalize's pointing-game hit: 1.0 when the map's argmax pixel lies in the mask, else 0.0;
    NaN when the mask is empty.

    saliency float [H, W] at the image's size (see :func:`resize_bilinear`), mask bool [H, W].
    ties "first": ``np.argmax`` (the first maximum in row-major order), as CheXlocalize;
    "mean": the fraction of the tied maximum pixels that lie in the mask (the expected hit under
    random tie-breaking; the same value when the maximum is unique).
    """
    s, m = _check_pair(saliency, mask)
    return _pointing(s, m, ties)


def _pointing(s: np.ndarray, m: np.ndarray, ties: str) -> float:
    if not m.any():
        return math.nan
    if ties == "first":
        return float(m.reshape(-1)[int(np.argmax(s))])
    if ties == "mean":
        top = s == s.max()
        return float(np.sum(top & m) / np.sum(top))
    raise ValueError(f"ties must be 'first' or 'mean', got {ties!r}")


def energy_in_mask(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Score-CAM's energy-based pointing game: sum(saliency inside mask) / sum(saliency).

    saliency float [H, W], non-negative with a positive sum; mask bool [H, W]. NaN when the mask is
    empty. A uniform map gives the mask's area fraction, mask.mean().
    """
    s, m = _check_pair(saliency, mask)
    if np.any(s < 0):
        raise ValueError(f"saliency has {int(np.sum(s < 0))} negative values; its mass is undefined")
    if s.sum() <= 0:
        raise ValueError("saliency is all zero; it has no mass to place")
    return _energy(s, m)


def _energy(s: np.ndarray, m: np.ndarray) -> float:
    if not m.any():
        return math.nan
    return float(s[m].sum() / s.sum())


def cnr(saliency: np.ndarray, mask: np.ndarray) -> float:
    """BioViL / MS-CXR contrast-to-noise ratio |mean_in - mean_out| / sqrt(var_in + var_out).

    saliency float [H, W], mask bool [H, W]; variances with ddof 0. NaN when either side is empty
    or both variances and the mean difference are zero (a constant map); +inf when the two sides
    are each constant but differ.
    """
    s, m = _check_pair(saliency, mask)
    return _cnr(s, m)


def _cnr(s: np.ndarray, m: np.ndarray) -> float:
    inside, outside = s[m], s[~m]
    if inside.size == 0 or outside.size == 0:
        return math.nan
    diff = abs(float(inside.mean()) - float(outside.mean()))
    noise = math.sqrt(float(inside.var()) + float(outside.var()))
    if noise == 0.0:
        return math.nan if diff == 0.0 else math.inf
    return diff / noise


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values as OpenCV's THRESH_OTSU computes it (getThreshVal_Otsu_8u):
    the level t in 0..255 maximising the between-class variance q1 q2 (mu1 - mu2)^2 of the classes
    <= t and > t, levels whose class weight is below FLT_EPSILON skipped, the first maximum kept.
    Returns 0 when no level splits the values (all equal). Foreground is value > t.
    """
    v = np.asarray(values)
    if v.dtype != np.uint8:
        raise ValueError(f"Otsu's threshold here takes uint8 values, got {v.dtype}")
    if v.size == 0:
        raise ValueError("no values to threshold")
    p = np.bincount(v.reshape(-1), minlength=256).astype(np.float64) / v.size
    levels = np.arange(256, dtype=np.float64)
    mu = float(np.sum(levels * p))
    q1 = np.cumsum(p)
    q2 = 1.0 - q1
    eps = float(np.finfo(np.float32).eps)
    ok = (np.minimum(q1, q2) >= eps) & (np.maximum(q1, q2) <= 1.0 - eps)
    if not ok.any():
        return 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = np.cumsum(levels * p) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
    sigma = np.where(ok, sigma, -np.inf)
    best = float(sigma.max())
    if best <= 0:
        return 0
    # OpenCV keeps the first level whose variance beats every earlier one (strict >); allow for
    # the rounding between its running sums and these cumulative ones
    return int(np.flatnonzero(sigma >= best * (1 - 1e-12))[0])


def otsu_segmentation(saliency: np.ndarray) -> np.ndarray | None:
    """CheXlocalize's default binary segmentation of a map: bool [H, W], or None for a constant map.

    Min-max normalise, ``np.uint8(255 * m)``, Otsu's threshold (:func:`otsu_threshold`), then fill
    as their contour drawing does: every contour of the foreground is drawn filled, so holes are
    filled (background 4-connected, foreground 8-connected, as OpenCV traces), and a contour of a
    single point (an isolated one-pixel component) is skipped. Checked against their pipeline
    (cv2.threshold THRESH_OTSU, cv2.findContours RETR_TREE, PIL polygons) on 60 random and 6
    hand-drawn maps (holes, notches, lone pixels): same threshold, no pixel different.
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"saliency must be a non-empty 2-D [H, W] array, got shape {s.shape}")
    bad = int(np.sum(~np.isfinite(s)))
    if bad:
        raise ValueError(f"saliency has {bad} non-finite values of {s.size}")
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return None
    q = np.uint8(255 * ((s - lo) / (hi - lo)))  # truncation, as np.uint8 on their float map
    fg = q > otsu_threshold(q)
    # fill holes: background components (4-connected) that do not touch the border; the same as
    # ndimage.binary_fill_holes, several times faster on a radiograph-sized map
    background, _ = ndimage.label(~fg)
    outer = np.zeros(int(background.max()) + 1, dtype=bool)
    outer[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = True
    filled = fg | ~outer[background]
    labels, n = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    if n:
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        filled &= sizes[labels] > 1
    return filled


def otsu_iou(saliency: np.ndarray, mask: np.ndarray) -> float:
    """IoU of CheXlocalize's Otsu segmentation of the map (:func:`otsu_segmentation`) with the mask.

    saliency float [H, W], mask bool [H, W]. NaN when the mask is empty, the segmentation is empty,
    or the map is constant (CheXlocalize's ``calculate_iou`` with ``true_pos_only=True``).
    """
    s, m = _check_pair(saliency, mask)
    return _otsu_iou(s, m)


def _otsu_iou(s: np.ndarray, m: np.ndarray) -> float:
    if not m.any():
        return math.nan
    seg = otsu_segmentation(s)
    if seg is None or not seg.any():
        return math.nan
    return float(np.sum(seg & m) / np.sum(seg | m))


# ----------------------------------------------------------------------------- token map -> pixels


def _axis_cells(n_px: int, lo: float, hi: float, n_cells: int) -> np.ndarray:
    """Cell index of each pixel centre along one axis (int [n_px]); outside [0, n_cells) = unseen.
    The same arithmetic as Geometry.to_image, so the seen pixels are exactly the painted ones."""
    centres = np.arange(n_px) + 0.5
    return np.floor((centres - lo) / (hi - lo) * n_cells).astype(int)


def _seen_range(n_px: int, lo: float, hi: float, n_cells: int) -> slice:
    idx = _axis_cells(n_px, lo, hi, n_cells)
    ok = np.flatnonzero((idx >= 0) & (idx < n_cells))
    if ok.size == 0:
        return slice(0, 0)
    return slice(int(ok[0]), int(ok[-1]) + 1)


def seen_slices(geometry: Geometry) -> tuple[slice, slice]:
    """(rows, cols) slices of the original image the model saw (a rectangle: the crop box's pixels,
    those whose centre lies in it); the whole image for a square resize."""
    width, height = geometry.image_size
    x0, y0, x1, y1 = geometry.crop_box
    rows, cols = geometry.grid
    return _seen_range(height, y0, y1, rows), _seen_range(width, x0, x1, cols)


def seen_mask(geometry: Geometry) -> np.ndarray:
    """bool [H, W]: True where the model saw the image (where Geometry.to_image is not NaN)."""
    width, height = geometry.image_size
    out = np.zeros((height, width), dtype=bool)
    out[seen_slices(geometry)] = True
    return out


def _linear_weights(n_px: int, lo: float, hi: float, n_cells: int, px: slice) -> np.ndarray:
    """float [len(px), n_cells]: bilinear weights of each seen pixel centre on the cell centres,
    align_corners=False, clamped at the edges (PyTorch's F.interpolate)."""
    centres = np.arange(px.start, px.stop) + 0.5
    u = np.clip((centres - lo) / (hi - lo) * n_cells - 0.5, 0.0, n_cells - 1)
    i0 = np.floor(u).astype(int)
    i1 = np.minimum(i0 + 1, n_cells - 1)
    t = u - i0
    w = np.zeros((centres.size, n_cells))
    r = np.arange(centres.size)
    np.add.at(w, (r, i0), 1.0 - t)
    np.add.at(w, (r, i1), t)
    return w


def resize_bilinear(grid_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D map float [rows, cols] resized to float [height, width] as
    ``F.interpolate(x[None, None], (height, width), mode='bilinear', align_corners=False)``."""
    g = np.asarray(grid_map, dtype=np.float64)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"grid_map must be a non-empty 2-D array, got shape {g.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height} x {width}")
    wy = _linear_weights(height, 0.0, float(height), g.shape[0], slice(0, height))
    wx = _linear_weights(width, 0.0, float(width), g.shape[1], slice(0, width))
    return wy @ g @ wx.T


def _grid(token_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    arr = np.asarray(token_map, dtype=np.float64)
    rows, cols = geometry.grid
    if arr.size != rows * cols:
        raise ValueError(f"token map has {arr.size} values, the {rows} x {cols} grid needs {rows * cols}")
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape != (rows, cols)):
        raise ValueError(f"token map must be ({rows * cols},) or ({rows}, {cols}), got {arr.shape}")
    bad = int(np.sum(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"token map has {bad} non-finite values")
    return arr.reshape(rows, cols)


def _seen_pixels(token_map: np.ndarray, geometry: Geometry, mode: str) -> np.ndarray:
    """The map on the seen rectangle only: float [seen rows, seen cols]."""
    grid = _grid(token_map, geometry)
    width, height = geometry.image_size
    x0, y0, x1, y1 = geometry.crop_box
    rows, cols = geometry.grid
    rs, cs = seen_slices(geometry)
    if mode == "bilinear":
        wy = _linear_weights(height, y0, y1, rows, rs)
        wx = _linear_weights(width, x0, x1, cols, cs)
        return wy @ grid @ wx.T
    if mode == "nearest":
        ri = _axis_cells(height, y0, y1, rows)[rs]
        ci = _axis_cells(width, x0, x1, cols)[cs]
        return grid[ri][:, ci]
    raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")


def token_map_to_pixels(token_map: np.ndarray, geometry: Geometry, mode: str = "bilinear") -> np.ndarray:
    """A per-token map (n_tokens,) or (rows, cols) on the original image: float [H, W], NaN where
    the model never saw the image.

    mode "bilinear": F.interpolate(align_corners=False) of the grid onto the crop box's pixels (for
    a square resize, exactly the resize of the grid to the image's size); "nearest": each pixel
    takes its cell's value, identical to Geometry.to_image (what the overlays paint).
    """
    width, height = geometry.image_size
    out = np.full((height, width), np.nan)
    out[seen_slices(geometry)] = _seen_pixels(token_map, geometry, mode)
    return out


def gaussian_prior_token_map(geometry: Geometry, sigma: float = DEFAULT_PRIOR_SIGMA) -> np.ndarray:
    """The centred Gaussian prior as a token map float [rows, cols]: each cell's value at its
    centre in original pixels, exp(-(dx^2 / (2 (sigma W)^2) + dy^2 / (2 (sigma H)^2))), (dx, dy)
    from the image's centre (W/2, H/2); sigma is a fraction of each side."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    width, height = geometry.image_size
    x0, y0, x1, y1 = geometry.crop_box
    rows, cols = geometry.grid
    cx = x0 + (np.arange(cols) + 0.5) * (x1 - x0) / cols
    cy = y0 + (np.arange(rows) + 0.5) * (y1 - y0) / rows
    gx = np.exp(-((cx - width / 2) ** 2) / (2 * (sigma * width) ** 2))
    gy = np.exp(-((cy - height / 2) ** 2) / (2 * (sigma * height) ** 2))
    return gy[:, None] * gx[None, :]


# ----------------------------------------------------------------------------- one map + one region


def _scaled(geometry: Geometry, mask: np.ndarray, max_side: int | None) -> tuple[Geometry, np.ndarray, float]:
    width, height = geometry.image_size
    if max_side is None or max(width, height) <= max_side:
        return geometry, mask, 1.0
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    s = max_side / max(width, height)
    new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = geometry.crop_box
    geo = Geometry((new_w, new_h), (x0 * sx, y0 * sy, x1 * sx, y1 * sy), geometry.grid, geometry.input_size)
    return geo, resample_mask(mask, new_w, new_h), s


def _metrics(sal: np.ndarray, m: np.ndarray, area: float, ties: str) -> dict[str, float]:
    # a signed map (e.g. gradient x input) has no mass: energy is undefined there, the rest is not
    # (sal is the finite map this module computed, m its boolean region: no checks again)
    energy = _energy(sal, m) if sal.min() >= 0 and sal.max() > 0 else math.nan
    return {
        "pointing_hit": _pointing(sal, m, ties),
        "energy": energy,
        "energy_lift": energy / area if area > 0 else math.nan,
        "otsu_iou": _otsu_iou(sal, m),
        "cnr": _cnr(sal, m),
    }


def _prepare(geometry: Geometry, mask: np.ndarray, max_side: int | None):
    m = np.asarray(mask)
    width, height = geometry.image_size
    if m.shape != (height, width):
        raise ValueError(
            f"region mask is {m.shape[1]} x {m.shape[0]} (W x H) but the geometry's image is {width} x {height}"
        )
    if m.dtype != bool:
        raise ValueError(f"region mask must be boolean, got {m.dtype}")
    geo, m, scale = _scaled(geometry, m, max_side)
    rs, cs = seen_slices(geo)
    region_px = int(m.sum())
    seen_m = m[rs, cs]
    seen_px = int(seen_m.sum())
    info = {
        "eval_width": geo.image_size[0],
        "eval_height": geo.image_size[1],
        "eval_scale": scale,
        "region_px": region_px,
        "seen_fraction": seen_px / region_px if region_px else math.nan,
        "area_fraction": seen_px / seen_m.size if seen_m.size else math.nan,
    }
    if region_px == 0:
        status = STATUS_EMPTY
    elif seen_px == 0:
        status = STATUS_NOT_SEEN
    else:
        status = STATUS_OK
    return geo, seen_m, info, status


def _nan_metrics(prefix: str = "") -> dict[str, float]:
    return {prefix + k: math.nan for k in METRICS}


def baseline_values(
    geometry: Geometry,
    mask: np.ndarray,
    *,
    mode: str = "bilinear",
    prior_sigma: float = DEFAULT_PRIOR_SIGMA,
    max_side: int | None = None,
) -> dict[str, float]:
    """The uniform and Gaussian-prior baselines for one (geometry, region), keys ``uniform_<metric>``
    and ``prior_<metric>`` for each of METRICS; computed as :func:`grounding_row` computes a model's
    map (same grid, mapping and seen region), pointing with ties="mean" (see the module docstring).
    Independent of the model's map: compute once per (model, image, region) and pass to
    grounding_row. NaN everywhere unless the region is seen."""
    geo, seen_m, info, status = _prepare(geometry, mask, max_side)
    out = {**_nan_metrics("uniform_"), **_nan_metrics("prior_")}
    if status != STATUS_OK:
        return out
    area = info["area_fraction"]
    for name, token_map in (
        ("uniform_", np.ones(geo.grid)),
        ("prior_", gaussian_prior_token_map(geo, prior_sigma)),
    ):
        sal = _seen_pixels(token_map, geo, mode)
        out.update({name + k: v for k, v in _metrics(sal, seen_m, area, ties="mean").items()})
    return out


def grounding_row(
    token_map: np.ndarray,
    geometry: Geometry,
    mask: np.ndarray,
    *,
    mode: str = "bilinear",
    prior_sigma: float = DEFAULT_PRIOR_SIGMA,
    max_side: int | None = None,
    baselines: dict[str, float] | None = None,
) -> dict[str, object]:
    """Every grounding value for one token map and one region.

    token_map  float (n_tokens,) or (rows, cols): one layer's map (any map kind)
    geometry   the model's Geometry for the image (medvlm.core.geometry; stored with each result)
    mask       bool [H, W] at geometry.image_size (W x H): the region, e.g. JoinedRegion.mask()
    mode       "bilinear" (CheXlocalize's resize; default) or "nearest" (the overlays' cells)
    max_side   None: evaluate at the image's own size (the definition); an int: at a copy whose
               long side is max_side (geometry scaled, mask resampled at pixel centres), faster
               for large originals; the row records eval_scale
    baselines  baseline_values(...) for the same geometry, mask, mode, prior_sigma and max_side,
               or None to compute them here

    Returns a dict: status ("ok", "not seen": the region lies wholly where the model never looked,
    "empty region"), region_px, seen_fraction (of the region's pixels, the share the model saw),
    area_fraction (the region's share of the seen pixels = the uniform map's energy), the map's
    pointing_hit, energy, energy_lift (energy / area_fraction), otsu_iou, cnr (NaN unless status is
    "ok"; energy also NaN for a map with negative values or no mass), the uniform_* and prior_*
    baselines, and mode, prior_sigma, eval_width/height/scale.
    """
    geo, seen_m, info, status = _prepare(geometry, mask, max_side)
    row: dict[str, object] = {"status": status, **info, "mode": mode, "prior_sigma": prior_sigma}
    if status == STATUS_OK:
        sal = _seen_pixels(token_map, geo, mode)
        row.update(_metrics(sal, seen_m, info["area_fraction"], ties="first"))
    else:
        _grid(token_map, geo)  # a bad map is an error even where the region is not seen
        row.update(_nan_metrics())
    if baselines is None:
        baselines = baseline_values(geometry, mask, mode=mode, prior_sigma=prior_sigma, max_side=max_side)
    row.update(baselines)
    return row
