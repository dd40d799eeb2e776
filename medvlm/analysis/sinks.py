"""Attention sinks among the image tokens (issue #14 section 4): how much of a map a few tokens
hold, which image positions win regardless of image and question, and which image tokens
carry outlying hidden-state norms. Pure numpy over stored maps (medvlm.core.maps.MapReader) and
the image-token norms the scoring pass captures (QuestionScore.image_token_norms).

Definitions (n = image tokens of the model; every number is a unit for
medvlm.analysis.tables.metric_table, so it gets the main tables' cluster-bootstrap interval):

top_share     per map and layer: the share of the map's image attention (the map divided by
              its own sum over the image tokens) held by its k = ceil(frac * n) largest tokens,
              frac = TOP_FRAC = 1% (k = 14 of LLaVA-Rad's 1369 tokens, 3 of MedGemma's 256). A
              uniform map gives k / n (uniform_top_share); a single token holding everything
              gives 1.
peak          the map's argmax token (the lowest index on ties).
recurrent sink  per model and layer, a position p whose peak share exceeds min_share: the
              share of studies in which p is the peak of at least one of the study's maps,
              whatever the question ("regardless of question"; each study counts once however
              many maps it has). Default RECURRENT_MIN_SHARE = 0.5: a single token that is a
              study's peak in more than half of the studies is a property of the model, not of
              the image: the anatomy and the finding asked move a content peak from study to
              study by more than one token (a 14 px LLaVA-Rad cell, a 56 px MedGemma cell).
              Under peaks placed at random a study with m maps has p among its peaks with
              probability about m / n (30 / 1369 = 2% for LLaVA-Rad, 30 / 256 = 12% for
              MedGemma at 5 findings x 6 paraphrases), far below one half. Several positions
              can be recurrent at once.
detected sinks  per model, the union of the recurrent sinks of every stored layer and of the
              layer-mean map (the map figures and grounding read): what --exclude_sinks zeroes
              through MapReader.get(..., exclude=...), after which each consumer's own
              normalisation renormalises the map over the remaining tokens.
peak_at_sink  per map and layer, 1 when its peak is a recurrent sink of that layer (the
              layer-mean map: of the detected sinks), else 0.
sink_share    per layer-mean map, the share of its image attention held by the detected sinks.
norm ratio    per study and layer, each image token's hidden-state norm entering the layer
              divided by the median over that study's image tokens at that layer (scale-free:
              the residual stream grows with depth and differs between models).
norm outlier  a token whose norm ratio exceeds NORM_FACTOR = 3. "Vision Transformers Need
              Registers" (Darcet et al., ICLR 2024, sec. 2.1 and fig. 3) finds a bimodal norm
              distribution whose outlying mode (about 2% of tokens) sits roughly an order of
              magnitude above the normal tokens and cuts it at a fixed norm in the gap (150 for
              DINOv2 ViT-g); 3 is about the geometric midpoint (sqrt(10) = 3.2) between a
              typical token (1 x the median) and that mode (~10 x), and the continuous
              norm_max_ratio is reported beside the count so the cut can be checked against the
              distribution actually seen.
norm units    per (study, layer): norm_median, norm_max_ratio (largest norm / median),
              norm_outlier_fraction (outliers / n), has_norm_outlier (0/1); recurrent norm
              outliers are positions that are outliers in more than min_share of the studies.

MEAN_LAYER (-1) in a layer column stands for the layer-mean map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

TOP_FRAC = 0.01
RECURRENT_MIN_SHARE = 0.5
NORM_FACTOR = 3.0
MEAN_LAYER = -1
#: where a run stores each study's image-token norms (medvlm.core.store: finding NORM_FINDING,
#: variant 0, map kind NORM_KIND, float32 [L, n] with its layers)
NORM_KIND = "token_norm"
NORM_FINDING = "__study__"

MAP_METRICS = ("top_share", "peak_at_sink")
MEAN_METRICS = ("sink_share",)
NORM_METRICS = ("norm_median", "norm_max_ratio", "norm_outlier_fraction", "has_norm_outlier")
_RECORD_COLUMNS = ("model", "study_id", "finding", "variant_id", "cluster_id")

#: one definition sentence per reported number, for the report's glossary (sources in the module docstring)
GLOSSARY = {
    "top_share": "Share of a map's image attention (renormalised over the image tokens) held by its top 1% of "
    "image tokens (ceil(0.01 n)); a uniform map gives k / n.",
    "peak_at_sink": "1 when the map's most-attended image token is a recurrent sink of that layer (the layer-mean "
    "map: of the detected sinks), else 0.",
    "sink_share": "Share of the layer-mean map's image attention held by the detected sink positions (what "
    "--exclude_sinks removes).",
    "recurrent sink": "An image position that is the most-attended token of at least one of a study's maps in more "
    "than half of the studies, whatever the question.",
    "norm_median": "Median L2 norm of the image tokens' hidden states entering the layer (per study).",
    "norm_max_ratio": "Largest image-token hidden-state norm divided by the study's median at that layer.",
    "norm_outlier_fraction": "Share of image tokens whose hidden-state norm exceeds 3x the study's median at that "
    "layer (high-norm outliers, Darcet et al., 'Vision Transformers Need Registers', ICLR 2024).",
    "has_norm_outlier": "1 when the study has at least one high-norm image token at that layer, else 0.",
}

NormGetter = Callable[[str, str], "tuple[Sequence[int], np.ndarray] | None"]


# -- definitions on arrays -------------------------------------------------------------------
def top_k(n_image: int, frac: float = TOP_FRAC) -> int:
    """k = ceil(frac * n_image), at least 1: how many tokens top_share counts."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    return max(1, math.ceil(frac * n_image - 1e-9))


