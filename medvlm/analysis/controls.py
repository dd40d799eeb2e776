"""Does the answer use the image? Image-reliance controls and their statistics.

Each question is also answered under controls (medvlm.core.config.CONTROLS), packed into the same
pass as the question (one shared prefix per control and pass, never a second scoring loop):
    text_only  the same conversation template without the image
    blank      the image replaced by a uniform mid-grey image (value 128) of the same size
A record then carries p_yes_<control> beside p_yes.

Per control, over ok rows that have it (units: question rows):
    abs_delta_p_<c>     |P(yes | image) - P(yes | control)|
    answer_change_<c>   1 if the answer (P(yes) >= 0.5) differs under the control, else 0
Per (model, study, finding) with all six paraphrases ok (units: those groups), the four
quadrants of {consistent, inconsistent} x {image-dependent, image-independent}:
    consistent          the six judgements (answers in variant 0's terms) agree
    image-dependent     mean over the paraphrases of |P(yes | image) - P(yes | text_only)| >=
                        threshold (DEFAULT_THRESHOLD = 0.1; --image_dependence_threshold)
each reported as the share of groups in that quadrant (q_consistent_dependent, ...). The
robustness studies of these models (a text-only run with the image removed) motivate it: a
model can be consistent across paraphrases while ignoring the image.
Every number gets a cluster-bootstrap interval through medvlm.analysis.tables.metric_table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medvlm.analysis.records import validate_records
from medvlm.analysis.tables import metric_table
from medvlm.core.config import CONTROLS

DEFAULT_THRESHOLD = 0.1
QUADRANTS = ("q_consistent_dependent", "q_consistent_independent", "q_inconsistent_dependent",
             "q_inconsistent_independent")  # fmt: skip


def control_column(control: str) -> str:
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; valid: {', '.join(CONTROLS)}")
    return f"p_yes_{control}"


def _ok_with_controls(records: pd.DataFrame) -> pd.DataFrame:
    df = validate_records(records)
    for c in CONTROLS:
        col = control_column(c)
        df[col] = pd.to_numeric(records[col], errors="coerce").to_numpy() if col in records else np.nan
    return df[df["status"] == "ok"].reset_index(drop=True)


def row_units(records: pd.DataFrame, controls: Sequence[str] = CONTROLS) -> pd.DataFrame:
    """One unit per ok row: model, finding, cluster_id, study_id, variant_id and, per control,
    abs_delta_p_<c> and answer_change_<c> (NaN where the row has no P(yes) for that control)."""
    df = _ok_with_controls(records)
    out = df[["model", "finding", "cluster_id", "study_id", "variant_id", "p_yes"]].copy()
    for c in controls:
        pc = df[control_column(c)].to_numpy(float)
        p = df["p_yes"].to_numpy(float)
        out[f"p_yes_{c}"] = pc
        out[f"abs_delta_p_{c}"] = np.abs(p - pc)
        out[f"answer_change_{c}"] = np.where(np.isnan(pc), np.nan, ((p >= 0.5) != (pc >= 0.5)).astype(float))
    return out


def quadrant_units(records: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD, control: str = "text_only"):
    """One unit per (model, study, finding) with all six paraphrases ok and the control's P(yes)
    on each: consistent, mean_abs_delta, image_dependent and the four 0/1 quadrant columns."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the image-dependence threshold must be in (0, 1), got {threshold}")
    df = _ok_with_controls(records)
    col = control_column(control)
    rows = []
    for (model, study, finding), g in df.groupby(["model", "study_id", "finding"], sort=True):
        if len(g) != 6 or g[col].isna().any():
            continue
        consistent = g["judgement"].nunique() == 1
        delta = float(np.mean(np.abs(g["p_yes"].to_numpy(float) - g[col].to_numpy(float))))
        dependent = delta >= threshold
        rows.append({
            "model": model, "study_id": study, "finding": finding, "cluster_id": g["cluster_id"].iloc[0],
            "consistent": consistent, "mean_abs_delta": delta, "image_dependent": dependent,
            "q_consistent_dependent": float(consistent and dependent),
            "q_consistent_independent": float(consistent and not dependent),
            "q_inconsistent_dependent": float(not consistent and dependent),
            "q_inconsistent_independent": float(not consistent and not dependent),
        })  # fmt: skip
    cols = ["model", "study_id", "finding", "cluster_id", "consistent", "mean_abs_delta", "image_dependent",
            *QUADRANTS]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def controls_table(
    records: pd.DataFrame,
    controls: Sequence[str] = CONTROLS,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    quadrants: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """controls.csv: per model (and model pair) and finding, every control metric and the
    quadrant shares with cluster-bootstrap intervals (medvlm.analysis.tables.metric_table rows).
    quadrants: quadrant_units(records, threshold) when the caller has them already."""
    present = [c for c in controls if control_column(c) in records and records[control_column(c)].notna().any()]
    if not present:
        return pd.DataFrame()
    units = row_units(records, present)
    metrics = [m for c in present for m in (f"abs_delta_p_{c}", f"answer_change_{c}")]
    proportions = [f"answer_change_{c}" for c in present]
    parts = [metric_table(units, metrics, proportions=proportions, n_boot=n_boot, seed=seed, level=level)]
    if "text_only" in present:
        quads = quadrant_units(records, threshold) if quadrants is None else quadrants
        if len(quads):
            parts.append(metric_table(quads, QUADRANTS, proportions=QUADRANTS, n_boot=n_boot, seed=seed, level=level))
    return pd.concat(parts, ignore_index=True)
