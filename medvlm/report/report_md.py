"""report.md: the text of a run's report, and the glossary that defines every number in it.

The glossary is data (GLOSSARY, COLUMNS), rendered into report.md and, by the same function,
into README.md's "Glossary" section; tests/test_reporting.py checks the README against it so
the two cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medvlm.report.forest import (
    FEW_CLUSTERS,
    MIN_CLUSTERS_FOR_CI,
    count_of,
    format_ci,
    format_estimate,
    method_name,
)

RANDOM_NOTE = "RANDOM WEIGHTS: these numbers and maps illustrate the pipeline, not a model."


@dataclass(frozen=True)
class Term:
    """One glossary entry: the name used in tables (key), how it is written (term), one
    defining sentence, its source where it has one, and for a metric which way is better."""

    key: str
    term: str
    text: str
    source: str | None = None
    better: str | None = None  # "higher", "lower" or "neither" for metrics


GLOSSARY: tuple[Term, ...] = (
    Term("accuracy", "Accuracy",
         "The share of answered rows whose answer (yes when P(yes) >= 0.5) equals the ground truth; failed rows "
         "are left out and counted.", better="higher"),
    Term("auroc", "AUROC",
         "The probability that a row whose ground truth is yes gets a higher P(yes) than a row whose ground truth "
         "is no, ties counting one half (the Mann-Whitney form of the area under the ROC curve).",
         "Hanley & McNeil, Radiology 1982", "higher"),
    Term("flip_rate", "Flip rate",
         "Of the paraphrases (variants 1-5) answered beside an answered original wording (variant 0) of the same "
         "study and finding, the share whose answer differs from the original's.", better="lower"),
    Term("all_agree", "All-agree",
         "The share of complete (study, finding) groups, all six wordings answered, in which the six answers "
         "are the same.", better="higher"),
    Term("consistent_correct", "Consistent-correct",
         "The share of complete groups in which all six answers agree and equal the ground truth.",
         better="higher"),
    Term("fleiss_kappa", "Fleiss' kappa",
         "Agreement among the six wordings, taken as raters of the complete groups, beyond the agreement their "
         "overall yes/no rates give by chance; it is n/a when every answer in the slice is the same, because "
         "chance agreement is then total and kappa is 0/0.", "Fleiss, Psychological Bulletin 1971", "higher"),
    Term("attn_js_vs_v0", "JSD",
         "The Jensen-Shannon divergence in bits (base 2, so between 0 and 1; the divergence, not its square "
         "root, the distance) between a paraphrase's attention map and the original wording's, both "
         "normalised to sum to 1 over the image tokens.", "Lin, IEEE Trans. Inf. Theory 1991", "lower"),
    Term("attn_spearman_vs_v0", "Spearman",
         "The rank correlation, over the image tokens, between a paraphrase's attention map and the original "
         "wording's; a constant map has none, and such pairs are left out and counted.",
         "Spearman, Am. J. Psychol. 1904", "higher"),
    Term("attn_iou10_vs_v0", "Top-10% IoU",
         "The intersection over union of the two maps' top-10% token sets (each the ceil(10% of tokens) "
         "tokens with the most attention, ties broken by token index).", better="higher"),
    Term("attn_entropy", "Entropy",
         "The Shannon entropy of a map normalised to sum to 1, divided by log(number of tokens): 1 for a "
         "uniform map, 0 for all attention on one token.", "Shannon, Bell Syst. Tech. J. 1948", "neither"),
    Term("between", "Between models (attn_js_between, attn_spearman_between, attn_iou10_between)",
         "JSD, Spearman and top-10% IoU between the two models' maps of the same question, after both are "
         "resampled by area onto a common 16 x 16 grid over the part of the image both models saw."),
    Term("difference", "Paired difference (rows \"a - b\")",
         "Model a's metric minus model b's on the clusters both have, every bootstrap resample drawing the same "
         "clusters for both models."),
    Term("ci", "Confidence interval",
         "A cluster bootstrap: the clusters (studies, or patients under --cluster_by subject_id) are resampled "
         "whole with replacement n_boot times from a fixed seed, giving the BCa interval with the percentile "
         "interval beside it (a proportion estimated at 0 or 1 gets an exact one-sided Clopper-Pearson bound "
         "with clusters as trials instead); no interval is shown with fewer than 5 clusters, and under 25 the "
         "intervals are flagged as unreliable.",
         "Efron, JASA 1987; Davison & Hinkley, Bootstrap Methods 1997; Clopper & Pearson, Biometrika 1934"),
)

COLUMNS: tuple[Term, ...] = (
    Term("random_weights", "random_weights",
         "True when the models had random weights (the demo, tests, timing runs): the numbers then describe the "
         "pipeline, not a model."),
    Term("model", "model",
         "A model, a paired difference \"a - b\" or a comparison of two models' maps \"a vs b\"."),
    Term("finding", "finding", "ALL (every finding together) or one finding."),
    Term("metric", "metric", "One of the metrics defined above, by its table name."),
    Term("estimate", "estimate", "The metric on all the data of the row's slice."),
    Term("ci_low", "ci_low, ci_high",
         "The interval's bounds by ci_method (BCa unless the column says otherwise); empty where no interval "
         "can be given."),
    Term("ci_method", "ci_method", "How ci_low and ci_high were made (bca, or the method used instead, such as none "
         "with fewer than 5 clusters)."),
    Term("ci_low_percentile", "ci_low_percentile, ci_high_percentile",
         "The percentile interval from the same resamples (empty where ci_method is not bca)."),
    Term("level", "level", "The intervals' coverage (0.95 for 95%)."),
    Term("n_clusters", "n_clusters", "How many clusters (studies or patients) were resampled for the row."),
    Term("few_clusters", "few_clusters",
         "True when n_clusters is under 25, so the interval is unreliable (said once per table in report.md)."),
    Term("n_rows", "n_rows", "The answered (ok) rows in those clusters."),
    Term("n_units", "n_units",
         "The units in the metric's denominator: rows (accuracy, AUROC, entropy), comparisons with the original "
         "wording (flip rate), complete groups (all-agree, consistent-correct, Fleiss' kappa) or map pairs (JSD, "
         "Spearman, IoU); for a paired difference, both models' units together."),
    Term("n_failed", "n_failed", "Rows of the slice that failed (recorded with their reason, never filled in)."),
    Term("n_boot", "n_boot", "The number of bootstrap resamples (--n_boot)."),
    Term("seed", "seed",
         "The seed of the bootstrap's random resampling (--bootstrap_seed): the same data and seed give the same "
         "intervals."),
    Term("n_undefined", "n_undefined",
         "Resamples in which the metric was undefined (such as Fleiss' kappa with every answer the same), left out "
         "of the interval."),
    Term("warning", "warning", "What makes the row's interval doubtful, in words."),
)

METRIC_TERMS = {t.key: t for t in GLOSSARY if t.better}
PANEL_TITLES = {
    "higher": "higher is better",
    "lower": "lower is better",
    "neither": "descriptive: no better direction",
}
_DIFF_PANEL_TITLES = {
    "higher": "higher is better: a - b > 0 favours a",
    "lower": "lower is better: a - b < 0 favours a",
    "neither": "descriptive: no better direction",
}


def metric_panels(metrics: Sequence[str], *, differences: bool = False) -> dict[str, str]:
    """metric -> forest-plot panel title by its better direction (GLOSSARY); between-model
    metrics follow the metric they repeat (JSD lower, Spearman and IoU higher)."""
    titles = _DIFF_PANEL_TITLES if differences else PANEL_TITLES
    out = {}
    for m in metrics:
        key = m.replace("_between", "_vs_v0")
        term = METRIC_TERMS.get(key)
        out[m] = titles[term.better] if term else "other"
    return out


def glossary_lines(terms: Sequence[Term] = GLOSSARY) -> list[str]:
    """The glossary as markdown bullets, one per term."""
    lines = []
    for t in terms:
        key = f" (`{t.key}`)" if t.key not in t.term and t.key in METRIC_TERMS else ""
        src = f" Source: {t.source}." if t.source else ""
        lines.append(f"- **{t.term}**{key}: {t.text}{src}")
    return lines


def glossary_markdown() -> str:
    """The block README.md's Glossary section holds and report.md ends with."""
    from medvlm.report.report_faithfulness import FAITHFULNESS_TERMS
    from medvlm.report.report_validity import VALIDITY_TERMS

    return "\n".join([
        "Every metric, one sentence each (table name in brackets):", "",
        *glossary_lines(GLOSSARY), "",
        "Validity outputs (controls.csv, grounding.csv, sinks.csv, faithfulness.csv):", "",
        *glossary_lines(VALIDITY_TERMS), *glossary_lines(FAITHFULNESS_TERMS), "",
        "Columns of summary.csv and per_finding.csv (and of the validity tables):", "",
        *glossary_lines(COLUMNS),
    ])  # fmt: skip


