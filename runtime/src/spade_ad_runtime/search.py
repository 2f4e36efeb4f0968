"""The pixel stage's exact search in numpy: each query's mean Euclidean distance to its ``kappa`` nearest
gallery rows, the same canonical answer as spade-ad's engine (``spade_ad.correspondence.search``).

The canonical answer (docs/engine.md): a pair's squared distance is the direct-difference value
:func:`exact_d2` (fp32 differences squared, summed over the coordinates by a fixed pairwise tree, one
rounding per operation), the ``kappa`` smallest of them per query (gallery rows counted as often as they
occur) are square-rooted and summed in ascending order by :func:`mean_sqrt`. IEEE arithmetic makes every
step give the same bits in numpy as in torch; ``tests/test_runtime.py`` holds the two to each other.

Finding the ``kappa`` smallest without computing :func:`exact_d2` for every pair: a float32 GEMM gives
``d~ = |q|^2 + |g|^2 - 2 q.g`` with ``|d~ - d^2| <= eps = gam (|q| + |g|)^2`` (:func:`eps_factor`, the
engine's bound about the centre 0), and the exact value ``e`` is within ``G_E d^2 / 4`` of ``d^2``
(:func:`G_E`). With ``ub`` the kappa-th smallest of ``(d~ + eps)(1 + G_E/4)`` over the whole gallery
(read off the same GEMM block), a row whose ``(d~ - eps)(1 - G_E/4)`` exceeds ``ub`` cannot be among the
kappa nearest; every other row (on real features: the kappa nearest and rare near-ties) is re-checked
exactly. Memory: one block of queries times the gallery at a time (``block_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

U = 2.0**-24  # unit roundoff of float32


def gamma(n: int, u: float = U) -> float:
    return n * u / (1 - n * u)


def eps_factor(dim: int, u_in: float = 0.0) -> float:
    """``gam`` in ``|d~ - d^2| <= gam (|q - c| + |g - c|)^2`` for the float32 GEMM form (the engine's
    ``_eps_factor``; the last factor covers norms computed with rounding)."""
    return (gamma(dim + 12) + 3 * u_in) * 1.01 * (1 + 4 * (dim + 4) * U) ** 2


def G_E(dim: int) -> float:  # noqa: N802 - a constant of the proof
    """``|e - d^2| <= G_E d^2 / 4`` for the direct-difference value ``e`` of :func:`exact_d2`."""
    return 4 * gamma(dim + 2)


def exact_d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances of paired float32 rows ``a[i]``, ``b[i]``: differences squared, summed by a fixed
    pairwise tree over the coordinates (the engine's ``exact_d2``, bit for bit)."""
    x = np.square(a.astype(np.float32, copy=False) - b.astype(np.float32, copy=False))
    while x.shape[1] > 1:
        h = x.shape[1] // 2
        y = x[:, :h] + x[:, h : 2 * h]
        if x.shape[1] % 2:
            y[:, 0] += x[:, 2 * h]
        x = y
    return np.ascontiguousarray(x[:, 0]) if x.shape[1] else np.zeros(x.shape[0], np.float32)


def mean_sqrt(d2: np.ndarray) -> np.ndarray:
    """Mean of the square roots of each row of ``d2`` (sorted ascending), summed in a fixed order; each root
    correctly rounded to float32 (taken in float64, rounded once: spade-ad's engine does the same)."""
    x = np.sqrt(np.maximum(d2.astype(np.float32, copy=False), np.float32(0)).astype(np.float64)).astype(np.float32)
    acc = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        acc += x[:, j]
    return acc / np.float32(x.shape[1]) if x.shape[1] > 1 else acc


