"""Wiring for run_medical_vlm_analysis.py: validate -> score each model -> analyse -> figures,
tables, manifest and report. The science lives in the modules this calls."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medvlm.core.pipeline import RunConfig, run_model, shard_rows
from medvlm.core.preflight import (
    SettingsFile,
    UsageError,
    check_inputs_are_not_outputs,
    check_layers,
    check_output_dir,
    check_outputs_are_the_tools,
    check_overwrite_safe,
    remove_tool_outputs,
)
from medvlm.core.store import RESULTS_GLOB, ResultsFileError, ResultsStore, read_results
from medvlm.data.data import DatasetError, load_dataset, select_studies
from medvlm.report.figures import check_colormap
from medvlm.report.reporting import RANDOM_NOTE, analyze


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "timm", "peft", "numpy", "scipy", "pandas", "pydicom", "matplotlib"):
        try:  # the installed distribution's version, without importing it (peft pulls in bitsandbytes: ~2.5 s)
            out[name] = version(name)
        except PackageNotFoundError:  # a missing package is reported as such
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
        here = Path(__file__).resolve().parents[2]
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


@dataclass
class _Plan:
    """What the checks before scoring produced (nothing is written until they all pass)."""

    dataset: object = None
    selection: object = None
    data_notes: tuple[str, ...] = ()  # what the outputs must say about the data (the demo's label sources)
    settings: SettingsFile | None = None
    created_dir: bool = False


def run(cfg: RunConfig, loaders: dict[str, Callable]) -> int:
    """The whole run: checks (nothing written on refusal), scoring, analysis. Returns the exit
    code; raises UsageError / DatasetError for user mistakes (the CLI prints one line)."""
    out = cfg.output_dir
    check_output_dir(out)
    started = time.perf_counter()
    if cfg.analyze_only:
        if not any(_has_a_line(p) for p in out.glob(RESULTS_GLOB)):
            raise UsageError(f"--analyze_only: no results*.jsonl in {out} (score first, or check --output_dir)")
        check_outputs_are_the_tools(out)  # a results.jsonl of someone else's, in a folder of theirs
        check_regions(cfg)
        plan = _Plan()
    else:
        plan = _preflight(cfg, loaders)
    # each process of a sharded run keeps its own manifest; rank 0's gathers the others'
    name = "manifest.json" if cfg.rank == 0 else f"manifest.shard-{cfg.rank}.json"
    manifest = Manifest(out / name)
    if cfg.rank == 0 and cfg.world_size > 1:
        for stale in out.glob("done.shard-*"):
            stale.unlink()
    if not cfg.analyze_only:
        code = _score(cfg, loaders, manifest, plan)
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
    try:
        code = analyze(cfg, manifest)
    except ResultsFileError:
        raise  # the user's to fix: one line (the CLI), not an analysis failure
    except Exception as e:  # noqa: BLE001 - the scored results stay; the user is told how to go on
        if cfg.debug:
            raise
        log = out / "analysis_error.log"
        log.write_text(traceback.format_exc())
        print(f"error: the analysis failed ({type(e).__name__}: {e}); the scored results in {out} are intact "
              f"(traceback in {log}). Once fixed, rerun with: --output_dir {out} --analyze_only", file=sys.stderr)
        return 1
    manifest.update(total_seconds=time.perf_counter() - started)
    manifest.write()
    return code


def _has_a_line(path: Path) -> bool:
    """Whether a results file holds anything but blank space (read up to its first other byte)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _wait_for_shards(out: Path, world: int, timeout_s: float = 24 * 3600) -> None:
    t0 = time.time()
    while not all((out / f"done.shard-{r}").exists() for r in range(1, world)):
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"shards did not finish within {timeout_s} s")
        time.sleep(2)


def _listed(head: str, items: list[str], limit: int = 20) -> list[str]:
    """head, then at most `limit` items indented, then how many more there are (none: [])."""
    if not items:
        return []
    more = [f"  ... and {len(items) - limit} more"] if len(items) > limit else []
    return [head, *("  " + i for i in items[:limit]), *more]


def _validation_report(ds, refused: bool = False) -> list[str]:
    """The bad rows, at most 20 of them (all are in the manifest of a run that goes on)."""
    head = f"{len(ds.bad_rows)} bad row(s)" + (":" if refused else " skipped (see manifest.json):")
    return _listed(head, [b.format(ds.source) for b in ds.bad_rows])