def uniform_top_share(n_image: int, frac: float = TOP_FRAC) -> float:
    """top_share of a uniform map: k / n_image."""
    return top_k(n_image, frac) / n_image


def top_share(maps: np.ndarray, frac: float = TOP_FRAC) -> np.ndarray:
    """maps [n_rows, n_image] (non-negative) -> [n_rows]: the share of each row's sum held by its
    ceil(frac * n_image) largest entries; NaN for a row summing to 0."""
    maps = np.atleast_2d(np.asarray(maps, dtype=np.float64))
    if maps.ndim != 2:
        raise ValueError(f"expected maps [n_rows, n_image], got shape {maps.shape}")
    if np.any(maps < 0):
        raise ValueError("top_share needs non-negative maps (attention), found negative values")
    k = top_k(maps.shape[1], frac)
    total = maps.sum(axis=1)
    top = np.partition(maps, maps.shape[1] - k, axis=1)[:, maps.shape[1] - k :].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)


def peak_share(peaks_by_study: Sequence[Sequence[int]], n_image: int) -> np.ndarray:
    """[n_image]: for each position, the share of studies in which it is the peak (argmax) of at
    least one of the study's maps. peaks_by_study: per study, its maps' peak positions."""
    if not len(peaks_by_study):
        return np.zeros(n_image)
    hits = np.zeros(n_image)
    for peaks in peaks_by_study:
        p = np.unique(np.asarray(list(peaks), dtype=int))
        if p.size and (p.min() < 0 or p.max() >= n_image):
            raise ValueError(f"peak position outside [0, {n_image}): {p.min()}..{p.max()}")
        hits[p] += 1
    return hits / len(peaks_by_study)


def recurrent_sinks(
    peaks_by_study: Sequence[Sequence[int]], n_image: int, min_share: float = RECURRENT_MIN_SHARE
) -> np.ndarray:
    """Sorted positions whose peak_share exceeds min_share (strictly): the recurrent sinks."""
    return np.flatnonzero(peak_share(peaks_by_study, n_image) > min_share)