def cluster_unit(cluster_by: str | None) -> str:
    """What a cluster is, in words: "patients" under --cluster_by subject_id, else "studies"."""
    return "patients" if cluster_by == "subject_id" else "studies"


def few_clusters_note(table: pd.DataFrame, unit: str) -> str | None:
    """The table's one note on too few clusters, from its n_clusters column (None if none)."""
    if "n_clusters" not in table.columns or table.empty:
        return None
    n = pd.to_numeric(table["n_clusters"], errors="coerce").dropna()
    if n.empty or n.min() >= FEW_CLUSTERS:
        return None
    lo = int(n.min())
    where = " in some rows" if lo != int(n.max()) else ""
    text = f"Only {count_of(lo, unit)}{where} (fewer than {FEW_CLUSTERS}): the intervals are unreliable"
    if lo < MIN_CLUSTERS_FOR_CI:
        text += f"; rows with fewer than {MIN_CLUSTERS_FOR_CI} {unit} get no interval"
    return text + "."


def _ci_cell(row: Mapping, unit: str, marks: dict[str, str]) -> str:
    n = row.get("n_clusters")
    if n is not None and np.isfinite(float(n)) and float(n) < MIN_CLUSTERS_FOR_CI:
        return f"no interval ({count_of(int(n), unit)})"
    ci = format_ci(row.get("ci_low"), row.get("ci_high"))
    if ci is None:
        return "n/a"
    method = str(row.get("ci_method", "bca"))
    return ci + (f" {marks[method]}" if method in marks else "")


