"""Tables from stored results: accuracy, robustness to paraphrase and attention movement,
each with percentile and BCa cluster-bootstrap intervals, per model and as paired model
differences. No GPU is needed: everything is read from result records and stored maps.

Input records (a pandas DataFrame, one row per (model, study, finding, variant)) need the
columns REQUIRED_COLUMNS and may carry ``polarity`` (medvlm.analysis.records checks them). Only status
== "ok" rows enter the metrics; failed rows are counted and reported, never imputed. A cluster
is the record's cluster_id (the study, or the patient when a patient has several studies).

Negated paraphrases: a variant whose correct answer is the opposite of variant 0's ("Is the
pleural space clear?") has polarity "negated" (given, or inferred from answer_gt; see
medvlm.analysis.records). Accuracy and AUROC use each row's own answer_gt. The robustness metrics use
the row's judgement, its answer in variant 0's terms (the opposite answer when negated), so
that they measure whether the model's judgement changed, not the literal word.
AnalysisTables.n_negated counts negated records per model; per_study.n_negated per group.

Metrics (METRICS), each computed per model over all findings (finding == "ALL") and per
finding:
  accuracy            correct / ok rows
  auroc               AUROC of p_yes against answer_gt == "yes" (bootstrapped as a bilinear form
                      in the cluster weights: the same as per-row weights W[b, cluster])
  flip_rate           judgements differing from variant 0's / comparisons against variant 0
                      (groups whose variant 0 is ok)
  all_agree           complete groups (all six variants ok) whose judgements all agree / complete
  consistent_correct  complete groups whose judgements all agree and equal variant 0's
                      answer_gt (every answer correct) / complete
  fleiss_kappa        Fleiss' kappa of the judgements, raters = the six variants, subjects =
                      complete groups
  attn_js_vs_v0       mean JS divergence (bits) between a variant's map and variant 0's map,
                      over variants 1..5 of groups where both maps exist
  attn_spearman_vs_v0 mean Spearman correlation, same pairs (constant maps left out, counted)
  attn_iou10_vs_v0    mean top-10% IoU, same pairs
  attn_entropy        mean normalised entropy of every ok row's map
Attention means are pooled ratios (sum of per-row values / number of rows) bootstrapped as
cluster ratio sums. Paired differences (model "a - b") use the clusters both models have in
the slice and the same resampled clusters for both. With get_common_map, BETWEEN_METRICS
compare the two models' maps of the same question on a common grid (model "a vs b").

Intervals (medvlm.analysis.intervals): ci_method "bca" normally; "none" (nan ends) with fewer than 5
clusters or an estimate undefined on all data; "exact_one_sided_clusters" for the proportions
PROPORTION_METRICS (and their paired differences) whose estimate is exactly 0 or 1 with every
resample equal to it: the exact one-sided Clopper-Pearson bound at the stated level over the
clusters as Bernoulli trials (e.g. flip rate 0 over 30 clusters: [0, 0.095]), not a zero-width
interval. Below 25 clusters intervals are unreliable: the column few_clusters says so per row,
and AnalysisTables.warnings once per table; a row's warning holds only its own issues.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medvlm.analysis import metrics as mt
from medvlm.analysis import stats as st
from medvlm.analysis.records import REQUIRED_COLUMNS, validate_records  # noqa: F401 - REQUIRED_COLUMNS re-exported

ALL = "ALL"
METRICS = (
    "accuracy",
    "auroc",
    "flip_rate",
    "all_agree",
    "consistent_correct",
    "fleiss_kappa",
    "attn_js_vs_v0",
    "attn_spearman_vs_v0",
    "attn_iou10_vs_v0",
    "attn_entropy",
)
BETWEEN_METRICS = ("attn_js_between", "attn_spearman_between", "attn_iou10_between")
PROPORTION_METRICS = ("accuracy", "flip_rate", "all_agree", "consistent_correct")
SUMMARY_COLUMNS = (
    "model",
    "finding",
    "metric",
    "estimate",
    "ci_low",
    "ci_high",
    "ci_method",
    "ci_low_percentile",
    "ci_high_percentile",
    "level",
    "n_clusters",
    "few_clusters",
    "n_rows",
    "n_units",
    "n_failed",
    "n_boot",
    "seed",
    "n_undefined",
    "warning",
)
PER_STUDY_COLUMNS = (
    "model",
    "study_id",
    "cluster_id",
    "finding",
    "answer_gt",
    "n_negated",
    "n_variants_ok",
    "n_failed",
    "has_v0",
    "n_correct",
    "accuracy",
    "flips",
    "comparisons",
    "flip_rate",
    "complete",
    "all_agree",
    "consistent_correct",
    "n_maps",
    "attn_js_vs_v0",
    "attn_spearman_vs_v0",
    "attn_iou10_vs_v0",
    "attn_entropy",
)
_ATTN_ROW_COLUMNS = {
    "attn_js_vs_v0": "js_vs_v0",
    "attn_spearman_vs_v0": "spearman_vs_v0",
    "attn_iou10_vs_v0": "iou10_vs_v0",
    "attn_entropy": "entropy",
}
_BETWEEN_ROW_COLUMNS = {
    "attn_js_between": "js",
    "attn_spearman_between": "spearman",
    "attn_iou10_between": "iou10",
}

MapGetter = Callable[[str, str, str, int], "np.ndarray | None"]


@dataclass(frozen=True)
class AnalysisTables:
    """summary      DataFrame, SUMMARY_COLUMNS, finding == "ALL" rows only: per model, per
                    pair "a - b" (paired difference) and, with common maps, "a vs b"
    per_finding  DataFrame, SUMMARY_COLUMNS, one block per finding (same row kinds)
    per_study    DataFrame, PER_STUDY_COLUMNS, one row per (model, study, finding)
    warnings     data-level warnings (failed rows, missing maps, undefined values), the
                 warnings of the summary rows, and one few-cluster warning per table
                 ("summary: ..." / "per_finding: ..."); per-row warnings are in the warning column
    n_negated    {model: records (ok or failed) whose polarity is negated}

    Row columns: estimate is the statistic on all data; ci_low / ci_high the interval of
    ci_method ("bca", "exact_one_sided_clusters" or "none" with nan ends; module docstring);
    ci_low_percentile / ci_high_percentile the percentile interval from the same resamples
    (nan where ci_method is not "bca"); n_clusters the clusters resampled; few_clusters
    n_clusters < 25 (intervals unreliable, stated once per table, not in warning); n_rows the
    ok records in them; n_units the units of the metric's denominator (rows, comparisons,
    complete groups or map pairs; for a paired difference, both models together); n_failed
    the failed records of the slice; n_undefined resamples where the statistic was undefined.
    per_study: answer_gt is variant 0's answer_gt (the group's answer in variant 0's terms),
    n_negated the group's negated records; flips, agreement and consistency use judgements.
    """

    summary: pd.DataFrame
    per_finding: pd.DataFrame
    per_study: pd.DataFrame
    warnings: list[str]
    n_negated: dict[str, int] = field(default_factory=dict)


def summarize(
    records: pd.DataFrame,
    get_map: MapGetter,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    get_common_map: MapGetter | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> AnalysisTables:
    """All tables for the result records.

    get_map(model, study_id, finding, variant_id) -> float [n_tokens] or None: the
      layer-aggregated attention map over the image tokens of one record (None if absent;
      absences are counted, never filled in).
    get_common_map: the same, resampled to a grid shared by the models (for BETWEEN_METRICS);
      None skips the between-model comparison.
    pairs: (a, b) model pairs for paired differences "a - b"; default every pair of the
      sorted model names (e.g. ("llava_rad", "medgemma")).
    Returns AnalysisTables.
    """
    df = validate_records(records)
    warnings: list[str] = []
    models = sorted(df["model"].unique().tolist())
    if pairs is None:
        pairs = list(itertools.combinations(models, 2))
    for a, b in pairs:
        for m in (a, b):
            if m not in models:
                raise ValueError(f"pair ({a!r}, {b!r}) names model {m!r}, not among the records {models}")

    for m in models:
        sub = df[df["model"] == m]
        n_failed = int((sub["status"] == "failed").sum())
        if n_failed:
            warnings.append(f"{m}: {n_failed} of {len(sub)} records failed and are excluded from the metrics")

    ok_rows = {
        m: _attention_rows(df[(df["model"] == m) & (df["status"] == "ok")], m, get_map, warnings)
        for m in models
    }
    between_rows = {}
    if get_common_map is not None:
        for a, b in pairs:
            between_rows[(a, b)] = _between_rows(ok_rows[a], ok_rows[b], a, b, get_common_map, warnings)

    findings = sorted(df["finding"].unique().tolist())
    draws = _DrawCache(n_boot=n_boot, seed=seed)
    blocks = []
    for finding in [ALL, *findings]:
        blocks.append(_slice_rows(df, ok_rows, between_rows, pairs, finding, models, draws, level=level))
    summary = pd.DataFrame(blocks[0], columns=list(SUMMARY_COLUMNS))
    per_finding = pd.DataFrame([r for block in blocks[1:] for r in block], columns=list(SUMMARY_COLUMNS))

    for r in blocks[0]:
        if r["warning"]:
            warnings.append(f"{r['model']} / {r['finding']} / {r['metric']}: {r['warning']}")
    n_warn = int(per_finding["warning"].notna().sum())
    if n_warn:
        warnings.append(
            f"per_finding: {n_warn} of {len(per_finding)} rows carry a warning (see its warning column)"
        )
    warnings += [w for name, t in (("summary", summary), ("per_finding", per_finding)) if (w := _few_clusters(name, t))]

    per_study = _per_study(df, ok_rows)
    negated = df["polarity"] == "negated"
    n_negated = {m: int((negated & (df["model"] == m)).sum()) for m in models}
    return AnalysisTables(summary, per_finding, per_study, warnings, n_negated)


def _few_clusters(name: str, table: pd.DataFrame) -> str | None:
    """One warning for the table's rows with fewer than st.MIN_CLUSTERS clusters, or None."""
    few = table["few_clusters"].to_numpy(dtype=bool)
    if not few.any():
        return None
    counts = table.loc[few, "n_clusters"]
    span = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    text = (
        f"{name}: {int(few.sum())} of {len(table)} rows rest on fewer than {st.MIN_CLUSTERS} clusters "
        f"(n_clusters {span}; column few_clusters): their intervals are unreliable"
    )
    n_none = int((counts < st.MIN_CLUSTERS_FOR_CI).sum())
    if n_none:
        text += f"; {n_none} of them have fewer than {st.MIN_CLUSTERS_FOR_CI} and no interval (ci_method none)"
    return text


