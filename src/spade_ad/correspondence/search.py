"""The exact core of stage 3's search: mean Euclidean distance from each query to its kappa nearest
gallery rows, exact (checked against :func:`.reference.nn_distances_reference`), never materialising
the distance matrix. The pruning cells live in :mod:`.pruning`, the thread and buffer heuristics in
:mod:`.runtime`.

The design and the correctness argument (the GEMM form's error bound ``eps``, the lower bounds, why every
row that can be among the kappa nearest is re-checked, and why the answer is canonical: the same bits
whatever the layout, pruning, threads or batching) are in ``docs/engine.md``: part I for
:func:`nn_distances`, part II for :func:`nn_distances_merged` over galleries merged from the fit-time
index of :mod:`.cells`.
"""
from __future__ import annotations

import itertools
import math
import time

import torch

from ..settings import DEFAULT_TILE_BYTES
from .cells import NSB, SHELLS, Merged
from .pruning import SUB_BOX, Layout, U, hash_bits, hash_vector, pruned_layout, pruning_pays
from .reference import brute_topk_d2
from .runtime import engine_threads, scratch, split_work, watch_threads

_CACHE_TILE = 1 << 20  # CPU: bytes of a GEMM block reduced while it is still in cache
_MAX_COLS = 2048  # CPU: gallery rows per GEMM unit, at most (on a GPU, tiles are as big as tile_bytes allows)


def _gamma(n: int, u: float = U) -> float:
    return n * u / (1 - n * u)


def _eps_factor(dim: int, u_in: float) -> float:
    """gam with |d~ - d^2| <= eps = gam (|q - c| + |g - c|)^2 for the GEMM form about any centre c
    (docs/engine.md); the last factor covers norms that are themselves computed with rounding."""
    return (_gamma(dim + 12) + 3 * u_in) * 1.01 * (1 + 4 * (dim + 4) * U) ** 2


def G_E(dim: int) -> float:  # noqa: N802 - a constant of the proof
    """|e - d^2| <= G_E d^2 / 4 for the direct-difference value e of :func:`exact_d2`."""
    return 4 * _gamma(dim + 2)


def _reduced_gemm_roundoff(device: torch.device) -> float:
    """Unit roundoff of the GEMM inputs if fp32 matmuls may run in TF32/bf16, else 0."""
    reduced = torch.get_float32_matmul_precision() != "highest"
    try:
        if device.type == "cuda":
            reduced |= bool(torch.backends.cuda.matmul.allow_tf32)
            reduced |= getattr(torch.backends.cuda.matmul, "fp32_precision", "none") in ("tf32", "bf16")
        else:
            mk = getattr(torch.backends.mkldnn, "matmul", None)
            reduced |= getattr(mk, "fp32_precision", "none") in ("tf32", "bf16")
    except (AttributeError, RuntimeError):  # pragma: no cover - older/odd builds
        reduced = True
    return 2.0**-8 if reduced else 0.0



