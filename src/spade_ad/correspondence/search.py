"""The exact core of stage 3's search: mean Euclidean distance from each query to its kappa nearest
gallery rows, exact (checked against :func:`.reference.nn_distances_reference`), never materialising
the distance matrix. The pruning cells live in :mod:`.pruning`, the thread and buffer heuristics in
:mod:`.runtime`.

Engine
------
Notation: q a query row, g a gallery row (fp32), d = |q - g| the exact distance of those fp32 vectors.
For a centre c, the GEMM form is d~ = |q - c|^2 + |g - c|^2 - 2 (q - c).(g - c) evaluated in fp32.
Dot-product error analysis (any summation order, FMA or not) plus the rounding of the centring gives
``|d~ - d^2| <= eps = gamma_{C+12} (|q - c| + |g - c|)^2`` (gamma_n = n u / (1 - n u), u = 2^-24; the
analysis needs C + 6, the rest absorbs the roundings of the threshold arithmetic, which is always done
at the scale of that same pair; computed norms are inflated slightly). The error thus depends on the
distances to a *local* centre, not on the feature norms.

1. Layout. The gallery is rotated onto its principal axes (eigendecomposition of a sample's C x C
   covariance) and cut into a grid of ~M/1024 cells by quantiles of the top 4 coordinates. One int32
   sort on (cell, hash of the row) groups each cell and puts identical rows side by side: exact
   duplicates (uniform background, fp16 bank) are kept once, with their multiplicity. The rows near the
   most repeated rows (dense clusters: a uniform background) get cells of their own. Cells are padded to
   whole 32-row blocks (pads score +inf); small neighbouring cells share a GEMM unit, big ones are cut
   into units of at most 2048 rows. Each unit is centred on its own mean and stores ``[g - c, |g - c|^2]``
   as the GEMM operand, so eps is tiny where rows are dense.
2. Bounds. Lower: the box of each unit in the top 6 principal coordinates gives every (unit, query)
   pair a lower bound l <= d for all its rows (shrunk by a margin for the rounding of the rotation).
   Upper: ``ub_q`` >= the kappa-th smallest d^2, first from the k rows at the query's own grid position
   when ``query_hw == gallery_hw`` describe the layout (a batched dot product), otherwise from a pass of
   every query against its home unit (smallest l). Without cells (small or high-dimensional problems,
   GPUs) every query meets every unit.
3. Search. For each unit, only the queries with ``l^2 <= ub_q`` take part; one GEMM gives
   D = d~ - |q - c|^2 for the tile (queries x unit) in cache-sized blocks, each reduced at once to
   minima over sub-blocks of rows. The row minimum + eps (kappa = 1), or the kappa-th smallest of minima
   over disjoint groups of rows (distinct rows) + eps, tighten ``ub_q`` (kept in absolute units); rows
   with ``d~ - eps <= ub_q`` are recorded as candidates (found through the sub-block minima, then row by
   row). ub only decreases.
4. Exact re-check. ``ub_q`` is tightened once more with each candidate's own eps and with the direct-
   difference score of each query's best candidate; candidates with ``d~ - eps > ub_q`` are dropped; the
   rest are scored with direct differences on the original fp32 rows, and the answer is the mean of the
   kappa smallest (a duplicated row counting up to its multiplicity).

Why it is exact: at the end, kappa distinct gallery rows have d^2 <= ub_q (every value ub ever took
was d~ + eps or a direct-difference score of such rows). A row that was not re-checked either lies in a
unit whose lower bound exceeded ub at that time (so d^2 >= l^2 > ub >= final ub), or had d~ - eps above
a threshold that was never below the final ub (so d^2 > final ub), or was dropped at the end with
d~ - eps > final ub. None of them can be among the kappa nearest, ties and duplicates included, so the
re-checked rows contain the true kappa nearest and the answer is their direct-difference distance
(relative error ~C u, far below 1e-4). There is no failure mode for finite inputs; a query left with
fewer than kappa finite candidates (non-finite features) is recomputed by brute force and counted in
``stats['fallback']``. If the user allowed reduced-precision fp32 matmuls (TF32/bf16), eps grows to
match. Peak memory: a ``tile_bytes`` tile, O((P + M) C) buffers (some kept between calls as scratch,
see :func:`release_scratch`) and a (units x P) table of lower bounds, about P M / 1000; never P x M.

The same code runs on a CUDA device (cells off by default: there a dense GEMM is cheap). On the CPU,
threads are used only while they pay (see ``threads`` in :func:`nn_distances`).
"""
from __future__ import annotations

