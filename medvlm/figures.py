"""Figures: attention overlays, the six-paraphrase grid, the two-model comparison, forest plots.

Pure functions: they take data (images, per-token maps, geometries, tables) and return a
matplotlib Figure; :func:`save` writes it as PNG. Figures are built on the Agg canvas
directly (no pyplot state, no display needed), so they work headless and in notebooks.

Honesty rules followed here:
- A map is drawn only where the model saw the image: cells are painted back onto the original
  image through its :class:`~medvlm.geometry.Geometry` (nearest cell, no smoothing); what the
  model never saw (LLaVA-Rad's center crop drops the ends of a non-square image) stays unpainted
  and is shaded and labelled "not seen by model".
- Maps are shown as each token's share of the attention paid to the image (normalised over the
  image tokens); the colour bars say so.
- A missing or failed map is an empty panel that says why, never a made-up map.
- Figures from random-weight models carry a red "RANDOM WEIGHTS" banner.
"""

from __future__ import annotations

import difflib
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.patheffects as path_effects
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.layout_engine import ConstrainedLayoutEngine, TightLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.textpath import TextToPath
from matplotlib.transforms import blended_transform_factory
from PIL import Image

from medvlm.geometry import Geometry

__all__ = [
    "COLORBAR_LABEL",
    "NOT_SEEN_LABEL",
    "RANDOM_WEIGHTS_TEXT",
    "check_colormap",
    "forest_plot",
    "image_shares",
    "new_figure",
    "overlay",
    "paraphrase_grid",
    "random_weights_banner",
    "save",
    "side_by_side",
]

COLORBAR_LABEL = "share of image attention"
NOT_SEEN_LABEL = "not seen by model"
RANDOM_WEIGHTS_TEXT = "RANDOM WEIGHTS \u2014 illustrates the pipeline, not a model"
BANNER_GID = "medvlm-random-weights-banner"
UNSEEN_GID = "medvlm-not-seen"
DEFAULT_DPI = 150

_SUGGESTED_COLORMAPS = ("hot", "inferno", "magma", "viridis", "plasma", "jet", "turbo", "gray")
_UNSEEN_FACE = (0.55, 0.55, 0.55, 0.6)
_UNSEEN_HATCH = (1.0, 1.0, 1.0, 0.55)
_MAX_DISPLAY_SIDE = 640  # images and painted maps are drawn at most this many pixels on the long side
_TITLE_SIZE = 8.5


# ----------------------------------------------------------------------------- helpers


def check_colormap(colormap: str | Colormap) -> Colormap:
    """The matplotlib colormap called `colormap` (a Colormap passes through).

    Raises ValueError naming a few valid names (and close matches) when it is unknown.
    """
    if isinstance(colormap, Colormap):
        return colormap
    if isinstance(colormap, str) and colormap in matplotlib.colormaps:
        return matplotlib.colormaps[colormap]
    close = difflib.get_close_matches(str(colormap), list(matplotlib.colormaps), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown colormap {colormap!r}{hint}; valid names include "
        f"{', '.join(_SUGGESTED_COLORMAPS)} (any name in matplotlib.colormaps)"
    )


