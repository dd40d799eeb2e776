"""Figures: attention overlays, the six-paraphrase grid, the two-model comparison, forest plots.

Pure functions: they take data (images, per-token maps, geometries, tables) and return a
matplotlib Figure; :func:`save` writes it as a palette PNG. Figures are built on the Agg
canvas directly (no pyplot state, no display needed), so they work headless and in notebooks.
The grid and the side-by-side figure are laid out by hand (measured in points, no layout
engine): they are drawn once, which is most of their cost.

Honesty rules followed here:
- A map is drawn only where the model saw the image: cells are painted back onto the original
  image through its :class:`~medvlm.core.geometry.Geometry` (nearest cell, no smoothing); what the
  model never saw (LLaVA-Rad's center crop drops the ends of a non-square image) stays unpainted
  and is shaded and labelled "not seen by model".
- Maps are shown as each token's share of the attention paid to the image (normalised over the
  image tokens), or relative to a uniform map where two grids share one scale; the colour bars
  say which.
- A missing or failed map is an empty panel that says why, never a made-up map.
- Every figure says what it shows: study, finding, ground truth, each answer and whether it
  was right, P(yes), and (given a provenance line) which layers, heads and query tokens the
  map combines.
- Figures from random-weight models carry a red "RANDOM WEIGHTS" banner.
"""

from __future__ import annotations

import difflib
import math
import textwrap
import weakref
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.patheffects as path_effects
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from medvlm.core.geometry import Geometry
from medvlm.report.figure_canvas import (
    BANNER_GID,
    DEFAULT_DPI,
    PNG_COLORS,
    RANDOM_WEIGHTS_TEXT,
    banner_height_pt,
    new_figure,
    random_weights_banner,
    render_rgb,
    save,
)
from medvlm.report.forest import ci_footnote, forest_plot

__all__ = [
    "BANNER_GID",
    "COLORBAR_LABEL",
    "DEFAULT_DPI",
    "NOT_SEEN_LABEL",
    "PNG_COLORS",
    "RANDOM_WEIGHTS_TEXT",
    "RELATIVE_LABEL",
    "check_colormap",
    "ci_footnote",
    "forest_plot",
    "image_shares",
    "new_figure",
    "overlay",
    "paraphrase_grid",
    "random_weights_banner",
    "render_rgb",
    "save",
    "side_by_side",
]

COLORBAR_LABEL = "share of image attention"
RELATIVE_LABEL = "attention relative to uniform (1 = uniform)"
NOT_SEEN_LABEL = "not seen by model"
UNSEEN_GID = "medvlm-not-seen"
SHARED_SCALE_TEXT = ("Colour: one scale shared by the panels: each token's attention relative to a uniform map "
                     "(share x number of tokens; 1 = uniform), comparable between grids of different sizes.")
SEPARATE_SCALE_TEXT = ("Colour: each panel has its own scale (share of the image attention per token); shares are "
                       "not comparable between grids with different numbers of tokens.")

_SUGGESTED_COLORMAPS = ("hot", "inferno", "magma", "viridis", "plasma", "jet", "turbo", "gray")
_UNSEEN_FACE = (0.55, 0.55, 0.55, 0.6)
_UNSEEN_HATCH = (1.0, 1.0, 1.0, 0.55)
_MAX_DISPLAY_SIDE = 640  # images and painted maps are drawn at most this many pixels on the long side
_MIN_DISPLAY_SIDE = 128
_TITLE_SIZE = 8.5
_FOOT_SIZE = 7.5
_LINE = 1.25  # line height in font sizes


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


def _check_image(image: Image.Image, geometry: Geometry) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if tuple(image.size) != tuple(geometry.image_size):
        raise ValueError(
            f"image is {image.size[0]} x {image.size[1]} but the geometry was built for "
            f"{geometry.image_size[0]} x {geometry.image_size[1]}"
        )


