"""The validity phase of an analysis: does the answer use the image (controls), and is the
attention on the finding (grounding). Reads stored results and maps only, so --analyze_only
with a new --regions recomputes it without scoring again.

    run_validity(cfg, records, reader) -> ValidityResults
        controls      controls.csv rows (medvlm.analysis.controls.controls_table), or empty
        quadrants     per (model, study, finding) quadrant units (for the report's table)
        grounding     grounding.csv rows (medvlm.analysis.grounding_run.grounding_table), or empty
        units         grounding_rows.csv: one row per question x map kind with every value
        regions       the join report (manifest "regions"), or None without --regions
        notes         what the report must say (regions that are not expert annotations, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from medvlm.analysis.controls import controls_table, quadrant_units
from medvlm.analysis.grounding_run import grounding_table, grounding_units
from medvlm.core.config import CONTROLS
from medvlm.core.maps import MapReader


@dataclass
class ValidityResults:
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)
    quadrants: pd.DataFrame = field(default_factory=pd.DataFrame)
    grounding: pd.DataFrame = field(default_factory=pd.DataFrame)
    units: pd.DataFrame = field(default_factory=pd.DataFrame)
    regions: dict | None = None
    notes: list[str] = field(default_factory=list)
    joined: dict = field(default_factory=dict)  # {record index label: (JoinedRegion, ...)}


def _image_sizes(records: pd.DataFrame) -> dict[str, tuple[int, int]]:
    ok = records[records["status"] == "ok"]
    return {str(p): tuple(int(v) for v in g["image_size"]) for p, g in zip(ok["image_path"], ok["geometry"],
                                                                           strict=True)}  # fmt: skip


def run_validity(cfg, records: pd.DataFrame, reader: MapReader, *, exclude: dict | None = None) -> ValidityResults:
    """Controls and grounding tables for a run's records (see the module docstring).

    cfg      RunConfig (regions, finding_map, map_kinds, image_dependence_threshold, n_boot,
             bootstrap_seed)
    records  read_results(output_dir)
    exclude  {model: image-token positions} zeroed in every map (--exclude_sinks)
    """
    res = ValidityResults()
    has_controls = [c for c in CONTROLS if f"p_yes_{c}" in records and records[f"p_yes_{c}"].notna().any()]
    if has_controls:
        if "text_only" in has_controls:
            res.quadrants = quadrant_units(records, cfg.image_dependence_threshold)
        res.controls = controls_table(records, has_controls, threshold=cfg.image_dependence_threshold,
                                      n_boot=cfg.n_boot, seed=cfg.bootstrap_seed,
                                      quadrants=res.quadrants if "text_only" in has_controls else None)  # fmt: skip
    if cfg.regions:
        from medvlm.data.regions import join_regions, read_regions

        sets = [read_regions(p, cfg.finding_map) for p in cfg.regions]
        ok = records[records["status"] == "ok"]
        joined, report = join_regions(sets, ok, _image_sizes(records), cfg.finding_map)
        res.joined = joined
        res.regions = report.as_dict()
        res.notes += report.summary()
        for p in cfg.regions:
            if "NOT_EXPERT" in str(p).upper():
                res.notes.append(f"regions from {p} are NOT expert annotations (see the file's source column)")
        res.units = grounding_units(ok, joined, reader, list(cfg.map_kinds), exclude=exclude)
        res.grounding = grounding_table(res.units, n_boot=cfg.n_boot, seed=cfg.bootstrap_seed)
    return res
