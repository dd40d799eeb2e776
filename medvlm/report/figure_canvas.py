"""What every figure stands on: a Figure on the Agg canvas (no pyplot), the red RANDOM WEIGHTS
banner, and :func:`save`, which writes a palette PNG.

Why a palette PNG: an attention overlay on a radiograph is photographic, and a full-colour
PNG of a six-panel grid at 150 dpi is 1-2 MB. Quantised to 256 colours after rendering (at the
same pixel size, so text keeps its resolution) it is a quarter of that, and encodes in a fifth
of the time; the colours differ from the full-colour render by about 2.5 of 255 levels on
average, 99% of them by at most 10, and the white page and dark text keep their values
(tests/test_figures.py measures these on a radiograph-like figure).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.layout_engine import ConstrainedLayoutEngine, TightLayoutEngine
from matplotlib.text import Text
from matplotlib.textpath import TextToPath
from PIL import Image

__all__ = [
    "BANNER_GID",
    "DEFAULT_DPI",
    "PNG_COLORS",
    "RANDOM_WEIGHTS_TEXT",
    "banner_height_pt",
    "new_figure",
    "random_weights_banner",
    "render_rgb",
    "save",
]

RANDOM_WEIGHTS_TEXT = "RANDOM WEIGHTS \u2014 illustrates the pipeline, not a model"
BANNER_GID = "medvlm-random-weights-banner"
DEFAULT_DPI = 150
PNG_COLORS = 256  # palette size of saved PNGs; 0 keeps full colour

_BANNER_SIZE = 12.0
_BANNER_GAP = 3.0  # points above and below the banner's box


def new_figure(figsize: tuple[float, float], *, compress: bool = False, layout: bool = True) -> Figure:
    """A Figure on the Agg canvas (no pyplot, no display) with constrained layout; use it to
    place :func:`~medvlm.report.figures.overlay` panels in your own figures. compress=True suits
    grids of images; layout=False leaves placement to the caller (axes placed by hand)."""
    engine = ConstrainedLayoutEngine(compress=compress) if layout else None
    fig = Figure(figsize=figsize, layout=engine)
    FigureCanvasAgg(fig)
    return fig


def _text_width_pt(text: str, prop: FontProperties) -> float:
    return max(TextToPath().get_text_width_height_descent(line, prop, ismath=False)[0]
               for line in text.split("\n"))


def _banner_spec(fig_w_in: float) -> tuple[str, float, float]:
    """(text, font size, height in points) of the banner on a figure fig_w_in wide."""
    avail_pt = fig_w_in * 72.0 - 12.0
    text, size = RANDOM_WEIGHTS_TEXT, _BANNER_SIZE
    width = _text_width_pt(text, FontProperties(weight="bold", size=size))
    if width > avail_pt:
        size = max(7.0, size * avail_pt / width)
        if _text_width_pt(text, FontProperties(weight="bold", size=size)) > avail_pt:
            text = RANDOM_WEIGHTS_TEXT.replace(" \u2014 ", " \u2014\n", 1)
    n_lines = text.count("\n") + 1
    box_pad = 0.35 * size  # points: matplotlib's bbox pad is in units of the font size
    return text, size, n_lines * size * 1.2 + 2 * box_pad + 2 * _BANNER_GAP


def banner_height_pt(fig_w_in: float) -> float:
    """The height (points) :func:`random_weights_banner` takes at the top of a figure
    fig_w_in inches wide: figures laid out by hand reserve it."""
    return _banner_spec(fig_w_in)[2]


def random_weights_banner(fig: Figure) -> Text:
    """Put a red "RANDOM WEIGHTS" banner across the top of `fig` (idempotent).

    Room is made for it: the layout area (constrained, tight or subplots_adjust) is lowered
    by the banner's height and an automatically placed suptitle is moved under the banner.
    Figures laid out by hand reserve banner_height_pt() themselves.
    """
    for t in fig.texts:
        if t.get_gid() == BANNER_GID:
            return t
    fig_w_in, fig_h_in = fig.get_size_inches()
    text, size, banner_pt = _banner_spec(fig_w_in)
    box_pad = 0.35 * size
    banner = fig.text(
        0.5, 1.0 - (_BANNER_GAP + box_pad) / 72.0 / fig_h_in, text, ha="center", va="top",
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
        band_pt += sup_lines * sup_size * 1.25 + _BANNER_GAP
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


def render_rgb(fig: Figure, *, dpi: int = DEFAULT_DPI) -> np.ndarray:
    """`fig` drawn once at `dpi` on a white background: uint8 [height, width, 3].

    A figure on the Agg canvas is drawn once (savefig draws a figure with a layout engine
    twice: once to lay it out, once to paint it); any other figure goes through savefig.
    """
    old_dpi, old_face = fig.dpi, fig.get_facecolor()
    fig.patch.set_facecolor("white")
    try:
        if type(fig.canvas) is FigureCanvasAgg:
            fig.set_dpi(dpi)
            fig.canvas.draw()
            rgba = np.asarray(fig.canvas.buffer_rgba())
            return np.array(rgba[..., :3])
        import io

        with io.BytesIO() as buf:
            fig.savefig(buf, format="raw", dpi=dpi, facecolor="white")
            width, height = (int(v) for v in fig.get_size_inches() * dpi)
            rgba = np.frombuffer(buf.getvalue(), np.uint8).reshape(height, width, 4)
        return np.array(rgba[..., :3])
    finally:
        fig.set_dpi(old_dpi)
        fig.patch.set_facecolor(old_face)


def _quantize(image: Image.Image, rgb: np.ndarray, colors: int) -> Image.Image:
    """`image` on a palette of `colors` (fast octree), with the white background kept exactly
    white (the octree gives each colour its bucket's mean, and would tint the page)."""
    q = image.quantize(colors, method=Image.Quantize.FASTOCTREE)
    white = (rgb == 255).all(axis=2)
    if white.any():
        idx = int(np.bincount(np.asarray(q)[white]).argmax())
        palette = q.getpalette()
        palette[3 * idx: 3 * idx + 3] = [255, 255, 255]
        q.putpalette(palette)
    return q


def save(fig: Figure, path: str | Path, *, dpi: int = DEFAULT_DPI, colors: int = PNG_COLORS) -> Path:
    """Write `fig` as a PNG at `dpi` (creating parent folders) and close it. Returns the path.

    colors: quantise to a palette of this many colours after rendering (fast octree; the
    pixel size and so the text's resolution are unchanged); 0 writes full colour RGB.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save writes PNG; give a path ending in .png, got {path.name!r}")
    if not 0 <= colors <= 256:
        raise ValueError(f"colors must be 0 (full colour) or 1..256, got {colors}")
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = render_rgb(fig, dpi=dpi)
    image = Image.fromarray(rgb)
    if colors:
        image = _quantize(image, rgb, colors)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", dpi=(dpi, dpi))
    tmp.replace(path)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return path
