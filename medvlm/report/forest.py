"""Forest plots of a summary table: one row per metric, one marker per model, CI whiskers,
the numbers beside them, and a footnote that says how the intervals were made.

Metrics whose better direction differs (accuracy up, flip rate down, entropy neither) go on
separate panels when `panels` says which is which, so no row invites the wrong reading.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from collections.abc import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from medvlm.report.figure_canvas import new_figure, random_weights_banner

__all__ = ["CI_METHOD_NAMES", "ci_footnote", "format_ci", "format_estimate", "forest_plot"]

DECIMALS = 3  # the decimals of every estimate and bound in figures and report.md
FEW_CLUSTERS = 25  # below this many clusters intervals are flagged as unreliable
MIN_CLUSTERS_FOR_CI = 5  # below this many no interval is shown

CI_METHOD_NAMES = {
    "bca": "BCa",
    "percentile": "percentile",
    "none": "no interval",
    "exact_one_sided_clusters": "exact one-sided bound, estimate at 0 or 1 (Clopper-Pearson, clusters as trials)",
}
_METHOD_MARKS = ("*", "\u2020", "\u2021", "\u00a7")


def format_estimate(x, decimals: int = DECIMALS) -> str:
    """A number as every table and figure prints it: fixed decimals, "n/a" when undefined."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.{decimals}f}" if np.isfinite(v) else "n/a"


def format_ci(lo, hi, decimals: int = DECIMALS) -> str | None:
    """"[lo, hi]", or None when either bound is undefined."""
    a, b = format_estimate(lo, decimals), format_estimate(hi, decimals)
    return None if "n/a" in (a, b) else f"[{a}, {b}]"


def method_name(method) -> str:
    if method is None or (isinstance(method, float) and not np.isfinite(method)):
        return "unknown"
    return CI_METHOD_NAMES.get(str(method), str(method).replace("_", " "))


def count_of(n: int, unit: str) -> str:
    """"1 study", "2 studies", "1 patient", "1 unit": a count with its plural noun."""
    singular = {"studies": "study", "patients": "patient", "units": "unit"}.get(unit, unit)
    return f"{n} {singular if n == 1 else unit}"


def _clusters_text(values: np.ndarray, unit: str) -> str:
    lo, hi = int(values.min()), int(values.max())
    return count_of(lo, unit) if lo == hi else f"{lo}\u2013{hi} {unit}"