def exact_d2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances of paired fp32 rows ``a[i]``, ``b[i]`` by direct differences, summed by a fixed
    pairwise tree over the coordinates (one rounding per elementwise operation): a pair gets the same
    bits whatever else is computed with it, so results do not depend on batching, layout or threads."""
    x = (a - b).square_()
    while x.shape[1] > 1:
        h = x.shape[1] // 2
        y = x[:, :h] + x[:, h : 2 * h]
        if x.shape[1] % 2:
            y[:, 0] += x[:, 2 * h]
        x = y
    return x[:, 0].contiguous() if x.shape[1] else torch.zeros(x.shape[0], device=x.device)


def mean_sqrt(d2: torch.Tensor) -> torch.Tensor:
    """Mean of the square roots of each row of ``d2`` (sorted ascending), summed in a fixed order.

    The square roots are taken in float64 and rounded once to float32: the correctly rounded float32 root
    (53 >= 2 * 24 + 2 bits), as IEEE and numpy define it. torch's own float32 ``sqrt`` on the CPU is not
    correctly rounded (measured with torch 2.14 on AVX2: one value in five is one ulp off), which would make
    the canonical answer depend on the library that computes it."""
    x = d2.clamp_min(0).double().sqrt_().float()
    acc = x[:, 0].clone()
    for j in range(1, x.shape[1]):
        acc += x[:, j]
    return acc.div_(x.shape[1]) if x.shape[1] > 1 else acc


def _smallest_per_row(qi: torch.Tensor, vals: torch.Tensor, n_rows: int, kk: int) -> torch.Tensor:
    """(n_rows, kk) table of the kk smallest ``vals`` of each row id ``qi`` (+inf where fewer)."""
    out = torch.full((n_rows, kk), math.inf, device=vals.device)
    if vals.numel() == 0:
        return out
    o = torch.argsort(vals, stable=True)
    qs, vs = qi[o], vals[o]
    o = torch.argsort(qs, stable=True)
    qs, vs = qs[o], vs[o]
    counts = torch.bincount(qs, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(qs.numel(), device=vals.device) - starts[qs]
    keep = rank < kk
    out[qs[keep], rank[keep]] = vs[keep]
    return out



class _Search:
    """Phase 3: GEMM tiles over the units, the running bound ``ub``, candidates, exact re-checks."""

    def __init__(
        self,
        q: torch.Tensor,
        g: torch.Tensor,
        lay: Layout,
        kk: int,
        gam: float,
        tile_bytes: int,
        ub: torch.Tensor,
    ) -> None:
        self.q, self.g, self.lay, self.kk, self.gam, self.tile_bytes = q, g, lay, kk, gam, tile_bytes
        n_q, dim = q.shape
        dev = q.device
        self.n_q, self.dim = n_q, dim
        self.ub = ub  # >= the kk-th smallest d^2 of each query; only decreases
        self.qa = torch.cat([q * -2.0, torch.ones(n_q, 1, device=dev)], dim=1)
        self.all_q = torch.arange(n_q, device=dev)
        self.chunk = max(1, tile_bytes // (4 * dim * 3))  # candidate rows per exact re-check batch
        self.cap = max(self.chunk, tile_bytes // 32)  # candidate rows held before a re-check
        self.gnorm = lay.aug[:, dim].sqrt()
        self.g_e = G_E(dim)  # |e - d^2| <= g_e d^2 / 4 for the direct-difference value e
        self.infl = 1 + self.g_e  # every bound kept in ub is inflated by this (canonical results)
        self.run = torch.full((n_q, kk), math.inf, device=dev) if kk > 1 else None  # kk smallest bounds
        self.result = torch.full((n_q, kk), math.inf, device=dev)  # kk smallest exact d^2 re-checked
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.counters = {"pairs": 0, "rechecked": 0, "candidates": 0}
        self.pace = [math.inf]  # best seconds per distance seen by the GEMM blocks of this call

    def recheck(self, cq: torch.Tensor, cg: torch.Tensor) -> None:
        """Exact (direct-difference) scores of candidate rows, merged into ``result``."""
        self.counters["rechecked"] += int(cq.numel())
        for a in range(0, cq.numel(), self.chunk):
            qi, gi = cq[a : a + self.chunk], cg[a : a + self.chunk]
            rows = self.lay.src.index_select(0, gi)
            e = exact_d2(self.g.index_select(0, rows), self.q.index_select(0, qi))
            if self.run is None:
                self.result[:, 0].scatter_reduce_(0, qi, e, "amin")
            else:
                assert self.lay.mult is not None
                # a repeated row counts up to kk times
                rep = self.lay.mult.index_select(0, gi).clamp_max(self.kk)
                self.result = _smallest_per_row(
                    torch.cat([self.all_q.repeat_interleave(self.kk), qi.repeat_interleave(rep)]),
                    torch.cat([self.result.reshape(-1), e.repeat_interleave(rep)]),
                    self.n_q,
                    self.kk,
                )

    def flush(self) -> None:
        """Tighten ub with the pending candidates, then re-check those that can still matter."""
        if not self.pending:
            return
        cq, cg, cv, cn = (torch.cat([p[j] for p in self.pending]) for j in range(4))
        self.pending.clear()
        self.n_pending = 0
        # the pair's own rounding bound (the loop used the unit's largest norm): tighter ub, fewer re-checks
        e_pair = (cn + self.gnorm.index_select(0, cg)).square_().mul_(self.gam)
        dq = cv.add_(cn.square_())  # d~
        hi_v = (dq + e_pair).mul_(self.infl)
        ub = self.ub
        if self.run is None:
            ub.scatter_reduce_(0, cq, hi_v, "amin")
            # re-check each query's best candidate first: its exact score bounds ub tighter still
            low = torch.full_like(ub, math.inf).scatter_reduce_(0, cq, dq, "amin")
            top = (dq <= low.index_select(0, cq)).nonzero().squeeze(1)
            self.recheck(cq.index_select(0, top), cg.index_select(0, top))
            dq.index_fill_(0, top, math.inf)  # done
            torch.minimum(ub, self.result[:, 0] * ((1 + self.g_e) * self.infl), out=ub)
        else:
            assert self.lay.mult is not None
            # distinct rows (with their multiplicity) only
            rep = self.lay.mult.index_select(0, cg).clamp_max(self.kk)
            best = _smallest_per_row(
                cq.repeat_interleave(rep), hi_v.repeat_interleave(rep), self.n_q, self.kk
            )
            torch.minimum(ub, torch.minimum(best[:, -1], self.result[:, -1] * ((1 + self.g_e) * self.infl)), out=ub)
        keep = (dq - e_pair <= ub.index_select(0, cq)).nonzero().squeeze(1)
        self.recheck(cq.index_select(0, keep), cg.index_select(0, keep))

    def search(self, unit: tuple[int, int, int, int, float, int], idx: torch.Tensor) -> None:
        """GEMM of the queries ``idx`` against one unit: update ub and record the candidate rows."""
        r0, r1, sub, nsb, rad, ui = unit
        rows = max(1, self.tile_bytes // (4 * (r1 - r0)))
        cpu = self.q.device.type == "cpu"
        blk = max(1, min(rows, _CACHE_TILE // (4 * (r1 - r0)))) if cpu else rows
        at = self.lay.aug[r0:r1].t()
        for a in range(0, idx.numel(), rows):
            qi = idx[a : a + rows]
            n = qi.numel()
            x = self.qa.index_select(0, qi).add_(self.lay.cen2[ui])  # [-2 (q - c), 1]
            nq = torch.linalg.vector_norm(x[:, : self.dim], dim=1).mul_(0.5)  # |q - c|
            d = scratch("tile", (n, r1 - r0), x.device)
            d3 = d.view(n, sub, nsb)
            # minima over sub-blocks (sub-block j: rows r0 + j + t * nsb, t < sub): distinct rows for the
            # kk-th bound, and a cheap first pass to find the candidate rows
            sbm = scratch("sbm", (n, nsb), x.device)
            t0 = time.perf_counter()
            for b0 in range(0, n, blk):  # blocks of rows that stay in cache between the GEMM and the minima
                b1 = min(n, b0 + blk)
                torch.mm(x[b0:b1], at, out=d[b0:b1])  # D = d~ - |q - c|^2
                torch.amin(d3[b0:b1], 1, out=sbm[b0:b1])
            self.counters["pairs"] += d.numel()
            if cpu and d.numel() >= 1 << 16 and torch.get_num_threads() > 1:
                watch_threads(self.pace, (time.perf_counter() - t0) / d.numel())
            qn_u = nq * nq
            e_q = (nq + rad).square_().mul_(self.gam)  # eps of every pair in this unit
            low = sbm.amin(1)
            # the bound stays in absolute units (a round trip through D units would lose it to rounding
            # when it is much smaller than |q - c|^2); the threshold for the rows is in units of D
            if self.run is None:
                new = torch.minimum(self.ub.index_select(0, qi), (low + qn_u + e_q).mul_(self.infl))
            else:
                # kk increasing values, each reached by distinct rows, among the previous ones and this
                # unit's sub-block minima: repeated min-and-drop (ties dropped together only loosen the
                # bound; much cheaper than topk on these short rows)
                grp = next((x for x in (8, 16, 32, 64) if x >= self.kk and nsb % x == 0), nsb)
                part = sbm.view(n, grp, nsb // grp).amin(2)  # minima of disjoint groups: distinct rows
                vals = torch.cat([self.run.index_select(0, qi), part.add_((qn_u + e_q)[:, None])], 1)
                mins = []
                for _ in range(self.kk):
                    mins.append(vals.amin(1, keepdim=True))
                    vals.masked_fill_(vals <= mins[-1], math.inf)
                top = torch.cat(mins, 1)
                self.run.index_copy_(0, qi, top)
                new = torch.minimum(self.ub.index_select(0, qi), top[:, -1] * self.infl)
            self.ub.index_copy_(0, qi, new)
            thr = new.sub_(qn_u).add_(e_q)  # rows with D <= thr may be among the kk nearest
            hit = (low <= thr).nonzero().squeeze(1)  # queries with at least one candidate row here
            if hit.numel() == 0:
                continue
            r, c = (sbm.index_select(0, hit) <= thr.index_select(0, hit)[:, None]).nonzero(as_tuple=True)
            r = hit.index_select(0, r)
            rows_d = d3.transpose(1, 2)[r, c]  # (n_cand, sub): the rows of the candidate sub-blocks
            i, t = (rows_d <= thr.index_select(0, r)[:, None]).nonzero(as_tuple=True)
            rq = r.index_select(0, i)
            vals = rows_d[i, t]
            gi = c.index_select(0, i).add_(t * nsb).add_(r0)
            self.pending.append((qi.index_select(0, rq), gi, vals, nq.index_select(0, rq)))
            self.n_pending += i.numel()
            self.counters["candidates"] += i.numel()
            if self.n_pending > self.cap:
                self.flush()



def _local_bound(q: torch.Tensor, g: torch.Tensor, hw: int, kk: int, gam: float) -> torch.Tensor:
    """Upper bound on the kappa-th smallest d^2 over the gallery rows at each query's own grid position."""
    k = g.shape[0] // hw
    gv = g.view(k, hw, -1)
    gnr = torch.linalg.vector_norm(gv, dim=2)  # (k, hw)
    qnr = torch.linalg.vector_norm(q, dim=1)
    dl = torch.einsum("kpc,pc->kp", gv, q).mul_(-2.0).add_(gnr.square()).add_(qnr.square())
    dl.add_((gnr + qnr).square_().mul_(gam))
    if kk == 1:
        return dl.amin(0)
    return dl.topk(kk, dim=0, largest=False).values[-1]