import math
import time

import torch

from .pruning import SUB_BOX, Layout, U, hash_bits, hash_vector, pruned_layout, pruning_pays
from .reference import brute_topk_d2
from .runtime import engine_threads, scratch, watch_threads

DEFAULT_TILE_BYTES = 8 << 20  # one query x gallery tile of fp32 squared distances
_CACHE_TILE = 1 << 20  # CPU: bytes of a GEMM block reduced while it is still in cache
_MAX_COLS = 2048  # CPU: gallery rows per GEMM unit, at most (on a GPU, tiles are as big as tile_bytes allows)


def _gamma(n: int, u: float = U) -> float:
    return n * u / (1 - n * u)


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
        self.g_e = 4 * _gamma(dim + 2)  # |e - d^2| <= g_e d^2 / 4 for the direct-difference value e
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
            e = (self.g.index_select(0, rows) - self.q.index_select(0, qi)).square_().sum(1)
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
        hi_v = dq + e_pair
        ub = self.ub
        if self.run is None:
            ub.scatter_reduce_(0, cq, hi_v, "amin")
            # re-check each query's best candidate first: its exact score bounds ub tighter still
            low = torch.full_like(ub, math.inf).scatter_reduce_(0, cq, dq, "amin")
            top = (dq <= low.index_select(0, cq)).nonzero().squeeze(1)
            self.recheck(cq.index_select(0, top), cg.index_select(0, top))
            dq.index_fill_(0, top, math.inf)  # done
            torch.minimum(ub, self.result[:, 0] * (1 + self.g_e), out=ub)
        else:
            assert self.lay.mult is not None
            # distinct rows (with their multiplicity) only
            rep = self.lay.mult.index_select(0, cg).clamp_max(self.kk)
            best = _smallest_per_row(
                cq.repeat_interleave(rep), hi_v.repeat_interleave(rep), self.n_q, self.kk
            )
            torch.minimum(ub, torch.minimum(best[:, -1], self.result[:, -1] * (1 + self.g_e)), out=ub)
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
                new = torch.minimum(self.ub.index_select(0, qi), low + qn_u + e_q)
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
                new = torch.minimum(self.ub.index_select(0, qi), top[:, -1])
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
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"shapes {tuple(queries.shape)} and {tuple(gallery.shape)} do not match")
    if gallery.shape[0] == 0:
        raise ValueError("empty gallery")
    if kappa < 1:
        raise ValueError("kappa must be >= 1")
    if queries.device.type != "cpu":
        return _nn_distances(queries, gallery, kappa, tile_bytes, stats, query_hw, gallery_hw, prune)
    with engine_threads(threads, float(queries.shape[0]) * gallery.shape[0] * queries.shape[1]):
        return _nn_distances(queries, gallery, kappa, tile_bytes, stats, query_hw, gallery_hw, prune)



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
    # |d~ - d^2| <= eps = gam (|q - c| + |g - c|)^2 for the GEMM form about any centre c (module
    # docstring); the last factor covers norms that are themselves computed with rounding
    gam = (_gamma(dim + 12) + 3 * u_in) * 1.01 * (1 + 4 * (dim + 4) * U) ** 2

    if prune is None:  # cells pay on a CPU, for big problems with few channels
        prune = pruning_pays(dev, n_q, n_g, dim)

    # ---- ub: an upper bound on the kk-th smallest d^2 of each query (only decreases). With cells, the
    # rows at the query's own grid position give a good first one (it prunes; without cells it would not)
    ub = torch.full((n_q,), math.inf, device=dev)
    local = False
    if prune and query_hw is not None and gallery_hw is not None and tuple(query_hw) == tuple(gallery_hw):
        hw = int(query_hw[0]) * int(query_hw[1])
        if hw == n_q and n_g % hw == 0 and n_g // hw >= kk:
            ub, local = _local_bound(q, g, hw, kk, gam), True

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
    return result.clamp_min_(0).sqrt_().mean(1)



__all__ = ["nn_distances", "DEFAULT_TILE_BYTES"]
