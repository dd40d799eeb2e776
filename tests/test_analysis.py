"""Tests of medvlm.analysis.analysis.summarize on small synthetic result records."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from medvlm.analysis import analysis as an

A, B = "llava_rad", "medgemma"
V0_MAP = np.array([1.0, 1.0, 0.0, 0.0])
OTHER_MAP = np.array([0.0, 0.0, 1.0, 1.0])
B_MAP = np.array([1.0, 2.0, 3.0, 4.0])


def _records_and_maps():
    """Two studies of two patients, findings effusion / edema, six variants, two models.

    llava_rad answers (y = yes, n = no; gt in brackets):
      s1 effusion [yes]: y y n y y y          correct 5/6, flips 1/5, complete, disagree
      s2 effusion [no]:  n n n n n n          correct 6/6, flips 0/5, agree, consistent-correct
      s1 edema    [no]:  y n n n n (v5 failed) correct 4/5, flips 4/4, incomplete
      s2 edema    [yes]: y y y y y y          correct 6/6, flips 0/5, agree, consistent-correct
    medgemma answers the truth everywhere.
    llava_rad maps: V0_MAP everywhere except s1 effusion variant 1 (OTHER_MAP: JS 1, IoU 0,
    Spearman -1) and s2 edema variant 3 (no map). medgemma maps: B_MAP everywhere.
    """
    a_answers = {
        ("s1", "effusion"): ("yes", "yyn yyy"),
        ("s2", "effusion"): ("no", "nnn nnn"),
        ("s1", "edema"): ("no", "ynn nnF"),
        ("s2", "edema"): ("yes", "yyy yyy"),
    }
    recs, maps, common = [], {}, {}
    for (study, finding), (gt, codes) in a_answers.items():
        codes = codes.replace(" ", "")
        for v in range(6):
            for model in (A, B):
                code = codes[v] if model == A else gt[0]
                ok = code != "F"
                answer = {"y": "yes", "n": "no"}.get(code)
                recs.append(
                    {
                        "model": model,
                        "study_id": study,
                        "cluster_id": "p" + study[1:],
                        "finding": finding,
                        "variant_id": v,
                        "answer_gt": gt,
                        "p_yes": 0.9 if answer == "yes" else 0.2,
                        "answer": answer,
                        "correct": ok and answer == gt,
                        "status": "ok" if ok else "failed",
                    }
                )
                if not ok:
                    continue
                key = (model, study, finding, v)
                if model == B:
                    maps[key] = B_MAP
                elif (study, finding, v) == ("s1", "effusion", 1):
                    maps[key] = OTHER_MAP
                elif (study, finding, v) != ("s2", "edema", 3):
                    maps[key] = V0_MAP
                common[key] = (
                    OTHER_MAP if (model == B and (study, finding, v) == ("s1", "effusion", 0)) else V0_MAP
                )
    return pd.DataFrame(recs), maps, common


def _getter(store):
    return lambda model, study, finding, variant: store.get((model, study, finding, variant))


def _row(table, model, metric, finding=an.ALL):
    sel = table[(table["model"] == model) & (table["metric"] == metric) & (table["finding"] == finding)]
    assert len(sel) == 1, (model, metric, finding, len(sel))
    return sel.iloc[0]


@pytest.fixture(scope="module")
def hand_tables():
    recs, maps, common = _records_and_maps()
    return an.summarize(recs, _getter(maps), n_boot=200, seed=3, get_common_map=_getter(common))


def test_schema_and_shapes(hand_tables):
    t = hand_tables
    assert list(t.summary.columns) == list(an.SUMMARY_COLUMNS)
    assert list(t.per_finding.columns) == list(an.SUMMARY_COLUMNS)
    assert list(t.per_study.columns) == list(an.PER_STUDY_COLUMNS)
    n_per_slice = 2 * len(an.METRICS) + len(an.METRICS) + len(an.BETWEEN_METRICS)
    assert len(t.summary) == n_per_slice and set(t.summary["finding"]) == {an.ALL}
    assert len(t.per_finding) == 2 * n_per_slice and set(t.per_finding["finding"]) == {"edema", "effusion"}
    assert set(t.summary["model"]) == {A, B, f"{A} - {B}", f"{A} vs {B}"}
    assert len(t.per_study) == 8
    assert (t.summary["n_boot"] == 200).all() and (t.summary["seed"] == 3).all()
    # two clusters: no interval at all (fewer than 5), flagged few_clusters
    assert (t.summary["ci_method"] == "none").all() and t.summary["few_clusters"].all()
    assert t.n_negated == {A: 0, B: 0} and (t.per_study["n_negated"] == 0).all()


def test_hand_checked_estimates(hand_tables):
    s = hand_tables.summary
    assert _row(s, A, "accuracy")["estimate"] == pytest.approx(21 / 23)
    assert _row(s, A, "flip_rate")["estimate"] == pytest.approx(5 / 19)
    assert _row(s, A, "all_agree")["estimate"] == pytest.approx(2 / 3)
    assert _row(s, A, "consistent_correct")["estimate"] == pytest.approx(2 / 3)
    # 18 variant/variant-0 map pairs (19 minus the missing map): one with JS 1, IoU 0, Spearman -1
    assert _row(s, A, "attn_js_vs_v0")["estimate"] == pytest.approx(1 / 18)
    assert _row(s, A, "attn_iou10_vs_v0")["estimate"] == pytest.approx(17 / 18)
    assert _row(s, A, "attn_spearman_vs_v0")["estimate"] == pytest.approx(16 / 18)
    assert _row(s, A, "attn_entropy")["estimate"] == pytest.approx(0.5)
    assert _row(s, A, "attn_js_vs_v0")["n_units"] == 18
    assert _row(s, A, "accuracy")["n_rows"] == 23 and _row(s, A, "accuracy")["n_failed"] == 1
    assert _row(s, A, "accuracy")["n_clusters"] == 2
    assert _row(s, B, "accuracy")["estimate"] == 1.0 and _row(s, B, "flip_rate")["estimate"] == 0.0
    assert _row(s, B, "auroc")["estimate"] == 1.0
    # p_yes follows the answer (0.9 yes, 0.2 no). Positives: 11 at 0.9, 1 at 0.2; negatives:
    # 1 at 0.9, 10 at 0.2. Wins 11 * 10, ties 11 * 1 + 1 * 10 (count half), over 12 * 11 pairs.
    assert _row(s, A, "auroc")["estimate"] == pytest.approx((11 * 10 + 0.5 * (11 * 1 + 1 * 10)) / (12 * 11))
    # fleiss for llava_rad: complete groups s1-eff (5 y 1 n), s2-eff (6 n), s2-edema (6 y)
    p_bar = (2 / 3 + 1 + 1) / 3
    p_e = (11 / 18) ** 2 + (7 / 18) ** 2  # 11 yes, 7 no of 18 ratings
    assert _row(s, A, "fleiss_kappa")["estimate"] == pytest.approx((p_bar - p_e) / (1 - p_e))
    # paired differences on the shared clusters (both patients)
    assert _row(s, f"{A} - {B}", "accuracy")["estimate"] == pytest.approx(21 / 23 - 1)
    assert _row(s, f"{A} - {B}", "flip_rate")["estimate"] == pytest.approx(5 / 19)
    assert _row(s, f"{A} - {B}", "accuracy")["n_rows"] == 47
    # between models: 23 shared ok questions, one with disjoint common maps
    assert _row(s, f"{A} vs {B}", "attn_js_between")["estimate"] == pytest.approx(1 / 23)
    f = hand_tables.per_finding
    assert _row(f, A, "accuracy", "effusion")["estimate"] == pytest.approx(11 / 12)
    assert _row(f, A, "flip_rate", "edema")["estimate"] == pytest.approx(4 / 9)


def test_few_clusters_give_no_interval_and_one_warning_per_table(hand_tables):
    s = hand_tables.summary
    acc = _row(s, A, "accuracy")
    assert acc["ci_method"] == "none" and acc["few_clusters"] and acc["n_clusters"] == 2
    for col in ("ci_low", "ci_high", "ci_low_percentile", "ci_high_percentile"):
        assert np.isnan(acc[col])
    # the cluster count is stated once per table, never in the rows' warnings
    assert not s["warning"].fillna("").str.contains("clusters").any()
    assert not hand_tables.per_finding["warning"].fillna("").str.contains("clusters").any()
    few = [w for w in hand_tables.warnings if "fewer than 25 clusters" in w]
    assert len(few) == 2 and few[0].startswith(f"summary: {len(s)} of {len(s)} rows")
    assert few[1].startswith("per_finding: ") and f"{len(s)} of them have fewer than 5" in few[0]
    assert not any("only 2 clusters" in w for w in hand_tables.warnings)
    assert any("llava_rad: 1 of 24 records failed" in w for w in hand_tables.warnings)
    assert any("llava_rad: 1 of 23 ok records have no attention map" in w for w in hand_tables.warnings)


def test_per_study_rows(hand_tables):
    ps = hand_tables.per_study.set_index(["model", "study_id", "finding"])
    r = ps.loc[(A, "s1", "edema")]
    assert (r["n_variants_ok"], r["n_failed"], r["flips"], r["comparisons"]) == (5, 1, 4, 4)
    assert r["accuracy"] == pytest.approx(0.8) and not r["complete"] and np.isnan(r["all_agree"])
    r = ps.loc[(A, "s1", "effusion")]
    assert r["attn_js_vs_v0"] == pytest.approx(0.2) and r["all_agree"] == 0.0 and r["n_maps"] == 6
    r = ps.loc[(A, "s2", "edema")]
    assert r["n_maps"] == 5 and r["consistent_correct"] == 1.0


def test_paired_difference_of_a_model_with_its_copy_is_zero_width():
    recs, maps = _random_records(n_clusters=8)
    recs = recs[recs["model"] == A]
    copy = recs.assign(model="copy")
    maps.update({("copy", *k[1:]): v for k, v in maps.items() if k[0] == A})
    t = an.summarize(pd.concat([recs, copy]), _getter(maps), n_boot=100, seed=0, pairs=[(A, "copy")])
    diff = t.summary[t.summary["model"] == f"{A} - copy"]
    assert len(diff) == len(an.METRICS)
    defined = diff[diff["estimate"].notna()]
    assert len(defined) == len(an.METRICS) and (defined["ci_method"] == "bca").all()
    for col in ("estimate", "ci_low", "ci_high", "ci_low_percentile", "ci_high_percentile"):
        np.testing.assert_array_equal(defined[col].to_numpy(dtype=float), 0.0)
    assert defined["warning"].str.contains("zero-width interval, not a confidence statement").all()


def _random_records(n_clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    recs, maps = [], {}
    for c, finding, model in itertools.product(range(n_clusters), ("effusion", "edema"), (A, B)):
        gt = "yes" if (c + len(finding)) % 3 == 0 else "no"
        skill = 0.8 if model == A else 0.7
        base = rng.random(16)
        for v in range(6):
            p = float(np.clip((skill if gt == "yes" else 1 - skill) + 0.2 * rng.standard_normal(), 0, 1))
            answer = "yes" if p >= 0.5 else "no"
            status = "failed" if rng.random() < 0.03 else "ok"
            recs.append(
                {
                    "model": model,
                    "study_id": f"s{c}",
                    "cluster_id": f"p{c}",
                    "finding": finding,
                    "variant_id": v,
                    "answer_gt": gt,
                    "p_yes": p,
                    "answer": answer,
                    "correct": answer == gt,
                    "status": status,
                }
            )
            maps[(model, f"s{c}", finding, v)] = base + 0.3 * rng.random(16)
    return pd.DataFrame(recs), maps


def test_random_records_are_reproducible_and_well_formed():
    recs, maps = _random_records()
    t1 = an.summarize(recs, _getter(maps), n_boot=150, seed=5)
    t2 = an.summarize(recs.sample(frac=1.0, random_state=1), _getter(maps), n_boot=150, seed=5)
    pd.testing.assert_frame_equal(t1.summary, t2.summary)
    s = t1.summary
    assert len(s) == 3 * len(an.METRICS)
    model_rows = s[s["model"].isin([A, B])]
    assert model_rows["estimate"].notna().all()
    assert (model_rows["n_clusters"] == 30).all()
    assert model_rows["warning"].isna().all()
    assert (model_rows["ci_low"] <= model_rows["ci_high"]).all()
    assert (model_rows["ci_low_percentile"] <= model_rows["estimate"]).all()
    assert (model_rows["estimate"] <= model_rows["ci_high_percentile"]).all()
    ok = recs[recs["status"] == "ok"]
    for m in (A, B):
        assert _row(s, m, "accuracy")["estimate"] == pytest.approx(ok[ok["model"] == m]["correct"].mean())
    diff = _row(s, f"{A} - {B}", "accuracy")
    assert diff["estimate"] == pytest.approx(
        _row(s, A, "accuracy")["estimate"] - _row(s, B, "accuracy")["estimate"]
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.drop(columns=["p_yes"]), "lack required columns \\['p_yes'\\]"),
        (
            lambda d: d.assign(variant_id=d["variant_id"].replace(5, 6)),
            "expected variant_id in 0..5, found \\['6'\\]",
        ),
        (lambda d: pd.concat([d, d.iloc[:2]]), "found 2 duplicates"),
        (
            lambda d: d.assign(correct=~d["correct"].astype(bool)),
            "correct disagrees with answer == answer_gt",
        ),
        (lambda d: d.assign(status=d["status"].replace("failed", "error")), "found 1 other values"),
    ],
)
def test_bad_records_raise(mutate, message):
    recs, maps, _ = _records_and_maps()
    with pytest.raises(ValueError, match=message):
        an.summarize(mutate(recs), _getter(maps), n_boot=10, seed=0)


def test_bad_map_raises_with_its_key():
    recs, maps, _ = _records_and_maps()
    maps[(B, "s1", "edema", 2)] = np.array([1.0, -1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="medgemma / s1 / edema / variant 2: .*1 negative"):
        an.summarize(recs, _getter(maps), n_boot=10, seed=0)


def test_model_without_rows_in_a_finding_gets_nan_rows_not_numbers():
    recs, maps, _ = _records_and_maps()
    recs = recs[~((recs["model"] == B) & (recs["finding"] == "edema"))]
    t = an.summarize(recs, _getter(maps), n_boot=50, seed=0)
    for model in (B, f"{A} - {B}"):
        row = _row(t.per_finding, model, "accuracy", "edema")
        assert np.isnan(row["estimate"]) and np.isnan(row["ci_low"]) and np.isnan(row["ci_high_percentile"])
        assert row["n_clusters"] == 0 and "no clusters to resample" in row["warning"]
    assert _row(t.per_finding, A, "accuracy", "edema")["estimate"] == pytest.approx(10 / 11)
    assert _row(t.summary, B, "accuracy")["n_rows"] == 12


def test_map_length_mismatch_names_the_question():
    recs, maps, _ = _records_and_maps()
    maps[(A, "s2", "effusion", 4)] = np.ones(9)
    with pytest.raises(ValueError, match="llava_rad / s2 / effusion / variant 4 vs variant 0: .*9 vs 4"):
        an.summarize(recs, _getter(maps), n_boot=10, seed=0)


# ----------------------------------------------------------------------------- negated paraphrases


_FLIP = {"yes": "no", "no": "yes"}


def _negated_records(n_studies=6, negated_variant=3):
    """One finding asked six ways; variant `negated_variant` is worded the other way round, so
    its answer_gt is the opposite of variant 0's. llava_rad answers every row correctly (the
    same judgement throughout); medgemma answers variant 0's word to all six (a literal word
    that stays the same while its judgement flips on the negated variant)."""
    recs = []
    for c in range(n_studies):
        gt0 = "yes" if c % 2 == 0 else "no"
        for v in range(6):
            gt = _FLIP[gt0] if v == negated_variant else gt0
            for model, answer in ((A, gt), (B, gt0)):
                recs.append(
                    {
                        "model": model,
                        "study_id": f"s{c}",
                        "cluster_id": f"s{c}",
                        "finding": "effusion",
                        "variant_id": v,
                        "answer_gt": gt,
                        "p_yes": 0.9 if answer == "yes" else 0.1,
                        "answer": answer,
                        "correct": answer == gt,
                        "status": "ok",
                    }
                )
    return pd.DataFrame(recs)


@pytest.mark.parametrize("polarity", ["inferred", "given", "given_in_some_rows", "nullable_strings"])
def test_negated_paraphrase_counts_judgements_not_words(polarity):
    recs = _negated_records()
    if polarity != "inferred":
        recs["polarity"] = np.where(recs["variant_id"] == 3, "Negated", "direct")
    if polarity in ("given_in_some_rows", "nullable_strings"):  # e.g. rows from before the column: inferred
        recs.loc[recs["study_id"].isin(["s0", "s1"]), "polarity"] = None
    if polarity == "nullable_strings":
        recs["polarity"] = recs["polarity"].astype("string")  # missing values are pd.NA
    t = an.summarize(recs, lambda *k: None, n_boot=200, seed=0)
    s = t.summary
    g = 6
    # llava_rad: same judgement on all six wordings -> no flip, all agree, all correct
    assert _row(s, A, "accuracy")["estimate"] == 1.0
    assert _row(s, A, "flip_rate")["estimate"] == 0.0
    assert _row(s, A, "all_agree")["estimate"] == 1.0
    assert _row(s, A, "consistent_correct")["estimate"] == 1.0
    assert _row(s, A, "auroc")["estimate"] == 1.0
    # medgemma: the same word everywhere is a changed judgement on the negated variant
    assert _row(s, B, "accuracy")["estimate"] == pytest.approx(5 / 6)
    assert _row(s, B, "flip_rate")["estimate"] == pytest.approx(1 / 5)
    assert _row(s, B, "all_agree")["estimate"] == 0.0
    assert t.n_negated == {A: g, B: g}
    ps = t.per_study.set_index(["model", "study_id", "finding"])
    assert ps.loc[(A, "s1", "effusion"), "answer_gt"] == "no" and ps.loc[(A, "s1", "effusion"), "n_negated"] == 1
    assert ps.loc[(B, "s0", "effusion"), "flips"] == 1 and ps.loc[(A, "s0", "effusion"), "flips"] == 0
    # at a boundary the interval is the exact one-sided bound over the 6 clusters, not [0, 0]
    flip = _row(s, A, "flip_rate")
    assert flip["ci_method"] == "exact_one_sided_clusters" and flip["few_clusters"]
    assert (flip["ci_low"], flip["ci_high"]) == pytest.approx((0.0, 1 - 0.05 ** (1 / g)))
    assert np.isnan(flip["ci_low_percentile"]) and "exact one-sided" in flip["warning"]
    agree = _row(s, A, "all_agree")
    assert (agree["ci_low"], agree["ci_high"]) == pytest.approx((0.05 ** (1 / g), 1.0))
    diff = _row(s, f"{A} - {B}", "all_agree")  # 1 - 0, both at a boundary: Bonferroni of the two
    u = 1 - 0.025 ** (1 / g)
    assert diff["ci_method"] == "exact_one_sided_clusters"
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((1 - 2 * u, 1.0))
    kappa = _row(s, A, "fleiss_kappa")  # judgements agree within groups, differ between them
    assert kappa["estimate"] == 1.0 and kappa["ci_method"] == "bca"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # variant 4 marked negated although its answer_gt equals variant 0's
        (lambda r: r.assign(polarity=np.where(r["variant_id"] == 4, "negated", None)),
         r"polarity contradicts answer_gt in 12 of 12 \(model, study, finding\) groups"),
        # variant 3 marked direct although its answer_gt differs from variant 0's
        (lambda r: r.assign(polarity=np.where(r["variant_id"] == 3, "direct", None)),
         r"polarity contradicts answer_gt in 12 of 12"),
        (lambda r: r.assign(polarity=np.where(r["variant_id"] == 0, "negated", None)),
         r"variant 0 is the original wording and cannot be negated: 12 of 12"),
        (lambda r: r.assign(polarity="reversed"), r"polarity must be 'direct', 'negated' or empty, found 72 of 72"),
        (lambda r: r[~((r["study_id"] == "s2") & (r["variant_id"] == 0))],
         r"2 of 12 \(model, study, finding\) groups lack variant 0 and their answer_gt differs"),
        # llava_rad's variant 2 has the opposite answer_gt of medgemma's variant 2
        (lambda r: r.assign(
            answer_gt=np.where((r["model"] == A) & (r["variant_id"] == 2), r["answer_gt"].map(_FLIP), r["answer_gt"]),
            answer=lambda d: np.where(d["model"] == A, d["answer_gt"], d["answer"]),
            correct=lambda d: d["answer"] == d["answer_gt"]),
         r"must be the same for every model of a \(study, finding, variant\), found 6 of 36"),
    ],
)
def test_polarity_that_cannot_hold_is_refused(mutate, message):
    with pytest.raises(ValueError, match=message):
        an.summarize(mutate(_negated_records()), lambda *k: None, n_boot=10, seed=0)


def test_group_without_variant_0_takes_its_reference_from_the_given_polarity():
    recs = _negated_records()
    recs = recs[~((recs["study_id"] == "s2") & (recs["variant_id"] == 0))].copy()
    recs["polarity"] = np.where(recs["variant_id"] == 3, "negated", "direct")
    t = an.summarize(recs, lambda *k: None, n_boot=10, seed=0)
    ps = t.per_study.set_index(["model", "study_id", "finding"])
    assert ps.loc[(A, "s2", "effusion"), "answer_gt"] == "yes" and not ps.loc[(A, "s2", "effusion"), "has_v0"]
    assert t.n_negated == {A: 6, B: 6}
