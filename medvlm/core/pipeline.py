"""The analysis run: validated CSV -> each model in turn -> results store.

One model at a time over all selected studies (freed before the next loads, so a 16 GB GPU
fits the run). Each image is loaded once; whole studies (all their findings x paraphrases)
are packed into forward passes of at most `batch_size` questions, their prefixes batched.
Every row ends as a record, status "ok" or "failed" with its reason; a CUDA out-of-memory
error halves the batch and retries. Rerunning into the same folder skips finished rows.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from medvlm.analysis.sinks import NORM_FINDING, NORM_KIND
from medvlm.core.backend import PendingScores, VLMBackend
from medvlm.core.config import MODEL_NAMES, RunConfig, dist_env  # noqa: F401 - re-exported
from medvlm.core.store import GENERIC_FINDING, ResultsStore, map_key, read_results
from medvlm.data.data import ImageLoadError, load_image

BackendLoader = Callable[[RunConfig], VLMBackend]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _geometry_record(backend: VLMBackend, size: tuple[int, int]) -> dict:
    return backend.geometry(*size).to_record()


def _base_record(model: str, row, random_weights: bool, stamp: str | None) -> dict:
    """The fields every record has; stamp: image_stamp of the row's image."""
    return {
        "model": model,
        "study_id": str(row.study_id),
        "finding": str(row.finding),
        "variant_id": int(row.variant_id),
        "cluster_id": str(row.cluster_id),
        "subject_id": None if pd.isna(getattr(row, "subject_id", None)) else str(row.subject_id),
        "question": str(row.question),
        "answer_gt": str(row.answer_gt),
        "polarity": getattr(row, "polarity", None),
        "line": int(row.line),
        "image_path": str(row.image_abspath),
        "image_stamp": stamp,
        "random_weights": random_weights,
    }


def image_stamp(path) -> str | None:
    """"<bytes>:<modified, ns>" of an image file: an image replaced or edited in place changes
    it (so resume scores its rows again); None where the file cannot be read."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stamps(rows) -> dict:
    """{image path: image_stamp} of the rows' images, each file looked at once."""
    return {p: image_stamp(p) for p in {row.image_abspath for row in rows}}


def _ok_record(model: str, row, s, geometry: dict, notes, seconds: float, random_weights: bool,
               stamp: str | None) -> dict:  # fmt: skip
    rec = _base_record(model, row, random_weights, stamp)
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
        **{f"p_yes_{c}": p for c, p in s.controls.items()},
        geometry=geometry,
        image_notes=list(notes),
        seconds=seconds,
    )
    return rec


def _failed_records(model: str, rows, reason: str, random_weights: bool, tb: str | None = None) -> list[dict]:
    extra = {"traceback": tb} if tb else {}
    rows = list(rows)
    stamps = _stamps(rows)
    return [{**_base_record(model, row, random_weights, stamps[row.image_abspath]), "status": "failed", "error": reason,
             **extra} for row in rows]  # fmt: skip


