"""Metrics: answers, robustness to paraphrase, and attention-map comparisons.

Every metric is a small pure function. The answer and robustness metrics also come as
per-unit sufficient statistics (a row, or a (study, finding) group of up to six variants,
contributes a small vector of numbers) and a statistic of their sums, so that
medvlm.analysis.stats can bootstrap them over clusters in one matrix product.

Answers are coded 1.0 = "yes", 0.0 = "no", nan = variant missing or failed. A group is one
(study, finding) question asked in N_VARIANTS paraphrases; its answers are a row of a
float [n_groups, N_VARIANTS] matrix, column v = variant_id v (variant 0 is the original).
For the robustness metrics medvlm.analysis.analysis passes judgements, the answers in variant 0's terms
(a negated paraphrase's answer reversed; see medvlm.analysis.records), and variant 0's answer_gt as truth.

Attention maps are 1-D non-negative arrays over the image tokens; each function normalises
them to sum 1 itself and raises ValueError for negative, non-finite or all-zero maps.
"""

from __future__ import annotations

import math

import numpy as np

N_VARIANTS = 6

# --------------------------------------------------------------------------------------
# answers


def accuracy(correct: np.ndarray) -> float:
    """Fraction of rows answered correctly (nan for no rows). correct: bool [n]."""
    c = np.asarray(correct, dtype=bool)
    return float(c.mean()) if c.size else float("nan")


def accuracy_units(correct: np.ndarray) -> np.ndarray:
    """Per-row sufficient statistics (correct, 1) for ratio_statistic: float [n, 2]."""
    c = np.asarray(correct, dtype=np.float64)
    return np.stack([c, np.ones_like(c)], axis=-1)


def auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted AUROC (Mann-Whitney): P(score_pos > score_neg) + 0.5 P(tie).

    scores   float [n] (e.g. P(yes))
    labels   bool [n] (True = positive, e.g. answer_gt == "yes")
    weights  None (all 1) or float [..., n], non-negative per-row weights (e.g. bootstrap
             cluster counts); each positive/negative pair counts w_i * w_j.
    Returns float [...] (a 0-d array for 1-D weights): nan where the positive or negative
    weight is zero (AUROC undefined).
    Vectorised: sorts once, then O(n) per weight vector.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite, found {int(np.sum(~np.isfinite(s)))} non-finite")
    w = np.ones(s.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape[-1] != s.shape[0]:
        raise ValueError(f"weights need one entry per row: {s.shape[0]} rows, found {w.shape[-1]}")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    if s.size == 0:
        return np.full(w.shape[:-1], np.nan)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    w_sorted = w[..., order]
    pos = np.add.reduceat(w_sorted * y[order], starts, axis=-1)  # [..., T]
    neg = np.add.reduceat(w_sorted * ~y[order], starts, axis=-1)
    neg_below = np.cumsum(neg, axis=-1) - neg
    num = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    total = pos.sum(axis=-1) * neg.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, num / np.where(total > 0, total, 1.0), np.nan)


