"""Wiring for run_medical_vlm_analysis.py: validate -> score each model -> analyse -> figures,
tables, manifest and report. The science lives in the modules this calls."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from medvlm.data import DatasetError, load_dataset, select_studies
from medvlm.pipeline import RunConfig, run_model, shard_rows
from medvlm.reporting import RANDOM_NOTE, analyze
from medvlm.store import ResultsStore


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