def _halve(batch_size: int) -> int:
    """The batch after a CUDA out-of-memory error: half as many questions, cache emptied."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return max(1, batch_size // 2)


def _ok_results(model: str, rows, scores, geometry: dict, notes, seconds: float, random_weights: bool):
    """(records, maps) for rows scored successfully, one QuestionScore per row."""
    records, maps = [], {}
    rows = list(rows)
    stamps = _stamps(rows)
    for row, s in zip(rows, scores, strict=True):
        records.append(_ok_record(model, row, s, geometry, notes, seconds, random_weights, stamps[row.image_abspath]))
        maps[map_key(row.finding, row.variant_id)] = (s.layers, s.attention)
        if s.generic_attention is not None:  # the study's generic-prompt map (relative attention), stored once
            maps[map_key(GENERIC_FINDING, 0, "generic")] = (s.layers, s.generic_attention)
        if s.image_token_norms is not None:  # the study's image-token norms (medvlm.analysis.sinks), stored once
            maps[map_key(NORM_FINDING, 0, NORM_KIND)] = (s.layers, s.image_token_norms)
    return records, maps


def score_study(backend: VLMBackend, rows: pd.DataFrame, loaded, batch_size: int, random_weights: bool):
    """Score one study's rows (its image already loaded) in batches of batch_size questions.
    Returns (records, maps, batch_size_used).

    A failure is recorded per row with its reason; CUDA OOM halves the batch and retries.
    """
    model = backend.name
    records, maps = [], {}
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
                batch_size = _halve(batch_size)
                continue
            records += _failed_records(model, batch, f"{type(e).__name__}: {e}", random_weights,
                                       traceback.format_exc(limit=3))  # fmt: skip
            i += len(batch)
            continue
        dt = (time.perf_counter() - t0) / len(batch)
        ok_records, ok_maps = _ok_results(model, batch, scores, geometry, loaded.notes, dt, random_weights)
        records += ok_records
        maps.update(ok_maps)
        i += len(batch)
    return records, maps, batch_size


@dataclass
class PreparedStudies:
    """Host-side work for one pass: images read, the backend's prepare() done (or its error)."""

    failed: list  # (study_id, records, {}) for studies whose image could not be read
    ready: list  # (rows, LoadedImage)
    prepared: object = None
    error: BaseException | None = None


# threads that decode one pass's images (a pass holds at most a few dozen studies)
DECODE_THREADS = 8


def prepare_studies(backend: VLMBackend, studies: list[pd.DataFrame], random_weights: bool) -> PreparedStudies:
    """Read the studies' images and run backend.prepare on them (safe to run in a thread
    while the device scores the previous pass). The images are decoded in parallel threads
    (PNG, JPEG and DICOM decoders release the interpreter; decoding one after another was the
    runner's bottleneck on a GPU). Never raises for a bad study."""
    model = backend.name
    failed, ready = [], []

    def load(rows):
        try:
            return load_image(rows.iloc[0].image_abspath)
        except (ImageLoadError, OSError) as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(len(studies), DECODE_THREADS))) as pool:
        loaded = list(pool.map(load, studies))
    for rows, img in zip(studies, loaded, strict=True):
        if isinstance(img, BaseException):
            failed.append((rows.iloc[0].study_id, _failed_records(model, rows.itertuples(index=False),
                                                                   f"image: {img}", random_weights), {}))  # fmt: skip
        else:
            ready.append((rows, img))
    pre = PreparedStudies(failed, ready)
    if ready:
        try:
            pre.prepared = backend.prepare([(img.image, list(r.question), list(r.finding)) for r, img in ready])
        except Exception as e:  # noqa: BLE001 - scored study by study later, where errors are recorded
            pre.error = e
    return pre


@dataclass
class LaunchedStudies:
    """One pass of whole studies, its device work launched (or its launch failed): read it with
    finish_studies."""

    studies: list[pd.DataFrame]
    pre: PreparedStudies
    batch_size: int  # after the launch (halved on CUDA out-of-memory)
    started: float  # perf_counter at the launch
    pending: PendingScores | None = None  # None: scored study by study when read


def launch_studies(
    backend: VLMBackend,
    studies: list[pd.DataFrame],
    batch_size: int,
    random_weights: bool,
    pre: PreparedStudies | None = None,
) -> LaunchedStudies:
    """Launch one backend pass over several studies when their questions fit in batch_size
    (backend.launch_prepared: nothing waits for the GPU). A launch that fails leaves the
    studies to be scored one by one when read; CUDA OOM halves the batch first."""
    pre = pre or prepare_studies(backend, studies, random_weights)
    launched = LaunchedStudies(studies, pre, batch_size, time.perf_counter())
    n_questions = sum(len(rows) for rows, _ in pre.ready)
    if pre.ready and pre.error is None and (len(pre.ready) == 1 or n_questions <= batch_size):
        try:
            launched.pending = backend.launch_prepared(pre.prepared)
        except Exception as e:  # noqa: BLE001 - retried study by study when read, where errors are recorded
            if is_oom(e):
                launched.batch_size = _halve(batch_size)
    return launched