# --------------------------------------------------------------------------------------
# per-row attention values


def _fetch(get_map: MapGetter, model: str, study: str, finding: str, variant: int) -> np.ndarray | None:
    m = get_map(model, study, finding, int(variant))
    if m is None:
        return None
    arr = np.asarray(m, dtype=np.float64)
    try:
        mt.normalise_map(arr)
    except ValueError as err:
        raise ValueError(f"map of {model} / {study} / {finding} / variant {variant}: {err}") from err
    return arr


def _attention_rows(ok: pd.DataFrame, model: str, get_map: MapGetter, warnings: list[str]) -> pd.DataFrame:
    """The model's ok rows plus has_map, js_vs_v0, spearman_vs_v0, iou10_vs_v0, entropy
    (nan where undefined: no map, no variant-0 map, variant 0 itself, constant map)."""
    out = ok.copy()
    n = len(out)
    cols = {c: np.full(n, np.nan) for c in ("js_vs_v0", "spearman_vs_v0", "iou10_vs_v0", "entropy")}
    has_map = np.zeros(n, dtype=bool)
    n_constant = 0
    pos = {idx: i for i, idx in enumerate(out.index)}
    for (study, finding), grp in out.groupby(["study_id", "finding"], sort=False):
        maps = {}
        for idx, v in zip(grp.index, grp["variant_id"], strict=True):
            m = _fetch(get_map, model, study, finding, v)
            if m is not None:
                maps[int(v)] = m
                has_map[pos[idx]] = True
                cols["entropy"][pos[idx]] = mt.normalised_entropy(m)
        ref = maps.get(0)
        if ref is None:
            continue
        for idx, v in zip(grp.index, grp["variant_id"], strict=True):
            if v == 0 or int(v) not in maps:
                continue
            i = pos[idx]
            try:
                cols["js_vs_v0"][i] = mt.js_divergence(maps[int(v)], ref)
            except ValueError as err:
                raise ValueError(f"{model} / {study} / {finding} / variant {v} vs variant 0: {err}") from err
            cols["spearman_vs_v0"][i] = mt.spearman(maps[int(v)], ref)
            n_constant += int(np.isnan(cols["spearman_vs_v0"][i]))
            cols["iou10_vs_v0"][i] = mt.topk_iou(maps[int(v)], ref, 10.0)
    for c, v in cols.items():
        out[c] = v
    out["has_map"] = has_map
    n_missing = int(n - has_map.sum())
    if n_missing:
        warnings.append(f"{model}: {n_missing} of {n} ok records have no attention map (left out of attn_*)")
    if n_constant:
        warnings.append(
            f"{model}: {n_constant} variant/variant-0 map pairs have a constant map "
            f"(Spearman undefined, left out of attn_spearman_vs_v0)"
        )
    return out


