"""Deletion and insertion curves on the answer's confidence (RISE: Petsiuk, Das and Saenko,
"RISE: Randomized input sampling for explanation of black-box models", BMVC 2018), and the
faithfulness table.

For one unit (model, study, finding, paraphrase) and one map over the model's image tokens:
rank the token cells by the map, then perturb the image in the model's own input space (the
normalised pixel tensor the vision tower reads) one token cell at a time, in K steps:

    cells  the grid cells that pool into one image token: LLaVA-Rad 14 x 14 px of its 518 px
           center crop (37 x 37), MedGemma 56 x 56 px of its 896 px square (16 x 16); in general
           input side / grid side
    step k the first n_k = floor(k N / K + 1/2) cells in map order, k = 0..K (N cells)
    deletion   those cells replaced by the substrate (--substrate blur: the image's Gaussian
               blur; mean: 0 in normalised space, the normalisation's mean colour)
    insertion  starting from the fully blurred image, those cells restored to the original
    score  the model's P of the answer it gave on the unperturbed image (the scoring pass's
           answer), renormalised over yes / no: P(yes) for "yes", 1 - P(yes) for "no"
    AUC    RISE's: (sum of the K + 1 scores - first / 2 - last / 2) / K, the trapezoid over
           equally spaced points, in [0, 1]. Deletion: lower = more faithful; insertion: higher.

Where this departs from RISE, and why:
- cells, not pixels: a map has one value per token, and the model reads a token per cell.
  RISE removes a fixed pixel count per step; here n_k is rounded to whole cells, so point k
  sits at n_k / N, within 1 / (2N) of k / K, and the AUC treats the points as equally spaced,
  as RISE's does.
- blur: RISE convolves with an 11 x 11 kernel made by Gaussian-filtering a delta at sigma 5
  (their 224 px input; zero padding darkens the border). Here sigma is RISE's 5 px scaled to
  the model's input side (5 x 518 / 224 = 11.6 px for LLaVA-Rad, 5 x 896 / 224 = 20 px for
  MedGemma), the kernel is the sampled Gaussian truncated at 4 sigma, normalised, separable,
  with reflected borders (no darkening): scipy.ndimage.gaussian_filter's, mode "mirror".
  FaithfulnessConfig.blur_sigma overrides it.
- score: RISE scores the class softmax; here the answer's probability renormalised over the
  two answers (the project's P(yes)).
- ties in a map are broken by a seeded random permutation (RISE: numpy's argsort order),
  so raster order never decides.
- signed maps (gradxinput) are ranked by their value toward the answer given (s x value,
  s = +1 for "yes", -1 for "no"): the cells that most support the answer go first.
Baselines: R (default 3) seeded random orders per unit, their curves averaged ("random"), and
every other map given. Per unit and map the record holds both AUCs and their differences from
random and from raw attention (same unit: paired); the table pools them over units with
cluster-bootstrap intervals (medvlm.analysis.tables.metric_table; the study is the cluster).

Cost: every perturbed image is a new prefix (vision tower + decoder prefix). The perturbed
images of all units of all studies given are scored in the backend's own packed pass
(prepare / score_prepared, one question per image, no attention captured, no controls),
images_per_pass at a time, built on the device from the study's original and substrate
tensors; identical perturbed images within a unit (shared endpoints, equal prefixes) are
scored once. Unique images per unit <= 2 + 2 (K - 1) (maps + R) (+1 with the mean substrate).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from medvlm.analysis.tables import metric_table
from medvlm.core.medgemma_pixels import normalize_pixels

SUBSTRATES = ("blur", "mean")
RISE_SIGMA_PX = 5.0  # RISE's blur sigma (klen 11, nsig 5) ...
RISE_INPUT_SIDE = 224  # ... at its 224 px input
#: maps ranked by their value toward the answer given (signed maps)
SIGNED_KINDS = ("gradxinput",)
RANDOM = "random"
MAP_ORDER = ("attention", "relative", "generic", "gradxinput", "relevancy", RANDOM)
METRICS = ("deletion_auc", "insertion_auc")
DIFF_METRICS = {
    RANDOM: ("deletion_auc_minus_random", "insertion_auc_minus_random"),
    "attention": ("deletion_auc_minus_attention", "insertion_auc_minus_attention"),
}


@dataclass(frozen=True)
class FaithfulnessConfig:
    """steps K (points k = 0..K); substrate of deletion ("blur" | "mean"); n_random R seeded
    random orders; seed (random orders and tie-breaking); blur_sigma in model-input pixels
    (None: RISE's 5 px at 224 scaled to the input side); images_per_pass (None: the backend's
    studies per scoring pass, default_batch_size // 6); variants "0", "all" or "0,3"."""

    steps: int = 16
    substrate: str = "blur"
    n_random: int = 3
    seed: int = 0
    blur_sigma: float | None = None
    images_per_pass: int | None = None
    variants: str = "0"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.substrate not in SUBSTRATES:
            raise ValueError(f"unknown substrate {self.substrate!r}; valid: {', '.join(SUBSTRATES)}")
        if self.n_random < 1:
            raise ValueError(f"n_random must be >= 1, got {self.n_random}")
        if self.blur_sigma is not None and not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
        parse_variants(self.variants)


def parse_variants(spec: str) -> tuple[int, ...] | None:
    """--faithfulness_variants: "all" -> None (every paraphrase), "0" or "0,3" -> those ids."""
    spec = str(spec).strip()
    if spec == "all":
        return None
    try:
        out = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError as e:
        raise ValueError(f"faithfulness variants must be 'all' or comma-separated ids, got {spec!r}") from e
    if not out or min(out) < 0:
        raise ValueError(f"faithfulness variants must be 'all' or ids >= 0, got {spec!r}")
    return out


def blur_sigma(cfg: FaithfulnessConfig, input_side: int) -> float:
    """The blur's sigma in model-input pixels: cfg.blur_sigma, else 5 x input_side / 224."""
    return float(cfg.blur_sigma) if cfg.blur_sigma is not None else RISE_SIGMA_PX * input_side / RISE_INPUT_SIDE


# -- pure pieces ----------------------------------------------------------------------------
def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """[K, C, H, W] float -> the same, each channel convolved with the sampled Gaussian
    exp(-x^2 / (2 sigma^2)), radius int(4 sigma + 1/2), normalised, separably, with reflected
    borders: scipy.ndimage.gaussian_filter(mode="mirror", truncate=4.0) per channel. (Blur is
    linear with unit weight, so blurring normalised pixels equals normalising blurred ones.)"""
    radius = max(1, int(4.0 * sigma + 0.5))
    if radius >= min(pixels.shape[-2:]):
        raise ValueError(f"blur radius {radius} px (sigma {sigma}) is not smaller than the image {pixels.shape[-2:]}")
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2.0 * sigma**2))
    k = (k / k.sum()).to(device=pixels.device, dtype=pixels.dtype)
    n, c, h, w = pixels.shape
    y = torch.nn.functional.pad(pixels.reshape(n * c, 1, h, w), (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y.view(n, c, h, w)


def step_counts(n_cells: int, steps: int) -> np.ndarray:
    """[steps + 1] int: n_k = floor(k n_cells / steps + 1/2), from 0 to n_cells."""
    k = np.arange(steps + 1, dtype=np.int64)
    return (2 * k * n_cells + steps) // (2 * steps)


def cell_pixel_mask(removed: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """removed [B, rows * cols] bool (token j = cell (j // cols, j % cols)) -> [B, 1, side, side]
    bool: True on every pixel of the removed cells. The side must be a multiple of the grid."""
    rows, cols = grid
    if side % rows or side % cols:
        raise ValueError(f"input side {side} is not a whole number of {rows} x {cols} cells")
    if removed.shape[-1] != rows * cols:
        raise ValueError(f"{removed.shape[-1]} cell flags for a {rows} x {cols} grid")
    m = removed.view(-1, rows, cols)
    m = m.repeat_interleave(side // rows, dim=1).repeat_interleave(side // cols, dim=2)
    return m[:, None]


def perturb(original: torch.Tensor, substrate: torch.Tensor, removed: torch.Tensor, grid) -> torch.Tensor:
    """original, substrate [C, S, S] (or [B, C, S, S] per image); removed [B, n_cells] bool ->
    [B, C, S, S]: substrate on the removed cells' pixels, original elsewhere."""
    mask = cell_pixel_mask(removed.to(original.device), grid, original.shape[-1])
    return torch.where(mask, substrate, original)


def rise_auc(scores) -> float:
    """RISE's auc(arr): (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (len(arr) - 1)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or a.size < 2:
        raise ValueError(f"a curve needs at least 2 points, got shape {a.shape}")
    return float((a.sum() - a[0] / 2 - a[-1] / 2) / (a.size - 1))


def _unit_seed(seed: int, study_id, finding, variant_id, stream: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{study_id}|{finding}|{int(variant_id)}".encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng([int(seed), stream, *words])


def rank_order(values: np.ndarray, rng: np.random.Generator, sign: float = 1.0) -> np.ndarray:
    """Cells in decreasing sign * value, ties in a random order drawn from rng: [n] int."""
    v = sign * np.asarray(values, dtype=np.float64)
    perm = rng.permutation(v.size)
    return perm[np.argsort(-v[perm], kind="stable")]


# -- scoring perturbed pixels through the backend's own pass -----------------------------------
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _placeholder_pixels(images):
    return torch.zeros((len(images), 3, 1, 1))


def scoring_view(backend):
    """A shallow copy of the backend that scores one question per image with nothing extra:
    no controls, no generic prompt, no generation, no attention captured (layers ()), and
    pixel_values() a placeholder (the caller puts the perturbed pixels into the prepared pass).
    The model, tokenizer and processor are shared, never copied; the prompt caches are its own.
    Cached per backend while its config and model stay the same."""
    hit = _VIEWS.get(backend)
    if hit is not None and hit[0] is backend.config and hit[1] is backend.model:
        hit[2].compiled = backend.compiled  # compile() after the view was made: its pass skips the fused norms too
        return hit[2]
    view = copy.copy(backend)
    view.config = dataclasses.replace(backend.config, controls=(), generic_prompt=None, generate=False)
    view.layers = ()
    view.keep_logits = False
    view.pixel_values = _placeholder_pixels
    for cache in ("_token_cache", "_prompt_cache"):
        if hasattr(backend, cache):
            setattr(view, cache, {})
    _VIEWS[backend] = (backend.config, backend.model, view)
    return view


def _device(backend) -> torch.device:
    dev = getattr(backend, "device", None)
    return torch.device(dev) if dev is not None else next(backend.model.parameters()).device


def model_pixels(backend, images) -> torch.Tensor:
    """[K, 3, S, S] float32 on the backend's device: the normalised pixels its vision tower
    reads (backend.pixel_values; MedGemma's 8-bit pixels normalised by the processor's own
    rescale_and_normalize, as its pass does on the device)."""
    px = backend.pixel_values(list(images)).to(_device(backend))
    if px.dtype == torch.uint8:
        processor = getattr(backend, "processor", None)
        if processor is None:
            raise ValueError(f"backend {backend.name!r} gave 8-bit pixels and has no processor to normalise them")
        px = normalize_pixels(processor.image_processor, px)
    if not px.is_floating_point():
        raise ValueError(f"backend {backend.name!r} gave {px.dtype} pixels")
    return px.float()


def score_pixels(backend, images, questions, findings, pixels: torch.Tensor) -> np.ndarray:
    """P(yes) [N] of N (image, question) pairs with the image's model-input pixels replaced by
    pixels [N, 3, S, S], in one pass of the backend's own prepare / score_prepared
    (scoring_view: one question per image, nothing extra). images only name the pass's studies
    (MedGemma checks each question's tokens against its processor once); their pixels are
    never used."""
    view = scoring_view(backend)
    items = [(im, [q], None if f is None else [f]) for im, q, f in zip(images, questions, findings, strict=True)]
    prep = view.prepare(items)
    prep["pixel_values"] = pixels
    return np.array([s[0].p_yes for s in view.score_prepared(prep)], dtype=np.float64)


# -- the units --------------------------------------------------------------------------------------
@dataclass
class _Unit:
    study: int  # index into the studies given
    study_id: str
    finding: str
    variant_id: int
    question: str
    answer: str
    orders: dict  # map name -> [n] cell order; "random" -> [R, n]
    unavailable: dict  # map name -> reason


def _units(studies, n_cells: int, cfg: FaithfulnessConfig) -> list[_Unit]:
    wanted = parse_variants(cfg.variants)
    units = []
    for s, (study_id, _, rows, maps_by_kind) in enumerate(studies):
        for i, row in enumerate(rows):
            v = int(row["variant_id"])
            if wanted is not None and v not in wanted:
                continue
            answer = str(row["answer"])
            if answer not in ("yes", "no"):
                raise ValueError(f"study {study_id} row {i}: answer must be 'yes' or 'no', got {answer!r}")
            sign = 1.0 if answer == "yes" else -1.0
            orders, unavailable = {}, {}
            tie = _unit_seed(cfg.seed, study_id, row["finding"], v, 1)
            for kind, per_row in maps_by_kind.items():
                if kind == RANDOM:
                    raise ValueError(f"'{RANDOM}' is the baseline's name, not a map kind")
                value = per_row[i]
                if value is None or isinstance(value, str):
                    unavailable[kind] = value or "map unavailable"
                    continue
                value = np.asarray(value, dtype=np.float64)
                if value.shape != (n_cells,):
                    raise ValueError(f"study {study_id} row {i}: {kind} map has shape {value.shape}, "
                                     f"expected ({n_cells},)")  # fmt: skip
                if not np.isfinite(value).all():
                    unavailable[kind] = f"{int((~np.isfinite(value)).sum())} non-finite map values"
                    continue
                orders[kind] = rank_order(value, tie, sign if kind in SIGNED_KINDS else 1.0)
            rng = _unit_seed(cfg.seed, study_id, row["finding"], v, 0)
            orders[RANDOM] = np.stack([rng.permutation(n_cells) for _ in range(cfg.n_random)])
            units.append(_Unit(s, str(study_id), str(row["finding"]), v, str(row["question"]), answer,
                               orders, unavailable))  # fmt: skip
    return units


def faithfulness_for_studies(backend, studies: Sequence[tuple], cfg: FaithfulnessConfig | None = None,
                             model: str | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Deletion and insertion curves of every chosen unit of several studies, batched together.

    backend  a loaded backend (LLaVARadMedical, MedGemmaMedical, or any VLMBackend whose
             prepare() / score_prepared() take model-input pixels in prep["pixel_values"])
    studies  [(study_id, image, rows, maps_by_kind), ...]:
             image         the study's image as score() takes it
             rows          [{"finding", "variant_id", "question", "answer" ("yes"/"no": the
                           scoring pass's answer)}, ...]; rows of other variants than
                           cfg.variants are skipped
             maps_by_kind  {kind: [one entry per row: [n_image] float map (e.g. MapReader.get),
                           or None / a reason string where that map is unavailable]}
    model    the model entry's name in the records (default backend.name)
    returns  (records, curves):
             records  one dict per (unit, map) and for "random": model, study_id, finding,
                      variant_id, map, status ("ok" / "unavailable"), reason, deletion_auc,
                      insertion_auc, the four differences (DIFF_METRICS; NaN for a map's own
                      baseline or where it is missing), answer, p_answer (unperturbed),
                      p_answer_deleted (all cells removed), p_answer_blurred (insertion's start),
                      steps, n_cells, substrate, blur_sigma, n_random, seed, n_images (unique
                      perturbed images the unit needed)
             curves   one dict per (unit, map ok, curve): the unit's keys, map, curve
                      ("deletion" / "insertion"), cells [K + 1] (n_k), score [K + 1]
    """
    cfg = cfg or FaithfulnessConfig()
    if not studies:
        return [], []
    model = model or backend.name
    grid = tuple(backend.grid)
    n_cells = grid[0] * grid[1]
    images = [backend.checked_items([(im, ["?"], None)])[0][0] for _, im, _, _ in studies]
    units = _units(studies, n_cells, cfg)
    if not units:
        return [], []
    used = sorted({u.study for u in units})
    slot = {s: i for i, s in enumerate(used)}
    originals = model_pixels(backend, [images[s] for s in used])  # [S, 3, side, side] float32
    side = originals.shape[-1]
    sigma = blur_sigma(cfg, side)
    dtype = _model_dtype(backend)  # what the tower reads: selecting before or after the cast is the same
    blurred = gaussian_blur(originals, sigma).to(dtype)
    # [2 S, 3, side, side]: the studies' substrates, blur first, then mean (0 in normalised space)
    substrates = torch.cat([blurred, torch.zeros_like(blurred)]) if cfg.substrate == "mean" else blurred
    originals = originals.to(dtype)
    counts = step_counts(n_cells, cfg.steps)
    # every unit's images, deduplicated within the unit: key (substrate, removed cells)
    jobs: list[tuple[int, str, np.ndarray]] = []  # (unit index, substrate, removed [n] bool)
    index: dict[tuple, int] = {}
    plan = []  # per unit: {(map, curve, order index): [job per step]}

    def job(u: int, substrate: str, removed: np.ndarray) -> int:
        key = (u, "none" if not removed.any() else substrate, removed.tobytes())
        if key not in index:
            index[key] = len(jobs)
            jobs.append((u, key[1], removed))
        return index[key]

    for u, unit in enumerate(units):
        entry = {}
        for name, order in unit.orders.items():
            for o, seq in enumerate(order if name == RANDOM else [order]):
                rank = np.empty(n_cells, dtype=np.int64)
                rank[seq] = np.arange(n_cells)
                for curve, sub in (("deletion", cfg.substrate), ("insertion", "blur")):
                    ids = []
                    for n in counts:
                        first = rank < n
                        ids.append(job(u, sub, first if curve == "deletion" else ~first))
                    entry[(name, curve, o)] = ids
        plan.append(entry)
    p_yes = np.empty(len(jobs))
    per_pass = int(cfg.images_per_pass or max(1, getattr(backend, "default_batch_size", 6) // 6))
    for lo in range(0, len(jobs), per_pass):
        chunk = jobs[lo : lo + per_pass]
        us = [units[u] for u, _, _ in chunk]
        pixels = _chunk_pixels(originals, substrates, [slot[x.study] for x in us], chunk, grid)
        p_yes[lo : lo + len(chunk)] = score_pixels(backend, [images[x.study] for x in us], [x.question for x in us],
                                                   [x.finding for x in us], pixels)  # fmt: skip
    return _collect(units, plan, jobs, p_yes, counts, model, cfg, sigma, n_cells)


def _model_dtype(backend) -> torch.dtype:
    dtype = getattr(backend, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    model = getattr(backend, "model", None)
    return next(model.parameters()).dtype if model is not None else torch.float32


def _chunk_pixels(originals, substrates, slots, chunk, grid) -> torch.Tensor:
    """One pass's perturbed images [B, 3, S, S], built on the device in a few kernels: each
    job's study original with its substrate on its removed cells (an unperturbed job removes
    nothing). substrates: [n S, 3, S, S], the blur of every study, then the mean if used. One
    study and one substrate in the pass (the usual case): one where() over broadcast views."""
    from medvlm.core.engine import to_device  # here: the table and report need no transformers

    device = originals.device
    removed = to_device(torch.from_numpy(np.stack([r for _, _, r in chunk])), device)
    mask = cell_pixel_mask(removed, grid, originals.shape[-1])  # [B, 1, S, S]
    named = [SUBSTRATES.index(s) for _, s, _ in chunk if s in SUBSTRATES]
    which = [SUBSTRATES.index(s) if s in SUBSTRATES else (named[0] if named else 0) for _, s, _ in chunk]
    n = originals.shape[0]
    if len(set(slots)) == 1 and len(set(which)) == 1:
        at = which[0] * n + slots[0]
        return torch.where(mask, substrates[at : at + 1], originals[slots[0] : slots[0] + 1])
    index = to_device(torch.tensor(slots), device)
    flat = to_device(torch.tensor([w * n + s for w, s in zip(which, slots, strict=True)]), device)
    return torch.where(mask, substrates.index_select(0, flat), originals.index_select(0, index))


def _collect(units, plan, jobs, p_yes, counts, model, cfg, sigma, n_cells) -> tuple[list[dict], list[dict]]:
    per_unit_images = np.bincount([u for u, _, _ in jobs], minlength=len(units))
    records, curves = [], []
    for u, unit in enumerate(units):
        p = p_yes if unit.answer == "yes" else 1.0 - p_yes
        keys = {"model": model, "study_id": unit.study_id, "finding": unit.finding, "variant_id": unit.variant_id}
        entry = plan[u]
        result = {}
        for name in unit.orders:
            n_orders = len(unit.orders[name]) if name == RANDOM else 1
            dele = np.mean([p[entry[(name, "deletion", o)]] for o in range(n_orders)], axis=0)
            ins = np.mean([p[entry[(name, "insertion", o)]] for o in range(n_orders)], axis=0)
            result[name] = (dele, ins)
            for curve, values in (("deletion", dele), ("insertion", ins)):
                curves.append({**keys, "map": name, "curve": curve, "cells": counts.tolist(),
                               "score": [float(x) for x in values]})  # fmt: skip
        auc = {name: (rise_auc(d), rise_auc(i)) for name, (d, i) in result.items()}
        first = result[RANDOM][0]
        common = {"answer": unit.answer, "p_answer": float(first[0]), "p_answer_deleted": float(first[-1]),
                  "p_answer_blurred": float(result[RANDOM][1][0]), "steps": cfg.steps, "n_cells": n_cells,
                  "substrate": cfg.substrate, "blur_sigma": sigma, "n_random": cfg.n_random, "seed": cfg.seed,
                  "n_images": int(per_unit_images[u])}  # fmt: skip
        for name in [*[k for k in unit.orders if k != RANDOM], *unit.unavailable, RANDOM]:
            rec = {**keys, "map": name, **common}
            if name in auc:
                rec.update(status="ok", reason=None, deletion_auc=auc[name][0], insertion_auc=auc[name][1])
            else:
                rec.update(status="unavailable", reason=unit.unavailable[name], deletion_auc=np.nan,
                           insertion_auc=np.nan)  # fmt: skip
            for base, (d_name, i_name) in DIFF_METRICS.items():
                ok = name != base and name in auc and base in auc
                rec[d_name] = auc[name][0] - auc[base][0] if ok else np.nan
                rec[i_name] = auc[name][1] - auc[base][1] if ok else np.nan
            records.append(rec)
    return records, curves


def faithfulness_for_study(backend, study_id, image, rows, maps_by_kind, cfg: FaithfulnessConfig | None = None,
                           model: str | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """faithfulness_for_studies for one study (see there); prefer several studies per call:
    their perturbed images share passes."""
    return faithfulness_for_studies(backend, [(study_id, image, rows, maps_by_kind)], cfg, model)


# -- storage: one line per (unit, map), the curves inside --------------------------------------------
UNIT_KEY = ("model", "study_id", "finding", "variant_id", "map")


def merge_curves(records: Sequence[Mapping], curves: Sequence[Mapping], decimals: int = 6) -> list[dict]:
    """The compact form for the results (e.g. faithfulness_units.jsonl): each record with its
    "deletion" and "insertion" scores ([K + 1], rounded to `decimals`); the cells per step are
    step_counts(n_cells, steps), so they are not repeated. An unavailable map has no curves."""
    by_key = {(*(c[k] for k in UNIT_KEY), c["curve"]): c for c in curves}
    out = []
    for r in records:
        row = dict(r)
        for curve in ("deletion", "insertion"):
            c = by_key.get((*(r[k] for k in UNIT_KEY), curve))
            row[curve] = None if c is None else [round(float(x), decimals) for x in c["score"]]
        out.append(row)
    return out


def split_curves(rows: Sequence[Mapping] | pd.DataFrame) -> list[dict]:
    """merge_curves' rows -> the curve dicts faithfulness_figures takes (cells rebuilt)."""
    rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    out = []
    for r in rows:
        for curve in ("deletion", "insertion"):
            score = r.get(curve)
            if score is None or (isinstance(score, float) and np.isnan(score)):
                continue
            cells = step_counts(int(r["n_cells"]), int(r["steps"])).tolist()
            out.append({**{k: r[k] for k in UNIT_KEY}, "curve": curve, "cells": cells, "score": list(score)})
    return out


# -- tables -------------------------------------------------------------------------------------
def map_sort_key(name: str) -> tuple[int, str]:
    return (MAP_ORDER.index(name) if name in MAP_ORDER else len(MAP_ORDER) - 1, name)


def faithfulness_units(records: Sequence[Mapping] | pd.DataFrame, clusters: Mapping | None = None) -> pd.DataFrame:
    """The records as metric_table units: one row per (model, study, finding, variant, map),
    cluster_id = clusters[study_id] (e.g. the patient) or the study id."""
    df = pd.DataFrame(list(records) if not isinstance(records, pd.DataFrame) else records).copy()
    if df.empty:
        return df
    df["study_id"] = df["study_id"].astype(str)
    df["cluster_id"] = df["study_id"].map(lambda s: str(clusters[s])) if clusters is not None else df["study_id"]
    return df


def faithfulness_table(records, *, clusters: Mapping | None = None, n_boot: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> pd.DataFrame:  # fmt: skip
    """faithfulness.csv: per map (strata column "map", in MAP_ORDER), model and finding (ALL
    first): deletion_auc and insertion_auc, and for each map its paired differences from
    random and from raw attention (a map's difference from itself is left out), each the
    pooled mean over units with its cluster-bootstrap interval (metric_table), plus the
    paired model differences "a - b". Units whose map was unavailable count as undefined."""
    units = faithfulness_units(records, clusters)
    if units.empty:
        return metric_table(pd.DataFrame(columns=["model", "finding", "cluster_id", "map", *METRICS]), METRICS,
                            strata=("map",))  # fmt: skip
    parts = []
    for name in sorted(units["map"].unique(), key=map_sort_key):
        block = units[units["map"] == name]
        metrics = [*METRICS]
        for base, diffs in DIFF_METRICS.items():
            if name != base and block[diffs[0]].notna().any():
                metrics += list(diffs)
        parts.append(metric_table(block, metrics, strata=("map",), n_boot=n_boot, seed=seed, level=level))
    return pd.concat(parts, ignore_index=True)


def curve_units(curves: Sequence[Mapping] | pd.DataFrame, clusters: Mapping | None = None) -> pd.DataFrame:
    """Curves as units for per-step intervals: one row per (model, study, finding, variant, map,
    curve) with columns step_0..step_K (the scores) and cells (n_k per step)."""
    df = pd.DataFrame(list(curves) if not isinstance(curves, pd.DataFrame) else curves).copy()
    if df.empty:
        return df
    steps = np.stack(df["score"].map(np.asarray).to_numpy())
    for k in range(steps.shape[1]):
        df[f"step_{k}"] = steps[:, k]
    df["study_id"] = df["study_id"].astype(str)
    df["cluster_id"] = df["study_id"].map(lambda s: str(clusters[s])) if clusters is not None else df["study_id"]
    return df