def _check_search(queries: torch.Tensor, gallery: torch.Tensor, kappa: int) -> None:
    """The arguments of a plain search: (P, C) queries, a non-empty (M, C) gallery, kappa >= 1."""
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(gallery.shape)} do not match")
    if gallery.shape[0] == 0:
        raise ValueError("empty gallery")
    if kappa < 1:
        raise ValueError("kappa must be >= 1")


def nn_distances(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    stats: dict[str, int] | None = None,
    query_hw: tuple[int, int] | None = None,
    gallery_hw: tuple[int, int] | None = None,
    *,
    prune: bool | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Exact mean distance from each query to its ``kappa`` nearest gallery rows (fp32 result).

    queries: (P, C), gallery: (M, C), any float dtype, on any device; computed in fp32 on the queries'
    device. Peak extra memory is bounded by ``tile_bytes`` plus O(P + M) vectors, never P * M.
    ``query_hw`` / ``gallery_hw``: grid shapes when the queries are one image's H*W positions (row-major)
    and the gallery a stack of images of H*W positions each; they only speed things up.
    ``prune``: use the cells and their lower bounds (default: on a CPU, when the problem is big enough
    and C <= 128 so that they pay off). The result is exact either way.
    ``threads``: CPU threads to use (default: torch's current setting), restored afterwards. They are
    used only while a quick measurement says parallel regions pay: when the cores are busy with other
    processes, each of the engine's hundreds of mid-sized parallel ops waits for a descheduled thread,
    and one thread is several times faster (the measurement is remembered for half a second).
    ``stats``: if given, counters are added: ``queries``, ``fallback`` (queries recomputed by brute
    force; 0 for finite features), ``pairs`` (query-gallery distances the GEMMs computed), ``candidates``
    (rows recorded as possible nearest) and ``rechecked`` (rows scored exactly).
    """
    _check_search(queries, gallery, kappa)
    if queries.device.type != "cpu":
        return _nn_distances(queries, gallery, kappa, tile_bytes, stats, query_hw, gallery_hw, prune)
    with engine_threads(threads, float(queries.shape[0]) * gallery.shape[0] * queries.shape[1]):
        return _nn_distances(queries, gallery, kappa, tile_bytes, stats, query_hw, gallery_hw, prune)


def search_plain(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    query_hw: tuple[int, int] | None = None,
    gallery_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """:func:`nn_distances` with torch's thread setting as it is and no lock taken (see :func:`search_merged`)."""
    _check_search(queries, gallery, kappa)
    return _nn_distances(queries, gallery, kappa, tile_bytes, None, query_hw, gallery_hw, None)



def _nn_distances(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int,
    tile_bytes: int,
    stats: dict[str, int] | None,
    query_hw: tuple[int, int] | None,
    gallery_hw: tuple[int, int] | None,
    prune: bool | None,
) -> torch.Tensor:
    dev = queries.device
    q = queries.detach().to(device=dev, dtype=torch.float32).contiguous()
    g = gallery.detach().to(device=dev, dtype=torch.float32).contiguous()
    n_q, n_g, dim = q.shape[0], g.shape[0], q.shape[1]
    kk = min(kappa, n_g)
    if n_q == 0:
        return torch.empty(0, device=dev)
    u_in = _reduced_gemm_roundoff(dev)
    # |d~ - d^2| <= eps = gam (|q - c| + |g - c|)^2 for the GEMM form about any centre c
    # (docs/engine.md); the last factor covers norms that are themselves computed with rounding
    gam = _eps_factor(dim, u_in)

    if prune is None:  # cells pay on a CPU, for big problems with few channels
        prune = pruning_pays(dev, n_q, n_g, dim)

    # ---- ub: an upper bound on the kk-th smallest d^2 of each query (only decreases). With cells, the
    # rows at the query's own grid position give a good first one (it prunes; without cells it would not)
    ub = torch.full((n_q,), math.inf, device=dev)
    local = False
    if prune and query_hw is not None and gallery_hw is not None and tuple(query_hw) == tuple(gallery_hw):
        hw = int(query_hw[0]) * int(query_hw[1])
        if hw == n_q and n_g % hw == 0 and n_g // hw >= kk:
            ub, local = _local_bound(q, g, hw, kk, gam).mul_(1 + G_E(dim)), True

    # ---- layout (cells, units) and, with cells, the lower bound on d^2 of every (unit, query) pair
    max_cols = tile_bytes // (4 * max(1, min(n_q, 512)))
    if dev.type == "cpu":
        max_cols = min(max_cols, _MAX_COLS)
    max_cols = max(SUB_BOX, max_cols // SUB_BOX * SUB_BOX)
    lb2: torch.Tensor | None = None
    if prune:
        lay, lb2 = pruned_layout(q, g, kk, max_cols, u_in)
    else:
        lay = Layout(g, hash_bits(torch.mv(g, hash_vector(dim, dev)), 31), None, kk > 1, max_cols)
    # ---- search (see _Search)
    srch = _Search(q, g, lay, kk, gam, tile_bytes, ub)
    if lb2 is None:
        for unit in lay.units:
            srch.search(unit, srch.all_q)
    else:
        if not local:
            # pass 1: every query against its home unit (smallest lower bound), for a first ub
            home = lb2.argmin(0)
            counts = torch.bincount(home, minlength=lb2.shape[0]).tolist()
            groups = torch.split(torch.argsort(home), counts)
            for unit in lay.units:
                if counts[unit[-1]]:
                    srch.search(unit, groups[unit[-1]])
            lb2[home, srch.all_q] = math.nan  # done (NaN never passes the test below, even against ub = inf)
        for unit in lay.units:
            idx = (lb2[unit[-1]] <= srch.ub).nonzero().squeeze(1)
            if idx.numel():
                srch.search(unit, idx)
    srch.flush()
    result, counters = srch.result, srch.counters

    bad = ~torch.isfinite(result[:, -1])
    n_bad = int(bad.sum())
    if n_bad:
        which = bad.nonzero().squeeze(1)
        result[which] = brute_topk_d2(q[which], g, kk, tile_bytes)
    if stats is not None:
        stats["fallback"] = stats.get("fallback", 0) + n_bad
        stats["queries"] = stats.get("queries", 0) + n_q
        stats["pairs"] = stats.get("pairs", 0) + counters["pairs"]
        stats["rechecked"] = stats.get("rechecked", 0) + counters["rechecked"]
        stats["candidates"] = stats.get("candidates", 0) + counters["candidates"]
    return mean_sqrt(result)



# ------------------------------------------------------------------------------------------ merged galleries


def unit_bounds(q: torch.Tensor, m: Merged, u_in: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``lb`` (units x queries): lower bounds on d^2 from each query to every row of each unit of ``m``
    (rigorous under rounding, see docs/engine.md), and ``s`` (cells x queries): the computed
    |q - c|^2 to each centroid."""
    cen = m.lev.centroids
    n_cells, dim = cen.shape
    cn = torch.linalg.vector_norm(cen, dim=1)
    qn = torch.linalg.vector_norm(q, dim=1)
    s = torch.addmm((cn * cn)[:, None], cen, q.t(), alpha=-2.0).add_((qn * qn)[None])
    err = (cn[:, None] + qn[None]).square_().mul_((_gamma(dim + 6) + 3 * u_in) * 1.02 * (1 + 4 * (dim + 4) * U) ** 2)
    d_lo = (s - err).clamp_min_(0).sqrt_().mul_(1 - 4 * U)  # <= |q - c|
    d_hi = (s + err).sqrt_().mul_(1 + 4 * U)  # >= |q - c|
    rr = 4 * (dim + 4) * U  # relative error of a computed |g - c|
    r_out = (m.r_out * (1 + rr)).view(n_cells, SHELLS, 1)
    r_in = (m.r_in * (1 - rr)).view(n_cells, SHELLS, 1)
    lb = torch.maximum(d_lo.view(n_cells, 1, -1) - r_out, r_in - d_hi.view(n_cells, 1, -1)).clamp_min_(0)
    return lb.square_().mul_(1 - 8 * U).view(n_cells * SHELLS, -1), s


def _to_blocks(m: Merged, unit: torch.Tensor, q: torch.Tensor, lbv: torch.Tensor | None) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(unit, query) pairs sorted by unit -> (block, query) pairs sorted by block (a unit's pairs repeated
    for each of its blocks); ``lbv`` (the pairs' bounds) follows."""
    nb = m.nblocks.index_select(0, unit)
    if bool((nb == 1).all()):
        return m.first_block.index_select(0, unit), q, lbv
    units, n_u = torch.unique_consecutive(unit, return_counts=True)
    m_u = m.nblocks.index_select(0, units)
    tot = n_u * m_u
    t = torch.arange(int(tot.sum())) - torch.repeat_interleave(torch.cumsum(tot, 0) - tot, tot)
    nn = torch.repeat_interleave(n_u, tot)
    src = torch.repeat_interleave(torch.cumsum(n_u, 0) - n_u, tot) + t % nn
    blk = torch.repeat_interleave(m.first_block.index_select(0, units), tot) + t // nn
    return blk, q.index_select(0, src), None if lbv is None else lbv.index_select(0, src)


def _sub_block_minima(d: torch.Tensor, rows: int, out: torch.Tensor) -> None:
    """``out`` (rows, NSB): the minima of the first ``rows`` rows of ``d`` over each sub-block of NSB columns
    apart (sub-block j of a block: its rows j, j + NSB, j + 2 NSB, ...)."""
    torch.amin(d[:rows].view(rows, d.shape[1] // NSB, NSB), 1, out=out)


class _MergedSearch:
    """GEMM blocks of a merged gallery against the queries of (block, query) pairs, sub-block minima,
    the running bound ``ub``, candidate sub-blocks and their exact re-check (docs/engine.md, part II)."""

    def __init__(self, q: torch.Tensor, m: Merged, kk: int, gam: float, tile_bytes: int) -> None:
        self.q, self.m, self.kk, self.gam, self.tile_bytes = q, m, kk, gam, tile_bytes
        n_q, dim = q.shape
        self.n_q, self.dim = n_q, dim
        self.ub = torch.full((n_q,), math.inf)
        self.qa = torch.cat([q * -2.0, torch.ones(n_q, 1)], dim=1)
        self.cen2 = torch.cat([m.lev.centroids * 2.0, torch.zeros(m.lev.centroids.shape[0], 1)], dim=1)
        self.r_out = m.r_out * (1 + 4 * (dim + 4) * U)  # >= every |g - c| of the unit
        self.all_q = torch.arange(n_q)
        self.g_e = G_E(dim)
        self.infl = 1 + self.g_e
        self.run = torch.full((n_q, kk), math.inf) if kk > 1 else None  # kk smallest bounds of distinct rows
        self.result = torch.full((n_q, kk), math.inf)  # kk smallest exact d^2 re-checked (with multiplicity)
        self.bstart = m.bstart.tolist()
        self.bcols = m.bcols.tolist()
        self.aug_t = m.aug.t()  # (C + 1, R): a block's GEMM operand is one slice of it
        self.counters = {"pairs": 0, "candidates": 0, "rechecked": 0}

    def first_bound(self, cell: torch.Tensor) -> None:
        """ub from every query's whole ``cell`` (a cell's rows are contiguous): one GEMM per cell and the
        kk smallest D of each query's row (distinct rows; pads score +inf)."""
        m, dim, kk = self.m, self.dim, self.kk
        order = torch.argsort(cell, stable=True)
        cell = cell.index_select(0, order)
        x = self.qa.index_select(0, order).add_(self.cen2.index_select(0, cell))
        nq = torch.linalg.vector_norm(x[:, :dim], dim=1).mul_(0.5)
        rad = self.r_out.view(-1, SHELLS).amax(1).clamp_min_(0).index_select(0, cell)
        e_q = (nq + rad).square_().mul_(self.gam)
        row = torch.cat([m.bstart, (m.bstart[-1:] + m.bcols[-1:]) if m.bstart.numel() else m.bstart.new_zeros(1)])
        first = m.first_block.view(-1, SHELLS)
        r0s = row.index_select(0, first[:, 0]).tolist()
        r1s = row.index_select(0, first[:, -1] + m.nblocks.view(-1, SHELLS)[:, -1]).tolist()
        low = torch.empty(order.numel(), kk)
        tile = max(1, min(self.tile_bytes, _CACHE_TILE) // 4)
        cells, per = torch.unique_consecutive(cell, return_counts=True)
        cl, ncl = cells.tolist(), per.tolist()
        starts = [0, *itertools.accumulate(ncl)]

        def run(lo: int, hi: int) -> None:  # cells lo..hi-1
            buf = scratch("mtile", (max([tile, *(r1s[c] - r0s[c] for c in cl[lo:hi])]),), x.device)
            low0 = low[:, 0]
            for c, n, p0 in zip(cl[lo:hi], ncl[lo:hi], starts[lo:hi], strict=True):
                r0, r1 = r0s[c], r1s[c]
                if r1 == r0:  # (an empty cell: only for non-finite queries, whose nearest centroid is NaN)
                    low[p0 : p0 + n] = math.inf
                    continue
                at = self.aug_t[:, r0:r1]
                step = max(1, tile // (r1 - r0))
                grid = buf[: step * (r1 - r0)].view(step, r1 - r0)
                for a in range(p0, p0 + n, step):
                    e = min(p0 + n, a + step)
                    d = torch.mm(x[a:e], at, out=grid[: e - a])
                    if kk == 1:
                        torch.amin(d, 1, out=low0[a:e])
                    elif r1 - r0 >= kk:
                        low[a:e] = d.topk(kk, 1, largest=False).values
                    else:
                        low[a:e] = math.inf

        work = [n * (r1s[c] - r0s[c]) for c, n in zip(cl, ncl, strict=True)]
        self.counters["pairs"] += sum(work)
        split_work(run, work)
        bound = low[:, -1].add_(nq * nq).add_(e_q).mul_(self.infl)
        self.ub.scatter_reduce_(0, order, bound, "amin")

    def process(self, pb: torch.Tensor, pq: torch.Tensor) -> None:
        """All (block ``pb``, query ``pq``) pairs, sorted by block."""
        n = pb.numel()
        if n == 0:
            return
        m, dim, kk = self.m, self.dim, self.kk
        # blocks of one width side by side, so that one op takes the sub-block minima of many blocks (nothing
        # below depends on the order of the pairs): fewer, larger ops for the many small blocks
        order = torch.argsort(m.bcols.index_select(0, pb) * m.bcols.numel() + pb, stable=True)
        pb, pq = pb.index_select(0, order), pq.index_select(0, order)
        unit = m.bunit.index_select(0, pb)
        x = self.qa.index_select(0, pq).add_(self.cen2.index_select(0, unit // SHELLS))  # [-2 (q - c), 1]
        nq = torch.linalg.vector_norm(x[:, :dim], dim=1).mul_(0.5)  # |q - c|
        e_p = (nq + self.r_out.index_select(0, unit)).square_().mul_(self.gam)  # eps of the pair's rows
        sbm = torch.empty(n, NSB)
        blocks, per = torch.unique_consecutive(pb, return_counts=True)
        tile = max(1, min(self.tile_bytes, _CACHE_TILE) // 4)
        bl, nbl = blocks.tolist(), per.tolist()
        widths = [self.bcols[b] for b in bl]
        starts = [0, *itertools.accumulate(nbl)]

        def run(lo: int, hi: int) -> None:  # blocks lo..hi-1
            buf = scratch("mtile", (max([tile, *widths[lo:hi]]),), pb.device)  # at least one row of each width
            i = lo
            while i < hi:  # blocks of one width: their D rows fill a cache-sized buffer, reduced when full
                cols = widths[i]
                cap = max(1, tile // cols)
                grid = buf[: cap * cols].view(cap, cols)
                first, fill = starts[i], 0  # the pair of the buffer's first row, rows in the buffer
                while i < hi and widths[i] == cols:
                    r0 = self.bstart[bl[i]]
                    at = self.aug_t[:, r0 : r0 + cols]
                    a, end = starts[i], starts[i + 1]
                    while a < end:
                        take = min(end - a, cap - fill)
                        torch.mm(x[a : a + take], at, out=grid[fill : fill + take])  # D = d~ - |q - c|^2
                        fill, a = fill + take, a + take
                        if fill == cap:
                            _sub_block_minima(grid, fill, sbm[first : first + fill])
                            first, fill = first + fill, 0
                    i += 1
                if fill:
                    _sub_block_minima(grid, fill, sbm[first : first + fill])

        work = [nb * self.bcols[b] for b, nb in zip(bl, nbl, strict=True)]
        self.counters["pairs"] += sum(work)
        split_work(run, work)
        low = sbm.amin(1)
        nq2 = nq * nq
        if self.run is None:
            self.ub.scatter_reduce_(0, pq, (low + nq2 + e_p).mul_(self.infl), "amin")
        else:
            kt = min(kk, NSB)  # sub-block minima are reached by distinct rows
            top = sbm.topk(kt, 1, largest=False).values.add_((nq2 + e_p)[:, None])
            self.run = _smallest_per_row(
                torch.cat([self.all_q.repeat_interleave(kk), pq.repeat_interleave(kt)]),
                torch.cat([self.run.reshape(-1), top.reshape(-1)]),
                self.n_q,
                kk,
            )
            torch.minimum(self.ub, self.run[:, -1] * self.infl, out=self.ub)
        thr = self.ub.index_select(0, pq).sub_(nq2).add_(e_p)  # rows with D <= thr may be among the kk nearest
        hit = (low <= thr).nonzero().squeeze(1)
        if hit.numel() == 0:
            return
        i, j = (sbm.index_select(0, hit) <= thr.index_select(0, hit)[:, None]).nonzero(as_tuple=True)
        cp = hit.index_select(0, i)
        blk = pb.index_select(0, cp)
        sub = m.bcols.index_select(0, blk) // NSB
        t = torch.arange(int(sub.sum())) - torch.repeat_interleave(torch.cumsum(sub, 0) - sub, sub)
        rows = torch.repeat_interleave(m.bstart.index_select(0, blk) + j, sub) + t * NSB
        rq = torch.repeat_interleave(pq.index_select(0, cp), sub)
        real = torch.isfinite(m.aug[:, dim].index_select(0, rows)).nonzero().squeeze(1)  # pads are not rows
        self.recheck(rq.index_select(0, real), rows.index_select(0, real))

    def recheck(self, rq: torch.Tensor, rows: torch.Tensor) -> None:
        """Exact (direct-difference) d^2 of candidate rows, merged into ``result``; ub tightened with it."""
        m, kk = self.m, self.kk
        self.counters["candidates"] += rows.numel()
        self.counters["rechecked"] += rows.numel()
        chunk = max(1, self.tile_bytes // (4 * self.dim * 3))
        for a in range(0, rows.numel(), chunk):
            qi, ri = rq[a : a + chunk], rows[a : a + chunk]
            e = exact_d2(m.g16.index_select(0, m.src.index_select(0, ri)).float(), self.q.index_select(0, qi))
            if kk == 1:
                self.result[:, 0].scatter_reduce_(0, qi, e, "amin")
            else:
                assert m.mult is not None
                rep = m.mult.index_select(0, ri).clamp_max(kk)  # a repeated row counts up to kk times
                self.result = _smallest_per_row(
                    torch.cat([self.all_q.repeat_interleave(kk), qi.repeat_interleave(rep)]),
                    torch.cat([self.result.reshape(-1), e.repeat_interleave(rep)]),
                    self.n_q,
                    kk,
                )
        torch.minimum(self.ub, self.result[:, -1] * ((1 + self.g_e) * self.infl), out=self.ub)


def nn_distances_merged(
    queries: torch.Tensor,
    gallery: Merged,
    kappa: int = 1,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    stats: dict[str, int] | None = None,
    *,
    threads: int | None = None,
) -> torch.Tensor:
    """:func:`nn_distances` against a gallery merged from the fit-time index (:func:`.cells.merge`): the
    same exact result, bit for bit (CPU). ``gallery.n_rows`` counts the positions with multiplicity."""
    with engine_threads(threads, float(queries.shape[0]) * gallery.n_rows * queries.shape[1]):
        return search_merged(queries, gallery, kappa, tile_bytes, stats)


def search_merged(
    queries: torch.Tensor,
    gallery: Merged,
    kappa: int = 1,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """:func:`nn_distances_merged` with torch's thread setting as it is and no lock taken: for callers that
    run several searches at once on worker threads (each single-threaded), see :mod:`.gallery`."""
    if queries.ndim != 2 or queries.shape[1] != gallery.aug.shape[1] - 1:
        raise ValueError(f"queries {tuple(queries.shape)} do not match the gallery's {gallery.aug.shape[1] - 1} "
                         "channels")
    if kappa < 1:
        raise ValueError("kappa must be >= 1")
    if kappa > 1 and gallery.mult is None:
        raise ValueError("kappa > 1 needs a gallery merged with need_mult=True")
    q = queries.detach().to("cpu", torch.float32).contiguous()
    return _merged(q, gallery, kappa, tile_bytes, stats)


def _merged(q: torch.Tensor, m: Merged, kappa: int, tile_bytes: int, stats: dict[str, int] | None) -> torch.Tensor:
    n_q, dim = q.shape
    kk = min(kappa, m.n_rows)
    if n_q == 0:
        return torch.empty(0)
    u_in = _reduced_gemm_roundoff(q.device)
    lb, s = unit_bounds(q, m, u_in)
    n_cells = m.lev.centroids.shape[0]
    # a first, tight ub: every query against all rows of its nearest centroid's cell (among the cells
    # with at least kk rows)
    ok = m.count.view(n_cells, SHELLS).sum(1) >= kk
    srch = _MergedSearch(q, m, kk, _eps_factor(dim, u_in), tile_bytes)
    if bool(ok.any()):
        srch.first_bound(torch.where(ok[:, None], s, math.inf).argmin(0))
    # every (unit, query) pair whose bound does not exceed ub, in chunks (ub tightens between them)
    unit, qi = (lb <= srch.ub[None]).nonzero(as_tuple=True)
    pb, pq, lbv = _to_blocks(m, unit, qi, lb[unit, qi])
    assert lbv is not None
    chunk = max(1024, tile_bytes // (4 * (NSB + dim + 1)))
    for a in range(0, pb.numel(), chunk):
        keep = (lbv[a : a + chunk] <= srch.ub.index_select(0, pq[a : a + chunk])).nonzero().squeeze(1)
        srch.process(pb[a : a + chunk].index_select(0, keep), pq[a : a + chunk].index_select(0, keep))
    result, counters = srch.result, srch.counters
    bad = ~torch.isfinite(result[:, -1])
    n_bad = int(bad.sum())
    if n_bad:  # non-finite features: brute force over every position
        real = torch.isfinite(m.aug[:, dim]).nonzero().squeeze(1)
        mult = torch.ones(m.g16.shape[0], dtype=torch.long)
        if m.mult is not None:
            mult[m.src.index_select(0, real)] = m.mult.index_select(0, real)
        g = m.g16.float().repeat_interleave(mult.clamp_max(kk), dim=0)
        which = bad.nonzero().squeeze(1)
        result[which] = brute_topk_d2(q[which], g, kk, tile_bytes)
    if stats is not None:
        stats["fallback"] = stats.get("fallback", 0) + n_bad
        stats["queries"] = stats.get("queries", 0) + n_q
        for key, v in counters.items():
            stats[key] = stats.get(key, 0) + v
    return mean_sqrt(result)


__all__ = ["nn_distances", "nn_distances_merged", "search_merged", "search_plain", "exact_d2", "DEFAULT_TILE_BYTES"]
