"""Cluster bootstrap: percentile and BCa confidence intervals that resample whole clusters.

A cluster is a study (or a patient, when a patient has several studies). Rows of one
cluster are never split: the bootstrap draws clusters with replacement and keeps every row
of each drawn cluster.

Most metrics of this project are functions of per-cluster sufficient statistics: a
cluster contributes a vector of sums s_g (shape [k]), and the metric is
theta = statistic(sum_g s_g). A bootstrap resample is then a vector of cluster counts
w (shape [G], summing to G), and theta_b = statistic(w @ S). Drawing
W = rng.multinomial(G, [1/G]*G, size=B) gives all B resamples at once, so every interval is
one matrix product. Statistics that are not functions of sums get the same draws as
per-row weights, W[b, cluster_of_row] (RowsSpec, cluster_bootstrap_rows); two-sample
U-statistics such as the AUROC can instead be written as a bilinear form in the cluster
counts (BilinearRatioSpec), which gives identical numbers at O(G^2) per resample.

Building blocks: a *spec* (SumsSpec, RowsSpec, BilinearRatioSpec, DifferenceSpec) says how
to evaluate one statistic on the full sample, on a chunk of resamples [b, G], and on the G
leave-one-cluster-out jackknife samples; bootstrap_many evaluates several specs on one set
of draws; cluster_bootstrap, paired_cluster_bootstrap and cluster_bootstrap_rows are the
one-statistic front ends.

Reproducibility: the draws depend only on (number of clusters, n_boot, seed), so every
metric computed on the same clusters with the same seed sees the same resampled clusters,
and a paired difference of two models uses the same draws for both. The seed is recorded
in every result.

Conventions: shapes are written [G, k] (clusters x sums), [B, G] (resamples x clusters).
A statistic returns nan where it is undefined (e.g. 0 / 0); such resamples are left out of
the interval and counted, never replaced by a number.

The intervals themselves (percentile, BCa, the exact bound at 0 or 1, no interval below
5 clusters, the few-cluster flag) are made in medvlm.analysis.intervals; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from medvlm.analysis.intervals import (  # noqa: F401 - re-exported
    DEGENERATE_NOTE,
    EXACT_METHOD,
    MAX_UNDEFINED_FRACTION,
    MIN_CLUSTERS,
    MIN_CLUSTERS_FOR_CI,
    NO_CI_METHOD,
    TIE_RTOL,
    BootstrapCI,
    CIMethod,
    IntervalPair,
    Method,
    check_level,
    cluster_note,
    exact_cluster_bound,
    intervals_from_replicates,
    no_interval_pair,
)

SumStatistic = Callable[[np.ndarray], np.ndarray]
"""Maps aggregated sums [..., k] to theta [...], vectorised over the leading axes."""
RowStatistic = Callable[..., np.ndarray]
"""Called as statistic(*row_arrays, weights=w) with w [..., n_rows]; returns theta [...]."""

_CHUNK_ELEMENTS = 2_000_000
"""Resamples are drawn and evaluated in chunks of about this many weight entries."""


# --------------------------------------------------------------------------------------
# statistic specifications: what to evaluate on each resample


@dataclass(frozen=True, eq=False)
class SumsSpec:
    """A statistic of summed per-cluster sufficient statistics.

    sums       float [G, k]: row g holds cluster g's sums
    statistic  maps aggregated sums [..., k] to theta [...] (vectorised)
    """

    sums: np.ndarray
    statistic: SumStatistic

    @property
    def n_clusters(self) -> int:
        return int(self.sums.shape[0])

    def estimate(self) -> float:
        return float(self.statistic(self.sums.sum(axis=0)))

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """weights [b, G] cluster counts -> theta [b]."""
        return np.asarray(self.statistic(weights @ self.sums), dtype=np.float64).reshape(-1)

    def jackknife(self) -> np.ndarray:
        """Leave-one-cluster-out values, float [G]."""
        loo = self.sums.sum(axis=0)[None, :] - self.sums
        return np.asarray(self.statistic(loo), dtype=np.float64).reshape(-1)


@dataclass(frozen=True, eq=False)
class RowsSpec:
    """A statistic of rows that takes per-row weights (e.g. a weighted AUROC).

    data           arrays with one entry per row along axis 0, each [n, ...]
    cluster_index  int [n]: cluster of each row, in 0 .. n_clusters-1
    n_clusters     G (clusters without rows are allowed: they contribute nothing)
    statistic      called as statistic(*data, weights=w) with w float [..., n]; returns
                   theta [...] (vectorised over the leading axes of w)
    """

    data: tuple[np.ndarray, ...]
    cluster_index: np.ndarray
    n_clusters: int
    statistic: RowStatistic

    def estimate(self) -> float:
        n = self.cluster_index.shape[0]
        return float(np.asarray(self.statistic(*self.data, weights=np.ones(n))).reshape(()))

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """weights [b, G] cluster counts -> theta [b]; each row gets its cluster's count.

        Evaluated in sub-chunks of resamples so that the [b, n_rows] weights stay small.
        """
        n = self.cluster_index.shape[0]
        out = np.empty(weights.shape[0])
        step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, weights.shape[0], step):
            row_weights = weights[start : start + step, self.cluster_index].astype(np.float64)
            theta = self.statistic(*self.data, weights=row_weights)
            out[start : start + step] = np.asarray(theta, dtype=np.float64).reshape(-1)
        return out

    def jackknife(self) -> np.ndarray:
        """Leave-one-cluster-out values, float [G]."""
        n = self.cluster_index.shape[0]
        out = np.empty(self.n_clusters)
        step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, self.n_clusters, step):
            groups = np.arange(start, min(start + step, self.n_clusters))
            row_weights = (self.cluster_index[None, :] != groups[:, None]).astype(np.float64)
            out[groups] = np.asarray(self.statistic(*self.data, weights=row_weights)).reshape(-1)
        return out


@dataclass(frozen=True, eq=False)
class BilinearRatioSpec:
    """theta(w) = (w^T M w) / ((w . u) (w . v)) for cluster weights w [G]: two-sample
    U-statistics such as the AUROC, where M[g, h] sums the kernel over (positive row in
    cluster g, negative row in cluster h), u counts positives and v negatives per cluster
    (see medvlm.analysis.metrics.auroc_cluster_terms). Equal to the row-weighted statistic with row
    weights w[cluster_of_row], at O(G^2) per resample instead of O(rows).

    matrix float [G, G]; left float [G]; right float [G]. nan where a denominator is 0.
    """

    matrix: np.ndarray
    left: np.ndarray
    right: np.ndarray

    def __post_init__(self) -> None:
        g = self.matrix.shape[0]
        if self.matrix.shape != (g, g) or self.left.shape != (g,) or self.right.shape != (g,):
            raise ValueError(
                f"expected matrix [G, G] and vectors [G]: got {self.matrix.shape}, "
                f"{self.left.shape}, {self.right.shape}"
            )

    @property
    def n_clusters(self) -> int:
        return int(self.matrix.shape[0])

    @staticmethod
    def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    def estimate(self) -> float:
        num = self.matrix.sum()
        return float(self._ratio(np.asarray(num), np.asarray(self.left.sum() * self.right.sum())))

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """weights [b, G] -> theta [b]."""
        w = weights.astype(np.float64)
        num = np.einsum("bg,bg->b", w @ self.matrix, w)
        return self._ratio(num, (w @ self.left) * (w @ self.right))

    def jackknife(self) -> np.ndarray:
        """Leave-one-cluster-out values in closed form, float [G]."""
        m = self.matrix
        num = m.sum() - m.sum(axis=0) - m.sum(axis=1) + np.diag(m)
        den = (self.left.sum() - self.left) * (self.right.sum() - self.right)
        return self._ratio(num, den)


@dataclass(frozen=True, eq=False)
class DifferenceSpec:
    """theta_a - theta_b, both evaluated on the same resampled clusters (paired)."""

    a: SumsSpec | RowsSpec | BilinearRatioSpec | DifferenceSpec
    b: SumsSpec | RowsSpec | BilinearRatioSpec | DifferenceSpec

    def __post_init__(self) -> None:
        if self.a.n_clusters != self.b.n_clusters:
            raise ValueError(
                f"paired statistics need the same clusters: {self.a.n_clusters} vs {self.b.n_clusters}"
            )

    @property
    def n_clusters(self) -> int:
        return self.a.n_clusters

    def estimate(self) -> float:
        return self.a.estimate() - self.b.estimate()

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        return self.a.replicates(weights) - self.b.replicates(weights)

    def jackknife(self) -> np.ndarray:
        return self.a.jackknife() - self.b.jackknife()


Spec = SumsSpec | RowsSpec | BilinearRatioSpec | DifferenceSpec


def sums_spec(sums: np.ndarray, statistic: SumStatistic) -> SumsSpec:
    """Validate sums (2-D, finite) and wrap them with their statistic."""
    arr = np.asarray(sums, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"sums must be 2-D [clusters, k], got {arr.ndim} dimension(s)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sums must be finite, found {int(np.sum(~np.isfinite(arr)))} non-finite entries")
    return SumsSpec(arr, statistic)


def rows_spec(
    data: Sequence[np.ndarray],
    cluster_index: np.ndarray,
    statistic: RowStatistic,
    n_clusters: int | None = None,
) -> RowsSpec:
    """Validate per-row data and cluster indices and wrap them with their statistic.

    n_clusters defaults to max(cluster_index) + 1.
    """
    idx = np.asarray(cluster_index)
    if idx.ndim != 1:
        raise ValueError(f"cluster_index must be 1-D, got {idx.ndim} dimensions")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"cluster_index must hold integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    g = int(idx.max()) + 1 if n_clusters is None and idx.size else int(n_clusters or 0)
    if idx.size and (idx.min() < 0 or idx.max() >= g):
        raise ValueError(f"cluster_index must lie in 0..{g - 1}, found {int(idx.min())}..{int(idx.max())}")
    arrays = tuple(np.asarray(d) for d in data)
    for d in arrays:
        if d.shape[0] != idx.shape[0]:
            raise ValueError(
                f"each data array needs one entry per row: {idx.shape[0]} rows, found {d.shape[0]}"
            )
    return RowsSpec(arrays, idx, g, statistic)


# --------------------------------------------------------------------------------------
# draws


def _chunk_size(n_clusters: int, n_boot: int) -> int:
    return int(max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_clusters, 1))))


def iter_bootstrap_weights(
    n_clusters: int, *, n_boot: int, seed: int, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Yield the cluster-count matrix W in consecutive chunks of rows, int64 [b, G] each.

    Concatenated, the chunks equal bootstrap_weights(n_clusters, n_boot=n_boot, seed=seed)
    whatever the chunk size (numpy draws multinomial rows one after another).
    """
    _check_boot(n_boot)
    if n_clusters < 1:
        raise ValueError(f"need at least 1 cluster to resample, found {n_clusters}")
    rng = np.random.default_rng(seed)
    pvals = np.full(n_clusters, 1.0 / n_clusters)
    step = chunk if chunk is not None else _chunk_size(n_clusters, n_boot)
    done = 0
    while done < n_boot:
        size = min(step, n_boot - done)
        yield rng.multinomial(n_clusters, pvals, size=size)
        done += size


