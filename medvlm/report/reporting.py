"""The analysis phase of a run: stored results -> tables, figures, report.md and the
manifest's analysis section. Needs no GPU (``--analyze_only`` runs only this).

Phases, each timed into manifest["timings_s"] (merged with the scoring phase's "load" and
"score"): "analyse" (statistics and the CSV tables) and "figures" (drawing and writing the
PNGs, with a progress bar). Figures of an earlier run into the same folder that this run did
not draw are removed; nothing else in figures/ is touched.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from medvlm.analysis.analysis import summarize
from medvlm.analysis.faithfulness_run import read_units
from medvlm.analysis.metrics import intersect_boxes, resample_to_grid
from medvlm.analysis.sinks import reader_norms, sink_summary
from medvlm.analysis.validity import run_validity
from medvlm.core.geometry import Geometry
from medvlm.core.maps import MapReader, MapUnavailable
from medvlm.core.store import _safe_name, read_results
from medvlm.data.data import load_image
from medvlm.report.report_faithfulness import faithfulness_section
from medvlm.report.report_md import RANDOM_NOTE, DrawnFigure, cluster_unit, metric_panels, render_report
from medvlm.report.report_validity import grounding_section, reliance_section, sinks_section

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from medvlm.core.config import RunConfig
    from medvlm.core.runner import Manifest

__all__ = ["RANDOM_NOTE", "analyze", "is_tool_figure", "provenance_text", "remove_stale_figures"]

COMMON_GRID = (16, 16)
FORESTS = ("forest_models", "forest_differences")
VALIDITY_FIGURES = ("forest_grounding", "reliance_text_only", "reliance_blank", "faithfulness_curves")
# the names the figure phase gives its PNGs: <study stem>-<10 hex digest>__<finding>__<model>_paraphrases.png,
# ...__<finding>__models.png and the FORESTS (_forest_jobs, _plan_study_figures); only these are ever removed as stale
_TOOL_FIGURE = re.compile(
    rf"^(?:{'|'.join(FORESTS + VALIDITY_FIGURES)}|.+-[0-9a-f]{{10}}__.+__(?:.+_paraphrases|.+_maps|models))\.png$"
)
_HEADS = {
    "mean": "heads: mean (at capture)",
    "max": "heads: max over heads (at capture)",
    "entropy": "heads: entropy-weighted mean, focused heads weigh more (at capture)",
    "none": "heads: mean of the stored per-head maps",
}
_QUERIES = {
    "answer": "query: the answering token",
    "question": "query: the question's tokens (their rows averaged)",
    "finding": "query: the finding phrase's tokens (their rows averaged)",
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def analyze(cfg: RunConfig, manifest: Manifest) -> int:
    """Tables, figures, manifest and report.md from the stored results."""
    drawing = _Drawing(cfg.output_dir)
    try:
        return _analyze(cfg, manifest, drawing)
    finally:
        drawing.close()  # figure workers of a failed analysis stop (nothing when it finished)


def _analyze(cfg: RunConfig, manifest: Manifest, drawing: _Drawing) -> int:
    out = cfg.output_dir
    t0 = time.perf_counter()
    df = read_results(out)
    if df.empty:
        print(f"error: no results in {out}", file=sys.stderr)
        return 1
    if not (df["status"] == "ok").any():  # nothing to estimate from: say why, invent no table
        reasons = df["error"].fillna("no reason recorded").astype(str).str.split("\n").str[0].value_counts()
        top = "; ".join(f"{n} x {why}" for why, n in reasons.head(3).items())
        print(f"error: no answered rows in {out}: all {len(df)} failed ({top}); every row's reason is in "
              f"results.jsonl", file=sys.stderr)  # fmt: skip
        return 1
    random_weights = bool(df.get("random_weights", pd.Series([False])).fillna(False).any())
    _say(f"analysing {len(df)} records: statistics with {cfg.n_boot} bootstrap resamples ...")

    reader = MapReader(out)  # every map of the analysis, any kind, read through one cache
    get_map = reader.getter("attention")  # the layer (and head) mean of the raw maps; None where absent

    ok = df[df["status"] == "ok"]
    geo = {(r.model, r.study_id): Geometry.from_record(r.geometry) for r in ok[["model", "study_id", "geometry"]]
           .drop_duplicates(["model", "study_id"]).itertuples(index=False)}  # fmt: skip

    def get_common_map(model, study, finding, variant):
        m = get_map(model, study, finding, variant)
        g = geo.get((model, str(study)))
        if m is None or g is None:
            return None
        boxes = [geo[k].crop_box for k in geo if k[1] == str(study)]
        box = functools.reduce(intersect_boxes, boxes)
        return resample_to_grid(m, g.crop_box, g.grid, box, COMMON_GRID)

    # the per-study figures need no statistics: drawn in forked workers while the statistics run
    # (with --exclude_sinks their maps wait for the sink detection, so they are planned after it)
    study_plan = None if cfg.exclude_sinks else _plan_study_figures(cfg, df, get_map, geo, random_weights,
                                                                     manifest.data)  # fmt: skip
    if study_plan is not None:
        drawing.start(study_plan.jobs)

    models = sorted(df["model"].unique())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tables = summarize(df, get_map, n_boot=cfg.n_boot, seed=cfg.bootstrap_seed,
                           get_common_map=get_common_map if len(models) > 1 else None)  # fmt: skip
    sink_report = sink_summary(df, reader, reader_norms(reader), n_boot=cfg.n_boot, seed=cfg.bootstrap_seed)
    exclude = sink_report.sinks if cfg.exclude_sinks else {}
    figure_map = reader.getter("attention", exclude=exclude)  # --exclude_sinks: the figures' maps without sinks

    validity = run_validity(cfg, df, reader, exclude=exclude)
    faith_units = read_units(out)
    clusters = dict(zip(df["study_id"].astype(str), df["cluster_id"].astype(str), strict=False))
    faith = None
    if not faith_units.empty:
        from medvlm.analysis.faithfulness import faithfulness_table

        faith_units = faith_units[faith_units["study_id"].astype(str).isin(clusters)]
        faith = faithfulness_table(faith_units, clusters=clusters, n_boot=cfg.n_boot, seed=cfg.bootstrap_seed)
    for name, table in (("summary", tables.summary), ("per_finding", tables.per_finding),
                        ("per_study", tables.per_study), ("controls", validity.controls),
                        ("grounding", validity.grounding), ("grounding_rows", validity.units),
                        ("sinks", sink_report.table), ("faithfulness", faith)):  # fmt: skip
        if table is None or table.empty:
            continue
        if "random_weights" in table.columns:  # every row of a random-weight run says so
            table.pop("random_weights")
        table.insert(0, "random_weights", random_weights)
        table.to_csv(out / f"{name}.csv", index=False)
    t_analyse = time.perf_counter() - t0
    _say(f"tables written ({t_analyse:.1f} s)")

    t1 = time.perf_counter()
    unit = cluster_unit(manifest.data.get("cluster_by", cfg.cluster_by))
    if study_plan is None:
        study_plan = _plan_study_figures(cfg, df, figure_map, geo, random_weights, manifest.data)
    forests = _forest_jobs(cfg, tables, random_weights, manifest.data)
    plan = _Plan([*forests, *study_plan.jobs], study_plan.warnings)
    plan.jobs.extend(validity_jobs(cfg, df, reader, geo, validity, exclude, random_weights, unit))
    if faith is not None and not faith.empty:
        from medvlm.analysis.faithfulness import split_curves
        from medvlm.report.faithfulness_figures import faithfulness_curves_figure

        caption = ("Mean deletion and insertion curves per model with per-step cluster-bootstrap bands, one line per "
                   "map (random orders grey and dashed); the x axis is the share of token cells perturbed.")
        plan.jobs.append(_Job(cfg.output_dir / "figures" / "faithfulness_curves.png", caption,
                              lambda: faithfulness_curves_figure(split_curves(faith_units), clusters=clusters,
                                                                 n_boot=cfg.n_boot, seed=cfg.bootstrap_seed,
                                                                 random_weights=random_weights,
                                                                 cluster_unit=unit)))  # fmt: skip
    figs = drawing.finish(plan.jobs)
    stale = remove_stale_figures(out / "figures", [f.path for f in figs])
    t_figures = time.perf_counter() - t1
    _say(f"figures: {len(figs)} written in {t_figures:.1f} s"
         + (f"; {len(stale)} stale figure(s) of an earlier run removed" if stale else ""))  # fmt: skip

    failed = df[df["status"] == "failed"]
    manifest.update(
        analysis={
            "n_boot": cfg.n_boot,
            "bootstrap_seed": cfg.bootstrap_seed,
            "ci": f"95% cluster bootstrap (BCa; percentile alongside), cluster = {unit} "
                  f"({manifest.data.get('cluster_by', cfg.cluster_by)})",
            "attention_map": "mean over stored layers (and heads) of the raw query-to-image rows; "
                             "normalised over the image for the metrics",
            "js": "Jensen-Shannon divergence, base 2 (in [0, 1]), not the distance",
            "common_grid": list(COMMON_GRID),
            "warnings": tables.warnings,
            "figure_warnings": plan.warnings,
        },
        failed_rows={"count": int(len(failed)),
                     "rows": failed[["model", "study_id", "finding", "variant_id", "error"]].to_dict("records")},
        random_weights=random_weights or manifest.data.get("random_weights", False),
        figures=[str(f.path.relative_to(out)) for f in figs],
        stale_figures_removed=[str(p.relative_to(out)) for p in stale],
        timings_s={**manifest.data.get("timings_s", {}), "analyse": t_analyse, "figures": t_figures},
        sinks={**sink_report.manifest(grids={m: list(g.grid) for (m, _), g in geo.items()}),
               "excluded_from_maps": bool(cfg.exclude_sinks)},
        regions=validity.regions,
        validity_notes=validity.notes,
        map_kinds=list(cfg.map_kinds),
    )  # fmt: skip
    manifest.write()
    sections = [
        *reliance_section(validity.controls, validity.quadrants, unit, cfg.image_dependence_threshold),
        *grounding_section(validity.grounding, validity.units, validity.regions, validity.notes, unit),
        *sinks_section(manifest.data.get("sinks"), bool(cfg.exclude_sinks)),
        *faithfulness_section(faith, unit, _faith_settings(manifest.data, faith_units),
                              "figures/faithfulness_curves.png" if faith is not None else None),
    ]
    (out / "report.md").write_text(render_report(out, manifest.data, tables, figs, random_weights, sections))
    _say(f"wrote {out / 'report.md'}")
    return 0


# ----------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class _Job:
    path: Path
    caption: str
    draw: Callable[[], Figure]


@dataclass(frozen=True)
class _Plan:
    jobs: list[_Job]
    warnings: list[str]


def is_tool_figure(name: str) -> bool:
    """Whether a file name is one the figure phase writes (and so may remove as stale)."""
    return bool(_TOOL_FIGURE.match(name))


def remove_stale_figures(folder: Path, keep) -> list[Path]:
    """Remove PNGs in `folder` that the figure phase writes (is_tool_figure) but that are not in
    `keep` (this run's figures): what an earlier run drew and this one did not. Returns them."""
    if not folder.is_dir():
        return []
    keep = {Path(p).resolve() for p in keep}
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.is_symlink() and is_tool_figure(p.name) and p.resolve() not in keep:
            p.unlink()
            removed.append(p)
    return removed


def _ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (with en dashes)."""
    v = sorted({int(x) for x in values})
    parts, start = [], None
    for i, x in enumerate(v):
        if start is None:
            start = x
        if i + 1 == len(v) or v[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}\u2013{x}")
            start = None
    return ", ".join(parts)


def provenance_text(model: str, rows: pd.DataFrame, manifest: Mapping) -> str:
    """Which layers, heads and query tokens a model's drawn maps combine, in one line, from
    the records' `layers` and the manifest's model description (or run config)."""
    layers = set()
    if "layers" in rows.columns:
        for v in rows["layers"].dropna():
            layers.add(tuple(int(x) for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])))
    if len(layers) == 1:
        (ls,) = layers
        layer_text = f"attention: mean over layers {_ranges(ls)} ({len(ls)} layer{'s' * (len(ls) != 1)})"
    elif layers:
        layer_text = f"attention: mean over the stored layers (they differ between rows: {len(layers)} sets)"
    else:
        layer_text = "attention: mean over the stored layers (not recorded in the results)"
    info = (manifest.get("models") or {}).get(model) or {}
    att = (manifest.get("config") or {}).get("attention") or {}
    head = info.get("head_mode", att.get("attention_head_mode"))
    query = info.get("query_mode", att.get("query_mode"))
    head_text = _HEADS.get(head, f"heads: {head}" if head else "heads: not recorded")
    query_text = _QUERIES.get(query, f"query: {query}" if query else "query: not recorded")
    return f"{layer_text} \u00b7 {head_text} \u00b7 {query_text}"


def _select(cfg: RunConfig, df: pd.DataFrame) -> tuple[list[str], list[str] | None, list[str]]:
    """(studies, findings or None for all, warnings) the per-study figures are drawn for."""
    warns = []
    ok_studies = list(dict.fromkeys(df.loc[df["status"] == "ok", "study_id"].astype(str)))
    if cfg.figure_studies:
        wanted = [str(s) for s in dict.fromkeys(cfg.figure_studies)]
        unknown = [s for s in wanted if s not in ok_studies]
        if unknown:
            warns.append(f"--figure_studies: no answered rows for {', '.join(unknown)}; they are not drawn")
        studies = [s for s in wanted if s in ok_studies]
    else:
        studies = ok_studies[: max(0, cfg.n_figure_studies)]
    findings = None
    if cfg.figure_findings:
        known = set(df["finding"].astype(str))
        wanted = [str(f) for f in dict.fromkeys(cfg.figure_findings)]
        unknown = [f for f in wanted if f not in known]
        if unknown:
            warns.append(f"--figure_findings: no rows for {', '.join(unknown)}; they are not drawn")
        findings = [f for f in wanted if f in known]
    return studies, findings, warns


def _forest_jobs(cfg, tables, random_weights, manifest: Mapping) -> list[_Job]:
    """The forest plots of the summary table (each model's metrics; the models' differences)."""
    from medvlm.report import figures  # matplotlib is imported only when figures are drawn

    out = cfg.output_dir / "figures"
    unit = cluster_unit(manifest.get("cluster_by", cfg.cluster_by))
    jobs: list[_Job] = []
    summary = tables.summary
    for name in FORESTS:
        diff = name == "forest_differences"
        table = summary[summary["model"].str.contains(" - ")] if diff else summary[~summary["model"].str.contains(" ")]
        if not len(table):
            continue
        panels = metric_panels(table["metric"].unique().tolist(), differences=diff)
        note = figures.ci_footnote(table, unit)
        title = "paired differences between models (a - b)" if diff else "metrics per model"
        what = ("Paired differences a - b (the same resampled clusters for both models)" if diff
                else "Each model's metrics")  # fmt: skip
        caption = f"{what} with their intervals, on panels by which direction is better; {note}"

        def draw(table=table, title=title, panels=panels, ref=0.0 if diff else None):
            return figures.forest_plot(table, title=title, ref_line=ref, random_weights=random_weights,
                                       panels=panels, cluster_unit=unit)  # fmt: skip

        jobs.append(_Job(out / f"{name}.png", caption, draw))
    return jobs


def _plan_study_figures(cfg, df, get_map, geo, random_weights, manifest: Mapping) -> _Plan:
    """The figure studies' paraphrase grids and model side-by-sides (no statistics needed)."""
    from medvlm.report import figures  # matplotlib is imported only when figures are drawn

    out = cfg.output_dir / "figures"
    cmap = cfg.attention.colormap
    jobs: list[_Job] = []
    studies, findings, warns = _select(cfg, df)
    for w in warns:
        _say(f"warning: {w}")
    provenance = {m: provenance_text(m, df[(df["model"] == m) & (df["status"] == "ok")], manifest)
                  for m in df["model"].unique()}  # fmt: skip
    for study in studies:
        srows = df[df["study_id"].astype(str) == study]
        image = load_image(srows.iloc[0]["image_path"]).image  # loaded here: forked workers inherit it
        study_findings = sorted(srows["finding"].unique())
        for finding in study_findings if findings is None else [f for f in findings if f in study_findings]:
            frows = srows[srows["finding"] == finding]
            v0_rows = frows[frows["variant_id"] == 0]
            gt = str((v0_rows if len(v0_rows) else frows).iloc[0]["answer_gt"])  # variant 0's, the reference
            for model in sorted(frows["model"].unique()):
                if (model, study) not in geo:
                    continue
                mrows = frows[frows["model"] == model]
                okm = mrows[mrows["status"] == "ok"]
                n_right = int((okm["answer"].astype(str) == okm["answer_gt"].astype(str)).sum())
                caption = (f"Study {study}, finding {finding}, {model}: the attention of each of the six wordings "
                           f"over the image; ground truth {gt}, {n_right} of {len(okm)} answers correct"
                           f"{f', {len(mrows) - len(okm)} failed' if len(mrows) > len(okm) else ''}. "
                           f"{provenance[model][:1].upper()}{provenance[model][1:]}.")  # fmt: skip

                def draw(model=model, mrows=mrows, okm=okm, finding=finding, gt=gt, study=study, image=image):
                    return figures.paraphrase_grid(
                        image,
                        {int(r.variant_id): get_map(model, study, finding, r.variant_id) for r in okm.itertuples()},
                        {int(r.variant_id): r.question for r in mrows.itertuples()},
                        {int(r.variant_id): (r.answer, float(r.p_yes)) for r in okm.itertuples()},
                        geo[(model, study)], finding=finding, model_name=model, colormap=cmap,
                        failures={int(r.variant_id): str(r.error)
                                  for r in mrows[mrows["status"] == "failed"].itertuples()},
                        random_weights=random_weights, study_id=study, ground_truth=gt,
                        truths={int(r.variant_id): str(r.answer_gt) for r in mrows.itertuples()},
                        provenance=provenance[model],
                    )  # fmt: skip

                jobs.append(_Job(out / f"{_safe_name(study)}__{finding}__{model}_paraphrases.png", caption, draw))
            v0 = frows[(frows["variant_id"] == 0) & (frows["status"] == "ok")]
            v0 = v0[v0["model"].map(lambda m, study=study: (m, study) in geo).astype(bool)]  # a mask: [] picks columns
            if v0["model"].nunique() > 1:
                answers = ", ".join(f"{r.model} {r.answer} (P(yes) {float(r.p_yes):.2f})" for r in v0.itertuples())
                caption = (f"Study {study}, finding {finding}, the original wording: each model's attention on one "
                           f"shared colour scale (attention relative to a uniform map); ground truth {gt}; "
                           f"answers: {answers}.")  # fmt: skip

                def draw(v0=v0, finding=finding, gt=gt, study=study, image=image):
                    return figures.side_by_side(
                        image,
                        {r.model: get_map(r.model, study, finding, 0) for r in v0.itertuples()},
                        {r.model: geo[(r.model, study)] for r in v0.itertuples()},
                        question=v0.iloc[0]["question"],
                        answers_by_model={r.model: (r.answer, float(r.p_yes)) for r in v0.itertuples()},
                        colormap=cmap, random_weights=random_weights, shared_scale=True, study_id=study,
                        finding=finding, ground_truth=gt, provenance={m: provenance[m] for m in v0["model"]},
                    )  # fmt: skip

                jobs.append(_Job(out / f"{_safe_name(study)}__{finding}__models.png", caption, draw))
    return _Plan(jobs, warns)


#: the jobs of the running figure phase by batch, inherited by the workers forked for each batch
_JOBS: dict[int, list[_Job]] = {}


def _run_job(batch: int, i: int) -> tuple[int, int]:
    from medvlm.report import figures

    job = _JOBS[batch][i]
    figures.save(job.draw(), job.path)
    return batch, i


def figure_workers(n_jobs: int, warn: bool = True) -> int:
    """Processes that draw the figures: one per available core (at most 4), forked so they
    inherit the loaded results, maps and images; 1 (drawn here) off Linux, for fewer than 4
    figures, or with MEDVLM_FIGURE_WORKERS=1 (the environment variable sets the number; one
    that is not a number is warned about when `warn`)."""
    env = os.environ.get("MEDVLM_FIGURE_WORKERS", "").strip()
    if env:
        if env.isdigit():
            return max(1, int(env))
        if warn:
            _say(f"warning: MEDVLM_FIGURE_WORKERS={env!r} is not a number; drawing in this process")
        return 1
    if not sys.platform.startswith("linux") or n_jobs < 4:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))


