"""Wiring for run_medical_vlm_analysis.py: validate -> score each model -> analyse -> figures,
tables, manifest and report. The science lives in the modules this calls."""

from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from medvlm import figures
from medvlm.analysis import summarize
from medvlm.data import DatasetError, load_dataset, load_image, select_studies
from medvlm.geometry import Geometry
from medvlm.metrics import intersect_boxes, resample_to_grid
from medvlm.pipeline import RunConfig, run_model, shard_rows
from medvlm.store import ResultsStore, _safe_name, load_study_maps, map_key, read_results

RANDOM_NOTE = "RANDOM WEIGHTS: these numbers and maps illustrate the pipeline, not a model."
COMMON_GRID = (16, 16)


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "timm", "peft", "numpy", "scipy", "pandas", "pydicom", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return out


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None  # fmt: skip
    except Exception:  # noqa: BLE001
        return None


class Manifest:
    """manifest.json, merged with what an earlier run into the same folder wrote."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def update(self, **kw) -> None:
        self.data.update(kw)

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def run(cfg: RunConfig, loaders: dict[str, Callable]) -> int:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # each process of a sharded run keeps its own manifest; rank 0's gathers the others'
    name = "manifest.json" if cfg.rank == 0 else f"manifest.shard-{cfg.rank}.json"
    manifest = Manifest(out / name)
    started = time.perf_counter()
    if cfg.rank == 0 and cfg.world_size > 1:
        for stale in out.glob("done.shard-*"):
            stale.unlink()
    if not cfg.analyze_only:
        code = _score(cfg, loaders, manifest)
        if code:
            return code
    if cfg.rank != 0:
        (out / f"done.shard-{cfg.rank}").write_text("done\n")
        return 0
    if cfg.world_size > 1 and not cfg.analyze_only:
        _wait_for_shards(out, cfg.world_size)
    shards = {p.name: json.loads(p.read_text()).get("counts") for p in sorted(out.glob("manifest.shard-*.json"))}
    if shards:
        manifest.update(shard_counts=shards)
    code = analyze(cfg, manifest)
    manifest.update(total_seconds=time.perf_counter() - started)
    manifest.write()
    return code


def _wait_for_shards(out: Path, world: int, timeout_s: float = 24 * 3600) -> None:
    t0 = time.time()
    while not all((out / f"done.shard-{r}").exists() for r in range(1, world)):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"shards did not finish within {timeout_s} s")
        time.sleep(2)


def _score(cfg: RunConfig, loaders, manifest: Manifest) -> int:
    out = cfg.output_dir
    csv = cfg.csv
    if cfg.demo:
        from medvlm.demo_data import build_demo_dataset

        csv = build_demo_dataset(out / "demo_data")
    try:
        ds = load_dataset(csv, image_root=cfg.image_root, cluster_by=cfg.cluster_by, strict=cfg.strict)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        manifest.update(refused=str(e))
        manifest.write()
        return 2
    for w in ds.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if ds.bad_rows:
        print(f"{len(ds.bad_rows)} bad row(s) skipped (see manifest.json):", file=sys.stderr)
        for b in ds.bad_rows[:20]:
            print("  " + b.format(ds.source), file=sys.stderr)
    sel = select_studies(ds, n_studies=cfg.n_studies, sample=cfg.sample, seed=cfg.seed)
    if sel.warning:
        print(f"warning: {sel.warning}", file=sys.stderr)
    rows = shard_rows(sel.rows, cfg.rank, cfg.world_size)
    store = ResultsStore(out, shard=None if cfg.world_size == 1 else cfg.rank)
    model_info, counts = dict(manifest.data.get("models", {})), dict(manifest.data.get("counts", {}))
    for name, loader in loaders.items():
        t0 = time.perf_counter()
        backend = loader(cfg)
        load_s = time.perf_counter() - t0
        info = backend.describe()
        model_info[name] = {**info, "load_seconds": load_s}
        try:
            c = run_model(backend, rows, store, cfg, bool(info.get("random_weights")))
        finally:
            backend.unload()
        counts[name] = c
        print(f"{name}: {c['ok']} ok, {c['failed']} failed, {c['skipped_done']} already done, "
              f"{c['seconds']:.1f} s", file=sys.stderr)  # fmt: skip
    random_weights = any(m.get("random_weights") for m in model_info.values())
    manifest.update(
        created=dt.datetime.now(dt.UTC).isoformat(),
        command=" ".join(sys.argv),
        git_commit=_git_commit(),
        versions=_versions(),
        config=cfg.to_json(),
        csv=str(ds.source),
        column_mapping=ds.mapping.columns(),
        cluster_by=cfg.cluster_by,
        selection={"mode": sel.mode, "requested": sel.requested, "available": sel.available, "seed": sel.seed,
                   "studies": len(sel.study_ids)},  # fmt: skip
        bad_rows={"count": len(ds.bad_rows), "rows": [{"line": b.line, "reason": b.reason, "study_id": b.study_id}
                                                      for b in ds.bad_rows]},  # fmt: skip
        data_warnings=list(ds.warnings),
        models=model_info,
        counts=counts,
        random_weights=random_weights,
        note=RANDOM_NOTE if random_weights else None,
    )
    manifest.write()
    return 0


# -- analysis -------------------------------------------------------------------------------
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