def _between_rows(
    rows_a: pd.DataFrame, rows_b: pd.DataFrame, a: str, b: str, get_common_map: MapGetter, warnings: list[str]
) -> pd.DataFrame:
    """Questions both models answered ok, with js, spearman, iou10 between their common-grid
    maps (nan where a map is absent or, for Spearman, constant)."""
    keys = ["study_id", "finding", "variant_id"]
    both = rows_a[[*keys, "cluster_id"]].merge(rows_b[keys], on=keys, how="inner")
    n = len(both)
    vals = {c: np.full(n, np.nan) for c in ("js", "spearman", "iou10")}
    n_missing = 0
    for i, (study, finding, v) in enumerate(
        zip(both["study_id"], both["finding"], both["variant_id"], strict=True)
    ):
        ma = _fetch(get_common_map, a, study, finding, v)
        mb = _fetch(get_common_map, b, study, finding, v)
        if ma is None or mb is None:
            n_missing += 1
            continue
        try:
            vals["js"][i] = mt.js_divergence(ma, mb)
        except ValueError as err:
            raise ValueError(
                f"common-grid maps of {a} and {b} / {study} / {finding} / variant {v}: {err}"
            ) from err
        vals["spearman"][i] = mt.spearman(ma, mb)
        vals["iou10"][i] = mt.topk_iou(ma, mb, 10.0)
    for c, v in vals.items():
        both[c] = v
    if n_missing:
        warnings.append(f"{a} vs {b}: {n_missing} of {n} shared questions lack a common-grid map for a model")
    n_constant = int(np.sum(np.isnan(vals["spearman"]) & ~np.isnan(vals["js"])))
    if n_constant:
        warnings.append(
            f"{a} vs {b}: {n_constant} common-grid map pairs have a constant map "
            f"(Spearman undefined, left out of attn_spearman_between)"
        )
    return both