class _Drawing:
    """Draws figure jobs and writes them, with a progress bar: in forked worker processes when
    figure_workers() says so, else here. start(jobs) hands a first batch to workers and returns
    at once (the caller goes on, e.g. with the statistics, on the other cores); finish(jobs)
    draws the jobs not yet started, waits for all and returns every job of `jobs` as a
    DrawnFigure, in their order. Each batch gets its own workers, forked when it is handed
    over, so they inherit what its jobs' closures need. A broken pool falls back to drawing
    what is left here."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.started: list[_Job] = []
        self.pending: list = []  # (pool, futures) per batch handed to workers
        self.done: set[int] = set()  # ids of the jobs written

    def start(self, jobs: list[_Job]) -> None:
        workers = figure_workers(len(jobs), warn=False) if jobs else 1  # finish() warns, once
        if workers > 1:
            self._submit(jobs, workers)

    def close(self) -> None:
        """Stop the workers of batches not waited for (a failed analysis): queued jobs are dropped."""
        for pool, _ in self.pending:
            pool.shutdown(wait=True, cancel_futures=True)
        self.pending = []
        _JOBS.clear()

    def _submit(self, jobs: list[_Job], workers: int) -> None:
        batch = len(_JOBS)
        _JOBS[batch] = list(jobs)
        try:
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"))
            futures = [pool.submit(_run_job, batch, i) for i in range(len(jobs))]  # forks the workers now
        except (BrokenProcessPool, OSError) as e:
            _say(f"warning: could not start figure workers ({e}); drawing the figures in this process")
            return
        self.pending.append((pool, futures))
        self.started.extend(jobs)

    def finish(self, jobs: list[_Job]) -> list[DrawnFigure]:
        from tqdm.auto import tqdm

        if not jobs:
            self._wait(None)
            return []
        started = {id(j) for j in self.started}
        rest = [j for j in jobs if id(j) not in started]
        workers = figure_workers(len(jobs))
        _say(f"figures: drawing {len(jobs)} into {self.output_dir / 'figures'}"
             + (f" ({workers} processes)" if workers > 1 else "")
             + (f"; {len(self.started)} of them begun during the statistics" if self.started else "") + " ...")
        with tqdm(total=len(jobs), desc="figures", unit="fig", disable=None, file=sys.stderr) as bar:
            if workers > 1 and len(rest) > 1:
                self._submit(rest, workers)
            self._wait(bar)
            for job in jobs:
                if id(job) not in self.done:
                    from medvlm.report import figures

                    figures.save(job.draw(), job.path)
                    self.done.add(id(job))
                    bar.update(1)
        return [DrawnFigure(job.path, job.caption) for job in jobs]

    def _wait(self, bar) -> None:
        try:
            for pool, futures in self.pending:
                with pool:
                    for f in futures:
                        batch, i = f.result()
                        self.done.add(id(_JOBS[batch][i]))
                        if bar is not None:
                            bar.update(1)
        except BrokenProcessPool as e:
            _say(f"warning: a figure worker died ({e}); drawing the remaining figures in this process")
            for pool, _ in self.pending:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self.pending = []
            _JOBS.clear()


def validity_jobs(cfg, df, reader, geo, validity, exclude, random_weights, unit) -> list[_Job]:
    """The validity figures: the reliance scatter per control, the grounding forest plot, and for
    the figure studies each model's maps of every kind asked for (raw, relative) side by side with
    the region outlined where one joined."""
    from medvlm.report import validity_figures as vf

    out = cfg.output_dir / "figures"
    jobs = []
    for control in ("text_only", "blank"):
        col = f"p_yes_{control}"
        if col in df and df[col].notna().any():
            caption = (f"P(yes) with the image against P(yes) {control.replace('_', ' ')}, every answered row; "
                       "points on the diagonal are answers the image did not move.")
            jobs.append(_Job(out / f"reliance_{control}.png", caption,
                             lambda control=control: vf.reliance_scatter(df, control, random_weights=random_weights)))
    if validity.grounding is not None and not validity.grounding.empty:
        caption = ("Grounding per model and map kind (all findings and paraphrases pooled) beside the uniform map and "
                   "the Gaussian prior, with cluster-bootstrap intervals.")
        jobs.append(_Job(out / "forest_grounding.png", caption,
                         lambda: vf.grounding_forest(validity.grounding, random_weights=random_weights,
                                                     cluster_unit=unit)))  # fmt: skip
    studies, findings, _ = _select(cfg, df)
    ok = df[(df["status"] == "ok") & (df["variant_id"] == 0)]
    regions = {(str(ok.loc[i, "study_id"]), ok.loc[i, "finding"], ok.loc[i, "model"]): j
               for i, j in validity.joined.items() if i in ok.index}  # fmt: skip
    for r in ok[ok["study_id"].astype(str).isin(studies)].itertuples():
        if findings is not None and r.finding not in findings or (r.model, str(r.study_id)) not in geo:
            continue
        maps = {}
        for kind in cfg.map_kinds:
            try:
                maps[kind] = reader.get(r.model, str(r.study_id), r.finding, 0, kind, exclude=exclude.get(r.model, ()))
            except MapUnavailable:
                continue
        joined = regions.get((str(r.study_id), r.finding, r.model))
        if not maps or (len(maps) < 2 and joined is None):
            continue  # one kind and no region: the paraphrase grid shows it already
        label = "; ".join(sorted({str(j.describe().get("region_source")) for j in joined})) if joined else "no region"
        caption = (f"Study {r.study_id}, finding {r.finding}, {r.model}, the original wording: the maps of each kind "
                   f"({', '.join(maps)}) with the region outlined (from {label}).")

        def draw(r=r, maps=maps, joined=joined, label=label):
            image = load_image(r.image_path).image
            mask = np.logical_or.reduce([j.mask() for j in joined]) if joined else None
            return vf.maps_with_region(image, maps, geo[(r.model, str(r.study_id))], mask,
                                       title=f"Study {r.study_id}, {r.finding}, {r.model}: {r.question}",
                                       colormap=cfg.attention.colormap, region_label=f"region from {label}",
                                       random_weights=random_weights)  # fmt: skip

        jobs.append(_Job(out / f"{_safe_name(str(r.study_id))}__{r.finding}__{r.model}_maps.png", caption, draw))
    return jobs


def _faith_settings(manifest: Mapping, units: pd.DataFrame) -> dict:
    """What the faithfulness section says about how the curves were made (from the units)."""
    if units is None or units.empty:
        return {}
    first = units.iloc[0]
    sigma = {m: float(g["blur_sigma"].iloc[0]) for m, g in units.groupby("model")} if "blur_sigma" in units else None
    variants = sorted(units["variant_id"].astype(int).unique().tolist())
    curved = units.drop_duplicates(["model", "study_id", "finding", "variant_id"])
    named = {m: [f"{r.study_id} {r.finding}, paraphrase {int(r.variant_id)}" for r in g.itertuples()]
             for m, g in curved.groupby("model")}  # fmt: skip
    return {"steps": int(first["steps"]), "substrate": first["substrate"], "n_random": int(first["n_random"]),
            "blur_sigma": sigma, "variants": ",".join(map(str, variants)), "units": named}  # fmt: skip