def norm_ratios(norms: np.ndarray) -> np.ndarray:
    """norms [..., n_image] -> the same divided by the median over the image tokens (last axis)."""
    norms = np.asarray(norms, dtype=np.float64)
    med = np.median(norms, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(med > 0, norms / np.where(med > 0, med, 1.0), np.nan)


def norm_outliers(norms: np.ndarray, factor: float = NORM_FACTOR) -> np.ndarray:
    """norms [n_studies, L, n_image] (or any [..., n_image]) -> bool, same shape: True where a
    token's norm exceeds factor x the median over its study's image tokens at that layer."""
    return norm_ratios(norms) > factor


# -- units over a run's stored maps -----------------------------------------------------------
def _ok_records(records: pd.DataFrame) -> pd.DataFrame:
    missing = sorted(set(_RECORD_COLUMNS) - set(records.columns))
    if missing:
        raise ValueError(f"records lack columns {missing}")
    if "status" in records.columns:
        records = records[records["status"] == "ok"]
    return records.sort_values(["model", "study_id"], kind="stable")


def map_units(records: pd.DataFrame, reader, kind: str = "attention", frac: float = TOP_FRAC) -> pd.DataFrame:
    """One row per (ok record, stored layer) plus one for the layer-mean map (layer MEAN_LAYER):
    the record's model, study_id, finding, variant_id, cluster_id, then layer, n_image,
    top_share and peak (-1 where the map sums to 0). Maps are head-averaged first. Records
    without a map are left out and counted in .attrs["missing"] ({model: count})."""
    from medvlm.core.maps import MapUnavailable

    rows, missing = [], {}
    for r in _ok_records(records).itertuples(index=False):
        try:
            layers, maps = reader.layered(r.model, str(r.study_id), r.finding, int(r.variant_id), kind)
        except MapUnavailable:
            missing[r.model] = missing.get(r.model, 0) + 1
            continue
        per_layer = maps.reshape(maps.shape[0], -1, maps.shape[-1]).mean(axis=1)  # [L, n]
        stack = np.vstack([per_layer, per_layer.mean(axis=0, keepdims=True)])  # the mean: what get() reads
        shares = top_share(stack, frac)
        peaks = np.where(stack.sum(axis=1) > 0, stack.argmax(axis=1), -1)
        base = {c: getattr(r, c) for c in _RECORD_COLUMNS}
        for layer, share, peak in zip((*layers, MEAN_LAYER), shares, peaks, strict=True):
            rows.append({**base, "study_id": str(r.study_id), "layer": int(layer), "n_image": stack.shape[1],
                         "top_share": share, "peak": int(peak)})  # fmt: skip
    out = pd.DataFrame(rows, columns=[*_RECORD_COLUMNS, "layer", "n_image", "top_share", "peak"])
    out.attrs["missing"] = missing
    return out


def recurrent_by_layer(units: pd.DataFrame, min_share: float = RECURRENT_MIN_SHARE) -> dict[str, dict[int, list[int]]]:
    """{model: {layer: sorted recurrent sink positions}} from map_units (MEAN_LAYER included)."""
    out: dict[str, dict[int, list[int]]] = {}
    for (model, layer), block in units[units["peak"] >= 0].groupby(["model", "layer"], sort=True):
        peaks = [g["peak"].tolist() for _, g in block.groupby("study_id")]
        out.setdefault(str(model), {})[int(layer)] = recurrent_sinks(peaks, int(block["n_image"].iloc[0]),
                                                                     min_share).tolist()  # fmt: skip
    return out


def detected_sinks(by_layer: Mapping[str, Mapping[int, Sequence[int]]]) -> dict[str, list[int]]:
    """{model: sorted positions}: the union over every layer's (and the layer mean's) recurrent
    sinks, the positions --exclude_sinks zeroes (MapReader.get(..., exclude=sinks[model]))."""
    return {m: sorted({int(p) for ps in layers.values() for p in ps}) for m, layers in by_layer.items()}


def mark_peaks_at_sinks(units: pd.DataFrame, by_layer: Mapping, sinks: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """map_units with peak_at_sink: 1 when the peak is a recurrent sink of its layer (the
    layer-mean map: of the detected sinks), 0 when not, NaN for a map without a peak."""
    def at_sink(row) -> float:
        if row.peak < 0:
            return np.nan
        pool = sinks.get(row.model, ()) if row.layer == MEAN_LAYER else by_layer.get(row.model, {}).get(row.layer, ())
        return float(row.peak in set(pool))

    out = units.copy()
    out["peak_at_sink"] = [at_sink(r) for r in units.itertuples(index=False)] if len(units) else []
    return out


def sink_share_units(records: pd.DataFrame, reader, sinks: Mapping[str, Sequence[int]],
                     kind: str = "attention") -> pd.DataFrame:  # fmt: skip
    """One row per ok record of a model with detected sinks: sink_share, the share of its
    layer-mean map (MapReader.get, as figures read it) held by the sink positions."""
    from medvlm.core.maps import MapUnavailable

    rows = []
    for r in _ok_records(records).itertuples(index=False):
        pos = list(sinks.get(r.model, ()))
        if not pos:
            continue
        try:
            m = reader.get(r.model, str(r.study_id), r.finding, int(r.variant_id), kind)
        except MapUnavailable:
            continue
        total = m.sum()
        rows.append({**{c: getattr(r, c) for c in _RECORD_COLUMNS}, "study_id": str(r.study_id),
                     "layer": MEAN_LAYER, "sink_share": m[pos].sum() / total if total > 0 else np.nan})  # fmt: skip
    return pd.DataFrame(rows, columns=[*_RECORD_COLUMNS, "layer", "sink_share"])


def norm_units(studies: pd.DataFrame, get_norms: NormGetter, factor: float = NORM_FACTOR) -> pd.DataFrame:
    """One row per (model, study, layer) with stored norms: model, study_id, cluster_id, finding
    ("ALL": a study-level number), layer, n_image, NORM_METRICS and outliers (the outlying
    positions, for recurrence). studies: rows with model, study_id, cluster_id (duplicates
    dropped). get_norms(model, study_id) -> (layers, [L, n] norms) or None. Studies without
    norms are counted in .attrs["missing"]."""
    from medvlm.analysis.analysis import ALL

    rows, missing = [], {}
    keys = studies[["model", "study_id", "cluster_id"]].astype({"study_id": str}).drop_duplicates(["model", "study_id"])
    for model, study, cluster in keys.itertuples(index=False):
        got = get_norms(model, study)
        if got is None:
            missing[model] = missing.get(model, 0) + 1
            continue
        layers, norms = got
        norms = np.asarray(norms, dtype=np.float64).reshape(len(layers), -1)
        ratio = norm_ratios(norms)
        out = ratio > factor
        med = np.median(norms, axis=-1)
        for j, layer in enumerate(layers):
            rows.append({"model": model, "study_id": study, "cluster_id": cluster, "finding": ALL, "layer": int(layer),
                         "n_image": norms.shape[1], "norm_median": med[j], "norm_max_ratio": np.nanmax(ratio[j]),
                         "norm_outlier_fraction": out[j].mean(), "has_norm_outlier": float(out[j].any()),
                         "outliers": np.flatnonzero(out[j]).tolist()})  # fmt: skip
    frame = pd.DataFrame(rows, columns=["model", "study_id", "cluster_id", "finding", "layer", "n_image",
                                        *NORM_METRICS, "outliers"])  # fmt: skip
    frame.attrs["missing"] = missing
    return frame


def recurrent_norm_outliers(units: pd.DataFrame, min_share: float = RECURRENT_MIN_SHARE) -> dict[str, dict[int, list]]:
    """{model: {layer: positions that are norm outliers in more than min_share of the studies}}."""
    out: dict[str, dict[int, list]] = {}
    for (model, layer), block in units.groupby(["model", "layer"], sort=True):
        out.setdefault(str(model), {})[int(layer)] = recurrent_sinks(block["outliers"].tolist(),
                                                                     int(block["n_image"].iloc[0]), min_share).tolist()
    return out


def reader_norms(reader, finding: str = NORM_FINDING, kind: str = NORM_KIND) -> NormGetter:
    """get_norms for norm_units from a MapReader over a run whose store holds the norms as map
    kind NORM_KIND under (NORM_FINDING, variant 0): (layers, [L, n]) or None when absent."""
    from medvlm.core.maps import MapUnavailable

    def get(model: str, study: str):
        try:
            return reader.layered(model, study, finding, 0, kind)
        except MapUnavailable:
            return None

    return get


# -- the report ------------------------------------------------------------------------------
@dataclass
class SinkReport:
    """What sink_summary finds.

    table           metric_table rows (strata: layer; MEAN_LAYER = the layer-mean map) for
                    MAP_METRICS, MEAN_METRICS and NORM_METRICS
    sinks           {model: sorted positions}: the detected sinks (--exclude_sinks)
    by_layer        {model: {layer: recurrent sink positions}}
    norm_recurrent  {model: {layer: recurrent norm-outlier positions}}
    uniform_top_share  {model: k / n}: top_share of a uniform map
    settings        the definitions' parameters (kind, frac, min_share, factor)
    n_studies, missing  {model: studies with maps}, {"maps": {...}, "norms": {...}} left out
    """

    table: pd.DataFrame
    sinks: dict[str, list[int]]
    by_layer: dict[str, dict[int, list[int]]]
    norm_recurrent: dict[str, dict[int, list]]
    uniform_top_share: dict[str, float]
    settings: dict
    n_studies: dict[str, int] = field(default_factory=dict)
    missing: dict = field(default_factory=dict)

    def manifest(self, grids: Mapping[str, tuple[int, int]] | None = None) -> dict:
        """The manifest's "sinks" entry: JSON-ready (layer keys as strings, MEAN_LAYER as "mean");
        grids {model: (rows, cols)} adds each sink's grid cell [row, col] (row-major tokens)."""
        def keyed(d):
            return {m: {("mean" if int(k) == MEAN_LAYER else str(k)): v for k, v in layers.items()}
                    for m, layers in d.items()}  # fmt: skip

        cells = {m: [[p // grids[m][1], p % grids[m][1]] for p in ps] for m, ps in self.sinks.items()
                 if grids and m in grids}  # fmt: skip
        return {**self.settings, "positions": self.sinks, **({"cells": cells} if grids else {}),
                "by_layer": keyed(self.by_layer),
                "norm_outliers_by_layer": keyed(self.norm_recurrent), "uniform_top_share": self.uniform_top_share,
                "n_studies": self.n_studies, "missing": self.missing,
                "rule": "recurrent sink: the peak (argmax) of at least one of a study's maps in more than min_share "
                        "of the studies, at any stored layer or the layer-mean map (analysis.sinks)"}  # fmt: skip


def sink_summary(
    records: pd.DataFrame,
    reader,
    get_norms: NormGetter | None = None,
    *,
    kind: str = "attention",
    frac: float = TOP_FRAC,
    min_share: float = RECURRENT_MIN_SHARE,
    factor: float = NORM_FACTOR,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> SinkReport:
    """Per model and layer: top_share and peak_at_sink per map, sink_share per layer-mean map,
    the image-token norm metrics per study (when get_norms is given), each with its
    cluster-bootstrap interval (medvlm.analysis.tables.metric_table, strata "layer"); the detected
    sinks for --exclude_sinks. records: the run's records (ok rows are used)."""
    from medvlm.analysis.tables import metric_table

    units = map_units(records, reader, kind, frac)
    missing_maps = units.attrs["missing"]
    by_layer = recurrent_by_layer(units, min_share)
    sinks = detected_sinks(by_layer)
    units = mark_peaks_at_sinks(units, by_layer, sinks)
    shares = sink_share_units(records, reader, sinks, kind)
    stat = {"n_boot": n_boot, "seed": seed, "level": level}
    tables = [metric_table(units, MAP_METRICS, strata=("layer",), proportions=("peak_at_sink",), **stat)]
    if not shares.empty:
        tables.append(metric_table(shares, MEAN_METRICS, strata=("layer",), **stat))
    norm_recurrent, missing_norms = {}, {}
    if get_norms is not None:
        norms = norm_units(_ok_records(records), get_norms, factor)
        norm_recurrent, missing_norms = recurrent_norm_outliers(norms, min_share), norms.attrs["missing"]
        if not norms.empty:
            tables.append(metric_table(norms, NORM_METRICS, strata=("layer",), proportions=("has_norm_outlier",),
                                       per_finding=False, **stat))  # fmt: skip
    n_image = units.groupby("model")["n_image"].first() if len(units) else pd.Series(dtype=int)
    return SinkReport(
        table=pd.concat(tables, ignore_index=True),
        sinks=sinks,
        by_layer=by_layer,
        norm_recurrent=norm_recurrent,
        uniform_top_share={str(m): uniform_top_share(int(n), frac) for m, n in n_image.items()},
        settings={"kind": kind, "top_frac": frac, "min_share": min_share, "norm_factor": factor},
        n_studies={str(m): int(n) for m, n in units.groupby("model")["study_id"].nunique().items()},
        missing={"maps": missing_maps, "norms": missing_norms},
    )