def ci_footnote(table: pd.DataFrame, cluster_unit: str = "clusters") -> str:
    """One sentence on the intervals of `table`: level, method(s), clusters, and the
    few-cluster caveat (from the n_clusters column, so it holds whatever the row warnings say).
    Works with any subset of the columns level, ci_method, n_clusters."""
    parts = []
    if "level" in table.columns:
        levels = sorted({float(v) for v in table["level"].dropna()})
        parts.append("/".join(f"{100 * v:g}%" for v in levels) + " cluster-bootstrap intervals" if levels
                     else "cluster-bootstrap intervals")
    else:
        parts.append("cluster-bootstrap intervals")
    if "ci_method" in table.columns:
        counts = Counter(method_name(m) for m in table["ci_method"])
        if set(counts) == {method_name("none")}:
            parts[-1] = "no intervals"
        elif len(counts) == 1:
            parts[-1] += f", {next(iter(counts))}"
        else:
            parts[-1] += ", " + "; ".join(f"{name}: {n} row{'s' * (n != 1)}" for name, n in counts.most_common())
    if "n_clusters" in table.columns and table["n_clusters"].notna().any():
        n = table["n_clusters"].dropna().to_numpy(dtype=float)
        parts.append(f"clusters: {_clusters_text(n, cluster_unit)}")
        if n.min() < MIN_CLUSTERS_FOR_CI:
            parts.append(f"no interval with fewer than {MIN_CLUSTERS_FOR_CI} {cluster_unit}")
        if n.min() < FEW_CLUSTERS:
            parts.append(f"fewer than {FEW_CLUSTERS} {cluster_unit}: the intervals are unreliable")
    return "; ".join(parts) + "."


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
    decimals: int | None = DECIMALS,
    panels: Mapping[str, str] | None = None,
    ci_note: str | None = None,
    cluster_unit: str = "clusters",
) -> Figure:
    """Horizontal forest plot: one row per `metric_col` value (metric or finding), one marker
    per group (model) within the row, CI whiskers from `lo` to `hi`.

    ref_line draws a vertical dashed reference line (e.g. 0 for paired differences).
    A NaN estimate is written "n/a" in its row (no point); a finite estimate with a NaN
    bound is drawn without a whisker and marked "no CI". With `annotate`, the numbers
    "est [lo, hi]" are listed to the right of the axes with `decimals` decimals (None:
    about two significant digits of the largest value).
    panels: metric -> panel label (e.g. "higher is better"); each label gets its own panel
    and x axis, in order of first appearance; metrics not named go to a panel "other".
    ci_note: a footnote under the plot; None builds one from the table's level, ci_method
    and n_clusters columns (ci_footnote, with `cluster_unit`), "" leaves it out. Rows whose
    ci_method is not the most common one are marked (*, dagger, ...) and the marks explained.
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
    panel_of = {m: (panels or {}).get(m, "other") if panels else "" for m in metrics}
    panel_names = list(dict.fromkeys(panel_of[m] for m in metrics))
    rows_of = {p: [m for m in metrics if panel_of[m] == p] for p in panel_names}
    dec = decimals if decimals is not None else _decimals(df[[est, lo, hi]].to_numpy(dtype=float))

    marks: dict[str, str] = {}
    if "ci_method" in df.columns:
        with_ci = df[np.isfinite(df[lo]) & np.isfinite(df[hi])]
        counts = Counter(str(m) for m in with_ci["ci_method"])
        main = counts.most_common(1)[0][0] if counts else None
        for m in counts:
            if m != main:
                marks[m] = _METHOD_MARKS[len(marks) % len(_METHOD_MARKS)]

    n_groups = len(groups)
    step = min(0.28, 0.75 / max(n_groups, 1))
    colors = matplotlib.colormaps["tab10"].colors
    markers = ("o", "s", "D", "^", "v", "P")
    row_h = 0.3 + 0.17 * n_groups
    heights = [len(rows_of[p]) * row_h + (0.35 if p else 0.0) for p in panel_names]
    fig = new_figure((8.0 if annotate else 6.5, 1.5 + sum(heights) + 0.45 * (len(panel_names) - 1)))
    axes = fig.subplots(len(panel_names), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, p in zip(axes, panel_names, strict=True):
        _draw_panel(ax, df, rows_of[p], groups, metric_col, group_col, est, lo, hi, ref_line, step, colors,
                    markers, dec, annotate, marks)  # fmt: skip
        if p:
            ax.set_title(p, fontsize=9.5, loc="left", fontweight="bold")
        ax.set_xlabel(xlabel if xlabel is not None else est, fontsize=9)
    if n_groups > 1 or groups != [""]:
        handles = [
            Line2D([], [], color=colors[j % len(colors)], marker=markers[j % len(markers)], label=str(g))
            for j, g in enumerate(groups)
        ]
        # above the first panel, right-aligned (its title is on the left); inside the layout
        # as many columns as fit the plot's width (about 6 in for the entries at 8.5 pt)
        per_entry_in = 0.5 + 0.07 * max(len(str(g)) for g in groups)
        ncols = max(1, min(n_groups, 4, int(6.0 // per_entry_in)))
        axes[0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=ncols,
                       frameon=False, fontsize=8.5, borderaxespad=0.2)  # fmt: skip
    note = ci_footnote(df, cluster_unit) if ci_note is None else ci_note
    if marks:
        note += " " + "; ".join(f"{mark} {method_name(m)}" for m, mark in marks.items()) + "."
    if note:
        fig.supxlabel("\n".join(textwrap.wrap(note, 105)), fontsize=7.5, ha="center")
    if title:
        fig.suptitle(title, fontsize=11)
    if random_weights:
        random_weights_banner(fig)
    return fig


def _draw_panel(ax, df, metrics, groups, metric_col, group_col, est, lo, hi, ref_line, step, colors, markers,
                dec, annotate, marks) -> None:
    n_groups = len(groups)
    ax_text = blended_transform_factory(ax.transAxes, ax.transData)
    for i in range(len(metrics)):
        if i % 2 == 1:
            ax.axhspan(i - 0.5, i + 0.5, color=(0.95, 0.95, 0.95), zorder=0, linewidth=0)
    if ref_line is not None:
        ax.axvline(ref_line, color="0.35", linestyle="--", linewidth=1, zorder=1)
    xs: list[float] = [] if ref_line is None else [float(ref_line)]
    sub = df[df[metric_col].isin(metrics)]
    for j, g in enumerate(groups):
        color, marker = colors[j % len(colors)], markers[j % len(markers)]
        offset = (j - (n_groups - 1) / 2) * step
        for _, row in sub[sub[group_col] == g].iterrows():
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
                    ax.annotate("no CI", (e, y), xytext=(6, 0), textcoords="offset points", va="center",
                                fontsize=7, color=color)  # fmt: skip
            else:
                ax.text(0.5, y, "n/a", transform=ax_text, ha="center", va="center", fontsize=8, color=color,
                        fontstyle="italic", zorder=3)  # fmt: skip
            if annotate:
                ci = format_ci(lo_v, hi_v, dec) if has_ci else None
                txt = "n/a" if not np.isfinite(e) else f"{format_estimate(e, dec)} {ci or '[no CI]'}"
                if has_ci and "ci_method" in row.index and str(row["ci_method"]) in marks:
                    txt += " " + marks[str(row["ci_method"])]
                ax.text(1.02, y, txt, transform=ax_text, ha="left", va="center", fontsize=7.5, color=color)
    ax.set_yticks(range(len(metrics)), ["\n".join(textwrap.wrap(str(m), 28)) for m in metrics], fontsize=9)
    ax.set_ylim(len(metrics) - 0.5, -0.5)
    if xs:
        x_lo, x_hi = min(xs), max(xs)
        pad = 0.06 * (x_hi - x_lo) if x_hi > x_lo else max(abs(x_lo) * 0.1, 0.1)
        ax.set_xlim(x_lo - pad, x_hi + pad)
    ax.grid(axis="x", color="0.88", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)


def _decimals(values: np.ndarray) -> int:
    """Decimals that show about two significant digits of the largest finite value."""
    finite = np.abs(values[np.isfinite(values)])
    finite = finite[finite > 0]
    if finite.size == 0:
        return 2
    return int(np.clip(1 - math.floor(math.log10(finite.max())), 0, 4))