def check_regions(cfg: RunConfig) -> None:
    """Every --regions file (and --finding_map) read before anything is written or a model loads:
    one that cannot be used (missing, unknown format, not JSON) is a UsageError naming it. Its bad
    lines are the analysis's to count and list (manifest: regions.error_lines)."""
    if not cfg.regions:
        return
    from medvlm.data.regions import read_regions

    for path in cfg.regions:
        try:
            regions = read_regions(path, cfg.finding_map)
        except ValueError as e:  # RegionError, or a --finding_map that cannot be used
            raise UsageError(f"--regions: {e}") from None
        # said here, as the CSV's bad rows are, not only counted in the report
        head = f"{len(regions.errors)} bad line(s) of {path} skipped (see manifest.json, regions):"
        for line in _listed(head, [str(x) for x in regions.errors]):
            print(line, file=sys.stderr)


def _preflight(cfg: RunConfig, loaders) -> _Plan:
    """Every check that can run before a model loads; nothing is written unless all pass
    (then --overwrite removes the tool's earlier outputs, and the folder is made)."""
    out = cfg.output_dir
    check_outputs_are_the_tools(out)
    check_layers(cfg)
    check_regions(cfg)
    try:
        check_colormap(cfg.attention.colormap)
    except ValueError as e:
        raise UsageError(f"--colormap: {e}") from None
    plan = _Plan(created_dir=not out.exists())
    if cfg.demo:
        if cfg.overwrite:
            remove_tool_outputs(out)
        from medvlm.data.demo_data import build_demo_dataset

        csv = build_demo_dataset(out / "demo_data")
        labels = out / "demo_data" / "demo_labels.json"
        plan.data_notes = tuple(json.loads(labels.read_text()).get("notes", ())) if labels.exists() else ()
    else:
        csv = cfg.csv
    ds = load_dataset(csv, image_root=cfg.image_root, cluster_by=cfg.cluster_by, strict=cfg.strict)
    if ds.rows.empty:
        report = "\n".join(_validation_report(ds, refused=True))
        raise DatasetError(f"{report}\n{ds.source}: all {ds.n_rows_read} data row(s) are bad: nothing to score",
                           ds.source, ds.bad_rows)  # fmt: skip
    for w in ds.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in getattr(ds, "notes", ()):
        print(f"note: {n}", file=sys.stderr)
    for line in _validation_report(ds):
        print(line, file=sys.stderr)
    sel = select_studies(ds, n_studies=cfg.n_studies or None, sample=cfg.sample, seed=cfg.seed)
    if sel.warning:
        print(f"warning: {sel.warning}", file=sys.stderr)
    plan.dataset, plan.selection = ds, sel
    inputs = [ds.source, *map(Path, pd.unique(ds.rows["image_abspath"]))]  # the user's CSV and its images
    if not cfg.demo:  # the demo's own inputs live in its demo_data/
        check_inputs_are_not_outputs(out, [*inputs, *cfg.regions])
    if cfg.faithfulness and cfg.faithfulness_variants.strip() != "all":
        from medvlm.analysis.faithfulness import parse_variants

        asked = set(parse_variants(cfg.faithfulness_variants))
        have = set(sel.rows["variant_id"].astype(int))
        if not asked & have:  # else the curves would be none, and nothing would say so
            raise UsageError(f"--faithfulness_variants {cfg.faithfulness_variants}: no selected row has that variant "
                             f"(the selected rows have {', '.join(map(str, sorted(have)))})")
    if cfg.overwrite and not cfg.demo:
        check_overwrite_safe(out, inputs)
        removed = remove_tool_outputs(out)
        if removed:
            print(f"--overwrite: removed {len(removed)} earlier output(s) of this tool from {out}", file=sys.stderr)
    settings = SettingsFile(out)
    if out.exists() and not cfg.overwrite:
        with_rows = set(read_results(out)["model"].astype(str)) if any(out.glob(RESULTS_GLOB)) else set()
        manifest_path = out / "manifest.json"
        if with_rows and manifest_path.exists():
            settings.adopt_manifest(json.loads(manifest_path.read_text()), with_rows)
        settings.check_requested(loaders, cfg)
    plan.settings = settings
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or virtual file system: os.access passes these for root
        raise UsageError(f"--output_dir {out}: cannot create it ({e.strerror or e})") from None
    return plan