def finish_studies(backend: VLMBackend, launched: LaunchedStudies, random_weights: bool, since: float | None = None):
    """Read a launched pass: ([(study_id, records, maps)], batch size used). If its joint pass
    failed (at launch or when read), each study is scored alone (score_study), so one bad study
    cannot fail the others; CUDA OOM halves the batch first. Each record's seconds is the
    pass's share of the wall time per question: from `since` (the previous pass's reading, as
    passes overlap) or the launch, whichever is later, to this reading."""
    model = backend.name
    pre, batch_size = launched.pre, launched.batch_size
    out = list(pre.failed)
    scored = None
    if launched.pending is not None:
        try:
            scored = launched.pending.result()
        except Exception as e:  # noqa: BLE001 - retried study by study below, where errors are recorded
            if is_oom(e):
                batch_size = _halve(batch_size)
    if scored is not None:
        n_questions = sum(len(rows) for rows, _ in pre.ready)
        dt = (time.perf_counter() - max(launched.started, since or 0.0)) / max(n_questions, 1)
        for (rows, img), scores in zip(pre.ready, scored, strict=True):
            geometry = _geometry_record(backend, img.image.size)
            records, maps = _ok_results(model, rows.itertuples(index=False), scores, geometry, img.notes, dt,
                                        random_weights)  # fmt: skip
            out.append((rows.iloc[0].study_id, records, maps))
        return out, batch_size
    for rows, img in pre.ready:
        records, maps, batch_size = score_study(backend, rows, img, batch_size, random_weights)
        out.append((rows.iloc[0].study_id, records, maps))
    return out, batch_size


def score_studies(
    backend: VLMBackend,
    studies: list[pd.DataFrame],
    batch_size: int,
    random_weights: bool,
    pre: PreparedStudies | None = None,
):
    """Score several studies in one backend pass when their questions fit in batch_size
    (launch_studies, then finish_studies). Returns ([(study_id, records, maps)], batch size used).

    A study whose image cannot be read is recorded failed. If the joint pass fails, each
    study is scored alone (score_study), so one bad study cannot fail the others; CUDA OOM
    halves the batch first.
    """
    return finish_studies(backend, launch_studies(backend, studies, batch_size, random_weights, pre), random_weights)


def _next_chunk(groups: list[pd.DataFrame], i: int, batch_size: int) -> tuple[list[pd.DataFrame], int]:
    """Whole studies from groups[i:] up to batch_size questions (at least one study)."""
    chunk, n = [], 0
    while i < len(groups) and (not chunk or n + len(groups[i]) <= batch_size):
        chunk.append(groups[i])
        n += len(groups[i])
        i += 1
    return chunk, i


def _write_results(store: ResultsStore, model: str, results) -> None:
    for study, records, maps in results:
        store.write_study(model, str(study), records, maps)


# what a stored record must still agree on with the CSV's row to count as done
_ROW_FIELDS = {"question": "question", "answer_gt": "answer_gt", "polarity": "polarity", "image_path": "image_abspath"}