def _display_size(width: int, height: int, max_side: int = _MAX_DISPLAY_SIDE) -> tuple[int, int]:
    """Pixel size to draw an image of width x height at: itself, or at most max_side on the
    long side (a panel is a few hundred pixels wide; more only slows rendering)."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    scale = max_side / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _axes_max_side(ax: Axes, width: int, height: int) -> int:
    """The long side, in pixels, an image of width x height takes on `ax` when the figure is
    saved at DEFAULT_DPI (or the figure's own dpi, if higher), within
    [_MIN_DISPLAY_SIDE, _MAX_DISPLAY_SIDE]: drawing more pixels than that only costs time."""
    fig = ax.figure
    pos = ax.get_position()
    dpi = max(float(fig.dpi), float(DEFAULT_DPI))
    w_px, h_px = pos.width * fig.get_figwidth() * dpi, pos.height * fig.get_figheight() * dpi
    scale = min(w_px / width, h_px / height)
    need = math.ceil(scale * max(width, height)) + 2
    return int(min(_MAX_DISPLAY_SIDE, max(_MIN_DISPLAY_SIDE, need)))


_DISPLAY_CACHE: list[tuple[weakref.ref, tuple, np.ndarray]] = []  # a few recent (image, size) -> RGB


def _display_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The image as drawn: float32 RGB [height, width, 3] in [0, 1] at `size` (Lanczos-reduced
    when larger); greyscale through the grey scale (8-bit over 0..255, deeper images stretched
    min..max). The last few are kept: a study's figures draw the same radiograph a dozen times."""
    key = (size, image.mode)
    for ref, k, value in _DISPLAY_CACHE:
        if ref() is image and k == key:
            return value
    mode = image.mode
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = image.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        value = np.asarray(rgb, dtype=np.float32) / 255.0
    else:
        grey = image.convert("L") if mode in ("1", "L", "LA") else (image.convert("F") if mode != "F" else image)
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.LANCZOS)
        arr = np.asarray(grey, dtype=np.float64)
        if mode in ("1", "L", "LA"):
            vmin, vmax = 0.0, 255.0
        else:  # I, I;16*, F: high bit depth greyscale, stretched min..max for display
            finite = arr[np.isfinite(arr)]
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if vmax <= vmin:
                vmax = vmin + 1.0
        grey01 = np.clip((np.nan_to_num(arr, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0).astype(np.float32)
        value = np.repeat(grey01[..., None], 3, axis=2)
    _DISPLAY_CACHE.insert(0, (weakref.ref(image), key, value))
    del _DISPLAY_CACHE[4:]
    return value


def _paint_geometry(geometry: Geometry, max_side: int = _MAX_DISPLAY_SIDE) -> Geometry:
    """The geometry to paint with: the same one, or for a large image the same crop box on a
    proportionally smaller pixel grid over the same extent (see _display_size)."""
    width, height = geometry.image_size
    new_w, new_h = _display_size(width, height, max_side)
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


def _answer_line(answer: tuple[str, float] | None, ground_truth: str | None) -> str:
    """"answer: no (wrong) · P(yes) = 0.24"; without a ground truth, no verdict."""
    if answer is None:
        return "answer: n/a"
    ans, p_yes = answer
    verdict = ""
    if ground_truth is not None:
        verdict = " (correct)" if str(ans) == str(ground_truth) else " (wrong)"
    return f"answer: {ans}{verdict}  \u00b7  {_fmt_p(p_yes)}"


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


def wrap_to_width(text: str, fig_w_in: float, size: float) -> list[str]:
    """`text` wrapped to the figure's width at font `size` (about 0.55 em per character)."""
    width = max(20, int((fig_w_in * 72.0 - 16.0) / (0.55 * size)))
    return [line for para in str(text).split("\n") for line in (textwrap.wrap(para, width) or [""])]


class _Page:
    """A figure laid out by hand, top to bottom, in inches: a heading band, rows of panels,
    a footer. Positions are computed before anything is drawn, so the figure needs no layout
    engine and is drawn once."""

    def __init__(self, width: float, random_weights: bool):
        self.width = width
        self.top_pt = banner_height_pt(width) if random_weights else 4.0
        self.blocks: list[tuple[str, float, object]] = []  # (kind, height in inches, payload)

    def text_height(self, n_lines: int, size: float) -> float:
        return n_lines * size * _LINE / 72.0

    def figure(self, rows: list[dict], head: list[tuple[str, float, str]], foot: list[str]) -> tuple[Figure, list]:
        """rows: {"height": panel height, "title_lines": n, "panels": [(x, width), ...]};
        head: (text, size, weight) lines; foot: lines at _FOOT_SIZE. Returns the figure and
        per row the list of panel axes."""
        head_h = self.top_pt / 72.0 + sum(self.text_height(t.count("\n") + 1, s) for t, s, _ in head) + 0.06
        title_h = [self.text_height(r["title_lines"], _TITLE_SIZE) + 6 / 72.0 for r in rows]
        below = 14 / 72.0  # the "hatched: not seen by model" x label
        foot_h = self.text_height(len(foot), _FOOT_SIZE) + 0.1 if foot else 0.05
        height = head_h + sum(t + r["height"] + below for t, r in zip(title_h, rows, strict=True)) + foot_h
        fig = new_figure((self.width, height), layout=False)
        y = self.top_pt / 72.0
        for i, (text, size, weight) in enumerate(head):  # the first is the suptitle, at a fixed place
            kw = {"ha": "center", "va": "top", "fontsize": size, "fontweight": weight, "multialignment": "center"}
            if i == 0:
                fig.suptitle(text, y=1 - y / height, **kw)
            else:
                fig.text(0.5, 1 - y / height, text, **kw)
            y += self.text_height(text.count("\n") + 1, size)
        y = head_h
        axes = []
        for t, r in zip(title_h, rows, strict=True):
            y += t
            bottom = height - y - r["height"]
            axes.append([fig.add_axes((x / self.width, bottom / height, w / self.width, r["height"] / height))
                         for x, w in r["panels"]])  # fmt: skip
            y += r["height"] + below
        if foot:
            fig.text(0.1 / self.width, 0.05 / height, "\n".join(foot), ha="left", va="bottom", fontsize=_FOOT_SIZE,
                     color="0.2", linespacing=1.1)  # fmt: skip
        return fig, axes


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
    relative: bool = False,
) -> AxesImage:
    """Draw `image` at its native aspect on `ax` (extent in original pixels) and paint
    `token_map` over it through `geometry` (nearest cell, NaN where the model never saw).

    The map is shown as each token's share of the image attention (sums to 1 over the image
    tokens), or with relative=True as share x number of tokens (1 = a uniform map's value),
    which is comparable between grids of different sizes. vmin/vmax fix the colour scale
    (default 0 .. this map's maximum), so several panels can share one. Regions outside
    geometry.crop_box are hatched grey and labelled "not seen by model". The map is blended
    over the image and drawn with it as one image; returns the map's own AxesImage, hidden,
    which carries its colour scale (for a colour bar).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cmap = check_colormap(colormap).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    _check_image(image, geometry)
    shares = image_shares(token_map, geometry)
    if relative:
        shares = shares * geometry.n_tokens
    width, height = geometry.image_size
    extent = (0.0, float(width), float(height), 0.0)
    max_side = _axes_max_side(ax, width, height)
    size = _display_size(width, height, max_side)
    base = _display_rgb(image, size)
    painted = np.ma.masked_invalid(_paint_geometry(geometry, max_side).to_image(shares))
    lo = 0.0 if vmin is None else float(vmin)
    hi = float(shares.max()) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1e-12
    # the map blended over the image here ("over" compositing, as Agg would), drawn as one image;
    # the map's own AxesImage is kept (hidden) for its colour scale and colour bars
    rgba = cmap(Normalize(lo, hi)(painted)).astype(np.float32)
    a = rgba[..., 3:] * np.float32(alpha)
    blended = base * (1.0 - a) + rgba[..., :3] * a
    # a reduced copy is smoothed on its way to the screen; an image drawn at its own size keeps
    # its pixels and the map's cells sharp (matplotlib's "antialiased" would blur both)
    smooth = size != (width, height)
    ax.imshow((blended * 255.0 + 0.5).astype(np.uint8), extent=extent, zorder=1,
              interpolation="antialiased" if smooth else "nearest")  # fmt: skip
    mappable = ax.imshow(painted, extent=extent, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                         interpolation="nearest", zorder=2)  # fmt: skip
    mappable.set_visible(False)
    _shade_unseen(ax, geometry)
    _finish_image_axes(ax, geometry)
    if title:
        ax.set_title(title, fontsize=_TITLE_SIZE)
    if colorbar:
        # an inset axes hugs the image's drawn height (the axes box is shrunk to its aspect)
        cax = ax.inset_axes((1.03, 0.0, 0.045, 1.0))
        ax.figure.colorbar(_opaque(mappable), cax=cax, label=RELATIVE_LABEL if relative else COLORBAR_LABEL)
    if random_weights:
        random_weights_banner(ax.figure)
    return mappable


# ----------------------------------------------------------------------------- grids


def _question_title(prefix: str, question: str | None, answer: tuple[str, float] | None,
                    ground_truth: str | None = None, heading_truth: str | None = None) -> str:
    q = " ".join((question or "(question text missing)").split())
    q = textwrap.shorten(q, width=110, placeholder="\u2026")
    lines = textwrap.wrap(f"{prefix}: {q}", width=40)
    lines.append(_answer_line(answer, ground_truth))
    if ground_truth is not None and heading_truth is not None and ground_truth != heading_truth:
        lines.append(f"(negated wording: its truth is {ground_truth})")
    return "\n".join(lines)


def _heading_line(study_id: str | None, finding: str | None, ground_truth: str | None) -> str:
    parts = []
    if study_id is not None:
        parts.append(f"study {study_id}")
    if finding is not None:
        parts.append(f"finding {finding}")
    if ground_truth is not None:
        parts.append(f"ground truth: {ground_truth}")
    return "  \u00b7  ".join(parts)


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
    study_id: str | None = None,
    ground_truth: str | None = None,
    truths: Mapping[int, str] | None = None,
    provenance: str | None = None,
) -> Figure:
    """The six paraphrases' overlays for one (model, image, finding), 2 x 3, one colour scale.

    Each panel is titled with its (shortened, wrapped) question, the answer (with "correct" /
    "wrong" when a ground truth is given) and P(yes). The heading names the finding and model,
    then the study and ground truth (variant 0's); `truths` gives a variant its own ground
    truth where it differs (a negated wording), and its panel says so. `provenance` (which
    layers, heads and query tokens the maps combine) is printed under the panels. A variant
    in `failures` is an empty panel reading "failed: <reason>"; a variant with no map (absent
    or None) reads "missing". No map is ever made up for either.
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
    left, gap, cbar_gap, cbar_w, cbar_room = 0.12, 0.2, 0.2, 0.16, 1.05
    width = left + ncols * panel_w + (ncols - 1) * gap + cbar_gap + cbar_w + cbar_room
    titles = {}
    for k in variants:
        label = f"v{k} (original)" if k == 0 else f"v{k}"
        truth = (truths or {}).get(k, ground_truth)
        titles[k] = _question_title(label, questions.get(k), answers.get(k), truth, ground_truth)
    page = _Page(width, random_weights)
    rows = []
    for r in range(nrows):
        ks = variants[r * ncols: (r + 1) * ncols]
        rows.append({"height": panel_h, "title_lines": max(titles[k].count("\n") + 1 for k in ks),
                     "panels": [(left + c * (panel_w + gap), panel_w) for c in range(len(ks))]})  # fmt: skip
    head = [(f"{finding} \u2014 {model_name}", 12.0, "bold")]
    sub = _heading_line(study_id, None, ground_truth)
    if sub:
        head.append((sub, 10.0, "normal"))
    foot = wrap_to_width(provenance, width, _FOOT_SIZE) if provenance else []
    fig, row_axes = page.figure(rows, head, foot)
    axes = [ax for r in row_axes for ax in r]
    mappable = None
    for ax, k in zip(axes, variants, strict=True):
        if k in shares:
            mappable = overlay(ax, image, shares[k], geometry, colormap=cmap, alpha=alpha, vmin=0.0, vmax=vmax)
        else:
            _empty_panel(ax, geometry, problems[k])
        ax.set_title(titles[k], fontsize=_TITLE_SIZE, loc="left")
    if mappable is not None:
        top = axes[0].get_position().y1
        bottom = axes[-1].get_position().y0
        span = top - bottom
        x = (left + ncols * panel_w + (ncols - 1) * gap + cbar_gap) / width
        cax = fig.add_axes((x, bottom + 0.2 * span, cbar_w / width, 0.6 * span))
        fig.colorbar(_opaque(mappable), cax=cax, label=f"{COLORBAR_LABEL}\n(per token; image tokens sum to 1)")
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
    shared_scale: bool = True,
    study_id: str | None = None,
    finding: str | None = None,
    ground_truth: str | None = None,
    provenance: str | Mapping[str, str] | None = None,
) -> Figure:
    """The models' overlays for the same image and question, side by side.

    shared_scale=True (the default): one colour bar for all panels, on each token's attention
    relative to a uniform map (share x number of tokens), which is comparable between a
    37 x 37 and a 16 x 16 grid. shared_scale=False: each panel its own colour bar of shares,
    which are not comparable between grids. The figure states which it uses under the panels,
    with `provenance` (one line, or one per model).
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

    values: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    for m in models:
        if m in failures_by_model:
            problems[m] = f"failed: {failures_by_model[m]}"
        elif maps_by_model.get(m) is None:
            problems[m] = "missing"
        else:
            try:
                values[m] = image_shares(maps_by_model[m], geometries[m]) * geometries[m].n_tokens
            except ValueError as err:
                problems[m] = f"invalid map: {err}"
    vmax = max((float(v.max()) for v in values.values()), default=1.0)

    panel_w, panel_h = _panel_size(geometries[models[0]], 4.2, 4.6)
    left = 0.12
    if shared_scale:
        gap, tail = 0.3, 0.2 + 0.16 + 1.05
        xs = [left + i * (panel_w + gap) for i in range(len(models))]
        width = xs[-1] + panel_w + tail
    else:
        step = panel_w + 1.35  # each panel's own colour bar and its label
        xs = [left + i * step for i in range(len(models))]
        width = xs[-1] + step
    page = _Page(width, random_weights)
    q = textwrap.shorten(" ".join(question.split()), width=160, placeholder="\u2026")
    head = [("\n".join(textwrap.wrap(q, 70)), 11.0, "normal")]
    sub = _heading_line(study_id, finding, ground_truth)
    if sub:
        head.append((sub, 9.5, "normal"))
    if isinstance(provenance, Mapping):
        foot_text = [f"{m}: {provenance[m]}" for m in models if m in provenance]
    else:
        foot_text = [provenance] if provenance else []
    foot_text.append(SHARED_SCALE_TEXT if shared_scale else SEPARATE_SCALE_TEXT)
    foot = [line for t in foot_text for line in wrap_to_width(t, width, _FOOT_SIZE)]
    rows = [{"height": panel_h, "title_lines": 2, "panels": [(x, panel_w) for x in xs]}]
    fig, (axes,) = page.figure(rows, head, foot)
    mappable = None
    for ax, m in zip(axes, models, strict=True):
        geo = geometries[m]
        rows_, cols = geo.grid
        title = f"{m}  ({rows_}\u00d7{cols} tokens)\n{_answer_line(answers_by_model.get(m), ground_truth)}"
        if m in problems:
            _empty_panel(ax, geo, problems[m])
        elif shared_scale:
            mappable = overlay(ax, image, values[m], geo, colormap=cmap, alpha=alpha, relative=True,
                               vmin=0.0, vmax=vmax)  # fmt: skip
        else:
            overlay(ax, image, values[m], geo, colormap=cmap, alpha=alpha, colorbar=True)
        ax.set_title(title, fontsize=9)
    if mappable is not None:
        pos = axes[0].get_position()
        x = (xs[-1] + panel_w + 0.2) / width
        cax = fig.add_axes((x, pos.y0 + 0.1 * pos.height, 0.16 / width, 0.8 * pos.height))
        fig.colorbar(_opaque(mappable), cax=cax, label=RELATIVE_LABEL.replace(" (", "\n("))
    if random_weights:
        random_weights_banner(fig)
    return fig