# --------------------------------------------------------------------------------------
# statistics per slice


@dataclass(frozen=True, eq=False)
class _Groups:
    """The (study, finding) groups of one model's ok rows (validated, with judgement).

    keys      DataFrame [n_groups] with study_id, finding (sorted)
    group_id  int [n_rows]: group of each row
    answers   float [n_groups, N_VARIANTS]: judgements (answers in variant 0's terms), 1 yes,
              0 no, nan missing/failed
    truth     float [n_groups]: 1 if the group's reference_gt (variant 0's answer_gt) is "yes"
    """

    keys: pd.DataFrame
    group_id: np.ndarray
    answers: np.ndarray
    truth: np.ndarray

    @classmethod
    def of(cls, rows: pd.DataFrame) -> _Groups:
        by = rows.groupby(["study_id", "finding"], sort=True)
        group_id = by.ngroup().to_numpy().astype(np.int64)
        n = int(group_id.max()) + 1 if len(rows) else 0
        answers = np.full((n, mt.N_VARIANTS), np.nan)
        answers[group_id, rows["variant_id"].to_numpy()] = (rows["judgement"] == "yes").to_numpy(
            dtype=np.float64
        )
        truth = np.zeros(n)
        truth[group_id] = (rows["reference_gt"] == "yes").to_numpy(dtype=np.float64)
        keys = by.size().reset_index()[["study_id", "finding"]]
        assert len(keys) == n
        return cls(keys, group_id, answers, truth)