def summary_table(table: pd.DataFrame, unit: str) -> list[str]:
    """The summary as a markdown table: one interval column, intervals only where there are
    enough clusters, a mark on rows whose interval is not BCa, and the few-cluster note once."""
    if table.empty:
        return ["(no rows)"]
    level = pd.to_numeric(table.get("level", pd.Series([0.95])), errors="coerce").dropna()
    pct = f"{100 * float(level.iloc[0]):g}%" if len(level) else ""
    cells = {i: _ci_cell(row, unit, {}) for i, row in enumerate(table.to_dict("records"))}
    methods = [str(row.get("ci_method", "bca")) for i, row in enumerate(table.to_dict("records"))
               if cells[i] != "n/a" and not cells[i].startswith("no interval")]  # fmt: skip
    marks = {m: "*" * (i + 1) for i, m in enumerate(dict.fromkeys(x for x in methods if x != "bca"))}
    lines = [f"| model | metric | estimate | {pct} CI | {unit} | units |", "|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        n_units = row.get("n_units", row.get("n_rows"))
        lines.append(f"| {row['model']} | {row['metric']} | {format_estimate(row['estimate'])} | "
                     f"{_ci_cell(row, unit, marks)} | {row.get('n_clusters')} | {n_units} |")  # fmt: skip
    notes = [f"{mark} {method_name(m)}" for m, mark in marks.items()]
    if notes:
        lines += ["", "Interval method where it is not BCa: " + "; ".join(notes) + "."]
    note = few_clusters_note(table, unit)
    if note:
        lines += ["", f"> {note}"]
    return lines


@dataclass(frozen=True)
class DrawnFigure:
    """A figure this run wrote, with the caption report.md puts under it."""

    path: Path
    caption: str


_CLUSTER_NOTE = re.compile(r"only \d+ clusters? \(< ?\d+\)(: [^;]*)?(; )?")


def _without_cluster_note(warning: str) -> str | None:
    """A warning without its few-clusters clause (the summary table says that once); None
    when nothing but the row's name is left."""
    text = str(warning)
    cut = _CLUSTER_NOTE.sub("", text).strip().rstrip(":;").strip()
    if cut != text and ": " not in cut:
        return None
    return cut or None


def _timings_line(timings: Mapping) -> str | None:
    parts = []
    for phase in ("load", "score", "analyse", "figures"):
        v = timings.get(phase)
        if isinstance(v, Mapping):
            parts += [f"{phase} {m} {float(s):.1f} s" for m, s in v.items()]
        elif v is not None:
            parts.append(f"{phase} {float(v):.1f} s")
    return ("Time: " + ", ".join(parts) + ".") if parts else None


def render_report(out: Path, manifest: Mapping, tables, figs: Sequence[DrawnFigure], random_weights: bool,
                  sections: Sequence[str] = ()) -> str:
    """report.md's text; sections: markdown lines of further sections (validity) placed before
    the figures."""
    unit = cluster_unit(manifest.get("cluster_by"))
    lines = ["# Medical VLM attention analysis", ""]
    if random_weights:
        lines += [f"> **{RANDOM_NOTE}**", ""]
    lines += [f"Created {manifest.get('created', '')}; git commit `{manifest.get('git_commit')}`; "
              f"CSV `{manifest.get('csv')}`; clusters: {unit} (`{manifest.get('cluster_by')}`).", ""]  # fmt: skip
    bad = manifest.get("bad_rows", {}).get("count", 0)
    failed = manifest.get("failed_rows", {}).get("count", 0)
    lines.append(f"- Bad CSV rows skipped: **{bad}**; failed rows: **{failed}** (both listed in manifest.json).")
    for m, c in manifest.get("counts", {}).items():
        lines.append(f"- {m}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed this run, "
                     f"{c.get('seconds', 0):.1f} s.")  # fmt: skip
    for m, n in sorted((getattr(tables, "n_negated", None) or {}).items()):
        if n:
            lines.append(f"- {m}: {n} rows were negated wordings; consistency is computed on the model's judgement.")
    timing = _timings_line(manifest.get("timings_s", {}))
    if timing:
        lines.append(f"- {timing}")
    a = manifest.get("analysis", {})
    lines += ["", f"Intervals: {a.get('ci')}, B = {a.get('n_boot')}, seed {a.get('bootstrap_seed')}. "
              f"JS: {a.get('js')}. Definitions: see the Glossary at the end.", ""]  # fmt: skip
    lines += ["## Summary", "", *summary_table(tables.summary, unit)]
    # the summary's few-clusters note is printed under its table; the rest of the warnings here
    warnings = [w for w in map(_without_cluster_note, a.get("warnings", []))
                if w and not (w.startswith("summary:") and f"fewer than {FEW_CLUSTERS} clusters" in w)]  # fmt: skip
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    notes = manifest.get("data_notes") or []
    if notes:
        lines += ["", "## About the data", ""] + [f"- {n}" for n in notes]
    if sections:
        lines += ["", *sections]
    if figs:
        lines += ["", "## Figures", ""]
        for i, f in enumerate(figs, start=1):
            rel = f.path.relative_to(out)
            lines += [f"![{rel.stem}]({rel.as_posix()})", "", f"*Figure {i}. {f.caption}*", ""]
    lines += ["## Glossary", "", glossary_markdown(), ""]
    lines += ["## Files", "", "- results.jsonl: one record per (model, study, finding, variant)",
              "- attention/: per-layer maps (float16) keyed the same way",
              "- summary.csv, per_finding.csv, per_study.csv: the tables (columns in the Glossary)",
              "- controls.csv, grounding.csv (+ grounding_rows.csv), sinks.csv: the validity tables, where made",
              "- manifest.json: how this was made, with the time each phase took (timings_s)"]
    return "\n".join(lines) + "\n"