def _distinct_finite(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one row per distinct finite row of ``g`` (bit for bit; in order of first occurrence) and how
    often each occurs. Equal rows have equal distances, so each is scored once and counted with its
    multiplicity (a uniform background repeats one row hundreds of times)."""
    finite = np.nonzero(np.isfinite(g).all(axis=1))[0]
    rows = np.ascontiguousarray(g[finite])
    _, first, count = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel(),
                                return_index=True, return_counts=True)
    order = np.argsort(first)
    return finite[first[order]], count[order]


def _kth_smallest(d: np.ndarray, kg: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row of a GEMM tile ``d`` (queries x distinct rows): the ``kg``-th smallest value, which bounds the
    ``kg``-th smallest row counted with multiplicity (the largest when the tile has fewer distinct rows), and,
    for ``kg`` = 1, the column where it lies."""
    if kg == 1:
        am = d.argmin(axis=1)
        return d[np.arange(d.shape[0]), am], am
    return (np.partition(d, kg - 1, axis=1)[:, kg - 1] if d.shape[1] >= kg else d.max(axis=1)), None


def _candidates(cand: np.ndarray, am: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) of the True entries of ``cand``. With ``am`` (each query's argmin, itself a candidate when
    the query has any) a query with one candidate takes it without indexing its row; only rows with more are
    indexed (kappa = 1: on real features most queries have one)."""
    if am is None:
        qi, ri = np.nonzero(cand)
        return qi, ri
    n_cand = np.count_nonzero(cand, axis=1)
    one, more = np.nonzero(n_cand == 1)[0], np.nonzero(n_cand > 1)[0]
    qm, rm = np.nonzero(cand[more])
    return np.concatenate([one, more[qm]]), np.concatenate([am[one], rm])


def nn_distances(queries: np.ndarray, gallery: np.ndarray, kappa: int = 1, block_bytes: int = 4 << 20) -> np.ndarray:
    """(n,) float32: each query's mean distance to its ``kappa`` nearest ``gallery`` rows (exact, canonical).

    ``queries`` (n, C) and ``gallery`` (m, C) are float32 (a float16 bank's rows convert exactly). Each block of
    queries gets ``block_bytes`` of GEMM output: 4 MiB stays in cache (measured on bottle, 2-core AMD EPYC:
    0.37 s per image against 0.47 s with 16 MiB and 0.67 s with 64 MiB; 1 MiB 0.40 s).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {q.shape} and gallery {g.shape} do not match")
    if kappa < 1:
        raise ValueError("kappa must be >= 1")
    n, dim = q.shape
    m = g.shape[0]
    if m == 0:
        raise ValueError("the gallery is empty")
    kk = min(kappa, m)
    lo_f, hi_f = 1 - G_E(dim) / 4, 1 + G_E(dim) / 4
    rows_of, mult = _distinct_finite(g)
    g_ok = g[rows_of]
    out = np.full((n, kk), np.inf, np.float32)
    if g_ok.shape[0] == 0:
        return mean_sqrt(out)
    kg = min(kk, int(mult.sum()))
    # [q, 1] . [-2 g, |g|^2] = D = d~ - |q|^2, |D - (d^2 - |q|^2)| <= eps = gam (|q| + |g|)^2 (the engine's form)
    aug = np.concatenate([g_ok * np.float32(-2.0), np.einsum("ij,ij->i", g_ok, g_ok)[:, None]], axis=1).T.copy()
    gmax = float(np.sqrt(np.einsum("ij,ij->i", g_ok.astype(np.float64), g_ok.astype(np.float64)).max(initial=0)))
    qn2 = np.einsum("ij,ij->i", q.astype(np.float64), q.astype(np.float64))
    eps = eps_factor(dim) * (np.sqrt(qn2) + gmax) ** 2
    rows = max(1, block_bytes // (4 * max(1, aug.shape[1])))
    buf = np.empty((rows, aug.shape[1]), np.float32)
    qa = np.concatenate([q, np.ones((n, 1), np.float32)], axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite query: no candidates, distance inf
        for a in range(0, n, rows):
            b = min(n, a + rows)
            d = np.matmul(qa[a:b], aug, out=buf[: b - a])
            # ub: the kappa-th smallest upper bound (D + |q|^2 + eps)(1 + G_E/4) of an exact value; a row whose
            # lower bound (D + |q|^2 - eps)(1 - G_E/4) exceeds it cannot be among the kappa nearest
            dk, am = _kth_smallest(d, kg)
            ub = (dk.astype(np.float64) + qn2[a:b] + eps[a:b]) * hi_f
            thr = np.nextafter((ub / lo_f + eps[a:b] - qn2[a:b]).astype(np.float32), np.float32(np.inf))
            qi, ri = _candidates(d <= thr[:, None], am)
            _kth_exact(q[a:b], g_ok, qi, ri, out[a:b], mult)
    return mean_sqrt(out)


@dataclass(frozen=True)
class Grouped:
    """A gallery prepared for :func:`grouped_nn_distances`: its distinct finite rows sorted by group, each
    group's centre and radii, and the GEMM operand about the centres. Depends on the gallery alone, so one
    preparation serves every test image with the same gallery."""

    rows: np.ndarray  # (m', C) float32: distinct finite rows, group by group
    mult: np.ndarray  # (m',) how often each occurs in the gallery
    n_rows: int  # rows of the gallery as given (kappa is capped by it, as in nn_distances)
    start: np.ndarray  # (U,) first row of each group
    count: np.ndarray  # (U,) rows of each group
    c32: np.ndarray  # (U, C) float32 centres
    c64: np.ndarray  # (U, C) float64 centres
    r_in: np.ndarray  # (U,) float64, inflated: every row's |g - c| lies in [r_in, r_out]
    r_out: np.ndarray
    aug: np.ndarray  # (m', C + 1) float32: [-2 (g - c), |g - c|^2]


def group_gallery(gallery: np.ndarray, groups: np.ndarray, centres: np.ndarray) -> Grouped:
    """Prepare ``gallery`` (m, C) for :func:`grouped_nn_distances`; ``groups``: (m,) ids into ``centres``."""
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if g.ndim != 2 or groups.shape != (g.shape[0],) or centres.ndim != 2 or centres.shape[1] != g.shape[1]:
        raise ValueError(f"gallery {g.shape}, groups {groups.shape}, centres {centres.shape} do not match")
    if g.shape[0] == 0:
        raise ValueError("the gallery is empty")
    if groups.min() < 0 or groups.max() >= centres.shape[0]:
        raise ValueError("a group id is not a row of centres")
    rel = (g.shape[1] + 8) * 2.0**-52
    keep, mult = _distinct_finite(g)  # rows with a non-finite value are never neighbours
    by_group = np.argsort(groups[keep], kind="stable")
    order, mult = keep[by_group], mult[by_group]
    gs = g[order]
    ids, start, count = np.unique(groups[order], return_index=True, return_counts=True)
    c64 = np.asarray(centres, np.float64)[ids]
    r = np.sqrt(((gs.astype(np.float64) - np.repeat(c64, count, axis=0)) ** 2).sum(axis=1))
    c32 = np.asarray(centres, np.float32)[ids]
    gc = gs - np.repeat(c32, count, axis=0)  # each row about its group's centre: eps shrinks with the radius
    aug = np.concatenate([gc * np.float32(-2.0), np.einsum("ij,ij->i", gc, gc)[:, None]], axis=1)
    return Grouped(gs, mult, g.shape[0], start, count, c32, c64,
                   np.minimum.reduceat(r, start) * (1 - rel) if r.size else r,
                   np.maximum.reduceat(r, start) * (1 + rel) if r.size else r, aug)


def position_bound(queries: np.ndarray, positions: np.ndarray, kappa: int = 1) -> np.ndarray:
    """(n,) float64: per query, the ``kappa``-th smallest exact value :func:`exact_d2` over the gallery rows at
    its own position (``positions``: (k, n, C), the k gallery images' rows laid out like the queries), or inf
    with fewer than ``kappa`` finite ones. Each is the exact value of ``kappa`` gallery rows, so it is at least
    the canonical kappa-th smallest over the whole gallery: a valid first ``ub`` for
    :func:`grouped_nn_distances` (the engine's first bound from the query's own grid position, docs/engine.md
    part I). On aligned parts it is close to the answer (bottle level 0: median 1.09 times it)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k, n = positions.shape[:2]
    if positions.shape[1:] != q.shape:
        raise ValueError(f"positions {positions.shape} are not laid out like the queries {q.shape}")
    if k < kappa:
        return np.full(n, np.inf)
    e = exact_d2(positions.reshape(k * n, -1), np.broadcast_to(q, (k, *q.shape)).reshape(k * n, -1)).reshape(k, n)
    e = np.where(np.isnan(e), np.float32(np.inf), e)
    kth = e.min(axis=0) if kappa == 1 else np.partition(e, kappa - 1, axis=0)[kappa - 1]
    return kth.astype(np.float64)


def grouped_nn_distances(queries: np.ndarray, gallery: np.ndarray | Grouped, groups: np.ndarray | None = None,
                         centres: np.ndarray | None = None, kappa: int = 1,
                         first_ub: np.ndarray | None = None) -> np.ndarray:
    """:func:`nn_distances` with the gallery's rows in groups (``groups``: (m,) ids into ``centres``, (G, C);
    or a gallery prepared by :func:`group_gallery`): the same answer, bit for bit, computing only the (query,
    group) pairs the triangle inequality cannot rule out. Any grouping and any centres give the canonical
    answer (they only change the speed); spade-ad's fit-time index gives groups of close rows (one shell of
    one k-means cell, ``docs/engine.md`` part II).

    Per group, its radii ``r_in <= |g - c| <= r_out`` over its rows bound every row's distance from a query
    from below by ``l = max(|q - c| - r_out, r_in - |q - c|, 0)`` (float64, with margins for its rounding).
    ``ub``, an upper bound on each query's kappa-th smallest exact value, starts from ``first_ub`` (any values
    at least that, e.g. :func:`position_bound`) and (kappa > 1, or without it) the rows of the group with the
    nearest centre, and for kappa = 1 tightens group by group (nearest groups first); a group with
    ``l^2 > ub / (1 - G_E/4)`` cannot hold a row among the kappa nearest. Within the others, the GEMM form
    about the group's centre (eps with ``|q - c| + r_out``: small where rows are dense) picks the candidates
    (for kappa = 1: each query's nearest row, and one more pass finds the few queries with others), and they
    are re-checked exactly as in :func:`nn_distances`, duplicates counted with their multiplicity.
    """
    if not isinstance(gallery, Grouped):
        if groups is None or centres is None:
            raise ValueError("groups and centres are needed with an unprepared gallery")
        gallery = group_gallery(gallery, groups, centres)
    G = gallery  # noqa: N806
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != G.aug.shape[1] - 1:
        raise ValueError(f"queries {q.shape} do not match the gallery's {G.aug.shape[1] - 1} columns")
    if kappa < 1:
        raise ValueError("kappa must be >= 1")
    if first_ub is not None and np.shape(first_ub) != (q.shape[0],):
        raise ValueError(f"first_ub {np.shape(first_ub)} does not match the queries {q.shape}")
    n, dim = q.shape
    kk = min(kappa, G.n_rows)
    out = np.full((n, kk), np.inf, np.float32)
    if G.rows.shape[0] == 0:
        return mean_sqrt(out)
    kg = min(kk, int(G.mult.sum()))
    lo_f, hi_f = 1 - G_E(dim) / 4, 1 + G_E(dim) / 4
    rel = (dim + 8) * 2.0**-52  # float64 rounding of the bounds below, with room to spare
    gs, mult, start, count, c32, c64, r_in, r_out, aug = (G.rows, G.mult, G.start, G.count, G.c32, G.c64, G.r_in,
                                                          G.r_out, G.aug)
    q64 = q.astype(np.float64)
    qn2 = np.einsum("ij,ij->i", q64, q64)
    gam = eps_factor(dim)
    qa = np.empty((n, dim + 1), np.float32)  # [q - c, 1] for the queries of the group at hand
    qa[:, dim] = 1

    def tile(u: int, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """D = d~ - |q - c|^2 about group u's centre c for queries ``sel``, with |q - c|^2 and eps."""
        x = qa[: sel.size]
        np.subtract(q[sel], c32[u], out=x[:, :dim])
        x64 = x[:, :dim].astype(np.float64)
        qcn2 = np.einsum("ij,ij->i", x64, x64)
        d = x @ aug[start[u] : start[u] + count[u]].T
        return d, qcn2, gam * (np.sqrt(qcn2) + r_out[u]) ** 2

    with np.errstate(invalid="ignore", over="ignore"):  # non-finite queries: no candidates, distance inf
        cn2 = np.einsum("ij,ij->i", c64, c64)
        # (groups, n), in place: s = |q - c|^2 within err = rel (|q| + |c|)^2, so dq = sqrt(max(s, 0)) is
        # within sqrt(err) of |q - c|, and max(dq - r_out, r_in - dq) = |dq - mid| - half; margin covers
        # sqrt(err) and the roundings of these few float64 steps twice over
        s = c64 @ q64.T
        s *= -2
        s += cn2[:, None]  # |q - c|^2 - |q|^2: its argmin over groups is the nearest centre's group (home)
        home = np.argmin(np.where(np.isnan(s), np.inf, s), axis=0) if first_ub is None or kg > 1 else None
        s += qn2[None]
        s = np.sqrt(np.maximum(s, 0, out=s), out=s)
        s -= ((r_in + r_out) / 2)[:, None]
        s = np.abs(s, out=s)
        m = 2 * np.sqrt(rel)
        s -= (m * np.sqrt(qn2))[None] + ((r_out - r_in) / 2 + m * (np.sqrt(cn2) + r_out))[:, None]
        low2 = np.maximum(s, 0, out=s)
        low2 *= low2
        low2 *= 1 - rel  # l^2 <= d^2 for every row of the group
        ub = np.full(n, np.inf) if first_ub is None else np.array(first_ub, np.float64)
        if home is not None:  # (kappa > 1, or no first ub: ub does not tighten below; the home group's rows help)
            for u in np.unique(home):  # ub from the rows of the group with the nearest centre
                if count[u] < kg:  # fewer distinct rows than kappa: no bound from this group
                    continue
                sel = np.nonzero(home == u)[0]
                d, qcn2, eps = tile(u, sel)
                ub[sel] = np.minimum(ub[sel], (_kth_smallest(d, kg)[0].astype(np.float64) + qcn2 + eps) * hi_f)
        lim = ub / lo_f  # a row with d^2 above it is not among the kappa nearest
        grow = hi_f / lo_f
        every = np.arange(n)
        qis, ris, lows = [], [], []
        for u in np.argsort(low2.mean(axis=1), kind="stable"):  # (kappa = 1: nearest groups first tighten ub)
            sel = np.nonzero(low2[u] <= lim)[0]
            if sel.size == 0:
                continue
            d, qcn2, eps = tile(u, sel)
            lim_s = lim[sel]
            if kg == 1:  # the group's nearest row tightens ub
                am = d.argmin(axis=1)
                dmin = d[every[: sel.size], am]
                lim_s = np.minimum(lim_s, (dmin + qcn2 + eps) * grow)
                lim[sel] = lim_s
            lim_s += eps
            lim_s -= qcn2
            thr = np.nextafter(lim_s.astype(np.float32), np.float32(np.inf))  # rows with D <= thr: candidates
            if kg == 1:  # each query's nearest row, then (rarely) the others: one pass finds the queries with more
                has = np.nonzero(dmin <= thr)[0]
                d[every[: sel.size], am] = np.inf
                more = np.nonzero(d.min(axis=1) <= thr)[0]
                qm, rm = np.nonzero(d[more] <= thr[more, None])
                qi, ri = np.concatenate([has, more[qm]]), np.concatenate([am[has], rm])
                dv = np.concatenate([dmin[has], d[more[qm], rm]])
            else:
                qi, ri = np.nonzero(d <= thr[:, None])
                dv = d[qi, ri]
            qis.append(sel[qi])
            ris.append(start[u] + ri)
            lows.append(dv + (qcn2 - eps)[qi])  # a lower bound on d^2
        if qis:  # candidates taken under an earlier, looser ub are dropped under the final one
            qi, ri, low = np.concatenate(qis), np.concatenate(ris), np.concatenate(lows)
            ok = low <= lim[qi]
            _kth_exact(q, gs, qi[ok], ri[ok], out, mult)
    return mean_sqrt(out)


def _kth_exact(q: np.ndarray, g: np.ndarray, qi: np.ndarray, ri: np.ndarray, out: np.ndarray,
               mult: np.ndarray) -> None:
    """Score the candidate pairs (qi, ri) exactly and put each query's ``out.shape[1]`` smallest values, in
    ascending order and each row counted ``mult[ri]`` times, into its row of ``out`` (rows without candidates
    stay inf)."""
    e = exact_d2(g[ri], q[qi])
    e = np.where(np.isnan(e), np.float32(np.inf), e)
    if out.shape[1] > 1:  # a row repeated r times is r of the kappa nearest (at most kappa of them count)
        times = np.minimum(mult[ri], out.shape[1])
        qi, e = np.repeat(qi, times), np.repeat(e, times)
    order = np.lexsort((e, qi))
    qi, e = qi[order], e[order]
    first = np.searchsorted(qi, np.arange(out.shape[0]))
    count = np.diff(np.append(first, qi.size))
    for j in range(out.shape[1]):
        has = count > j
        out[has, j] = e[first[has] + j]


__all__ = ["nn_distances", "grouped_nn_distances", "position_bound", "group_gallery", "Grouped", "exact_d2",
           "mean_sqrt", "eps_factor", "G_E", "gamma"]