@dataclass(frozen=True)
class _SliceSpecs:
    specs: dict[str, st.Spec]
    n_units: dict[str, int]
    n_rows: int


def ratio_spec(values: np.ndarray, idx: np.ndarray, g: int) -> tuple[st.SumsSpec, int]:
    """(the pooled mean of the defined values as a cluster-sums spec, how many were defined):
    values [n] float (NaN: undefined, left out), idx [n] each value's cluster in [0, g)."""
    v = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(v)
    units = np.stack([np.where(defined, v, 0.0), defined.astype(np.float64)], axis=-1)
    return st.sums_spec(st.sum_by_cluster(units, idx, g), st.ratio_statistic), int(defined.sum())


def _model_specs(rows: pd.DataFrame, clusters: list[str]) -> _SliceSpecs:
    """Specs of METRICS for one model's ok rows (with attention columns), on the given
    clusters (rows of other clusters are dropped)."""
    g = len(clusters)
    rows = rows[rows["cluster_id"].isin(clusters)]
    idx = pd.Categorical(rows["cluster_id"], categories=clusters).codes.astype(np.int64)
    specs: dict[str, st.Spec] = {}
    n_units: dict[str, int] = {}

    correct = rows["correct"].to_numpy(dtype=bool)
    specs["accuracy"] = st.sums_spec(
        st.sum_by_cluster(mt.accuracy_units(correct), idx, g), st.ratio_statistic
    )
    n_units["accuracy"] = len(rows)
    specs["auroc"] = st.BilinearRatioSpec(
        *mt.auroc_cluster_terms(
            rows["p_yes"].to_numpy(dtype=np.float64), (rows["answer_gt"] == "yes").to_numpy(), idx, g
        )
    )
    n_units["auroc"] = len(rows)

    grp = _Groups.of(rows)
    answers, truth = grp.answers, grp.truth
    g_idx = np.zeros(answers.shape[0], dtype=np.int64)
    g_idx[grp.group_id] = idx

    flips = mt.flip_units(answers)
    specs["flip_rate"] = st.sums_spec(st.sum_by_cluster(flips, g_idx, g), st.ratio_statistic)
    n_units["flip_rate"] = int(flips[:, 1].sum())
    agree = mt.all_agree_units(answers)
    specs["all_agree"] = st.sums_spec(st.sum_by_cluster(agree, g_idx, g), st.ratio_statistic)
    n_complete = int(agree[:, 1].sum())
    n_units["all_agree"] = n_complete
    cc = mt.consistent_correct_units(answers, truth)
    specs["consistent_correct"] = st.sums_spec(st.sum_by_cluster(cc, g_idx, g), st.ratio_statistic)
    n_units["consistent_correct"] = n_complete
    specs["fleiss_kappa"] = st.sums_spec(
        st.sum_by_cluster(mt.fleiss_units(answers), g_idx, g), mt.fleiss_kappa_statistic
    )
    n_units["fleiss_kappa"] = n_complete

    for metric, col in _ATTN_ROW_COLUMNS.items():
        specs[metric], n_units[metric] = ratio_spec(rows[col].to_numpy(dtype=np.float64), idx, g)
    return _SliceSpecs(specs, n_units, len(rows))


def _between_specs(rows: pd.DataFrame, clusters: list[str]) -> _SliceSpecs:
    g = len(clusters)
    rows = rows[rows["cluster_id"].isin(clusters)]
    idx = pd.Categorical(rows["cluster_id"], categories=clusters).codes.astype(np.int64)
    specs: dict[str, st.Spec] = {}
    n_units: dict[str, int] = {}
    for metric, col in _BETWEEN_ROW_COLUMNS.items():
        specs[metric], n_units[metric] = ratio_spec(rows[col].to_numpy(dtype=np.float64), idx, g)
    return _SliceSpecs(specs, n_units, len(rows))