@dataclass(frozen=True, eq=False)
class BootstrapDraws:
    """The resamples for (n_clusters, n_boot, seed), to share between calls.

    weights is the materialised int32 [n_boot, G] matrix, or None to redraw it chunk by chunk
    on demand (make() materialises only up to max_entries). Either way chunks() yields
    exactly bootstrap_weights(n_clusters, n_boot=n_boot, seed=seed), in row chunks.
    """

    n_clusters: int
    n_boot: int
    seed: int
    weights: np.ndarray | None = None

    @classmethod
    def make(
        cls, n_clusters: int, *, n_boot: int, seed: int, max_entries: int = 20_000_000
    ) -> BootstrapDraws:
        """Draw and keep the weights when n_boot * n_clusters <= max_entries."""
        if 0 < n_clusters and n_boot * n_clusters <= max_entries:
            w = bootstrap_weights(n_clusters, n_boot=n_boot, seed=seed).astype(np.int32)
            return cls(n_clusters, n_boot, seed, w)
        return cls(n_clusters, n_boot, seed, None)

    def chunks(self) -> Iterator[np.ndarray]:
        """Consecutive row chunks [b, G] of the weight matrix."""
        if self.weights is None:
            yield from iter_bootstrap_weights(self.n_clusters, n_boot=self.n_boot, seed=self.seed)
            return
        step = _chunk_size(self.n_clusters, self.n_boot)
        for start in range(0, self.n_boot, step):
            yield self.weights[start : start + step]