def auroc_cluster_terms(
    scores: np.ndarray, labels: np.ndarray, cluster_index: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The AUROC as a bilinear form in cluster weights, for medvlm.analysis.stats.BilinearRatioSpec.

    Returns (M float [G, G], pos float [G], neg float [G]) with
    M[g, h] = sum over positive rows i of cluster g and negative rows j of cluster h of
    [s_i > s_j] + 0.5 [s_i == s_j], and pos / neg the positive / negative row counts, so that
    for cluster weights w the row-weighted AUROC is (w^T M w) / ((w . pos) (w . neg)).
    Built from one sort, in column chunks of at most about 2e6 entries.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    idx = np.asarray(cluster_index, dtype=np.int64)
    if s.ndim != 1 or y.shape != s.shape or idx.shape != s.shape:
        raise ValueError(
            f"scores, labels, cluster_index must be 1-D of equal length, got {s.shape}, "
            f"{y.shape}, {idx.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite, found {int(np.sum(~np.isfinite(s)))} non-finite")
    if idx.size and (idx.min() < 0 or idx.max() >= n_clusters):
        raise ValueError(
            f"cluster_index must lie in 0..{n_clusters - 1}, found {int(idx.min())}..{int(idx.max())}"
        )
    g = int(n_clusters)
    pos = np.bincount(idx[y], minlength=g).astype(np.float64)
    neg = np.bincount(idx[~y], minlength=g).astype(np.float64)
    matrix = np.zeros((g, g))
    if not (y.any() and (~y).any()):
        return matrix, pos, neg
    _, tie = np.unique(s, return_inverse=True)  # tie group of each row, ordered by score
    n_tie = int(tie.max()) + 1
    pos_rows = np.flatnonzero(y)
    pos_rows = pos_rows[np.argsort(idx[pos_rows], kind="stable")]
    pos_clusters, starts = np.unique(idx[pos_rows], return_index=True)
    neg_rows = np.flatnonzero(~y)
    step = max(1, 2_000_000 // max(n_tie, pos_rows.size))
    for h0 in range(0, g, step):
        h1 = min(g, h0 + step)
        sel = neg_rows[(idx[neg_rows] >= h0) & (idx[neg_rows] < h1)]
        counts = np.zeros((n_tie, h1 - h0))
        np.add.at(counts, (tie[sel], idx[sel] - h0), 1.0)
        below = np.cumsum(counts, axis=0) - 0.5 * counts  # negatives below + half the ties
        matrix[pos_clusters, h0:h1] = np.add.reduceat(below[tie[pos_rows]], starts, axis=0)
    return matrix, pos, neg


def _check_answers(answers: np.ndarray) -> np.ndarray:
    a = np.asarray(answers, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != N_VARIANTS:
        shape = a.shape[1] if a.ndim == 2 else a.ndim
        raise ValueError(f"expected answers [n_groups, {N_VARIANTS}] variants, found {shape}")
    ok = np.isnan(a) | (a == 0.0) | (a == 1.0)
    if not np.all(ok):
        raise ValueError(f"answers must be 1 (yes), 0 (no) or nan, found {int(np.sum(~ok))} other values")
    return a


def complete_groups(answers: np.ndarray) -> np.ndarray:
    """bool [n_groups]: all N_VARIANTS variants present."""
    return ~np.any(np.isnan(_check_answers(answers)), axis=1)


def flip_units(answers: np.ndarray) -> np.ndarray:
    """Per-group (flips, comparisons) against variant 0: float [n_groups, 2].

    For a group whose variant 0 is present, comparisons = number of variants 1..5 present,
    flips = how many of them differ from variant 0's answer; a group without variant 0
    contributes (0, 0).
    """
    a = _check_answers(answers)
    has_v0 = ~np.isnan(a[:, 0])
    rest = a[:, 1:]
    present = ~np.isnan(rest) & has_v0[:, None]
    flips = (present & (rest != a[:, :1])).sum(axis=1)
    return np.stack([flips, present.sum(axis=1)], axis=-1).astype(np.float64)


def flip_rate(answers: np.ndarray) -> float:
    """Pooled flip rate against variant 0: total flips / total comparisons (nan if none)."""
    f = flip_units(answers).sum(axis=0)
    return float(f[0] / f[1]) if f[1] > 0 else float("nan")


def all_agree_units(answers: np.ndarray) -> np.ndarray:
    """Per-group (complete and all answers equal, complete): float [n_groups, 2]."""
    a = _check_answers(answers)
    complete = ~np.any(np.isnan(a), axis=1)
    agree = complete & np.all(a == a[:, :1], axis=1)
    return np.stack([agree, complete], axis=-1).astype(np.float64)


def all_agree_rate(answers: np.ndarray) -> float:
    """Fraction of complete groups whose six answers all agree (nan if no complete group)."""
    u = all_agree_units(answers).sum(axis=0)
    return float(u[0] / u[1]) if u[1] > 0 else float("nan")


def consistent_correct_units(answers: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-group (complete, all answers agree and equal the truth; complete): float [n_groups, 2].

    truth: float/bool [n_groups], 1 = "yes", 0 = "no".
    """
    a = _check_answers(answers)
    t = np.asarray(truth, dtype=np.float64)
    if t.shape != (a.shape[0],):
        raise ValueError(f"expected one truth per group: {a.shape[0]} groups, found {t.shape}")
    complete = ~np.any(np.isnan(a), axis=1)
    cc = complete & np.all(a == t[:, None], axis=1)
    return np.stack([cc, complete], axis=-1).astype(np.float64)


def consistent_correct_rate(answers: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of complete groups where all six answers agree and equal the truth."""
    u = consistent_correct_units(answers, truth).sum(axis=0)
    return float(u[0] / u[1]) if u[1] > 0 else float("nan")


def fleiss_units(answers: np.ndarray) -> np.ndarray:
    """Per-group Fleiss sufficient statistics: float [n_groups, 5] =
    (P_i, 1, n_yes, n_no, n) for complete groups (raters = the N_VARIANTS variants,
    categories yes/no, P_i = (sum_j n_ij^2 - n) / (n (n - 1))), zeros for incomplete groups.
    """
    a = _check_answers(answers)
    complete = ~np.any(np.isnan(a), axis=1)
    n = float(N_VARIANTS)
    n_yes = np.where(complete, np.nansum(a, axis=1), 0.0)
    n_no = np.where(complete, n - n_yes, 0.0)
    p_i = np.where(complete, (n_yes**2 + n_no**2 - n) / (n * (n - 1.0)), 0.0)
    c = complete.astype(np.float64)
    return np.stack([p_i, c, n_yes, n_no, c * n], axis=-1)


def fleiss_kappa_statistic(sums: np.ndarray) -> np.ndarray:
    """Fleiss' kappa from summed fleiss_units: sums [..., 5] -> kappa [...].

    P_bar = sum P_i / n_groups; p_j = sum_i n_ij / sum n; P_e = sum_j p_j^2;
    kappa = (P_bar - P_e) / (1 - P_e). nan when there are no groups or P_e == 1 (every
    answer in one category: chance agreement is total and kappa is undefined).
    """
    s = np.asarray(sums, dtype=np.float64)
    if s.shape[-1] != 5:
        raise ValueError(f"fleiss_kappa_statistic expects 5 sums, found {s.shape[-1]}")
    sum_p, n_groups, n_yes, n_no, n_tot = (s[..., i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore"):
        p_bar = sum_p / n_groups
        p_e = (n_yes / n_tot) ** 2 + (n_no / n_tot) ** 2
        kappa = (p_bar - p_e) / (1.0 - p_e)
    undefined = (n_groups <= 0) | (n_tot <= 0) | (p_e >= 1.0 - 1e-12)
    return np.where(undefined, np.nan, kappa)


def fleiss_kappa(answers: np.ndarray) -> float:
    """Fleiss' kappa over the complete groups (subjects) with the six variants as raters."""
    return float(fleiss_kappa_statistic(fleiss_units(answers).sum(axis=0)))


# --------------------------------------------------------------------------------------
# attention maps


def normalise_map(token_map: np.ndarray) -> np.ndarray:
    """A non-negative 1-D map scaled to sum 1: float [n]. ValueError on negative, non-finite
    or all-zero input."""
    m = np.asarray(token_map, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"attention map must be 1-D over the image tokens, got {m.ndim} dimensions")
    if m.size == 0:
        raise ValueError("attention map is empty (0 tokens)")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"attention map has {int(np.sum(~np.isfinite(m)))} non-finite values")
    if np.any(m < 0):
        raise ValueError(f"attention map has {int(np.sum(m < 0))} negative values")
    total = m.sum()
    if total <= 0:
        raise ValueError("attention map sums to 0")
    return m / total


def _pair(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = normalise_map(p), normalise_map(q)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in length: {a.shape[0]} vs {b.shape[0]} tokens")
    return a, b


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon DIVERGENCE in bits (log base 2), in [0, 1]; not the JS distance
    (the distance is its square root, as scipy.spatial.distance.jensenshannon returns).

    JSD(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2, 0 log 0 = 0; 0 for
    identical maps, 1 for maps with disjoint support. Maps are normalised first.
    """
    a, b = _pair(p, q)
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    value = 0.5 * kl(a) + 0.5 * kl(b)
    return float(min(max(value, 0.0), 1.0))


def spearman(p: np.ndarray, q: np.ndarray) -> float:
    """Spearman rank correlation of two maps over tokens (average ranks for ties).

    Returns nan when either map is constant (the correlation is undefined); callers count
    and report such pairs rather than replacing them.
    """
    a, b = _pair(p, q)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)  # Pearson correlation of average ranks
    ra -= ra.mean()
    rb -= rb.mean()
    return float(np.dot(ra, rb) / np.sqrt(np.dot(ra, ra) * np.dot(rb, rb)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_value = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_value) - 1
    bounds = np.r_[np.flatnonzero(new_value), x.size]  # first position of each tie group, then n
    avg = 0.5 * (bounds[:-1] + bounds[1:] - 1) + 1.0
    ranks = np.empty(x.size)
    ranks[order] = avg[group]
    return ranks


def topk_iou(p: np.ndarray, q: np.ndarray, k: float = 10.0) -> float:
    """IoU of the top-k% token sets of two maps, in [0, 1].

    Each set holds the ceil(k / 100 * n) tokens with the largest values; ties at the cut-off
    are broken by token index (lower index first), so the result is deterministic.
    """
    a, b = _pair(p, q)
    if not 0.0 < k <= 100.0:
        raise ValueError(f"k must be a percentage in (0, 100], got {k}")
    n = a.shape[0]
    m = math.ceil(k / 100.0 * n - 1e-9)
    top_a = set(np.argsort(-a, kind="stable")[:m].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:m].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def normalised_entropy(p: np.ndarray) -> float:
    """Shannon entropy of the normalised map divided by log(n): in [0, 1], 1 for a uniform
    map, 0 for all mass on one token. Needs at least 2 tokens."""
    a = normalise_map(p)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"normalised entropy needs at least 2 tokens, found {n}")
    nz = a[a > 0]
    return float(-np.sum(nz * np.log(nz)) / math.log(n))


# --------------------------------------------------------------------------------------
# geometry of two models' maps

Box = tuple[float, float, float, float]


def _check_box(box: Box, name: str) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"{name} must be (x0, y0, x1, y1), got {len(box)} numbers")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{name} must have x1 > x0 and y1 > y0, got {box}")
    return x0, y0, x1, y1


def intersect_boxes(a: Box, b: Box) -> Box:
    """Intersection (x0, y0, x1, y1) of two boxes; ValueError when they do not overlap."""
    ax0, ay0, ax1, ay1 = _check_box(a, "box a")
    bx0, by0, bx1, by1 = _check_box(b, "box b")
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"boxes do not overlap: {tuple(a)} and {tuple(b)}")
    return (x0, y0, x1, y1)


def _overlap_matrix(d0: float, d1: float, n_dst: int, s0: float, s1: float, n_src: int) -> np.ndarray:
    """Overlap lengths [n_dst, n_src] of dst cells of [d0, d1] with src cells of [s0, s1]."""
    de = np.linspace(d0, d1, n_dst + 1)
    se = np.linspace(s0, s1, n_src + 1)
    lo = np.maximum(de[:-1, None], se[None, :-1])
    hi = np.minimum(de[1:, None], se[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def resample_to_grid(
    token_map: np.ndarray,
    src_box: Box,
    src_grid: tuple[int, int],
    dst_box: Box,
    dst_grid: tuple[int, int],
) -> np.ndarray:
    """Area-weighted resampling of a per-cell map onto another grid over another box.

    token_map  [rows * cols] (row-major, token j = cell (j // cols, j % cols)) or
               [rows, cols], defined over src_box = (x0, y0, x1, y1) in original-image pixels
    dst_box    the region to resample to (e.g. intersect_boxes of two models' crop boxes);
               it must lie inside src_box (no value is invented outside what the model saw)
    Each dst cell receives the area-weighted average of the src values it overlaps (the
    values are treated as a density; for equal-area src cells, the dst map is then
    proportional to the mass falling in each dst cell). Returns float [dst_rows * dst_cols],
    row-major.
    """
    sr, sc = (int(v) for v in src_grid)
    dr, dc = (int(v) for v in dst_grid)
    if min(sr, sc, dr, dc) < 1:
        raise ValueError(f"grids must be at least 1 x 1, got {src_grid} and {dst_grid}")
    m = np.asarray(token_map, dtype=np.float64)
    if m.size != sr * sc:
        raise ValueError(f"expected {sr * sc} values for a {sr} x {sc} grid, found {m.size}")
    m = m.reshape(sr, sc)
    sx0, sy0, sx1, sy1 = _check_box(src_box, "src_box")
    dx0, dy0, dx1, dy1 = _check_box(dst_box, "dst_box")
    tol = 1e-6 * max(sx1 - sx0, sy1 - sy0)
    if dx0 < sx0 - tol or dy0 < sy0 - tol or dx1 > sx1 + tol or dy1 > sy1 + tol:
        raise ValueError(f"dst_box {tuple(dst_box)} extends outside src_box {tuple(src_box)}")
    ox = _overlap_matrix(dx0, dx1, dc, sx0, sx1, sc)  # [dc, sc]
    oy = _overlap_matrix(dy0, dy1, dr, sy0, sy1, sr)  # [dr, sr]
    cell_area = ((dx1 - dx0) / dc) * ((dy1 - dy0) / dr)
    out = oy @ m @ ox.T / cell_area
    return out.reshape(-1)