def summary_record(
    model: str,
    finding: str,
    metric: str,
    pair: st.IntervalPair,
    *,
    n_rows: int,
    n_units: int,
    n_failed: int,
    note: str | None = None,
) -> dict:
    bca, pct = pair.bca, pair.percentile
    warning = "; ".join(w for w in (*bca.notes, note) if w) or None  # the cluster count: few_clusters
    bootstrap = pct.method == "percentile"
    return {
        "model": model,
        "finding": finding,
        "metric": metric,
        "estimate": bca.estimate,
        "ci_low": bca.ci_low,
        "ci_high": bca.ci_high,
        "ci_method": bca.method,
        "ci_low_percentile": pct.ci_low if bootstrap else np.nan,
        "ci_high_percentile": pct.ci_high if bootstrap else np.nan,
        "level": bca.level,
        "n_clusters": bca.n_clusters,
        "few_clusters": bca.few_clusters,
        "n_rows": n_rows,
        "n_units": n_units,
        "n_failed": n_failed,
        "n_boot": bca.n_boot,
        "seed": bca.seed,
        "n_undefined": bca.n_undefined,
        "warning": warning,
    }


class _DrawCache:
    """The resampled clusters of this summarize call, kept for the few most recent cluster
    counts so that slices with the same clusters do not redraw them (the draws depend only
    on (G, n_boot, seed), so reuse changes no number)."""

    def __init__(self, *, n_boot: int, seed: int, keep: int = 3) -> None:
        self.n_boot, self.seed, self.keep = n_boot, seed, keep
        self._draws: dict[int, st.BootstrapDraws] = {}

    def bootstrap(self, specs: dict[str, st.Spec], g: int, level: float) -> dict[str, st.IntervalPair]:
        proportions = [m for m in PROPORTION_METRICS if m in specs]
        if g < st.MIN_CLUSTERS_FOR_CI:
            return st.bootstrap_many(specs, n_boot=self.n_boot, seed=self.seed, level=level)
        if g not in self._draws:
            if len(self._draws) >= self.keep:
                self._draws.pop(next(iter(self._draws)))
            self._draws[g] = st.BootstrapDraws.make(
                g, n_boot=self.n_boot, seed=self.seed, max_entries=5_000_000
            )
        return st.bootstrap_many(
            specs, n_boot=self.n_boot, seed=self.seed, level=level, draws=self._draws[g], proportions=proportions
        )


def _slice_rows(
    df: pd.DataFrame,
    ok_rows: dict[str, pd.DataFrame],
    between_rows: dict[tuple[str, str], pd.DataFrame],
    pairs: Sequence[tuple[str, str]],
    finding: str,
    models: list[str],
    draws: _DrawCache,
    *,
    level: float,
) -> list[dict]:
    def in_slice(frame: pd.DataFrame) -> pd.DataFrame:
        return frame if finding == ALL else frame[frame["finding"] == finding]

    out = []
    rows_m = {m: in_slice(ok_rows[m]) for m in models}
    failed_m = {
        m: int(
            (
                (df["model"] == m)
                & (df["status"] == "failed")
                & ((df["finding"] == finding) if finding != ALL else True)
            ).sum()
        )
        for m in models
    }
    clusters_m = {m: sorted(rows_m[m]["cluster_id"].unique().tolist()) for m in models}
    for m in models:
        sp = _model_specs(rows_m[m], clusters_m[m])
        res = draws.bootstrap(sp.specs, len(clusters_m[m]), level)
        for metric in METRICS:
            out.append(
                summary_record(
                    m,
                    finding,
                    metric,
                    res[metric],
                    n_rows=sp.n_rows,
                    n_units=sp.n_units[metric],
                    n_failed=failed_m[m],
                )
            )
    for a, b in pairs:
        shared = sorted(set(clusters_m[a]) & set(clusters_m[b]))
        sa, sb = _model_specs(rows_m[a], shared), _model_specs(rows_m[b], shared)
        diff = {metric: st.DifferenceSpec(sa.specs[metric], sb.specs[metric]) for metric in METRICS}
        res = draws.bootstrap(diff, len(shared), level)
        for metric in METRICS:
            out.append(
                summary_record(
                    f"{a} - {b}",
                    finding,
                    metric,
                    res[metric],
                    n_rows=sa.n_rows + sb.n_rows,
                    n_units=sa.n_units[metric] + sb.n_units[metric],
                    n_failed=failed_m[a] + failed_m[b],
                )
            )
        if (a, b) in between_rows:
            sp = _between_specs(in_slice(between_rows[(a, b)]), shared)
            res = draws.bootstrap(sp.specs, len(shared), level)
            for metric in BETWEEN_METRICS:
                out.append(
                    summary_record(
                        f"{a} vs {b}",
                        finding,
                        metric,
                        res[metric],
                        n_rows=sp.n_rows,
                        n_units=sp.n_units[metric],
                        n_failed=failed_m[a] + failed_m[b],
                    )
                )
    return out