def image_shares(token_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A per-token attention map as each token's share of the image attention, float [n_tokens].

    Accepts (n_tokens,) or (rows, cols). Raises ValueError on a wrong size, non-finite or
    negative values, or an all-zero map: such a map cannot be normalised honestly.
    """
    arr = np.asarray(token_map, dtype=np.float64)
    if arr.size != geometry.n_tokens:
        raise ValueError(
            f"token map has {arr.size} values, the {geometry.grid[0]} x {geometry.grid[1]} grid "
            f"needs {geometry.n_tokens}"
        )
    arr = arr.reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"token map has {int(np.sum(~np.isfinite(arr)))} non-finite values")
    if np.any(arr < 0):
        raise ValueError("token map has negative values; attention mass cannot be negative")
    total = arr.sum()
    if total <= 0:
        raise ValueError("token map is all zero; there is no attention to show")
    return arr / total


def new_figure(figsize: tuple[float, float], *, compress: bool = False) -> Figure:
    """A Figure on the Agg canvas (no pyplot, no display) with constrained layout; use it to
    place :func:`overlay` panels in your own figures. compress=True suits grids of images."""
    fig = Figure(figsize=figsize, layout=ConstrainedLayoutEngine(compress=compress))
    FigureCanvasAgg(fig)
    return fig


def _check_image(image: Image.Image, geometry: Geometry) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if tuple(image.size) != tuple(geometry.image_size):
        raise ValueError(
            f"image is {image.size[0]} x {image.size[1]} but the geometry was built for "
            f"{geometry.image_size[0]} x {geometry.image_size[1]}"
        )


def _display_size(width: int, height: int) -> tuple[int, int]:
    """Pixel size to draw an image of width x height at: itself, or at most _MAX_DISPLAY_SIDE
    on the long side (a panel is a few hundred pixels wide; more only slows rendering)."""
    long_side = max(width, height)
    if long_side <= _MAX_DISPLAY_SIDE:
        return width, height
    scale = _MAX_DISPLAY_SIDE / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draw_image(ax: Axes, image: Image.Image, extent: tuple[float, float, float, float]) -> None:
    """The original image at its native aspect, in original pixel coordinates (the extent);
    a very large image is drawn from a Lanczos-reduced copy."""
    size = _display_size(*image.size)
    mode = image.mode
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = image.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        ax.imshow(np.asarray(rgb), extent=extent, interpolation="antialiased")
        return
    if mode in ("1", "L", "LA"):
        grey = image.convert("L")
        vmin, vmax = 0.0, 255.0
    else:  # I, I;16*, F: high bit depth greyscale, stretched min..max for display
        grey = image.convert("F") if mode != "F" else image
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(grey, dtype=np.float64)
    if mode not in ("1", "L", "LA"):
        finite = arr[np.isfinite(arr)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1.0
    ax.imshow(arr, extent=extent, cmap="gray", vmin=vmin, vmax=vmax, interpolation="antialiased")


def _paint_geometry(geometry: Geometry) -> Geometry:
    """The geometry to paint with: the same one, or for a very large image the same crop box
    on a proportionally smaller pixel grid over the same extent (see _display_size)."""
    width, height = geometry.image_size
    new_w, new_h = _display_size(width, height)
    if (new_w, new_h) == (width, height):
        return geometry
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = geometry.crop_box
    return Geometry((new_w, new_h), (x0 * sx, y0 * sy, x1 * sx, y1 * sy), geometry.grid, geometry.input_size)


def _unseen_strips(geometry: Geometry) -> list[tuple[float, float, float, float]]:
    """(x, y, width, height) rectangles of the original image outside the crop box."""
    width, height = geometry.image_size
    x0, y0, x1, y1 = geometry.crop_box
    eps = 1e-6
    strips = []
    if y0 > eps:
        strips.append((0.0, 0.0, float(width), y0))
    if y1 < height - eps:
        strips.append((0.0, y1, float(width), height - y1))
    top, bottom = max(y0, 0.0), min(y1, float(height))
    if x0 > eps:
        strips.append((0.0, top, x0, bottom - top))
    if x1 < width - eps:
        strips.append((x1, top, width - x1, bottom - top))
    return strips


def _shade_unseen(ax: Axes, geometry: Geometry) -> None:
    """Grey hatching over what the model never saw, labelled inside each strip when it fits,
    otherwise in the x label."""
    width, height = geometry.image_size
    labelled_all = True
    for x, y, w, h in _unseen_strips(geometry):
        ax.add_patch(
            Rectangle(
                (x, y), w, h, facecolor=_UNSEEN_FACE, edgecolor=_UNSEEN_HATCH, hatch="///",
                linewidth=0, zorder=3, gid=UNSEEN_GID,
            )
        )
        vertical = h > w
        thickness = (w / width) if vertical else (h / height)
        if thickness < 0.06:
            labelled_all = False
            continue
        ax.text(
            x + w / 2, y + h / 2, NOT_SEEN_LABEL, rotation=90 if vertical else 0,
            ha="center", va="center", fontsize=7, color="white", zorder=4, clip_on=True,
            path_effects=[path_effects.withStroke(linewidth=2, foreground="black")],
        )
    if not labelled_all:
        ax.set_xlabel(f"hatched: {NOT_SEEN_LABEL}", fontsize=7)


def _finish_image_axes(ax: Axes, geometry: Geometry) -> None:
    width, height = geometry.image_size
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _opaque(mappable: AxesImage) -> ScalarMappable:
    """The same colour scale without the overlay's transparency, for colour bars."""
    return ScalarMappable(norm=mappable.norm, cmap=mappable.get_cmap())


def _fmt_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "P(yes) n/a"
    return f"P(yes) = {p:.2f}"


def _panel_size(geometry: Geometry, max_w: float, max_h: float) -> tuple[float, float]:
    """Width and height (inches) of one image panel at the image's native aspect."""
    width, height = geometry.image_size
    aspect = height / width
    panel_w = min(max_w, max_h / aspect)
    return panel_w, panel_w * aspect


def _empty_panel(ax: Axes, geometry: Geometry, message: str) -> None:
    """A panel with no map: a grey box the size of the image with `message` in it."""
    _finish_image_axes(ax, geometry)
    ax.set_facecolor((0.93, 0.93, 0.93))
    ax.text(
        0.5, 0.5, "\n".join(textwrap.wrap(message, 28)) or message, transform=ax.transAxes,
        ha="center", va="center", fontsize=9, color="#8b0000", wrap=False,
    )


# ----------------------------------------------------------------------------- overlay


def overlay(
    ax: Axes,
    image: Image.Image,
    token_map: np.ndarray,
    geometry: Geometry,
    *,
    colormap: str | Colormap = "hot",
    alpha: float = 0.5,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = False,
    random_weights: bool = False,
) -> AxesImage:
    """Draw `image` at its native aspect on `ax` (extent in original pixels) and paint
    `token_map` over it through `geometry` (nearest cell, NaN where the model never saw).

    The map is shown as each token's share of the image attention (sums to 1 over the image
    tokens). vmin/vmax fix the colour scale (default 0 .. this map's maximum), so several
    panels can share one. Regions outside geometry.crop_box are hatched grey and labelled
    "not seen by model". Returns the map's AxesImage (for a colour bar).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cmap = check_colormap(colormap).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    _check_image(image, geometry)
    shares = image_shares(token_map, geometry)
    width, height = geometry.image_size
    extent = (0.0, float(width), float(height), 0.0)
    _draw_image(ax, image, extent)
    painted = _paint_geometry(geometry).to_image(shares)
    lo = 0.0 if vmin is None else float(vmin)
    hi = float(shares.max()) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-12
    mappable = ax.imshow(
        np.ma.masked_invalid(painted), extent=extent, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
        interpolation="nearest", zorder=2,
    )
    _shade_unseen(ax, geometry)
    _finish_image_axes(ax, geometry)
    if title:
        ax.set_title(title, fontsize=_TITLE_SIZE)
    if colorbar:
        # an inset axes hugs the image's drawn height (the axes box is shrunk to its aspect)
        cax = ax.inset_axes((1.03, 0.0, 0.045, 1.0))
        ax.figure.colorbar(_opaque(mappable), cax=cax, label=COLORBAR_LABEL)
    if random_weights:
        random_weights_banner(ax.figure)
    return mappable


# ----------------------------------------------------------------------------- grids


def _question_title(prefix: str, question: str | None, answer: tuple[str, float] | None) -> str:
    q = " ".join((question or "(question text missing)").split())
    q = textwrap.shorten(q, width=110, placeholder="\u2026")
    lines = textwrap.wrap(f"{prefix}: {q}", width=40)
    if answer is not None:
        ans, p_yes = answer
        lines.append(f"answer: {ans}  \u00b7  {_fmt_p(p_yes)}")
    else:
        lines.append("answer: n/a")
    return "\n".join(lines)


def paraphrase_grid(
    image: Image.Image,
    maps: Mapping[int, np.ndarray | None],
    questions: Mapping[int, str],
    answers: Mapping[int, tuple[str, float]],
    geometry: Geometry,
    *,
    finding: str,
    model_name: str,
    colormap: str | Colormap = "hot",
    failures: Mapping[int, str] | None = None,
    variants: Sequence[int] = (0, 1, 2, 3, 4, 5),
    alpha: float = 0.5,
    random_weights: bool = False,
) -> Figure:
    """The six paraphrases' overlays for one (model, image, finding), 2 x 3, one colour scale.

    Each panel is titled with its (shortened, wrapped) question, the answer and P(yes).
    A variant in `failures` is an empty panel reading "failed: <reason>"; a variant with no
    map (absent or None) reads "missing". No map is ever made up for either.
    """
    cmap = check_colormap(colormap)
    _check_image(image, geometry)
    failures = dict(failures or {})
    variants = list(variants)
    unknown = sorted(set(maps) - set(variants))
    if unknown:
        raise ValueError(f"maps for variants {unknown} not in the grid's variants {variants}")
    both = sorted(k for k in failures if maps.get(k) is not None)
    if both:
        raise ValueError(f"variants {both} have both a map and a failure recorded")

    shares: dict[int, np.ndarray] = {}
    problems: dict[int, str] = {}
    for k in variants:
        if k in failures:
            problems[k] = f"failed: {failures[k]}"
        elif maps.get(k) is None:
            problems[k] = "missing"
        else:
            try:
                shares[k] = image_shares(maps[k], geometry)
            except ValueError as err:
                problems[k] = f"invalid map: {err}"
    vmax = max((float(s.max()) for s in shares.values()), default=1.0)

    ncols = 3
    nrows = max(1, math.ceil(len(variants) / ncols))
    panel_w, panel_h = _panel_size(geometry, 3.4, 3.6)
    fig = new_figure((ncols * panel_w + 1.3, nrows * (panel_h + 0.75) + 0.6), compress=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    mappable = None
    for ax, k in zip(axes, variants, strict=False):
        label = f"v{k} (original)" if k == 0 else f"v{k}"
        title = _question_title(label, questions.get(k), answers.get(k))
        if k in shares:
            mappable = overlay(
                ax, image, shares[k], geometry, colormap=cmap, alpha=alpha, vmin=0.0, vmax=vmax,
            )
        else:
            _empty_panel(ax, geometry, problems[k])
        ax.set_title(title, fontsize=_TITLE_SIZE, loc="left")
    for ax in axes[len(variants):]:
        ax.set_visible(False)
    if mappable is not None:
        fig.colorbar(
            _opaque(mappable), ax=list(axes[: len(variants)]), shrink=0.6, pad=0.02,
            label=f"{COLORBAR_LABEL}\n(per token; image tokens sum to 1)",
        )
    fig.suptitle(f"{finding} \u2014 {model_name}", fontsize=12, fontweight="bold")
    if random_weights:
        random_weights_banner(fig)
    return fig


def side_by_side(
    image: Image.Image,
    maps_by_model: Mapping[str, np.ndarray | None],
    geometries: Mapping[str, Geometry],
    *,
    question: str,
    answers_by_model: Mapping[str, tuple[str, float]] | None = None,
    colormap: str | Colormap = "hot",
    failures_by_model: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    random_weights: bool = False,
) -> Figure:
    """The models' overlays for the same image and question, side by side.

    Each panel has its own colour bar: a token's share depends on how many tokens the grid
    has (37 x 37 vs 16 x 16), so the scales are not comparable and are not shared.
    """
    cmap = check_colormap(colormap)
    answers_by_model = dict(answers_by_model or {})
    failures_by_model = dict(failures_by_model or {})
    models = list(maps_by_model) + [m for m in failures_by_model if m not in maps_by_model]
    if not models:
        raise ValueError("no models to show")
    missing_geo = [m for m in models if m not in geometries]
    if missing_geo:
        raise ValueError(f"no geometry for models {missing_geo}")
    both = [m for m in failures_by_model if maps_by_model.get(m) is not None]
    if both:
        raise ValueError(f"models {both} have both a map and a failure recorded")
    for m in models:
        _check_image(image, geometries[m])

    panel_w, panel_h = _panel_size(geometries[models[0]], 4.2, 4.6)
    fig = new_figure((len(models) * (panel_w + 1.1), panel_h + 1.3), compress=True)
    axes = fig.subplots(1, len(models), squeeze=False).ravel()
    for ax, m in zip(axes, models, strict=True):
        geo = geometries[m]
        rows, cols = geo.grid
        head = f"{m}  ({rows}\u00d7{cols} tokens)"
        ans = answers_by_model.get(m)
        sub = f"answer: {ans[0]}  \u00b7  {_fmt_p(ans[1])}" if ans is not None else "answer: n/a"
        title = f"{head}\n{sub}"
        if m in failures_by_model:
            _empty_panel(ax, geo, f"failed: {failures_by_model[m]}")
        elif maps_by_model.get(m) is None:
            _empty_panel(ax, geo, "missing")
        else:
            try:
                overlay(ax, image, maps_by_model[m], geo, colormap=cmap, alpha=alpha, colorbar=True)
            except ValueError as err:
                _empty_panel(ax, geo, f"invalid map: {err}")
        ax.set_title(title, fontsize=9)
    q = textwrap.shorten(" ".join(question.split()), width=160, placeholder="\u2026")
    fig.suptitle("\n".join(textwrap.wrap(q, 70)), fontsize=11)
    if random_weights:
        random_weights_banner(fig)
    return fig


# ----------------------------------------------------------------------------- forest plot


def forest_plot(
    table: pd.DataFrame,
    *,
    metric_col: str = "metric",
    est: str = "estimate",
    lo: str = "ci_low",
    hi: str = "ci_high",
    group_col: str | None = "model",
    title: str | None = None,
    ref_line: float | None = None,
    xlabel: str | None = None,
    annotate: bool = True,
    random_weights: bool = False,
) -> Figure:
    """Horizontal forest plot: one row per `metric_col` value (metric or finding), one marker
    per group (model) within the row, CI whiskers from `lo` to `hi`.

    ref_line draws a vertical dashed reference line (e.g. 0 for paired differences).
    A NaN estimate is written "n/a" in its row (no point); a finite estimate with a NaN
    bound is drawn without a whisker and marked "no CI". With `annotate`, the numbers
    "est [lo, hi]" are listed to the right of the axes.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    needed = [metric_col, est, lo, hi] + ([group_col] if group_col is not None else [])
    absent = [c for c in needed if c not in table.columns]
    if absent:
        raise ValueError(f"table lacks columns {absent}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("table is empty")
    df = table.copy()
    for c in (est, lo, hi):
        df[c] = pd.to_numeric(df[c], errors="raise").astype(float)
    bad = df[(df[lo] > df[hi])]
    if not bad.empty:
        raise ValueError(f"{len(bad)} rows have {lo} > {hi}")
    if group_col is None:
        df["__group"] = ""
        group_col = "__group"
    dup = df.duplicated([metric_col, group_col])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} duplicate ({metric_col}, {group_col}) rows")

    metrics = list(dict.fromkeys(df[metric_col].tolist()))
    groups = list(dict.fromkeys(df[group_col].tolist()))
    n_groups = len(groups)
    step = min(0.28, 0.75 / max(n_groups, 1))
    colors = matplotlib.colormaps["tab10"].colors
    markers = ("o", "s", "D", "^", "v", "P")

    height = 1.3 + len(metrics) * (0.3 + 0.17 * n_groups)
    fig = new_figure((8.0 if annotate else 6.5, height))
    ax = fig.add_subplot()
    ax_text = blended_transform_factory(ax.transAxes, ax.transData)
    for i in range(len(metrics)):
        if i % 2 == 1:
            ax.axhspan(i - 0.5, i + 0.5, color=(0.95, 0.95, 0.95), zorder=0, linewidth=0)
    if ref_line is not None:
        ax.axvline(ref_line, color="0.35", linestyle="--", linewidth=1, zorder=1)

    xs: list[float] = [] if ref_line is None else [float(ref_line)]
    dec = _decimals(df[[est, lo, hi]].to_numpy(dtype=float))
    for j, g in enumerate(groups):
        color, marker = colors[j % len(colors)], markers[j % len(markers)]
        offset = (j - (n_groups - 1) / 2) * step
        for _, row in df[df[group_col] == g].iterrows():
            y = metrics.index(row[metric_col]) + offset
            e, lo_v, hi_v = row[est], row[lo], row[hi]
            has_ci = np.isfinite(lo_v) and np.isfinite(hi_v)
            if np.isfinite(e):
                if has_ci:
                    ax.hlines(y, lo_v, hi_v, color=color, linewidth=1.8, zorder=2)
                    xs += [lo_v, hi_v]
                ax.plot([e], [y], marker=marker, color=color, markersize=6, linestyle="none", zorder=3)
                xs.append(e)
                if not has_ci:
                    ax.annotate(
                        "no CI", (e, y), xytext=(6, 0), textcoords="offset points", va="center",
                        fontsize=7, color=color,
                    )
            else:
                ax.text(
                    0.5, y, "n/a", transform=ax_text, ha="center", va="center", fontsize=8,
                    color=color, fontstyle="italic", zorder=3,
                )
            if annotate:
                txt = "n/a" if not np.isfinite(e) else (
                    f"{e:.{dec}f} [{lo_v:.{dec}f}, {hi_v:.{dec}f}]" if has_ci else f"{e:.{dec}f} [no CI]"
                )
                ax.text(1.02, y, txt, transform=ax_text, ha="left", va="center", fontsize=7.5, color=color)

    ax.set_yticks(range(len(metrics)), ["\n".join(textwrap.wrap(str(m), 28)) for m in metrics], fontsize=9)
    ax.set_ylim(len(metrics) - 0.5, -0.5)
    if xs:
        x_lo, x_hi = min(xs), max(xs)
        pad = 0.06 * (x_hi - x_lo) if x_hi > x_lo else max(abs(x_lo) * 0.1, 0.1)
        ax.set_xlim(x_lo - pad, x_hi + pad)
    ax.set_xlabel(xlabel if xlabel is not None else est)
    ax.grid(axis="x", color="0.88", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    if n_groups > 1 or groups != [""]:
        handles = [
            Line2D([], [], color=colors[j % len(colors)], marker=markers[j % len(markers)], label=str(g))
            for j, g in enumerate(groups)
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(n_groups, 4), frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    if random_weights:
        random_weights_banner(fig)
    return fig


# ----------------------------------------------------------------------------- banner, save


def _decimals(values: np.ndarray) -> int:
    """Decimals that show about two significant digits of the largest finite value."""
    finite = np.abs(values[np.isfinite(values)])
    finite = finite[finite > 0]
    if finite.size == 0:
        return 2
    return int(np.clip(1 - math.floor(math.log10(finite.max())), 0, 4))


def _text_width_pt(text: str, prop: FontProperties) -> float:
    return max(TextToPath().get_text_width_height_descent(line, prop, ismath=False)[0]
               for line in text.split("\n"))


def random_weights_banner(fig: Figure) -> Text:
    """Put a red "RANDOM WEIGHTS" banner across the top of `fig` (idempotent).

    Room is made for it: the layout area (constrained, tight or subplots_adjust) is lowered
    by the banner's height and an automatically placed suptitle is moved under the banner.
    """
    for t in fig.texts:
        if t.get_gid() == BANNER_GID:
            return t
    fig_w_in, fig_h_in = fig.get_size_inches()
    avail_pt = fig_w_in * 72.0 - 12.0
    text, size = RANDOM_WEIGHTS_TEXT, 12.0
    width = _text_width_pt(text, FontProperties(weight="bold", size=size))
    if width > avail_pt:
        size = max(7.0, size * avail_pt / width)
        if _text_width_pt(text, FontProperties(weight="bold", size=size)) > avail_pt:
            text = RANDOM_WEIGHTS_TEXT.replace(" \u2014 ", " \u2014\n", 1)
    n_lines = text.count("\n") + 1
    box_pad = 0.35 * size  # points, matplotlib's bbox pad is in units of the font size
    gap = 3.0
    banner_pt = n_lines * size * 1.2 + 2 * box_pad + 2 * gap
    banner = fig.text(
        0.5, 1.0 - (gap + box_pad) / 72.0 / fig_h_in, text, ha="center", va="top",
        fontsize=size, fontweight="bold", color="white", multialignment="center",
        bbox={"boxstyle": "square,pad=0.35", "facecolor": "#c00000", "edgecolor": "none"},
        gid=BANNER_GID, zorder=100,
    )
    banner.set_in_layout(False)

    band_pt = banner_pt
    sup = getattr(fig, "_suptitle", None)  # matplotlib keeps the suptitle Text here
    if sup is not None and sup.get_text() and getattr(sup, "_autopos", False):
        sup_size = sup.get_fontsize()
        sup_lines = sup.get_text().count("\n") + 1
        # re-issue with an explicit y: the suptitle now sits under the banner, in the band
        fig.suptitle(
            sup.get_text(), y=1.0 - banner_pt / 72.0 / fig_h_in, va="top", fontsize=sup_size,
            fontweight=sup.get_fontweight(),
        )
        band_pt += sup_lines * sup_size * 1.25 + gap
    band = band_pt / 72.0 / fig_h_in
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        left, bottom, width_r, height_r = engine.get()["rect"]
        top = min(bottom + height_r, 1.0 - band)
        engine.set(rect=(left, bottom, width_r, max(top - bottom, 0.05)))
    elif isinstance(engine, TightLayoutEngine):
        left, bottom, right, top = engine.get()["rect"] or (0, 0, 1, 1)
        engine.set(rect=(left, bottom, right, min(top, 1.0 - band)))
    else:
        fig.subplots_adjust(top=min(fig.subplotpars.top, 1.0 - band))
    fig.stale = True
    return banner


def save(fig: Figure, path: str | Path, *, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` as a PNG at `dpi` (creating parent folders) and close it. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save writes PNG; give a path ending in .png, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", facecolor="white")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return path

