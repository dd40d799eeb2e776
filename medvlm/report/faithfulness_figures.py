"""The faithfulness figure: mean deletion and insertion curves per model, one line per map, each
with its cluster-bootstrap band (medvlm.analysis.tables.metric_table per step: the same intervals as
every table), in the look of medvlm/report/figures.py (Agg canvas, tab10, the RANDOM WEIGHTS banner,
a footnote that says how the bands were made).

    fig = faithfulness_curves_figure(curves, maps=("attention", "gradxinput"), random_weights=True)
    save(fig, "figures/faithfulness_curves.png")

Map kinds are a parameter and no kind is drawn differently from another, except the random
baseline (grey, dashed), which is what every map is compared with.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medvlm.analysis.faithfulness import RANDOM, curve_units, map_sort_key, rise_auc
from medvlm.analysis.tables import metric_table
from medvlm.report.figure_canvas import new_figure, random_weights_banner
from medvlm.report.forest import ci_footnote, count_of, format_estimate

CURVES = ("deletion", "insertion")
XLABEL = {"deletion": "fraction of token cells removed (map order)",
          "insertion": "fraction of token cells restored (map order)"}  # fmt: skip
TITLE = {"deletion": "Deletion (lower AUC = more faithful)", "insertion": "Insertion (higher AUC = more faithful)"}


def curve_bands(curves, *, clusters: Mapping | None = None, n_boot: int = 10_000, seed: int = 0,
                level: float = 0.95) -> pd.DataFrame:  # fmt: skip
    """Per (model, map, curve, step): the pooled mean score over units with its interval,
    from metric_table (clusters resampled whole). Columns: model, map, curve, step, fraction,
    estimate, ci_low, ci_high, ci_method, level, n_clusters, n_units, auc (RISE's AUC of the
    mean curve = the mean of the units' AUCs)."""
    units = curve_units(curves, clusters)
    if units.empty:
        raise ValueError("no curves to draw")
    steps = {len(s) for s in units["score"]}
    if len(steps) != 1:
        raise ValueError(f"curves of different lengths {sorted(steps)}: one figure per number of steps")
    n_steps = steps.pop()
    metrics = [f"step_{k}" for k in range(n_steps)]
    out = []
    for (name, curve), block in units.groupby(["map", "curve"], sort=False):
        table = metric_table(block, metrics, n_boot=n_boot, seed=seed, level=level, pairs=[], per_finding=False)
        cells = np.asarray(block["cells"].iloc[0], dtype=float)
        for model, rows in table.groupby("model", sort=True):
            rows = rows.set_index("metric").loc[metrics]
            est = rows["estimate"].to_numpy(dtype=float)
            for k, metric in enumerate(metrics):
                r = rows.loc[metric]
                out.append({"model": model, "map": name, "curve": curve, "step": k, "fraction": cells[k] / cells[-1],
                            "estimate": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                            "ci_method": r["ci_method"], "level": r["level"], "n_clusters": r["n_clusters"],
                            "n_units": r["n_units"], "auc": rise_auc(est)})  # fmt: skip
    return pd.DataFrame(out)


def faithfulness_curves_figure(
    curves,
    *,
    maps: Sequence[str] | None = None,
    include_random: bool = True,
    finding: str | None = None,
    clusters: Mapping | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    random_weights: bool = False,
    title: str | None = None,
    cluster_unit: str = "studies",
) -> Figure:
    """Rows: models; columns: deletion, insertion. x: the fraction of token cells perturbed in
    map order; y: the model's probability of the answer it gave, renormalised over yes / no.

    curves          the curve dicts of medvlm.analysis.faithfulness (or their DataFrame)
    maps            map kinds to draw (default: every kind in curves, in MAP_ORDER); the
                    random baseline is added unless include_random is False
    finding         draw only this finding's units (default: all)
    clusters        study_id -> cluster id (default: the study)
    n_boot, seed, level   the bands' bootstrap (metric_table)
    The legend gives each map's AUC (of the mean curve); the footnote the bands' method.
    """
    df = pd.DataFrame(list(curves) if not isinstance(curves, pd.DataFrame) else curves)
    if df.empty:
        raise ValueError("no curves to draw")
    if finding is not None:
        df = df[df["finding"].astype(str) == str(finding)]
        if df.empty:
            raise ValueError(f"no curves for finding {finding!r}")
    present = sorted(df["map"].astype(str).unique(), key=map_sort_key)
    wanted = [m for m in present if m != RANDOM] if maps is None else list(dict.fromkeys(maps))
    missing = [m for m in wanted if m not in present]
    if missing:
        raise ValueError(f"no curves for map(s) {missing}; present: {present}")
    if include_random and RANDOM in present and RANDOM not in wanted:
        wanted.append(RANDOM)
    df = df[df["map"].isin(wanted)]
    bands = curve_bands(df, clusters=clusters, n_boot=n_boot, seed=seed, level=level)
    models = sorted(bands["model"].unique())
    colors = matplotlib.colormaps["tab10"].colors
    color_of = {m: colors[i % len(colors)] for i, m in enumerate(x for x in wanted if x != RANDOM)}
    fig = new_figure((10.0, 1.6 + 3.0 * len(models)))
    axes = fig.subplots(len(models), 2, squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, curve in enumerate(CURVES):
            ax = axes[i, j]
            for name in wanted:
                b = bands[(bands["model"] == model) & (bands["map"] == name) & (bands["curve"] == curve)]
                if b.empty:
                    continue
                b = b.sort_values("step")
                baseline = name == RANDOM
                color = "0.45" if baseline else color_of[name]
                x = b["fraction"].to_numpy(dtype=float)
                lo, hi = b["ci_low"].to_numpy(dtype=float), b["ci_high"].to_numpy(dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.15 if not baseline else 0.12,
                                    linewidth=0)  # fmt: skip
                n_units = count_of(int(b["n_units"].max()), "units")
                label = f"{name} (AUC {format_estimate(b['auc'].iloc[0])}, {n_units})"
                ax.plot(x, b["estimate"].to_numpy(dtype=float), color=color, linewidth=1.8,
                        linestyle="--" if baseline else "-", marker="o", markersize=2.5, label=label)  # fmt: skip
            ax.set_xlim(0, 1)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(color="0.9", linewidth=0.8)
            ax.set_axisbelow(True)
            ax.set_title(f"{model}: {TITLE[curve]}", fontsize=9.5, loc="left")
            ax.set_xlabel(XLABEL[curve], fontsize=8.5)
            if j == 0:
                ax.set_ylabel("P(answer given), renormalised", fontsize=8.5)
            ax.legend(fontsize=7.5, frameon=False, loc="upper right" if curve == "deletion" else "lower right")
    note = (f"Lines: mean over units (study x finding x paraphrase); bands: {ci_footnote(bands, cluster_unit)} "
            "AUC: RISE's trapezoid over the steps (Petsiuk et al. 2018). "
            "Random: the mean of seeded random orders.")  # fmt: skip
    fig.supxlabel("\n".join(textwrap.wrap(note, 130)), fontsize=7.5)
    suffix = f" ({finding})" if finding else ""
    heading = title or f"Faithfulness: deletion and insertion of token cells in map order{suffix}"
    fig.suptitle(heading, fontsize=11)
    if random_weights:
        random_weights_banner(fig)
    return fig
