"""Tables of mean-of-units metrics with cluster-bootstrap intervals, for every new number
(controls, grounding, faithfulness): one function, the same statistics as the main tables.

A *unit* is whatever a metric averages over (a question row, a (study, finding) group, a map
and region pair), one row of a DataFrame with the columns
    model, finding, cluster_id   the model entry, the finding, the bootstrap cluster
    <metric columns>             the unit's value (NaN: undefined for this unit, left out and
                                 counted in n_undefined_units)
    [stratum columns]            optional extra keys each slice is also split by (e.g. the
                                 map kind or the paraphrase)
Each metric's estimate is the pooled mean over units, sum(values) / count(defined), and its
interval resamples clusters whole (BCa; percentile beside it; the exact one-sided bound for a
proportion at 0 or 1; no interval under 5 clusters), as medvlm.analysis.analysis does. Paired model
differences "a - b" use the clusters both models have in the slice, resampled together.
Rows follow medvlm.analysis.analysis.SUMMARY_COLUMNS plus the stratum columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pandas as pd

from medvlm.analysis import stats as st
from medvlm.analysis.analysis import ALL, SUMMARY_COLUMNS, ratio_spec, summary_record


def metric_table(
    units: pd.DataFrame,
    metrics: Sequence[str],
    *,
    strata: Sequence[str] = (),
    proportions: Sequence[str] = (),
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    pairs: Sequence[tuple[str, str]] | None = None,
    per_finding: bool = True,
) -> pd.DataFrame:
    """Per (stratum..., model, finding) - finding "ALL" first, then each finding when
    per_finding - every metric's pooled mean with its interval, and per model pair "a - b"
    the paired difference. proportions: metrics whose unit values are 0/1 (exact bound at 0
    or 1). Returns a DataFrame: strata columns, then SUMMARY_COLUMNS."""
    need = {"model", "finding", "cluster_id", *metrics, *strata}
    missing = sorted(need - set(units.columns))
    if missing:
        raise ValueError(f"units lack columns {missing}")
    bad = sorted(set(proportions) - set(metrics))
    if bad:
        raise ValueError(f"proportions {bad} are not among the metrics {list(metrics)}")
    out: list[dict] = []
    if units.empty:
        return pd.DataFrame(columns=[*strata, *SUMMARY_COLUMNS])
    groups = units.groupby(list(strata), sort=True, dropna=False) if strata else [((), units)]
    for key, block in groups:
        key = key if isinstance(key, tuple) else (key,)
        findings = [ALL, *sorted(block["finding"].astype(str).unique())] if per_finding else [ALL]
        for finding in findings:
            part = block if finding == ALL else block[block["finding"].astype(str) == finding]
            for rec in _slice(part, metrics, proportions, finding, n_boot, seed, level, pairs):
                out.append({**dict(zip(strata, key, strict=True)), **rec})
    return pd.DataFrame(out, columns=[*strata, *SUMMARY_COLUMNS])


def _slice(part, metrics, proportions, finding, n_boot, seed, level, pairs) -> list[dict]:
    models = sorted(part["model"].astype(str).unique())
    out = []
    specs_by_model = {}
    for m in models:
        rows = part[part["model"].astype(str) == m]
        clusters = sorted(rows["cluster_id"].astype(str).unique())
        idx = pd.Categorical(rows["cluster_id"].astype(str), categories=clusters).codes
        specs, n_units = {}, {}
        for metric in metrics:
            specs[metric], n_units[metric] = ratio_spec(rows[metric].to_numpy(float), idx, len(clusters))
        specs_by_model[m] = (rows, clusters)
        ci = st.bootstrap_many(specs, n_boot=n_boot, seed=seed, level=level,
                               proportions=[p for p in proportions if p in specs])  # fmt: skip
        for metric in metrics:
            undefined = len(rows) - n_units[metric]
            note = f"{undefined} undefined unit(s) left out" if undefined else None
            out.append(summary_record(m, finding, metric, ci[metric], n_rows=len(rows), n_units=n_units[metric],
                                      n_failed=0, note=note))  # fmt: skip
    for a, b in pairs if pairs is not None else itertools.combinations(models, 2):
        if a not in specs_by_model or b not in specs_by_model:
            continue
        (ra, ca), (rb, cb) = specs_by_model[a], specs_by_model[b]
        common = sorted(set(ca) & set(cb))
        if not common:
            continue
        ra, rb = ra[ra["cluster_id"].astype(str).isin(common)], rb[rb["cluster_id"].astype(str).isin(common)]
        ia = pd.Categorical(ra["cluster_id"].astype(str), categories=common).codes
        ib = pd.Categorical(rb["cluster_id"].astype(str), categories=common).codes
        specs, n_units = {}, {}
        for metric in metrics:
            sa, na = ratio_spec(ra[metric].to_numpy(float), ia, len(common))
            sb, nb = ratio_spec(rb[metric].to_numpy(float), ib, len(common))
            specs[metric], n_units[metric] = st.DifferenceSpec(sa, sb), na + nb
        ci = st.bootstrap_many(specs, n_boot=n_boot, seed=seed, level=level,
                               proportions=[p for p in proportions if p in specs])  # fmt: skip
        for metric in metrics:
            out.append(summary_record(f"{a} - {b}", finding, metric, ci[metric], n_rows=len(ra) + len(rb),
                                      n_units=n_units[metric], n_failed=0))  # fmt: skip
    return out
