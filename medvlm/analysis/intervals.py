"""Confidence intervals from bootstrap replicates: percentile and BCa, the exact bound for a
proportion whose bootstrap distribution is a point at 0 or 1, and no interval at all below
MIN_CLUSTERS_FOR_CI clusters. medvlm.analysis.stats draws the resamples and calls these; its module
docstring says how the resamples are made. Everything here is re-exported by medvlm.analysis.stats.

When there is no bootstrap interval (BootstrapCI.method):
  "none"       fewer than MIN_CLUSTERS_FOR_CI (5) clusters, or the statistic is undefined on
               the full sample: ci_low / ci_high are nan (no interval at all).
  "exact_one_sided_clusters"
               a proportion (bootstrap_many's ``proportions``) whose estimate is exactly 0 or 1
               and whose every defined resample equals it: the bootstrap distribution is a
               point, and [0, 0] or [1, 1] is no confidence statement. The interval is instead
               the exact one-sided Clopper-Pearson bound at ``level`` with the G clusters as G
               Bernoulli trials: [0, 1 - alpha^(1/G)] for 0 and [alpha^(1/G), 1] for 1, alpha =
               1 - level (at 95% about the rule of three, 3/G). It bounds the share of clusters
               with any event (any error, any flip), which bounds the pooled proportion when
               cluster size is unrelated to the event. For a paired difference of two such
               proportions both at 0 or 1, each model's bound is taken at 1 - alpha/2 and the
               difference interval is [lo_a - hi_b, hi_a - lo_b] (Bonferroni: joint coverage
               at least ``level``).
Other degenerate bootstrap distributions (every resample equal to the estimate, e.g. a kappa of
1) keep their zero-width interval and say so in their notes (``degenerate`` is True).

Few clusters: below MIN_CLUSTERS (25) the intervals are unreliable. This is a property of the
cluster count, not of one interval: BootstrapCI.few_clusters and cluster_note() state it
(and BootstrapCI.warning includes it), while BootstrapCI.notes holds only the issues
specific to that interval, so that a table can state the cluster count once.

Ties in BCa: a replicate counts as equal to the estimate when it lies within
TIE_RTOL x max(|estimate|, max |replicate|) of it, so that values that are equal
mathematically but were summed in another order (a few ulps apart) count as ties.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

Method = Literal["percentile", "bca"]
CIMethod = Literal["percentile", "bca", "exact_one_sided_clusters", "none"]
EXACT_METHOD = "exact_one_sided_clusters"
NO_CI_METHOD = "none"
MIN_CLUSTERS = 25
"""Below this many clusters the intervals are flagged as unreliable (few_clusters)."""
MIN_CLUSTERS_FOR_CI = 5
"""Below this many clusters no interval is reported (method "none")."""
TIE_RTOL = 1e-9
"""BCa ties: |replicate - estimate| <= TIE_RTOL * scale counts as equal (see the module
docstring). Rounding differences of the statistics here are a few ulps (far below 1e-13 of
the largest |replicate|), while two distinct ratios of integer sums with denominators below
3e4 differ by more than 1e-9."""
MAX_UNDEFINED_FRACTION = 0.01
"""Above this fraction of undefined (nan) resamples the intervals carry a warning."""


@dataclass(frozen=True)
class BootstrapCI:
    """One confidence interval.

    estimate    the statistic on the full sample (float; nan when undefined)
    ci_low, ci_high   interval ends (floats; nan when there is no interval)
    method      "percentile", "bca", "exact_one_sided_clusters" or "none" (module docstring)
    level       nominal coverage, e.g. 0.95
    n_boot      number of resamples drawn (B)
    seed        the seed of np.random.default_rng that drew them
    n_clusters  number of clusters resampled (G)
    n_undefined resamples where the statistic was nan (left out of the interval)
    notes       human-readable issues specific to this interval (undefined resamples, BCa
                undefined, degenerate distribution, exact bound used); empty when none
    degenerate  every defined resample equals the estimate (within the tie tolerance)

    few_clusters, cluster_note and warning (cluster_note and notes joined, or None) are
    derived properties.
    """

    estimate: float
    ci_low: float
    ci_high: float
    method: CIMethod
    level: float
    n_boot: int
    seed: int
    n_clusters: int
    n_undefined: int
    notes: tuple[str, ...] = ()
    degenerate: bool = False

    @property
    def few_clusters(self) -> bool:
        """Fewer than MIN_CLUSTERS clusters: the interval is unreliable (or absent)."""
        return self.n_clusters < MIN_CLUSTERS

    @property
    def cluster_note(self) -> str | None:
        return cluster_note(self.n_clusters)

    @property
    def warning(self) -> str | None:
        """None, or every reason the interval is unreliable or absent, joined by '; '."""
        msgs = [m for m in (self.cluster_note, *self.notes) if m]
        return "; ".join(msgs) if msgs else None


def cluster_note(n_clusters: int) -> str | None:
    """The standard note for a cluster count: no interval below MIN_CLUSTERS_FOR_CI,
    unreliable below MIN_CLUSTERS, else None."""
    if n_clusters < MIN_CLUSTERS_FOR_CI:
        return f"only {n_clusters} clusters (< {MIN_CLUSTERS_FOR_CI}): no interval"
    if n_clusters < MIN_CLUSTERS:
        return f"only {n_clusters} clusters (< {MIN_CLUSTERS}): intervals are unreliable"
    return None


@dataclass(frozen=True)
class IntervalPair:
    """Percentile and BCa intervals computed from one and the same set of resamples. Where
    there is no bootstrap interval (method "none") or the exact bound replaces it (method
    "exact_one_sided_clusters"), both entries hold that same interval."""

    percentile: BootstrapCI
    bca: BootstrapCI

    def get(self, method: Method) -> BootstrapCI:
        """The interval of the named method."""
        if method == "percentile":
            return self.percentile
        if method == "bca":
            return self.bca
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")


def exact_cluster_bound(estimate: float, n_clusters: int, level: float) -> tuple[float, float]:
    """Exact one-sided Clopper-Pearson bound for a proportion observed at 0 or 1 with the
    n_clusters clusters as Bernoulli trials: (0, 1 - alpha^(1/G)) for estimate 0 and
    (alpha^(1/G), 1) for estimate 1, alpha = 1 - level. ValueError for any other estimate
    or for G < 1."""
    check_level(level)
    if n_clusters < 1:
        raise ValueError(f"an exact bound needs at least 1 cluster, found {n_clusters}")
    edge = (1.0 - level) ** (1.0 / n_clusters)
    if estimate == 0.0:
        return 0.0, 1.0 - edge
    if estimate == 1.0:
        return edge, 1.0
    raise ValueError(f"an exact boundary bound needs an estimate of 0 or 1, got {estimate}")


DEGENERATE_NOTE = "every resample equals the estimate: a zero-width interval, not a confidence statement"


def intervals_from_replicates(
    estimate: float,
    replicates: np.ndarray,
    jackknife: np.ndarray,
    *,
    level: float,
    n_boot: int,
    seed: int,
) -> IntervalPair:
    """Percentile and BCa intervals from bootstrap replicates [B] and leave-one-cluster-out
    jackknife values [G].

    Percentile: the (1-level)/2 and (1+level)/2 quantiles (linear interpolation, as numpy
    and scipy.stats.bootstrap) of the defined (non-nan) replicates.
    BCa (Efron & Tibshirani 1993, 14.3): z0 = Phi^-1(fraction of replicates below the
    estimate, ties counted half; a tie is a replicate within TIE_RTOL x max(|estimate|,
    max |replicate|) of the estimate); acceleration a from the jackknife (undefined jackknife
    values left out; a = 0 when the jackknife values do not vary); the interval ends are the
    quantiles at Phi(z0 + (z0 + z)/(1 - a (z0 + z))) for z = Phi^-1 of the two tails. BCa is
    nan (with a note) when every replicate lies on one side of the estimate.
    With G < MIN_CLUSTERS_FOR_CI both are nan with method "none". When every defined
    replicate ties with the estimate, both intervals are flagged degenerate (with a note).
    """
    check_level(level)
    reps = np.asarray(replicates, dtype=np.float64).reshape(-1)
    jack = np.asarray(jackknife, dtype=np.float64).reshape(-1)
    g = jack.shape[0]
    if g < MIN_CLUSTERS_FOR_CI:
        return no_interval_pair(estimate, g, n_boot, seed, level, None)
    notes = []
    defined = reps[~np.isnan(reps)]
    n_undefined = int(reps.shape[0] - defined.shape[0])
    if n_undefined > MAX_UNDEFINED_FRACTION * reps.shape[0]:
        notes.append(
            f"statistic undefined in {n_undefined} of {reps.shape[0]} resamples "
            f"({100.0 * n_undefined / reps.shape[0]:.1f}%), left out of the interval"
        )

    def make(
        method: CIMethod, lo: float, hi: float, extra: str | None = None, degenerate: bool = False
    ) -> BootstrapCI:
        return BootstrapCI(
            estimate=float(estimate),
            ci_low=float(lo),
            ci_high=float(hi),
            method=method,
            level=float(level),
            n_boot=int(n_boot),
            seed=int(seed),
            n_clusters=int(g),
            n_undefined=n_undefined,
            notes=tuple(notes + ([extra] if extra else [])),
            degenerate=degenerate,
        )

    if np.isnan(estimate) or defined.size == 0:
        reason = "statistic undefined on the full sample" if np.isnan(estimate) else "no defined resamples"
        none = make(NO_CI_METHOD, float("nan"), float("nan"), reason)
        return IntervalPair(none, none)

    alpha = (1.0 - level) / 2.0
    tol = TIE_RTOL * max(abs(float(estimate)), float(np.max(np.abs(defined))))
    tie = np.abs(defined - estimate) <= tol
    if tie.all():
        pct = make("percentile", estimate, estimate, DEGENERATE_NOTE, degenerate=True)
        return IntervalPair(pct, replace(pct, method="bca"))
    p_lo, p_hi = np.quantile(defined, [alpha, 1.0 - alpha])
    percentile = make("percentile", p_lo, p_hi)

    below = np.count_nonzero((defined < estimate) & ~tie) + 0.5 * np.count_nonzero(tie)
    frac = below / defined.size
    if frac <= 0.0 or frac >= 1.0:
        nan = float("nan")
        bca = make("bca", nan, nan, "BCa undefined: every resample lies on one side of the estimate")
        return IntervalPair(percentile, bca)
    z0 = float(ndtri(frac))
    accel = _acceleration(jack)
    z = np.array([ndtri(alpha), ndtri(1.0 - alpha)])
    adjusted = ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    b_lo, b_hi = np.quantile(defined, adjusted)
    return IntervalPair(percentile, make("bca", b_lo, b_hi))


def _acceleration(jack: np.ndarray) -> float:
    """Jackknife acceleration sum(d^3) / (6 sum(d^2)^1.5), d = mean - theta_(g)."""
    vals = jack[~np.isnan(jack)]
    if vals.size < 2:
        return 0.0
    d = vals.mean() - vals
    den = float(np.sum(d**2))
    if den <= 0.0 or not np.isfinite(den):
        return 0.0
    return float(np.sum(d**3) / (6.0 * den**1.5))


def no_interval_pair(
    estimate: float, g: int, n_boot: int, seed: int, level: float, reason: str | None
) -> IntervalPair:
    """No interval (method "none"): fewer than MIN_CLUSTERS_FOR_CI clusters (the reason is
    then the cluster note) or a statistic undefined on the full sample (reason given)."""
    nan = float("nan")
    ci = BootstrapCI(
        estimate=float(estimate),
        ci_low=nan,
        ci_high=nan,
        method=NO_CI_METHOD,
        level=float(level),
        n_boot=int(n_boot),
        seed=int(seed),
        n_clusters=int(g),
        n_undefined=0,
        notes=(reason,) if reason else (),
    )
    return IntervalPair(ci, ci)


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