def _load_backend(name: str, loader, cfg: RunConfig):
    """The loaded backend; a download that cannot happen, a missing folder or a checkpoint that
    fails its fact checks is a UsageError naming the model id and the way out."""
    try:
        return loader(cfg)
    except (OSError, ValueError, ImportError) as e:
        if cfg.debug:
            raise
        ids = ([cfg.llava_rad_model, cfg.llava_rad_base] if name == "llava_rad" else [cfg.medgemma_model])
        remote = [i for i in ids if not Path(os.path.expanduser(i)).exists()]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cfg.random_models is None and remote:
            flag = "--llava_rad_model / --llava_rad_base" if name == "llava_rad" else "--medgemma_model"
            licence = (" MedGemma is gated: accept its licence (Health AI Developer Foundations terms) on its "
                       "Hugging Face page and run `huggingface-cli login` first." if name == "medgemma" else "")
            raise UsageError(
                f"{name}: could not load {', '.join(remote)} ({type(e).__name__}: {first}). It is not a local "
                f"folder, so its weights must be downloaded from the Hugging Face Hub: run where the Hub can be "
                f"reached, or download it elsewhere (huggingface-cli download ID --local-dir DIR) and pass the "
                f"folder with {flag}.{licence}"
            ) from None
        raise UsageError(f"{name}: could not load the model ({type(e).__name__}: {first})") from None


def _faithfulness(backend, name: str, rows, cfg: RunConfig) -> dict:
    from medvlm.analysis.faithfulness import FaithfulnessConfig
    from medvlm.analysis.faithfulness_run import run_faithfulness

    fcfg = FaithfulnessConfig(steps=cfg.faithfulness_steps, substrate=cfg.substrate, n_random=cfg.faithfulness_random,
                              variants=cfg.faithfulness_variants)  # fmt: skip
    kinds = [*cfg.map_kinds, *(k for k in cfg.attribution if k != "attention")]
    print(f"{name}: faithfulness curves ({fcfg.steps} steps, {fcfg.substrate}, maps {', '.join(kinds)}) ...",
          file=sys.stderr)  # fmt: skip
    return {**run_faithfulness(backend, name, cfg.output_dir, rows, fcfg, kinds,
                               max_studies=cfg.faithfulness_studies), "settings": dataclasses.asdict(fcfg)}


def _score(cfg: RunConfig, loaders, manifest: Manifest, plan: _Plan) -> int:
    out = cfg.output_dir
    ds, sel, settings = plan.dataset, plan.selection, plan.settings
    rows = shard_rows(sel.rows, cfg.rank, cfg.world_size)
    store = ResultsStore(out, shard=None if cfg.world_size == 1 else cfg.rank)
    model_info, counts = dict(manifest.data.get("models", {})), dict(manifest.data.get("counts", {}))
    timings = {"load": {}, "score": {}}
    for name, loader in loaders.items():
        t0 = time.perf_counter()
        try:
            backend = _load_backend(name, loader, cfg)
        except UsageError:
            if plan.created_dir and not any(out.iterdir()):
                out.rmdir()  # a refused first run leaves no empty folder behind
            raise
        timings["load"][name] = time.perf_counter() - t0
        info = backend.describe()
        try:
            settings.check_loaded(name, info)
            store.record_fields = {"settings_hash": settings.record(name, cfg, info)}
            model_info[name] = {**info, "load_seconds": timings["load"][name]}
            c = run_model(backend, rows, store, cfg, bool(info.get("random_weights")))
            if cfg.attention.controls:  # each control prompt is scored once (VLMBackend.control_memo)
                memo = backend.control_memo
                c["control_prompts"] = {"computed": memo.computed, "reused": memo.reused}
            if cfg.faithfulness:  # the curves need the model: while it is loaded
                t1 = time.perf_counter()
                c["faithfulness"] = _faithfulness(backend, name, rows, cfg)
                timings.setdefault("faithfulness", {})[name] = time.perf_counter() - t1
        finally:
            backend.unload()
        timings["score"][name] = c["seconds"]
        counts[name] = c
        again = f", {c['rescored_changed']} scored again (their CSV row changed)" if c.get("rescored_changed") else ""
        print(f"{name}: {c['ok']} ok, {c['failed']} failed, {c['skipped_done']} already done{again}, "
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
        data_notes=[*plan.data_notes, *getattr(ds, "notes", ())],
        n_negated_rows=int(getattr(ds, "n_negated", 0)),
        models=model_info,
        counts=counts,
        timings_s={**manifest.data.get("timings_s", {}), **timings},
        settings_file="settings.json",
        random_weights=random_weights,
        note=RANDOM_NOTE if random_weights else None,
    )
    manifest.write()
    return 0
