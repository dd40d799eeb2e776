"""The analysis run: validated CSV -> each model in turn -> results store.

One model at a time over all selected studies (freed before the next loads, so a 16 GB GPU
fits the run). Per study the image is loaded once and all its questions (findings x
paraphrases) are scored in batches of `batch_size` questions against one shared prefix.
Every row ends as a record, status "ok" or "failed" with its reason; a CUDA out-of-memory
error halves the batch and retries. Rerunning into the same folder skips finished rows.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from medvlm.backend import VLMBackend
from medvlm.config import MedicalAttentionConfig
from medvlm.data import ImageLoadError, load_image
from medvlm.store import ResultsStore, map_key

MODEL_NAMES = ("llava_rad", "medgemma")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is made of; recorded in the manifest."""

    output_dir: Path
    csv: Path | None = None
    image_root: Path | None = None
    models: tuple[str, ...] = MODEL_NAMES
    n_studies: int | None = None
    sample: int | None = None
    seed: int = 0
    cluster_by: str = "study_id"
    llava_rad_model: str = "microsoft/llava-rad"
    llava_rad_base: str = "lmsys/vicuna-7b-v1.5"
    medgemma_model: str = "google/medgemma-4b-it"
    dtype: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    batch_size: int = 36
    strict: bool = False
    overwrite: bool = False
    analyze_only: bool = False
    demo: bool = False
    random_models: str | None = None  # None (real weights), "tiny" or "full" (random, real shapes: timing)
    attention: MedicalAttentionConfig = field(default_factory=MedicalAttentionConfig)
    n_boot: int = 10_000
    bootstrap_seed: int = 0
    n_figure_studies: int = 3
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown or not self.models:
            raise ValueError(f"unknown model(s) {unknown}; valid: {', '.join(MODEL_NAMES)}")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("choose one of --load_in_8bit and --load_in_4bit")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_studies is not None and self.sample is not None:
            raise ValueError("--n_studies and --sample are exclusive")
        if self.random_models not in (None, "tiny", "full"):
            raise ValueError(f"random_models must be None, 'tiny' or 'full', got {self.random_models!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def device(self) -> str:
        """This process's device: its own GPU under `accelerate launch`, else cuda or cpu."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    @property
    def quantization(self) -> str | None:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


BackendLoader = Callable[[RunConfig], VLMBackend]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _geometry_record(backend: VLMBackend, size: tuple[int, int]) -> dict:
    g = backend.geometry(*size)
    return {"image_size": list(g.image_size), "crop_box": list(g.crop_box), "grid": list(g.grid),
            "input_size": g.input_size}  # fmt: skip


def _base_record(model: str, row, random_weights: bool) -> dict:
    return {
        "model": model,
        "study_id": str(row.study_id),
        "finding": str(row.finding),
        "variant_id": int(row.variant_id),
        "cluster_id": str(row.cluster_id),
        "subject_id": None if pd.isna(getattr(row, "subject_id", None)) else str(row.subject_id),
        "question": str(row.question),
        "answer_gt": str(row.answer_gt),
        "line": int(row.line),
        "image_path": str(row.image_abspath),
        "random_weights": random_weights,
    }


def score_study(backend: VLMBackend, rows: pd.DataFrame, batch_size: int, random_weights: bool):
    """Score one study's rows (one image). Returns (records, maps, batch_size_used).

    A failure is recorded per row with its reason; CUDA OOM halves the batch and retries.
    """
    model = backend.name
    first = rows.iloc[0]
    records, maps = [], {}
    try:
        loaded = load_image(first.image_abspath)
    except (ImageLoadError, OSError) as e:
        for row in rows.itertuples(index=False):
            records.append({**_base_record(model, row, random_weights), "status": "failed",
                            "error": f"image: {e}"})  # fmt: skip
        return records, maps, batch_size
    geometry = _geometry_record(backend, loaded.image.size)
    todo = list(rows.itertuples(index=False))
    i = 0
    while i < len(todo):
        batch = todo[i : i + batch_size]
        t0 = time.perf_counter()
        try:
            scores = backend.score(loaded.image, [r.question for r in batch], [r.finding for r in batch])
        except Exception as e:  # recorded per row, never swallowed silently
            if is_oom(e) and batch_size > 1:
                batch_size = max(1, batch_size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            reason = f"{type(e).__name__}: {e}"
            for row in batch:
                records.append({**_base_record(model, row, random_weights), "status": "failed", "error": reason,
                                "traceback": traceback.format_exc(limit=3)})  # fmt: skip
            i += len(batch)
            continue
        dt = (time.perf_counter() - t0) / len(batch)
        for row, s in zip(batch, scores, strict=True):
            rec = _base_record(model, row, random_weights)
            rec.update(
                status="ok",
                error=None,
                prompt=s.prompt,
                p_yes=s.p_yes,
                coverage=s.coverage,
                answer=s.answer,
                correct=s.answer == row.answer_gt,
                n_query_tokens=s.n_query_tokens,
                image_mass=[float(x) for x in s.image_mass],
                layers=list(s.layers),
                generated_text=s.generated_text,
                generated_answer=s.generated_answer,
                geometry=geometry,
                image_notes=list(loaded.notes),
                seconds=dt,
            )
            records.append(rec)
            maps[map_key(row.finding, row.variant_id)] = (s.layers, s.attention)
        i += len(batch)
    return records, maps, batch_size


def run_model(
    backend: VLMBackend,
    rows: pd.DataFrame,
    store: ResultsStore,
    cfg: RunConfig,
    random_weights: bool,
) -> dict:
    """Score every not-yet-finished row of `rows` with one backend. Returns counts and timing."""
    done = store.done_keys()
    model = backend.name
    pending = rows[[(model, str(s), f, int(v)) not in done
                    for s, f, v in rows[["study_id", "finding", "variant_id"]].itertuples(index=False)]]  # fmt: skip
    studies = list(dict.fromkeys(pending["study_id"]))
    counts = {"skipped_done": int(len(rows) - len(pending)), "ok": 0, "failed": 0, "studies": len(studies)}
    t0 = time.perf_counter()
    batch_size = cfg.batch_size
    for study in tqdm(studies, desc=model, unit="study", disable=None):
        study_rows = pending[pending["study_id"] == study]
        records, maps, batch_size = score_study(backend, study_rows, batch_size, random_weights)
        store.write_study(model, str(study), records, maps)
        for r in records:
            counts[r["status"]] += 1
    counts["seconds"] = time.perf_counter() - t0
    counts["final_batch_size"] = batch_size
    return counts


def shard_rows(rows: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """The studies this process scores: every world_size-th study in file order."""
    if world_size == 1:
        return rows
    studies = list(dict.fromkeys(rows["study_id"]))
    mine = set(studies[rank::world_size])
    return rows[rows["study_id"].isin(mine)]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment `accelerate launch` / torchrun set."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
