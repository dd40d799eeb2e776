"""Tests of medvlm.analysis.metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import mannwhitneyu, spearmanr

from medvlm.analysis import metrics as mt

NAN = np.nan

# group answers (1 yes, 0 no, nan missing), columns = variants 0..5
ANSWERS = np.array(
    [
        [1, 1, 0, 1, NAN, 0],  # v0 yes; v1..v5 present 4, flips 2; incomplete
        [NAN, 1, 1, 1, 1, 1],  # no v0: no comparisons; incomplete
        [0, 0, 0, 0, 0, 0],  # complete, all agree; flips 0 of 5
        [1, 1, 1, 1, 1, 0],  # complete, disagree; flips 1 of 5
    ]
)
TRUTH = np.array([1.0, 1.0, 0.0, 1.0])


def test_accuracy_and_units():
    correct = np.array([True, False, True, True])
    assert mt.accuracy(correct) == 0.75
    np.testing.assert_array_equal(mt.accuracy_units(correct), [[1, 1], [0, 1], [1, 1], [1, 1]])
    assert math.isnan(mt.accuracy(np.array([], dtype=bool)))


def test_auroc_hand_cases():
    assert float(mt.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], dtype=bool))) == 0.75
    # a tie between a positive and a negative counts half: (0.5 + 1 + 1 + 1) / 4
    assert float(mt.auroc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1], dtype=bool))) == 0.875
    assert math.isnan(float(mt.auroc(np.array([0.1, 0.2]), np.array([True, True]))))


def test_auroc_matches_mann_whitney_and_integer_weights_match_repeated_rows():
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.random(n) < 0.4
    scores = np.round(rng.random(n) * 0.5 + 0.3 * labels, 1)  # many ties
    u = mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert float(mt.auroc(scores, labels)) == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)

    weights = rng.integers(0, 4, size=(3, n)).astype(float)
    batch = mt.auroc(scores, labels, weights)
    assert batch.shape == (3,)
    for b in range(3):
        rep = np.repeat(np.arange(n), weights[b].astype(int))
        assert batch[b] == pytest.approx(float(mt.auroc(scores[rep], labels[rep])), abs=1e-12)


def test_auroc_cluster_terms_reproduce_the_row_weighted_auroc():
    rng = np.random.default_rng(5)
    n, g = 150, 12
    cluster = rng.integers(0, g, size=n)
    labels = rng.random(n) < 0.5
    scores = np.round(rng.random(n) + 0.3 * labels, 1)
    matrix, pos, neg = mt.auroc_cluster_terms(scores, labels, cluster, g)
    assert matrix.shape == (g, g) and pos.sum() == labels.sum() and neg.sum() == (~labels).sum()
    for w in [np.ones(g), rng.integers(0, 4, size=g).astype(float)]:
        bilinear = w @ matrix @ w / ((w @ pos) * (w @ neg))
        assert bilinear == pytest.approx(float(mt.auroc(scores, labels, w[cluster])), abs=1e-12)


def test_flip_units_and_rate():
    np.testing.assert_array_equal(mt.flip_units(ANSWERS), [[2, 4], [0, 0], [0, 5], [1, 5]])
    assert mt.flip_rate(ANSWERS) == pytest.approx(3 / 14)


def test_all_agree_and_consistent_correct():
    np.testing.assert_array_equal(mt.complete_groups(ANSWERS), [False, False, True, True])
    np.testing.assert_array_equal(mt.all_agree_units(ANSWERS), [[0, 0], [0, 0], [1, 1], [0, 1]])
    assert mt.all_agree_rate(ANSWERS) == 0.5
    # group 2 agrees on "no" and the truth is "no"; group 3 disagrees
    np.testing.assert_array_equal(mt.consistent_correct_units(ANSWERS, TRUTH)[:, 0], [0, 0, 1, 0])
    assert mt.consistent_correct_rate(ANSWERS, TRUTH) == 0.5
    assert mt.consistent_correct_rate(ANSWERS, np.array([1.0, 1.0, 1.0, 1.0])) == 0.0


def test_fleiss_kappa_hand_example():
    # groups: 6 yes; 3 yes 3 no; 5 yes 1 no.  P_i = 1, 0.4, 2/3 -> P_bar = 31/45;
    # p_yes = 14/18 -> P_e = 53/81;  kappa = (31/45 - 53/81) / (28/81) = 0.1 exactly.
    answers = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=float)
    np.testing.assert_allclose(mt.fleiss_units(answers)[:, 0], [1.0, 0.4, 2 / 3])
    assert mt.fleiss_kappa(answers) == pytest.approx(0.1, abs=1e-12)


def _statsmodels_style_fleiss(table: np.ndarray) -> float:
    """statsmodels.stats.inter_rater.fleiss_kappa(table, method='fleiss'), written out."""
    n_sub, _ = table.shape
    n_rat = table.sum(axis=1)[0]
    p_cat = table.sum(axis=0) / (n_sub * n_rat)
    p_rat = ((table * table).sum(axis=1) - n_rat) / (n_rat * (n_rat - 1.0))
    p_mean = p_rat.mean()
    p_mean_exp = (p_cat * p_cat).sum()
    return (p_mean - p_mean_exp) / (1 - p_mean_exp)


def test_fleiss_kappa_matches_statsmodels_formula_and_ignores_incomplete_groups():
    rng = np.random.default_rng(1)
    latent = rng.random(40)
    answers = (rng.random((40, 6)) < latent[:, None]).astype(float)
    yes = answers.sum(axis=1)
    table = np.stack([yes, 6 - yes], axis=1)
    expected = _statsmodels_style_fleiss(table)
    assert mt.fleiss_kappa(answers) == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected < 0.9  # a non-trivial kappa
    with_incomplete = np.vstack([answers, [[1, NAN, 0, 0, 0, 0]]])
    assert mt.fleiss_kappa(with_incomplete) == pytest.approx(expected, abs=1e-12)


def test_fleiss_statistic_is_vectorised_and_undefined_cases_are_nan():
    a = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=float)
    b = np.array([[0] * 6, [1] * 6], dtype=float)  # perfect agreement, both categories used
    stacked = np.stack([mt.fleiss_units(a).sum(0), mt.fleiss_units(b).sum(0)])
    out = mt.fleiss_kappa_statistic(stacked)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(mt.fleiss_kappa(a)) and out[1] == pytest.approx(1.0)
    assert math.isnan(mt.fleiss_kappa(np.ones((3, 6))))  # one category only
    assert math.isnan(mt.fleiss_kappa(np.full((2, 6), NAN)))  # no complete group


def test_answers_shape_is_checked():
    with pytest.raises(ValueError, match="expected answers \\[n_groups, 6\\] variants, found 5"):
        mt.flip_units(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="found 1 other values"):
        mt.flip_units(np.array([[0, 1, 2, 0, 0, 0]], dtype=float))


def test_js_divergence_base_2_bounds_and_hand_value():
    p = np.array([1.0, 2.0, 3.0])
    assert mt.js_divergence(p, 5 * p) == 0.0
    assert mt.js_divergence(np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0, 1.0])) == 1.0
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); 0.5 log2(4/3) + 0.5 (0.5 log2(2/3) + 0.5 log2 2)
    hand = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    assert mt.js_divergence(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(hand, abs=1e-12)
    assert hand == pytest.approx(0.311278, abs=1e-6)
    rng = np.random.default_rng(2)
    a, b = rng.random(50), rng.random(50)
    # the divergence is the square of scipy's distance
    assert mt.js_divergence(a, b) == pytest.approx(jensenshannon(a, b, base=2) ** 2, abs=1e-12)
    assert mt.js_divergence(a, b) == pytest.approx(mt.js_divergence(b, a), abs=1e-15)


def test_spearman():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert mt.spearman(a, a * 10) == pytest.approx(1.0)
    assert mt.spearman(a, a[::-1]) == pytest.approx(-1.0)
    assert math.isnan(mt.spearman(a, np.ones(4)))
    rng = np.random.default_rng(3)
    x, y = rng.random(30), rng.random(30)
    assert mt.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    xt, yt = np.round(x, 1), np.round(y, 1)  # with ties: average ranks
    assert mt.spearman(xt, yt) == pytest.approx(spearmanr(xt, yt).statistic, abs=1e-12)


def test_topk_iou():
    p = np.zeros(20)
    q = np.zeros(20)
    p[[0, 1]] = [5, 4]
    q[[1, 2]] = [5, 4]
    assert mt.topk_iou(p + 0.01, q + 0.01) == pytest.approx(1 / 3)  # ceil(10% of 20) = 2 tokens
    assert mt.topk_iou(p + 0.01, p + 0.01) == 1.0
    r = np.arange(256, dtype=float)  # ceil(25.6) = 26 tokens: 230..255
    s = r.copy()
    s[229] = 1000.0  # token 229 enters s's top set and pushes token 230 out
    assert mt.topk_iou(r, s) == pytest.approx(25 / 27)


def test_normalised_entropy():
    assert mt.normalised_entropy(np.ones(7)) == pytest.approx(1.0)
    assert mt.normalised_entropy(np.array([0.0, 3.0, 0.0])) == 0.0
    assert mt.normalised_entropy(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([1.0, -1.0, 2.0]), "1 negative"),
        (np.array([1.0, np.nan, 2.0]), "1 non-finite"),
        (np.zeros(3), "sums to 0"),
        (np.ones((2, 2)), "got 2 dimensions"),
    ],
)
def test_bad_maps_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        mt.js_divergence(bad, np.ones(bad.shape))


def test_map_length_mismatch_raises():
    with pytest.raises(ValueError, match="256 vs 1369"):
        mt.topk_iou(np.ones(256), np.ones(1369))


def test_resample_identity():
    rng = np.random.default_rng(4)
    m = rng.random(12)
    box = (10.0, 20.0, 70.0, 60.0)
    np.testing.assert_allclose(mt.resample_to_grid(m, box, (3, 4), box, (3, 4)), m, atol=1e-12)


def test_resample_2x2_to_1x1_is_the_average():
    out = mt.resample_to_grid(np.array([1.0, 2.0, 3.0, 6.0]), (0, 0, 2, 2), (2, 2), (0, 0, 2, 2), (1, 1))
    np.testing.assert_allclose(out, [3.0])


def test_resample_dst_inside_one_src_cell_and_straddling_cells():
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    # dst box inside the bottom-right src cell [1, 2] x [1, 2]
    np.testing.assert_allclose(
        mt.resample_to_grid(m, (0, 0, 2, 2), (2, 2), (1.2, 1.1, 1.8, 1.9), (2, 3)), np.full(6, 4.0)
    )
    # a 1 x 1 dst over [0.5, 1.5] x [0, 1]: half of cell 1, half of cell 2 -> 1.5
    np.testing.assert_allclose(mt.resample_to_grid(m, (0, 0, 2, 2), (2, 2), (0.5, 0, 1.5, 1), (1, 1)), [1.5])
    # 2 x 1 dst over [0.5, 2] x [0, 2]: row 0 = (0.5*1 + 1*2)/1.5, row 1 = (0.5*3 + 1*4)/1.5
    np.testing.assert_allclose(
        mt.resample_to_grid(m, (0, 0, 2, 2), (2, 2), (0.5, 0, 2, 2), (2, 1)), [2.5 / 1.5, 5.5 / 1.5]
    )


def test_resample_llava_crop_and_medgemma_whole_image_onto_common_region():
    # 800 x 600 image: LLaVA-Rad sees the central 600 x 600, MedGemma all of it
    llava_box, gemma_box = (100.0, 0.0, 700.0, 600.0), (0.0, 0.0, 800.0, 600.0)
    common = mt.intersect_boxes(llava_box, gemma_box)
    assert common == llava_box
    gemma = np.tile(np.arange(16, dtype=float), 16)  # value = column index, over the whole image
    out = mt.resample_to_grid(gemma, gemma_box, (16, 16), common, (12, 12))
    assert out.shape == (144,)
    # column j of the common grid covers x in [100 + 50 j, 150 + 50 j); gemma cells are 50 px wide
    np.testing.assert_allclose(out.reshape(12, 12)[0], np.arange(12) + 2.0)
    flat = mt.resample_to_grid(np.full(37 * 37, 2.0), llava_box, (37, 37), common, (12, 12))
    np.testing.assert_allclose(flat, 2.0)
    with pytest.raises(ValueError, match="extends outside src_box"):
        mt.resample_to_grid(np.ones(4), llava_box, (2, 2), gemma_box, (2, 2))
    with pytest.raises(ValueError, match="expected 4 values for a 2 x 2 grid, found 5"):
        mt.resample_to_grid(np.ones(5), llava_box, (2, 2), llava_box, (2, 2))


def test_intersect_boxes():
    assert mt.intersect_boxes((0, 0, 10, 10), (5, -5, 15, 8)) == (5.0, 0.0, 10.0, 8.0)
    with pytest.raises(ValueError, match="do not overlap"):
        mt.intersect_boxes((0, 0, 1, 1), (1, 0, 2, 1))