# --------------------------------------------------------------------------------------
# per-study table


def _per_study(df: pd.DataFrame, ok_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (model, study, finding) of all records, PER_STUDY_COLUMNS; groups whose
    variants all failed have n_variants_ok == 0 and nan rates. answer_gt is variant 0's
    (reference_gt); n_negated counts the group's negated records."""
    keys = ["model", "study_id", "finding"]
    base = (
        df.assign(failed=(df["status"] == "failed").astype(int), negated=(df["polarity"] == "negated").astype(int))
        .groupby(keys, sort=True)
        .agg(
            cluster_id=("cluster_id", "first"),
            answer_gt=("reference_gt", "first"),
            n_negated=("negated", "sum"),
            n_failed=("failed", "sum"),
        )
        .reset_index()
    )
    parts = []
    for m, rows in ok_rows.items():
        if rows.empty:
            continue
        grp = _Groups.of(rows)
        n = grp.answers.shape[0]
        n_ok = np.bincount(grp.group_id, minlength=n)
        n_correct = np.bincount(grp.group_id, weights=rows["correct"].to_numpy(dtype=np.float64), minlength=n)
        n_maps = np.bincount(grp.group_id, weights=rows["has_map"].to_numpy(dtype=np.float64), minlength=n)
        flips = mt.flip_units(grp.answers)
        agree = mt.all_agree_units(grp.answers)
        cc = mt.consistent_correct_units(grp.answers, grp.truth)
        complete = agree[:, 1] > 0
        part = grp.keys.assign(
            model=m,
            n_variants_ok=n_ok,
            has_v0=~np.isnan(grp.answers[:, 0]),
            n_correct=n_correct.astype(int),
            accuracy=n_correct / n_ok,
            flips=flips[:, 0].astype(int),
            comparisons=flips[:, 1].astype(int),
            flip_rate=np.where(flips[:, 1] > 0, flips[:, 0] / np.maximum(flips[:, 1], 1), np.nan),
            complete=complete,
            all_agree=np.where(complete, agree[:, 0], np.nan),
            consistent_correct=np.where(complete, cc[:, 0], np.nan),
            n_maps=n_maps.astype(int),
        )
        for metric, col in _ATTN_ROW_COLUMNS.items():
            v = rows[col].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            total = np.bincount(grp.group_id[ok], weights=v[ok], minlength=n)
            count = np.bincount(grp.group_id[ok], minlength=n)
            part[metric] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        parts.append(part)
    ok_columns = [c for c in PER_STUDY_COLUMNS if c not in ("cluster_id", "answer_gt", "n_negated", "n_failed")]
    ok_table = pd.concat(parts, ignore_index=True)[ok_columns] if parts else pd.DataFrame(columns=ok_columns)
    out = base.merge(ok_table, on=keys, how="left")
    for c in ("n_variants_ok", "n_correct", "flips", "comparisons", "n_maps"):
        out[c] = out[c].fillna(0).astype(int)
    for c in ("has_v0", "complete"):
        out[c] = out[c].astype("boolean").fillna(False).astype(bool)
    return out.loc[:, list(PER_STUDY_COLUMNS)].reset_index(drop=True)