def bootstrap_weights(n_clusters: int, *, n_boot: int, seed: int) -> np.ndarray:
    """All resamples at once: W = default_rng(seed).multinomial(G, [1/G]*G, size=n_boot).

    Returns int64 [n_boot, G]; row b counts how often each cluster is drawn (rows sum to G).
    """
    return np.concatenate(list(iter_bootstrap_weights(n_clusters, n_boot=n_boot, seed=seed)), axis=0)


# --------------------------------------------------------------------------------------
# intervals


def bootstrap_many(
    specs: Mapping[str, Spec],
    *,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
    draws: BootstrapDraws | None = None,
    proportions: Collection[str] = (),
) -> dict[str, IntervalPair]:
    """Percentile and BCa intervals for several statistics over the same clusters, from one
    set of draws (so every statistic sees the same resampled clusters).

    All specs must have the same number of clusters G (rows of their sums / cluster indices
    aligned to the same clusters). draws: optional BootstrapDraws for (G, n_boot, seed),
    to reuse materialised weights across calls. proportions: names of specs that are
    proportions in [0, 1] (a SumsSpec of (events, units) per cluster with events <= units)
    or DifferenceSpecs of two such: where their bootstrap distribution is a point at 0 or 1
    they get the exact bound of the module docstring instead. With fewer than
    MIN_CLUSTERS_FOR_CI clusters nothing is drawn and every interval is "none".
    Returns {name: IntervalPair}.
    """
    _check_boot(n_boot)
    check_level(level)
    if not specs:
        return {}
    unknown = sorted(set(proportions) - set(specs))
    if unknown:
        raise ValueError(f"proportions names {unknown}, not among the statistics {sorted(specs)}")
    sizes = {name: spec.n_clusters for name, spec in specs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all statistics need the same clusters, found cluster counts {sizes}")
    g = next(iter(sizes.values()))
    estimates = {name: spec.estimate() for name, spec in specs.items()}
    if g < MIN_CLUSTERS_FOR_CI:
        reason = "no clusters to resample" if g == 0 else None
        return {name: no_interval_pair(estimates[name], g, n_boot, seed, level, reason) for name in specs}
    if draws is None:
        draws = BootstrapDraws(g, n_boot, seed)
    elif (draws.n_clusters, draws.n_boot, draws.seed) != (g, n_boot, seed):
        raise ValueError(
            f"draws are for (clusters, n_boot, seed) = {(draws.n_clusters, draws.n_boot, draws.seed)}, "
            f"expected {(g, n_boot, seed)}"
        )
    reps = {name: np.empty(n_boot) for name in specs}
    done = 0
    for w in draws.chunks():
        for name, spec in specs.items():
            reps[name][done : done + w.shape[0]] = spec.replicates(w)
        done += w.shape[0]
    assert done == n_boot
    out = {}
    for name, spec in specs.items():
        if np.isnan(estimates[name]):
            out[name] = no_interval_pair(
                estimates[name], g, n_boot, seed, level, "statistic undefined on the full sample"
            )
            continue
        pair = intervals_from_replicates(
            estimates[name], reps[name], spec.jackknife(), level=level, n_boot=n_boot, seed=seed
        )
        if name in proportions and pair.bca.degenerate:
            pair = _exact_boundary_pair(spec, pair)
        out[name] = pair
    return out


def _exact_boundary_pair(spec: Spec, pair: IntervalPair) -> IntervalPair:
    """The exact bound of the module docstring for a degenerate proportion (or difference of
    two proportions), both entries of the pair; the pair unchanged when the estimate (or a
    model's estimate) is not at 0 or 1."""
    ci = pair.bca
    g, level = ci.n_clusters, ci.level
    if isinstance(spec, DifferenceSpec):
        ends = (spec.a.estimate(), spec.b.estimate())
        if not all(e in (0.0, 1.0) for e in ends):
            return pair
        side = 1.0 - (1.0 - level) / 2.0
        (lo_a, hi_a), (lo_b, hi_b) = (exact_cluster_bound(e, g, side) for e in ends)
        lo, hi = lo_a - hi_b, hi_a - lo_b
        note = (
            f"both estimates at 0 or 1 in every resample: exact interval from each model's one-sided "
            f"{side:.3g} bound over {g} clusters (Clopper-Pearson, clusters as trials; Bonferroni)"
        )
    else:
        if ci.estimate not in (0.0, 1.0):
            return pair
        lo, hi = exact_cluster_bound(ci.estimate, g, level)
        note = (
            f"estimate {ci.estimate:g} in every resample: exact one-sided {level:g} bound over {g} "
            f"clusters (Clopper-Pearson, clusters as trials)"
        )
    notes = tuple(n for n in ci.notes if n != DEGENERATE_NOTE) + (note,)
    exact = replace(ci, ci_low=float(lo), ci_high=float(hi), method=EXACT_METHOD, notes=notes)
    return IntervalPair(exact, exact)


# --------------------------------------------------------------------------------------
# convenience front ends


def cluster_bootstrap(
    sums: np.ndarray,
    statistic: SumStatistic,
    *,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
    method: Method = "bca",
) -> BootstrapCI:
    """Cluster-bootstrap interval of statistic(sum over clusters of sums).

    sums       [G, k] per-cluster sufficient statistics
    statistic  maps sums [..., k] to theta [...] (vectorised; nan where undefined)
    Returns a BootstrapCI of the chosen method; see cluster_bootstrap_both for both.
    """
    return cluster_bootstrap_both(sums, statistic, n_boot=n_boot, seed=seed, level=level).get(method)


def cluster_bootstrap_both(
    sums: np.ndarray,
    statistic: SumStatistic,
    *,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
) -> IntervalPair:
    """Percentile and BCa intervals from one set of resamples; see cluster_bootstrap."""
    return bootstrap_many({"x": sums_spec(sums, statistic)}, n_boot=n_boot, seed=seed, level=level)["x"]


def paired_cluster_bootstrap(
    sums_a: np.ndarray,
    stat_a: SumStatistic,
    sums_b: np.ndarray,
    stat_b: SumStatistic,
    *,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
    method: Method = "bca",
) -> BootstrapCI:
    """Interval of stat_a(sums_a) - stat_b(sums_b), both on the SAME resampled clusters.

    sums_a [G, ka] and sums_b [G, kb] must be aligned by row to the same G clusters (the
    caller keeps only clusters both models have). Returns a BootstrapCI of the difference.
    """
    return paired_cluster_bootstrap_both(
        sums_a, stat_a, sums_b, stat_b, n_boot=n_boot, seed=seed, level=level
    ).get(method)


def paired_cluster_bootstrap_both(
    sums_a: np.ndarray,
    stat_a: SumStatistic,
    sums_b: np.ndarray,
    stat_b: SumStatistic,
    *,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
) -> IntervalPair:
    """Percentile and BCa intervals of the paired difference; see paired_cluster_bootstrap."""
    spec = DifferenceSpec(sums_spec(sums_a, stat_a), sums_spec(sums_b, stat_b))
    return bootstrap_many({"x": spec}, n_boot=n_boot, seed=seed, level=level)["x"]


def cluster_bootstrap_rows(
    data: Sequence[np.ndarray],
    cluster_index: np.ndarray,
    statistic: RowStatistic,
    *,
    n_clusters: int | None = None,
    n_boot: int = 10_000,
    seed: int,
    level: float = 0.95,
    method: Method = "bca",
) -> BootstrapCI:
    """Cluster-bootstrap interval of a statistic of rows that accepts per-row weights.

    data           arrays [n, ...], one entry per row
    cluster_index  int [n], cluster of each row in 0..G-1 (G = n_clusters, default max+1)
    statistic      statistic(*data, weights=w) with w [..., n] -> theta [...]; resample b
                   gives row i the weight W[b, cluster_index[i]] (same W as cluster_bootstrap
                   for the same G and seed); the jackknife gives a left-out cluster weight 0.
    Returns a BootstrapCI of the chosen method.
    """
    spec = rows_spec(data, cluster_index, statistic, n_clusters)
    return bootstrap_many({"x": spec}, n_boot=n_boot, seed=seed, level=level)["x"].get(method)


def ratio_statistic(sums: np.ndarray) -> np.ndarray:
    """theta = S / N for sums [..., 2] = (S, N); nan where N == 0. Returns [...]."""
    s = np.asarray(sums, dtype=np.float64)
    if s.shape[-1] != 2:
        raise ValueError(f"ratio_statistic expects 2 sums (S, N), found {s.shape[-1]}")
    num, den = s[..., 0], s[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def sum_by_cluster(values: np.ndarray, cluster_index: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per-cluster sums of per-unit values.

    values [n, k] (or [n], treated as [n, 1]); cluster_index int [n] in 0..n_clusters-1.
    Returns float [n_clusters, k].
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim == 1:
        vals = vals[:, None]
    idx = np.asarray(cluster_index, dtype=np.int64)
    if idx.shape[0] != vals.shape[0]:
        raise ValueError(
            f"expected one cluster index per value row: {vals.shape[0]} rows, found {idx.shape[0]}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_clusters):
        raise ValueError(
            f"cluster_index must lie in 0..{n_clusters - 1}, found {int(idx.min())}..{int(idx.max())}"
        )
    out = np.zeros((n_clusters, vals.shape[1]))
    np.add.at(out, idx, vals)
    return out


def _check_boot(n_boot: int) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
