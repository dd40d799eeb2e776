"""Tests of medvlm.analysis.stats: the cluster bootstrap against a brute-force loop, against
scipy.stats.bootstrap fed cluster indices, a coverage simulation, pairing, and warnings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit, ndtr, ndtri

from medvlm.analysis import metrics as mt
from medvlm.analysis import stats as st


def _clustered(
    seed: int, g: int, mu: float = -0.85, sigma: float = 1.0
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-cluster 0/1 rows with a random cluster effect; returns (rows per cluster, sums [G, 2])."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(4, size=g)
    p = expit(mu + sigma * rng.standard_normal(g))
    rows = [(rng.random(n) < pc).astype(float) for n, pc in zip(sizes, p, strict=True)]
    sums = np.array([[r.sum(), r.size] for r in rows])
    return rows, sums


def test_weights_equal_direct_multinomial_and_are_chunk_invariant():
    g, b = 13, 257
    direct = np.random.default_rng(5).multinomial(g, [1 / g] * g, size=b)
    w = st.bootstrap_weights(g, n_boot=b, seed=5)
    assert w.shape == (b, g)
    np.testing.assert_array_equal(w, direct)
    chunked = np.concatenate(list(st.iter_bootstrap_weights(g, n_boot=b, seed=5, chunk=10)))
    np.testing.assert_array_equal(chunked, direct)
    assert np.all(w.sum(axis=1) == g)


def test_matches_brute_force_loop_over_clusters():
    g, b, seed, level = 40, 300, 11, 0.9
    rows, sums = _clustered(0, g)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(b):
        counts = rng.multinomial(g, [1 / g] * g)
        drawn = np.concatenate([rows[c] for c in np.repeat(np.arange(g), counts)])
        reps.append(drawn.mean())
    reps = np.array(reps)
    est = np.concatenate(rows).mean()
    jack = np.array([np.concatenate(rows[:c] + rows[c + 1 :]).mean() for c in range(g)])

    alpha = (1 - level) / 2
    pct = st.cluster_bootstrap(
        sums, st.ratio_statistic, n_boot=b, seed=seed, level=level, method="percentile"
    )
    assert pct.estimate == pytest.approx(est, abs=1e-12)
    assert (pct.ci_low, pct.ci_high) == pytest.approx(tuple(np.quantile(reps, [alpha, 1 - alpha])), abs=1e-12)

    # BCa by the textbook formulas on the brute-force replicates
    z0 = ndtri((np.sum(reps < est) + 0.5 * np.sum(reps == est)) / b)
    d = jack.mean() - jack
    a = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
    z = ndtri(np.array([alpha, 1 - alpha]))
    q = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
    bca = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=b, seed=seed, level=level, method="bca")
    assert (bca.ci_low, bca.ci_high) == pytest.approx(tuple(np.quantile(reps, q)), abs=1e-12)
    assert bca.n_clusters == g and bca.n_boot == b and bca.seed == seed and bca.warning is None
    assert bca.ci_low < est < bca.ci_high


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_agrees_with_scipy_bootstrap_on_cluster_indices(method):
    g = 60
    _, sums = _clustered(1, g)

    def stat(idx, axis=-1):
        s = sums[idx].sum(axis=-2)
        return s[..., 0] / s[..., 1]

    ref = sps.bootstrap(
        (np.arange(g),),
        stat,
        vectorized=True,
        n_resamples=4000,
        method=method.replace("bca", "BCa"),
        confidence_level=0.95,
        rng=np.random.default_rng(3),
    )
    ours = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=4000, seed=4, method=method)
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert ours.ci_high - ours.ci_low > 0.05  # a real interval, not a degenerate one


def test_weighted_rows_auroc_agrees_with_scipy_bca():
    g = 40
    rng = np.random.default_rng(2)
    sizes = 2 + rng.poisson(3, size=g)
    cluster = np.repeat(np.arange(g), sizes)
    effect = rng.standard_normal(g)[cluster]
    labels = rng.random(cluster.size) < expit(effect)
    scores = np.round(expit(effect + 1.2 * labels + rng.standard_normal(cluster.size)), 2)  # ties
    members = [np.flatnonzero(cluster == c) for c in range(g)]

    def stat(idx):
        rows = np.concatenate([members[c] for c in idx])
        return float(mt.auroc(scores[rows], labels[rows]))

    ref = sps.bootstrap(
        (np.arange(g),), stat, vectorized=False, n_resamples=2000, method="BCa", rng=np.random.default_rng(0)
    )
    ours = st.cluster_bootstrap_rows(
        (scores, labels),
        cluster,
        lambda s, y, weights: mt.auroc(s, y, weights),
        n_boot=2000,
        seed=1,
        method="bca",
    )
    assert ours.estimate == pytest.approx(stat(np.arange(g)), abs=1e-12)
    assert ours.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.015)
    assert ours.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.015)


def test_rows_and_sums_front_ends_use_the_same_draws():
    g = 30
    rows, sums = _clustered(3, g)
    values = np.concatenate(rows)
    cluster = np.repeat(np.arange(g), [r.size for r in rows])

    def weighted_mean(v, *, weights):
        return (weights * v).sum(axis=-1) / weights.sum(axis=-1)

    for method in ("percentile", "bca"):
        a = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=500, seed=9, method=method)
        b = st.cluster_bootstrap_rows((values,), cluster, weighted_mean, n_boot=500, seed=9, method=method)
        assert (a.ci_low, a.ci_high, a.estimate) == pytest.approx(
            (b.ci_low, b.ci_high, b.estimate), abs=1e-12
        )


def test_bilinear_auroc_spec_equals_row_weighted_auroc_with_the_same_draws():
    g = 30
    rng = np.random.default_rng(12)
    cluster = np.repeat(np.arange(g), 1 + rng.poisson(3, size=g))
    labels = rng.random(cluster.size) < 0.4
    scores = np.round(rng.random(cluster.size) + 0.4 * labels, 1)
    rows = st.rows_spec((scores, labels), cluster, lambda s, y, weights: mt.auroc(s, y, weights))
    bilinear = st.BilinearRatioSpec(*mt.auroc_cluster_terms(scores, labels, cluster, g))
    np.testing.assert_allclose(bilinear.jackknife(), rows.jackknife(), atol=1e-12)
    res = st.bootstrap_many({"rows": rows, "bilinear": bilinear}, n_boot=300, seed=4)
    for m in ("percentile", "bca"):
        a, b = res["rows"].get(m), res["bilinear"].get(m)
        assert (a.estimate, a.ci_low, a.ci_high) == pytest.approx(
            (b.estimate, b.ci_low, b.ci_high), abs=1e-12
        )
    assert res["rows"].bca.ci_high - res["rows"].bca.ci_low > 0.05


def test_shared_draws_are_the_same_resamples_and_must_match():
    draws = st.BootstrapDraws.make(17, n_boot=123, seed=8)
    assert draws.weights is not None
    np.testing.assert_array_equal(
        np.concatenate(list(draws.chunks())), st.bootstrap_weights(17, n_boot=123, seed=8)
    )
    lazy = st.BootstrapDraws.make(17, n_boot=123, seed=8, max_entries=10)
    assert lazy.weights is None
    np.testing.assert_array_equal(np.concatenate(list(lazy.chunks())), draws.weights)
    spec = {"x": st.sums_spec(np.ones((17, 2)), st.ratio_statistic)}
    with pytest.raises(ValueError, match="expected \\(17, 123, 9\\)"):
        st.bootstrap_many(spec, n_boot=123, seed=9, draws=draws)


def test_coverage_of_clustered_ratio_is_near_nominal():
    g, reps, b = 50, 400, 500
    mu, sigma = -0.85, 1.0
    x, wq = np.polynomial.hermite_e.hermegauss(80)
    truth = float(np.sum(wq * expit(mu + sigma * x)) / np.sqrt(2 * np.pi))  # E[p_cluster]
    hits = {"percentile": 0, "bca": 0}
    for r in range(reps):
        _, sums = _clustered(1000 + r, g, mu, sigma)
        pair = st.cluster_bootstrap_both(sums, st.ratio_statistic, n_boot=b, seed=r)
        for m in hits:
            ci = pair.get(m)
            hits[m] += ci.ci_low <= truth <= ci.ci_high
    for m, h in hits.items():
        assert 0.92 <= h / reps <= 0.98, (m, h / reps)


def test_paired_difference_of_a_model_with_itself_is_zero_width_at_zero():
    _, sums = _clustered(4, 30)
    for method in ("percentile", "bca"):
        ci = st.paired_cluster_bootstrap(
            sums, st.ratio_statistic, sums, st.ratio_statistic, n_boot=400, seed=0, method=method
        )
        assert (ci.estimate, ci.ci_low, ci.ci_high) == (0.0, 0.0, 0.0)


def test_paired_difference_uses_the_same_draws_for_both_models():
    g, b, seed = 35, 400, 7
    _, sums_a = _clustered(5, g)
    rng = np.random.default_rng(6)
    # model b: same clusters, a few answers changed -> strongly correlated with a
    sums_b = sums_a.copy()
    sums_b[:, 0] = np.clip(sums_b[:, 0] + rng.integers(-1, 2, size=g), 0, sums_b[:, 1])
    w = st.bootstrap_weights(g, n_boot=b, seed=seed)
    reps = st.ratio_statistic(w @ sums_a) - st.ratio_statistic(w @ sums_b)
    ci = st.paired_cluster_bootstrap(
        sums_a, st.ratio_statistic, sums_b, st.ratio_statistic, n_boot=b, seed=seed, method="percentile"
    )
    assert (ci.ci_low, ci.ci_high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-12)
    est = st.ratio_statistic(sums_a.sum(0)) - st.ratio_statistic(sums_b.sum(0))
    assert ci.estimate == pytest.approx(float(est), abs=1e-12)
    # unpaired: each model resampled with its own draws
    w_other = st.bootstrap_weights(g, n_boot=b, seed=seed + 1)
    unpaired = st.ratio_statistic(w @ sums_a) - st.ratio_statistic(w_other @ sums_b)
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    # pairing cancels the shared cluster effects: far narrower than the unpaired interval
    assert ci.ci_high - ci.ci_low < 0.5 * (hi - lo)


def test_difference_spec_needs_the_same_clusters():
    a = st.sums_spec(np.ones((4, 2)), st.ratio_statistic)
    b = st.sums_spec(np.ones((5, 2)), st.ratio_statistic)
    with pytest.raises(ValueError, match="4 vs 5"):
        st.DifferenceSpec(a, b)


def test_few_clusters_warn_and_enough_clusters_do_not():
    _, small = _clustered(7, 12)
    ci = st.cluster_bootstrap(small, st.ratio_statistic, n_boot=200, seed=0)
    assert ci.warning == "only 12 clusters (< 25): intervals are unreliable"
    # the cluster count is flagged once, apart from the interval's own notes
    assert ci.few_clusters and ci.notes == () and ci.method == "bca"
    _, big = _clustered(7, 40)
    ci = st.cluster_bootstrap(big, st.ratio_statistic, n_boot=200, seed=0)
    assert ci.warning is None and not ci.few_clusters


def test_fewer_than_five_clusters_give_no_interval():
    _, sums = _clustered(7, 4)
    pair = st.cluster_bootstrap_both(sums, st.ratio_statistic, n_boot=200, seed=0)
    for ci in (pair.percentile, pair.bca):
        assert ci.method == "none" and np.isnan(ci.ci_low) and np.isnan(ci.ci_high)
        assert ci.estimate == pytest.approx(sums[:, 0].sum() / sums[:, 1].sum())
        assert ci.warning == "only 4 clusters (< 5): no interval" and ci.few_clusters
    _, five = _clustered(7, 5)
    assert st.cluster_bootstrap(five, st.ratio_statistic, n_boot=200, seed=0, method="percentile").method == (
        "percentile"
    )


@pytest.mark.parametrize(("events", "g", "level"), [(0, 20, 0.95), (1, 30, 0.95), (0, 60, 0.9)])
def test_proportion_at_a_boundary_gets_the_exact_cluster_bound(events, g, level):
    """Every cluster without an event (or with only events): the bootstrap distribution is a
    point, so the interval is the exact one-sided Clopper-Pearson bound over G clusters."""
    sizes = 1.0 + np.arange(g) % 4
    sums = np.stack([events * sizes, sizes], axis=-1)
    spec = {"p": st.sums_spec(sums, st.ratio_statistic)}
    bootstrap = st.bootstrap_many(spec, n_boot=300, seed=0, level=level)["p"]
    assert (bootstrap.bca.ci_low, bootstrap.bca.ci_high) == (events, events)  # what a bootstrap says
    assert bootstrap.bca.degenerate and "zero-width" in bootstrap.bca.warning
    pair = st.bootstrap_many(spec, n_boot=300, seed=0, level=level, proportions=["p"])["p"]
    alpha = 1.0 - level
    expected = (0.0, 1.0 - alpha ** (1.0 / g)) if events == 0 else (alpha ** (1.0 / g), 1.0)
    for ci in (pair.percentile, pair.bca):
        assert ci.method == "exact_one_sided_clusters" and ci.estimate == events
        assert (ci.ci_low, ci.ci_high) == pytest.approx(expected, abs=1e-15)
        assert f"exact one-sided {level:g} bound over {g} clusters" in ci.warning
        assert "zero-width" not in ci.warning
    # the binomial's own one-sided bound: P(0 events in G trials | p = upper) = alpha
    upper = expected[1] if events == 0 else 1.0 - expected[0]
    assert sps.binom.pmf(0, g, upper) == pytest.approx(alpha)
    if events == 0 and level == 0.95:
        assert expected[1] == pytest.approx(3.0 / g, rel=0.1)  # the rule of three, -ln(0.05) / G


def test_proportion_difference_both_at_boundaries_gets_bonferroni_exact_bounds():
    g = 30
    sizes = np.full(g, 6.0)
    zero = np.stack([0 * sizes, sizes], axis=-1)
    one = np.stack([sizes, sizes], axis=-1)
    zero_spec, one_spec = st.sums_spec(zero, st.ratio_statistic), st.sums_spec(one, st.ratio_statistic)
    diff = {"same": st.DifferenceSpec(zero_spec, zero_spec), "opposite": st.DifferenceSpec(zero_spec, one_spec)}
    res = st.bootstrap_many(diff, n_boot=200, seed=1, proportions=["same", "opposite"])
    u = 1.0 - 0.025 ** (1.0 / g)  # each model's one-sided bound at 97.5%
    same, opposite = res["same"].bca, res["opposite"].bca
    assert same.method == opposite.method == "exact_one_sided_clusters"
    assert (same.estimate, same.ci_low, same.ci_high) == pytest.approx((0.0, -u, u))
    assert (opposite.estimate, opposite.ci_low, opposite.ci_high) == pytest.approx((-1.0, -1.0, -1.0 + 2 * u))
    with pytest.raises(ValueError, match=r"proportions names \['nope'\]"):
        st.bootstrap_many(diff, n_boot=10, seed=1, proportions=["nope"])


def test_proportion_inside_the_range_keeps_its_bootstrap_interval():
    _, sums = _clustered(3, 30)
    plain = st.bootstrap_many({"p": st.sums_spec(sums, st.ratio_statistic)}, n_boot=300, seed=0)["p"]
    marked = st.bootstrap_many(
        {"p": st.sums_spec(sums, st.ratio_statistic)}, n_boot=300, seed=0, proportions=["p"]
    )["p"]
    assert marked == plain and marked.bca.method == "bca" and not marked.bca.degenerate


def test_bca_counts_ties_that_differ_only_by_rounding():
    """A paired difference of two accuracies with equal cluster sizes: a resample's difference
    (k_a - k_b) / (6 G) equals the estimate's whenever k_a - k_b does, but computed as
    k_a / (6 G) - k_b / (6 G) it can be an ulp away. BCa must count those as ties."""
    g, b, seed = 25, 2000, 0
    rng = np.random.default_rng(4)
    n = np.full(g, 6.0)
    k_a = rng.integers(0, 7, size=g).astype(float)
    k_b = np.clip(k_a + rng.integers(-1, 2, size=g) * (rng.random(g) < 0.3), 0, 6)
    sums_a, sums_b = np.stack([k_a, n], axis=-1), np.stack([k_b, n], axis=-1)
    w = st.bootstrap_weights(g, n_boot=b, seed=seed)
    reps = st.ratio_statistic(w @ sums_a) - st.ratio_statistic(w @ sums_b)
    est = float(st.ratio_statistic(sums_a.sum(0)) - st.ratio_statistic(sums_b.sum(0)))
    d_exact, d_est = w @ (k_a - k_b), (k_a - k_b).sum()  # integers: exact
    assert np.sum(reps == est) < 0.7 * np.sum(d_exact == d_est)  # many ties are off by an ulp

    spec = st.DifferenceSpec(st.sums_spec(sums_a, st.ratio_statistic), st.sums_spec(sums_b, st.ratio_statistic))
    d = spec.jackknife().mean() - spec.jackknife()
    accel = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
    z = ndtri(np.array([0.025, 0.975]))

    def bca_ends(below):
        z0 = ndtri(below / b)
        return tuple(np.quantile(reps, ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))))

    right = bca_ends(np.sum(d_exact < d_est) + 0.5 * np.sum(d_exact == d_est))
    float_ties = bca_ends(np.sum(reps < est) + 0.5 * np.sum(reps == est))
    assert abs(float_ties[1] - right[1]) > 0.2 * (right[1] - right[0])  # the bug moved the end
    ci = st.paired_cluster_bootstrap(
        sums_a, st.ratio_statistic, sums_b, st.ratio_statistic, n_boot=b, seed=seed, method="bca"
    )
    assert (ci.ci_low, ci.ci_high) == pytest.approx(right, abs=1e-12)


def test_undefined_estimate_gives_nan_interval_with_reason():
    sums = np.zeros((30, 2))
    pair = st.cluster_bootstrap_both(sums, st.ratio_statistic, n_boot=100, seed=0)
    for ci in (pair.percentile, pair.bca):
        assert np.isnan(ci.estimate) and np.isnan(ci.ci_low) and np.isnan(ci.ci_high)
        assert "undefined on the full sample" in ci.warning


def test_undefined_resamples_are_counted_and_reported():
    g, b = 30, 1000
    sums = np.zeros((g, 2))
    sums[3] = [2.0, 5.0]
    sums[8] = [1.0, 5.0]
    w = st.bootstrap_weights(g, n_boot=b, seed=2)
    expected = int(np.sum((w[:, 3] == 0) & (w[:, 8] == 0)))
    assert expected > 0.01 * b
    ci = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=b, seed=2, method="percentile")
    assert ci.n_undefined == expected
    assert f"undefined in {expected} of {b} resamples" in ci.warning
    assert 0.0 <= ci.ci_low <= ci.estimate <= ci.ci_high <= 1.0


def test_bca_is_nan_when_every_resample_lies_on_one_side():
    _, sums = _clustered(8, 30)
    center = float(st.ratio_statistic(sums.sum(0)))

    def squared_distance(s):
        return (s[..., 0] / s[..., 1] - center) ** 2  # estimate 0, resamples > 0

    pair = st.cluster_bootstrap_both(sums, squared_distance, n_boot=300, seed=0)
    assert pair.bca.estimate == 0.0 and np.isnan(pair.bca.ci_low) and "one side" in pair.bca.warning
    assert 0.0 < pair.percentile.ci_low < pair.percentile.ci_high


def test_same_seed_reproduces_and_other_seed_differs():
    _, sums = _clustered(9, 30)
    a = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=300, seed=1)
    b = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=300, seed=1)
    c = st.cluster_bootstrap(sums, st.ratio_statistic, n_boot=300, seed=2)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_ratio_statistic_and_sum_by_cluster():
    s = np.array([[[1.0, 4.0], [0.0, 0.0]], [[3.0, 3.0], [2.0, 8.0]]])
    out = st.ratio_statistic(s)
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[0.25, np.nan], [1.0, 0.25]])
    sums = st.sum_by_cluster(np.array([[1, 1], [0, 1], [1, 1]]), np.array([2, 0, 2]), 3)
    np.testing.assert_array_equal(sums, [[0, 1], [0, 0], [2, 2]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: st.cluster_bootstrap(np.ones((5, 2)), st.ratio_statistic, seed=0, level=1.5), "got 1.5"),
        (lambda: st.cluster_bootstrap(np.ones((5, 2)), st.ratio_statistic, seed=0, n_boot=0), "got 0"),
        (lambda: st.cluster_bootstrap(np.ones(5), st.ratio_statistic, seed=0), "got 1 dimension"),
        (
            lambda: st.cluster_bootstrap(np.full((5, 2), np.nan), st.ratio_statistic, seed=0),
            "found 10 non-finite",
        ),
        (lambda: st.ratio_statistic(np.ones(3)), "expects 2 sums (S, N), found 3"),
        (lambda: st.sum_by_cluster(np.ones(3), np.array([0, 1]), 2), "3 rows, found 2"),
        (
            lambda: st.cluster_bootstrap_rows((np.ones(3),), np.array([0, 1]), np.sum, seed=0),
            "2 rows, found 3",
        ),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
