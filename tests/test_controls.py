"""Image-reliance controls: the per-row and per-group metrics on hand-made records, and the
shared metric table's intervals against a direct computation."""

import numpy as np
import pandas as pd
import pytest

from medvlm.analysis import stats as st
from medvlm.analysis.controls import QUADRANTS, controls_table, quadrant_units, row_units
from medvlm.analysis.tables import metric_table


def records(n_studies=6, p_text=0.5, models=("a",)):
    """Six paraphrases per study, P(yes) 0.9 with the image; text-only P(yes) p_text."""
    rows = []
    for m in models:
        for s in range(n_studies):
            for v in range(6):
                p = 0.9 if (s or v != 3) else 0.2  # study 0 flips on variant 3
                rows.append({"model": m, "study_id": f"s{s}", "cluster_id": f"s{s}", "finding": "f",
                             "variant_id": v, "answer_gt": "yes", "p_yes": p, "answer": "yes" if p >= 0.5 else "no",
                             "correct": p >= 0.5, "status": "ok", "p_yes_text_only": p_text,
                             "p_yes_blank": p})  # fmt: skip
    return pd.DataFrame(rows)


def test_row_units_by_hand():
    u = row_units(records(2, p_text=0.4))
    r = u[(u.study_id == "s0") & (u.variant_id == 3)].iloc[0]
    assert r.abs_delta_p_text_only == pytest.approx(0.2) and r.answer_change_text_only == 0.0  # 0.2 vs 0.4: no/no
    r = u[(u.study_id == "s1") & (u.variant_id == 0)].iloc[0]
    assert r.abs_delta_p_text_only == pytest.approx(0.5) and r.answer_change_text_only == 1.0
    assert (u.abs_delta_p_blank == 0).all() and (u.answer_change_blank == 0).all()


def test_quadrants_by_hand():
    q = quadrant_units(records(3, p_text=0.85), threshold=0.1)
    s0, s1 = q[q.study_id == "s0"].iloc[0], q[q.study_id == "s1"].iloc[0]
    # s0: inconsistent (variant 3 says no); mean |delta| = (5 * 0.05 + 0.65) / 6 = 0.15 -> dependent
    assert not s0.consistent and s0.mean_abs_delta == pytest.approx(0.15) and s0.q_inconsistent_dependent == 1
    # s1: consistent, |delta| 0.05 < 0.1 -> independent: a consistent model that ignores the image
    assert s1.consistent and s1.q_consistent_independent == 1
    assert (q[list(QUADRANTS)].sum(axis=1) == 1).all()


def test_a_negated_paraphrase_is_consistent_when_the_judgement_holds():
    df = records(1, p_text=0.9)
    df.loc[df.variant_id == 3, ["answer_gt", "p_yes", "answer", "correct"]] = ["no", 0.1, "no", True]
    q = quadrant_units(df)
    assert bool(q.iloc[0].consistent), "the answer 'no' to a negated wording is the same judgement"


def test_metric_table_equals_a_direct_bootstrap():
    rng = np.random.default_rng(1)
    units = pd.DataFrame({"model": "a", "finding": "f", "cluster_id": rng.integers(0, 30, 200).astype(str),
                          "x": rng.random(200)})  # fmt: skip
    units.loc[:9, "x"] = np.nan
    t = metric_table(units, ["x"], n_boot=2000, seed=3, per_finding=False)
    row = t.iloc[0]
    defined = units.dropna()
    assert row.estimate == pytest.approx(defined.x.mean()) and row.n_units == 190
    clusters = sorted(units.cluster_id.unique())
    sums = np.zeros((len(clusters), 2))
    for i, c in enumerate(clusters):
        d = defined[defined.cluster_id == c]
        sums[i] = d.x.sum(), len(d)
    ref = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=2000, seed=3)
    assert (row.ci_low, row.ci_high) == pytest.approx((ref.ci_low, ref.ci_high), abs=1e-12)
    assert "10 undefined" in row.warning


def test_controls_table_has_every_metric_and_pairs():
    df = pd.concat([records(6, 0.5, ("a",)), records(6, 0.85, ("b",))])
    t = controls_table(df, n_boot=500)
    assert {"a", "b", "a - b"} <= set(t.model)
    assert {"abs_delta_p_text_only", "answer_change_blank", *QUADRANTS} <= set(t.metric)
    d = t[(t.model == "a - b") & (t.metric == "abs_delta_p_text_only") & (t.finding == "ALL")].iloc[0]
    assert d.estimate == pytest.approx(row_units(df[df.model == "a"]).abs_delta_p_text_only.mean()
                                       - row_units(df[df.model == "b"]).abs_delta_p_text_only.mean())  # fmt: skip
    blank = t[(t.model == "a") & (t.metric == "answer_change_blank") & (t.finding == "ALL")].iloc[0]
    assert blank.estimate == 0 and blank.ci_method == "exact_one_sided_clusters" and blank.ci_high > 0
