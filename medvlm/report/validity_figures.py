"""Figures of the validity outputs: the image-reliance scatter, the grounding forest plot with
both baselines, and maps of several kinds (raw, relative, ...) beside each other with the
expert region outlined. Every figure takes the map kind(s) as a parameter; a random-weight
run's figures carry the banner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from medvlm.core.geometry import Geometry
from medvlm.report.figure_canvas import new_figure, random_weights_banner
from medvlm.report.figures import overlay, wrap_to_width
from medvlm.report.forest import forest_plot

GROUNDING_SHOWN = ("pointing_hit", "energy", "otsu_iou")
KIND_NAMES = {"attention": "raw attention", "relative": "relative attention", "generic": "generic prompt",
              "gradxinput": "gradient x input", "relevancy": "relevancy"}  # fmt: skip


def reliance_scatter(records: pd.DataFrame, control: str = "text_only", *, random_weights: bool = False) -> Figure:
    """One panel per model: P(yes | image) against P(yes | control) for every ok row (colour:
    the ground truth), the diagonal where the image changes nothing, and mean |delta|."""
    col = f"p_yes_{control}"
    ok = records[(records["status"] == "ok") & records.get(col, pd.Series(dtype=float)).notna()]
    models = sorted(ok["model"].unique())
    if not models:
        raise ValueError(f"no ok rows with {col}")
    fig = new_figure((3.4 * len(models), 3.9))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        rows = ok[ok["model"] == model]
        for gt, colour in (("yes", "#c0392b"), ("no", "#2471a3")):
            r = rows[rows["answer_gt"] == gt]
            ax.scatter(r[col], r["p_yes"], s=12, alpha=0.6, color=colour, label=f"truth {gt}", linewidths=0)
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=0.8)
        delta = float(np.mean(np.abs(rows["p_yes"] - rows[col])))
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"P(yes | {control.replace('_', ' ')})", ylabel="P(yes | image)",
               title=f"{model}\nmean |delta| {delta:.3f}, {len(rows)} rows")  # fmt: skip
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Does the answer use the image? ({control.replace('_', ' ')} control; on the diagonal the "
                 "image changed nothing)", fontsize=9)  # fmt: skip
    if random_weights:
        random_weights_banner(fig)
    return fig


def grounding_forest(table: pd.DataFrame, *, random_weights: bool = False, cluster_unit: str = "clusters") -> Figure:
    """Pooled grounding (all findings, all paraphrases) per model and map kind beside the
    uniform map and the centred Gaussian prior, each with its interval."""
    t = table[(table["variant_id"].astype(str) == "all") & (table["finding"] == "ALL")
              & ~table["model"].str.contains(" - ")]  # fmt: skip
    rows = []
    for r in t.itertuples():
        for metric in GROUNDING_SHOWN:
            if r.metric == metric:
                rows.append({**r._asdict(), "group": f"{r.model}: {KIND_NAMES.get(r.map_kind, r.map_kind)}"})
            for base, name in (("uniform_", "uniform map"), ("prior_", "Gaussian prior")):
                if r.metric == base + metric and r.map_kind == t["map_kind"].iloc[0]:
                    rows.append({**r._asdict(), "metric": metric, "group": f"{r.model}: {name}"})
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no pooled grounding rows to draw")
    return forest_plot(df, group_col="group", title="Is the attention on the finding? (expert regions; higher is "
                       "better)", random_weights=random_weights, cluster_unit=cluster_unit)  # fmt: skip


def maps_with_region(
    image: Image.Image,
    maps: Mapping[str, np.ndarray],
    geometry: Geometry,
    mask: np.ndarray | None,
    *,
    title: str,
    colormap: str = "hot",
    region_label: str = "expert region",
    random_weights: bool = False,
) -> Figure:
    """One panel per map kind (raw, relative, ...) over the image, the region's outline on
    each (mask: bool [H, W] at the image's size, or None), each map on its own scale."""
    kinds: Sequence[str] = list(maps)
    fig = new_figure((3.3 * len(kinds), 3.9))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        overlay(ax, image, maps[kind], geometry, colormap=colormap, title=KIND_NAMES.get(kind, kind))
        if mask is not None and mask.any():
            step = max(1, max(mask.shape) // 512)
            small = mask[::step, ::step].astype(float)
            ys = (np.arange(small.shape[0]) + 0.5) * step
            xs = (np.arange(small.shape[1]) + 0.5) * step
            ax.contour(xs, ys, small, levels=[0.5], colors=["#00e5ff"], linewidths=1.2)
    outline = f"cyan outline: {region_label}; " if mask is not None and mask.any() else ""
    text = f"{title}\n{outline}each panel on its own colour scale (0 to its largest share)"
    fig.suptitle("\n".join(wrap_to_width(text, fig.get_figwidth(), 8)), fontsize=8)
    if random_weights:
        random_weights_banner(fig)
    return fig
