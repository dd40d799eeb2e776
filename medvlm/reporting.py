"""The analysis phase of a run: stored results -> tables, figures, report.md and the
manifest's analysis section. Needs no GPU (``--analyze_only`` runs only this)."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from medvlm import figures
from medvlm.analysis import summarize
from medvlm.data import load_image
from medvlm.geometry import Geometry
from medvlm.metrics import intersect_boxes, resample_to_grid
from medvlm.store import _safe_name, load_study_maps, map_key, read_results

if TYPE_CHECKING:
    from medvlm.pipeline import RunConfig
    from medvlm.runner import Manifest

RANDOM_NOTE = "RANDOM WEIGHTS: these numbers and maps illustrate the pipeline, not a model."
COMMON_GRID = (16, 16)


def _geometry(rec) -> Geometry:
    g = rec["geometry"]
    return Geometry(tuple(g["image_size"]), tuple(g["crop_box"]), tuple(g["grid"]), int(g["input_size"]))


def analyze(cfg: RunConfig, manifest: Manifest) -> int:
    out = cfg.output_dir
    df = read_results(out)
    if df.empty:
        print(f"error: no results in {out}", file=sys.stderr)
        return 1
    random_weights = bool(df.get("random_weights", pd.Series([False])).fillna(False).any())

    study_maps = functools.lru_cache(maxsize=64)(functools.partial(load_study_maps, out))

    def get_map(model, study, finding, variant):
        z = study_maps(model, str(study))
        key = map_key(finding, variant)
        if key not in z:
            return None
        att = z[key].astype(np.float64)
        while att.ndim > 1:  # layers (and heads, when stored per head): mean
            att = att.mean(axis=0)
        return att

    ok = df[df["status"] == "ok"]
    geo = {(r.model, r.study_id): _geometry(r._asdict()) for r in ok[["model", "study_id", "geometry"]]
           .drop_duplicates(["model", "study_id"]).itertuples(index=False)}  # fmt: skip

    def get_common_map(model, study, finding, variant):
        m = get_map(model, study, finding, variant)
        g = geo.get((model, str(study)))
        if m is None or g is None:
            return None
        boxes = [geo[k].crop_box for k in geo if k[1] == str(study)]
        box = functools.reduce(intersect_boxes, boxes)
        return resample_to_grid(m, g.crop_box, g.grid, box, COMMON_GRID)

    models = sorted(df["model"].unique())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tables = summarize(df, get_map, n_boot=cfg.n_boot, seed=cfg.bootstrap_seed,
                           get_common_map=get_common_map if len(models) > 1 else None)  # fmt: skip
    tables.summary.to_csv(out / "summary.csv", index=False)
    tables.per_finding.to_csv(out / "per_finding.csv", index=False)
    tables.per_study.to_csv(out / "per_study.csv", index=False)
    figs = _figures(cfg, df, get_map, geo, tables, random_weights)
    failed = df[df["status"] == "failed"]
    manifest.update(
        analysis={
            "n_boot": cfg.n_boot,
            "bootstrap_seed": cfg.bootstrap_seed,
            "ci": "95% cluster bootstrap (BCa; percentile alongside), cluster = " + str(
                manifest.data.get("cluster_by", cfg.cluster_by)),
            "attention_map": "mean over stored layers (and heads) of the raw query-to-image rows; "
                             "normalised over the image for the metrics",
            "js": "Jensen-Shannon divergence, base 2 (in [0, 1]), not the distance",
            "common_grid": list(COMMON_GRID),
            "warnings": tables.warnings,
        },
        failed_rows={"count": int(len(failed)),
                     "rows": failed[["model", "study_id", "finding", "variant_id", "error"]].to_dict("records")},
        random_weights=random_weights or manifest.data.get("random_weights", False),
        figures=[str(p.relative_to(out)) for p in figs],
    )  # fmt: skip
    manifest.write()
    _report(out, manifest.data, tables, figs, random_weights)
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    return 0


def _figures(cfg, df, get_map, geo, tables, random_weights) -> list[Path]:
    out = cfg.output_dir / "figures"
    paths = []
    cmap = cfg.attention.colormap
    for name, table, ref in (("forest_models", tables.summary[~tables.summary["model"].str.contains(" ")], None),
                             ("forest_differences", tables.summary[tables.summary["model"].str.contains(" - ")], 0.0)):
        if len(table):
            fig = figures.forest_plot(table, title=name.replace("_", " "), ref_line=ref, random_weights=random_weights)
            paths.append(figures.save(fig, out / f"{name}.png"))
    ok = df[df["status"] == "ok"]
    studies = list(dict.fromkeys(ok["study_id"]))[: cfg.n_figure_studies]
    for study in studies:
        srows = df[df["study_id"] == study]
        image = load_image(srows.iloc[0]["image_path"]).image
        for finding in sorted(srows["finding"].unique()):
            frows = srows[srows["finding"] == finding]
            for model in sorted(frows["model"].unique()):
                mrows = frows[frows["model"] == model]
                if (model, study) not in geo:
                    continue
                okm = mrows[mrows["status"] == "ok"]
                fig = figures.paraphrase_grid(
                    image,
                    {int(r.variant_id): get_map(model, study, finding, r.variant_id) for r in okm.itertuples()},
                    {int(r.variant_id): r.question for r in mrows.itertuples()},
                    {int(r.variant_id): (r.answer, float(r.p_yes)) for r in okm.itertuples()},
                    geo[(model, study)],
                    finding=finding,
                    model_name=model,
                    colormap=cmap,
                    failures={int(r.variant_id): str(r.error) for r in mrows[mrows["status"] == "failed"].itertuples()},
                    random_weights=random_weights,
                )
                paths.append(figures.save(fig, out / f"{_safe_name(study)}__{finding}__{model}_paraphrases.png"))
            v0 = frows[(frows["variant_id"] == 0) & (frows["status"] == "ok")]
            if v0["model"].nunique() > 1:
                fig = figures.side_by_side(
                    image,
                    {r.model: get_map(r.model, study, finding, 0) for r in v0.itertuples()},
                    {r.model: geo[(r.model, study)] for r in v0.itertuples()},
                    question=v0.iloc[0]["question"],
                    answers_by_model={r.model: (r.answer, float(r.p_yes)) for r in v0.itertuples()},
                    colormap=cmap,
                    random_weights=random_weights,
                )
                paths.append(figures.save(fig, out / f"{_safe_name(study)}__{finding}__models.png"))
    return paths


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def _report(out: Path, manifest: dict, tables, figs: list[Path], random_weights: bool) -> None:
    lines = ["# Medical VLM attention analysis", ""]
    if random_weights:
        lines += [f"> **{RANDOM_NOTE}**", ""]
    counts = manifest.get("counts", {})
    lines += [f"Created {manifest.get('created', '')}; git commit `{manifest.get('git_commit')}`; "
              f"CSV `{manifest.get('csv')}`; clusters = {manifest.get('cluster_by')}.", ""]  # fmt: skip
    bad = manifest.get("bad_rows", {}).get("count", 0)
    failed = manifest.get("failed_rows", {}).get("count", 0)
    lines += [f"- Bad CSV rows skipped: **{bad}**; failed rows: **{failed}** (both listed in manifest.json)."]
    for m, c in counts.items():
        lines.append(f"- {m}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed this run, "
                     f"{c.get('seconds', 0):.1f} s.")  # fmt: skip
    a = manifest.get("analysis", {})
    lines += ["", f"Intervals: {a.get('ci')}, B = {a.get('n_boot')}, seed {a.get('bootstrap_seed')}. "
              f"JS: {a.get('js')}.", ""]  # fmt: skip
    lines += ["## Summary", "", "| model | metric | estimate | 95% CI | studies | rows |", "|---|---|---|---|---|---|"]
    for r in tables.summary.itertuples():
        lines.append(f"| {r.model} | {r.metric} | {_fmt(r.estimate)} | [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] | "
                     f"{r.n_clusters} | {r.n_rows} |")  # fmt: skip
    if a.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in a["warnings"]]
    lines += ["", "## Figures", ""]
    for p in figs:
        rel = p.relative_to(out)
        lines += [f"![{rel.stem}]({rel.as_posix()})", ""]
    lines += ["## Files", "", "- results.jsonl: one record per (model, study, finding, variant)",
              "- attention/: per-layer maps (float16) keyed the same way",
              "- summary.csv, per_finding.csv, per_study.csv: the tables", "- manifest.json: how this was made"]
    (out / "report.md").write_text("\n".join(lines) + "\n")

