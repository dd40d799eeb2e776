"""Result records as the analysis reads them: required columns, validation, and the
polarity of each paraphrase (direct or negated) with the judgement it implies.

A record is one (model, study, finding, variant) row of results.jsonl. validate_records checks
the columns REQUIRED_COLUMNS (plus the optional ``polarity``) and returns them with three more:

  polarity      "direct" or "negated" for every record (given, or inferred as below)
  reference_gt  the (study, finding)'s correct answer in variant 0's terms: variant 0's
                answer_gt, the same for every record of the (model, study, finding)
  judgement     the model's answer in variant 0's terms: the answer if direct, the opposite
                answer if negated; None for failed records

Polarity. A paraphrase may be worded so that its correct answer is the opposite of variant
0's ("Is the pleural space clear?" beside "Is there a pleural effusion?"): such a row is
negated. Each row's own answer_gt still decides whether it is correct; robustness (flip rate,
all-agree, consistent-correct, Fleiss' kappa) compares judgements, so that it measures whether
the model's judgement changed, not whether the literal word did. The optional ``polarity``
column ("direct"/"negated", any case; absent, null or empty: inferred) states it. Inferred:
negated iff answer_gt differs from variant 0's in the same (model, study, finding); in a group
without variant 0, from the rows whose polarity is given, else direct when every answer_gt is
the same. Refused with ValueError (each message gives the count and the total): an unknown
polarity value; variant 0 marked negated (variant 0 is the original wording); a group whose
rows imply different references (a direct row whose answer_gt differs from variant 0's, a
negated row whose answer_gt equals it); a group without variant 0 whose answer_gt differs and
whose polarity nothing states; a (study, finding, variant) whose answer_gt or polarity differs
between models.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medvlm.analysis import metrics as mt

REQUIRED_COLUMNS = (
    "model",
    "study_id",
    "cluster_id",
    "finding",
    "variant_id",
    "answer_gt",
    "p_yes",
    "answer",
    "correct",
    "status",
)
POLARITIES = ("direct", "negated")
GROUP_KEYS = ["model", "study_id", "finding"]
_OPPOSITE = {"yes": "no", "no": "yes"}


def validate_records(records: pd.DataFrame) -> pd.DataFrame:
    """Check the records and add polarity, reference_gt and judgement (module docstring).

    records  DataFrame with REQUIRED_COLUMNS (optionally polarity); one row per
             (model, study, finding, variant)
    Returns a new DataFrame [n_records] with REQUIRED_COLUMNS + polarity, reference_gt,
    judgement, index 0..n-1, variant_id int, p_yes float, correct bool (False for failed rows).
    Raises ValueError for any violated rule, naming the count.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack required columns {missing}")
    df = records.loc[:, list(REQUIRED_COLUMNS)].copy()
    given = records["polarity"] if "polarity" in records.columns else pd.Series(None, index=records.index)
    if df.empty:
        raise ValueError("records are empty: expected at least 1 row, found 0")
    for col in ("model", "study_id", "cluster_id", "finding"):
        if df[col].isna().any():
            raise ValueError(f"column {col} has {int(df[col].isna().sum())} missing values")
        df[col] = df[col].astype(str)
    bad_status = ~df["status"].isin(["ok", "failed"])
    if bad_status.any():
        raise ValueError(
            f"status must be 'ok' or 'failed', found {int(bad_status.sum())} other values: "
            f"{sorted(df.loc[bad_status, 'status'].astype(str).unique())[:5]}"
        )
    variant = pd.to_numeric(df["variant_id"], errors="coerce")
    bad_variant = variant.isna() | (variant % 1 != 0) | (variant < 0) | (variant >= mt.N_VARIANTS)
    if bad_variant.any():
        raise ValueError(
            f"expected variant_id in 0..{mt.N_VARIANTS - 1}, found "
            f"{sorted(df.loc[bad_variant, 'variant_id'].astype(str).unique())[:5]}"
        )
    df["variant_id"] = variant.astype(int)
    bad_gt = ~df["answer_gt"].isin(["yes", "no"])
    if bad_gt.any():
        raise ValueError(f"answer_gt must be 'yes' or 'no', found {int(bad_gt.sum())} other values")
    dup = df.duplicated(["model", "study_id", "finding", "variant_id"])
    if dup.any():
        raise ValueError(
            f"expected one record per (model, study, finding, variant), found {int(dup.sum())} duplicates"
        )
    clusters_per_study = df.groupby("study_id")["cluster_id"].nunique()
    if (clusters_per_study > 1).any():
        raise ValueError(
            f"each study needs one cluster_id, found {int((clusters_per_study > 1).sum())} "
            f"studies with several"
        )
    ok = df["status"] == "ok"
    bad_answer = ok & ~df["answer"].isin(["yes", "no"])
    if bad_answer.any():
        raise ValueError(f"ok rows need answer 'yes' or 'no', found {int(bad_answer.sum())} other values")
    p_yes = pd.to_numeric(df["p_yes"], errors="coerce")
    bad_p = ok & ~(np.isfinite(p_yes) & (p_yes >= 0) & (p_yes <= 1))
    if bad_p.any():
        raise ValueError(f"ok rows need p_yes in [0, 1], found {int(bad_p.sum())} rows outside or missing")
    df["p_yes"] = p_yes
    bad_correct = ok & ~df["correct"].isin([True, False])
    if bad_correct.any():
        raise ValueError(f"ok rows need a boolean correct, found {int(bad_correct.sum())} other values")
    expected = df["answer"] == df["answer_gt"]
    mismatch = ok & (df["correct"].astype(object) != expected)
    if mismatch.any():
        raise ValueError(
            f"correct disagrees with answer == answer_gt in {int(mismatch.sum())} of {int(ok.sum())} ok rows"
        )
    df["correct"] = np.where(ok, expected, False)
    df["polarity"], df["reference_gt"] = _resolve_polarity(df, _normalise(given.to_numpy(dtype=object)))
    df["judgement"] = np.where(
        ok, np.where(df["polarity"] == "negated", df["answer"].map(_OPPOSITE), df["answer"]), None
    )
    return df.reset_index(drop=True)


