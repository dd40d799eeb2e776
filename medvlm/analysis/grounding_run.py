"""Grounding of a run's stored maps against expert regions: units for the statistics, and the
grounding table (medvlm.analysis.grounding holds the metric definitions and their sources).

Which questions: every ok record whose finding is present (its answer_gt is "yes" for a direct
wording, "no" for a negated one) and that has a region joined to it (medvlm.data.regions). Several
regions joined to one question (e.g. two boxes of one finding) are scored as their union.
Which maps: each map kind asked for (attention, relative, ...), read through medvlm.core.maps with
the layers combined as everywhere else (their mean); tokens listed in `exclude` (attention
sinks, --exclude_sinks) are zeroed first. A region the model never saw (outside LLaVA-Rad's
center crop) is "not seen": counted, never a miss, left out of every rate.

Units (one per question x map kind): model, finding, cluster_id, study_id, variant_id,
map_kind, status, seen_fraction, area_fraction, the metrics (METRICS), the uniform_* and
prior_* baselines computed the same way, and per metric the paired difference from the prior
(<metric>_minus_prior). grounding_table gives each a cluster-bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medvlm.analysis.grounding import METRICS, STATUS_OK, baseline_values, grounding_row
from medvlm.analysis.tables import metric_table
from medvlm.core.geometry import Geometry
from medvlm.core.maps import MapReader, MapUnavailable

TABLE_METRICS = (
    *METRICS,
    *(f"uniform_{m}" for m in METRICS if m != "energy_lift"),
    *(f"prior_{m}" for m in METRICS),
    *(f"{m}_minus_prior" for m in METRICS),
)
DEFAULT_MAX_SIDE = 1024  # grounding is computed on a copy whose long side is at most this (recorded)


def finding_present(records: pd.DataFrame) -> pd.Series:
    """True where the record's finding is present: answer_gt yes on a direct wording, no on a
    negated one (polarity absent: direct)."""
    negated = records.get("polarity", pd.Series(index=records.index, dtype=object)).astype(str) == "negated"
    return (records["answer_gt"].astype(str) == "yes") ^ negated


def grounding_units(
    records: pd.DataFrame,
    regions_by_row: Mapping[object, Sequence],
    reader: MapReader,
    kinds: Sequence[str] = ("attention",),
    *,
    exclude: Mapping[str, Sequence[int]] | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> pd.DataFrame:
    """One unit per (present-finding ok record with a region) x map kind (module docstring).

    records         result records (read_results), index labels as given to join_regions
    regions_by_row  {record index label: (JoinedRegion, ...)} from medvlm.data.regions.join_regions
    Returns a DataFrame; rows whose map is unavailable get status "no map" and a reason."""
    ok = records[(records["status"] == "ok") & finding_present(records)]
    out = []
    masks: dict[tuple, np.ndarray] = {}  # the (study, finding)'s region: the same for every paraphrase and model
    baselines: dict[tuple, dict] = {}
    for label, rec in ok.iterrows():
        joined = regions_by_row.get(label)
        if not joined:
            continue
        geometry = Geometry.from_record(rec["geometry"])
        region = (rec["study_id"], rec["finding"])
        if region not in masks:
            masks[region] = np.logical_or.reduce([j.mask() for j in joined])
        mask = masks[region]
        key = (rec["model"], *region)
        if key not in baselines:
            baselines[key] = baseline_values(geometry, mask, max_side=max_side)
        base = {"model": rec["model"], "finding": rec["finding"], "cluster_id": rec["cluster_id"],
                "study_id": rec["study_id"], "variant_id": int(rec["variant_id"]), "n_regions": len(joined),
                "region_source": joined[0].describe().get("region_source")}  # fmt: skip
        for kind in kinds:
            try:
                token_map = reader.get(rec["model"], rec["study_id"], rec["finding"], int(rec["variant_id"]), kind,
                                       exclude=(exclude or {}).get(rec["model"], ()))  # fmt: skip
            except MapUnavailable as e:
                out.append({**base, "map_kind": kind, "status": "no map", "reason": str(e)})
                continue
            row = grounding_row(token_map, geometry, mask, max_side=max_side, baselines=baselines[key])
            for m in METRICS:
                row[f"{m}_minus_prior"] = row[m] - row[f"prior_{m}"] if row["status"] == STATUS_OK else np.nan
            out.append({**base, "map_kind": kind, **row})
    return pd.DataFrame(out)


def grounding_table(units: pd.DataFrame, *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """grounding.csv: per map kind, model (and model pair) and finding ("ALL" first), every
    grounding metric, baseline and difference from the prior with its cluster-bootstrap
    interval over the seen units; then the same per paraphrase (variant_id), all findings
    pooled. Columns: map_kind, variant_id ("all" for the pooled rows), SUMMARY_COLUMNS."""
    if units.empty or "status" not in units:
        return pd.DataFrame()
    seen = units[units["status"] == STATUS_OK].copy()
    if seen.empty:
        return pd.DataFrame()
    metrics = [m for m in TABLE_METRICS if m in seen]
    proportions = [m for m in metrics if m == "pointing_hit"]
    pooled = metric_table(seen, metrics, strata=("map_kind",), proportions=proportions, n_boot=n_boot, seed=seed,
                          level=level)  # fmt: skip
    pooled.insert(1, "variant_id", "all")
    per_variant = metric_table(seen, metrics, strata=("map_kind", "variant_id"), proportions=proportions,
                               n_boot=n_boot, seed=seed, level=level, per_finding=False)  # fmt: skip
    return pd.concat([pooled, per_variant.astype({"variant_id": str})], ignore_index=True)