def pending_rows(store: ResultsStore, model: str, rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(rows still to score, how many of them were done but changed in the CSV since).

    A row is done when the store's latest record for its key is ok and still has the CSV's
    question, image, answer_gt and polarity, and its image file the size and modification time
    recorded (image_stamp); a row whose CSV line changed (a fixed label, a reworded question)
    or whose image was replaced in place is scored again, and its new record supersedes the
    old one. (Records written before image stamps existed are not compared on it.)"""
    df = read_results(store.root)
    if df.empty:
        return rows, 0
    ok = df[(df["model"] == model) & (df["status"] == "ok")]
    stored = {(str(r["study_id"]), str(r["finding"]), int(r["variant_id"])): r for r in ok.to_dict("records")}
    keep, changed, stamps = [], 0, {}
    for row in rows.itertuples(index=False):
        rec = stored.get((str(row.study_id), str(row.finding), int(row.variant_id)))
        if rec is None:
            keep.append(True)
            continue
        path = getattr(row, "image_abspath", None)
        if path not in stamps:
            stamps[path] = image_stamp(path)
        same = all(_same(rec.get(k), getattr(row, col, None)) for k, col in _ROW_FIELDS.items())
        same = same and _same(rec.get("image_stamp"), stamps[path])
        keep.append(not same)
        changed += not same
    return rows[keep], changed


def _same(stored, current) -> bool:
    """Stored and CSV values agree (a field the record or the CSV does not have counts as equal)."""
    missing = (lambda v: v is None or (isinstance(v, float) and v != v))  # noqa: E731
    if missing(stored) or missing(current):
        return True
    return str(stored) == str(current)


def run_model(
    backend: VLMBackend,
    rows: pd.DataFrame,
    store: ResultsStore,
    cfg: RunConfig,
    random_weights: bool,
) -> dict:
    """Score every not-yet-finished row of `rows` with one backend, packing whole studies into
    forward passes of at most cfg.batch_size questions. Passes overlap: each is launched
    (launch_studies) before the previous one is read (finish_studies), so the GPU runs it while
    the host reads, records and hands over the previous one; meanwhile one thread prepares the
    pass after it (images and prompts; not while generating text, which shares the tokenizer)
    and another writes results, in order; a failed write stops the run at the next pass.
    Returns counts and timing."""
    model = backend.name
    pending, changed = pending_rows(store, model, rows)
    groups = [g for _, g in pending.groupby("study_id", sort=False)]
    counts = {"skipped_done": int(len(rows) - len(pending)), "ok": 0, "failed": 0, "studies": len(groups),
              "rescored_changed": changed}  # fmt: skip
    t0 = time.perf_counter()
    batch_size = cfg.batch_size or backend.default_batch_size
    prefetch = not cfg.attention.generate
    gradients = [k for k in cfg.attribution if k != "attention"]
    bar = tqdm(total=len(groups), desc=model, unit="study", disable=None)
    written = None  # the previous pass's write
    last_read = None  # when the previous pass was read

    def read(launched: LaunchedStudies) -> None:
        """Read a launched pass, add its gradient maps, hand its results to the writer."""
        nonlocal batch_size, written, last_read
        results, used = finish_studies(backend, launched, random_weights, since=last_read)
        last_read = time.perf_counter()
        batch_size = min(batch_size, used)
        if gradients:  # gradient maps of the pass's answered questions, into the same maps files
            from medvlm.analysis.faithfulness_run import add_gradient_maps

            images = {str(r.iloc[0].study_id): img.image for r, img in launched.pre.ready}
            add_gradient_maps(backend, [(str(st), rec, mp) for st, rec, mp in results], images, gradients)
        if written is not None:
            written.result()  # raises the previous write's error, if any
        written = writer.submit(_write_results, store, model, results)
        for _, records, _ in results:
            for r in records:
                counts[r["status"]] += 1
        bar.update(len(launched.studies))

    with ThreadPoolExecutor(max_workers=1) as pool, ThreadPoolExecutor(max_workers=1) as writer:
        chunk, i = _next_chunk(groups, 0, batch_size)
        future = pool.submit(prepare_studies, backend, chunk, random_weights) if chunk and prefetch else None
        previous = None  # the pass launched last, not yet read
        while chunk:
            pre = future.result() if future is not None else None
            nxt, i_next = _next_chunk(groups, i, batch_size)
            future = pool.submit(prepare_studies, backend, nxt, random_weights) if nxt and prefetch else None
            current = launch_studies(backend, chunk, batch_size, random_weights, pre)
            batch_size = current.batch_size
            if previous is not None:
                read(previous)  # while the device runs `current`
            previous, chunk, i = current, nxt, i_next
        if previous is not None:
            read(previous)
        if written is not None:
            written.result()
    bar.close()
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