def _normalise(given: np.ndarray) -> np.ndarray:
    """Polarity values -> "direct" / "negated" / None (null, nan or blank); ValueError for others."""
    out = np.empty(given.shape[0], dtype=object)
    bad = []
    for i, v in enumerate(given):
        if v is None or (not isinstance(v, str) and pd.isna(v)):  # None, nan, pd.NA
            out[i] = None
            continue
        text = str(v).strip().lower()
        out[i] = text or None
        if text and text not in POLARITIES:
            bad.append(str(v))
    if bad:
        raise ValueError(
            f"polarity must be 'direct', 'negated' or empty, found {len(bad)} of {len(given)} other values: "
            f"{sorted(set(bad))[:5]}"
        )
    return out


def _resolve_polarity(df: pd.DataFrame, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(polarity [n], reference_gt [n]) for validated records df and normalised given [n]."""
    is_v0 = (df["variant_id"] == 0).to_numpy()
    v0_negated = is_v0 & (given == "negated")
    if v0_negated.any():
        raise ValueError(
            f"variant 0 is the original wording and cannot be negated: {int(v0_negated.sum())} of "
            f"{int(is_v0.sum())} variant-0 records say polarity 'negated'"
        )
    gt = df["answer_gt"].to_numpy(dtype=object)
    stated = is_v0 | pd.notna(given)
    implied = np.where(given == "negated", df["answer_gt"].map(_OPPOSITE).to_numpy(dtype=object), gt)
    work = df[GROUP_KEYS].assign(implied=np.where(stated, implied, None), gt=gt)
    by = work.groupby(GROUP_KEYS, sort=False)
    n_groups = by.ngroups
    conflict = by["implied"].transform("nunique").to_numpy() > 1
    if conflict.any():
        example = " / ".join(work.loc[conflict, GROUP_KEYS].iloc[0])
        n_bad = int(work.loc[conflict, GROUP_KEYS].drop_duplicates().shape[0])
        raise ValueError(
            f"polarity contradicts answer_gt in {n_bad} of {n_groups} (model, study, finding) groups "
            f"(e.g. {example}): a direct row's answer_gt must equal variant 0's, a negated row's must differ"
        )
    reference = by["implied"].transform("first").to_numpy(dtype=object)
    unstated = pd.isna(reference)
    if unstated.any():
        gts = by["gt"].transform("nunique").to_numpy()
        unresolved = unstated & (gts > 1)
        if unresolved.any():
            n_bad = int(work.loc[unresolved, GROUP_KEYS].drop_duplicates().shape[0])
            example = " / ".join(work.loc[unresolved, GROUP_KEYS].iloc[0])
            raise ValueError(
                f"{n_bad} of {n_groups} (model, study, finding) groups lack variant 0 and their answer_gt "
                f"differs between variants with no polarity to say which are negated (e.g. {example})"
            )
        reference = np.where(unstated, gt, reference)
    polarity = np.where(gt == reference, "direct", "negated").astype(object)
    per_question = df[["study_id", "finding", "variant_id"]].assign(gt=gt, polarity=polarity)
    across = per_question.groupby(["study_id", "finding", "variant_id"])[["gt", "polarity"]].nunique()
    differs = (across > 1).any(axis=1)
    if differs.any():
        raise ValueError(
            f"answer_gt and polarity must be the same for every model of a (study, finding, variant), found "
            f"{int(differs.sum())} of {len(across)} that differ"
        )
    return polarity, reference
