"""Stage 3: pixel-level correspondence (every test position against all gallery positions).

Three implementations of the same function, "mean Euclidean distance to the kappa nearest gallery rows":

* :func:`nn_distances_reference` - brute force, direct differences in float64. The ground truth.
* :func:`cdist_baseline` - ``torch.cdist`` on the whole matrix, then ``topk``. The naive comparison.
* :func:`nn_distances` - the production engine, described here.

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
import threading
import time

import torch

DEFAULT_TILE_BYTES = 8 << 20  # one query x gallery tile of fp32 squared distances

_SUB_BOX = 32  # cells are padded to whole blocks of this many rows
_U = 2.0**-24  # fp32 unit roundoff
_BOX_DIMS = 6  # principal coordinates of the unit boxes (the lower bounds)
_GRID_DIMS = 4  # principal coordinates cut into the cell grid
_PRUNE_MIN_WORK = 4e9  # P * M * C below which the cells cost more than they save
_PRUNE_MAX_DIM = 128  # above, boxes on a few principal coordinates prune little (and eigh gets costly)
_CELL_ROWS = 1024  # target gallery rows per cell
_CACHE_TILE = 1 << 20  # CPU: bytes of a GEMM block reduced while it is still in cache
_MAX_COLS = 2048  # CPU: gallery rows per GEMM unit, at most (on a GPU, tiles are as big as tile_bytes allows)
_PROBE_TTL = 0.5  # seconds a measurement of whether threads pay is trusted
_STALL = 3.0  # a GEMM block this many times slower than the best one means the threads stall
_THREADS_MIN_WORK = 1e8  # P * M * C below which one thread is used (no measurement)
_DENSE_CLUSTERS = 2  # at most this many dense clusters get cells of their own
_DENSE_MIN_REPEATS = 8  # ... when their centre row is repeated at least this often
_DENSE_RADIUS = 0.02  # ... of this radius, relative to the gallery's rms distance from its mean


def nn_distances_reference(queries: torch.Tensor, gallery: torch.Tensor, kappa: int = 1) -> torch.Tensor:
    """Mean Euclidean distance from each query row to its ``kappa`` nearest gallery rows (float64)."""
    q = queries.detach().to("cpu", torch.float64)
    g = gallery.detach().to("cpu", torch.float64)
    kk = min(kappa, g.shape[0])
    out = torch.empty(q.shape[0], dtype=torch.float64)
    step = max(1, (32 << 20) // max(1, g.shape[0] * g.shape[1] * 8))
    for s in range(0, q.shape[0], step):
        d2 = ((q[s : s + step, None, :] - g[None, :, :]) ** 2).sum(-1)
        out[s : s + step] = d2.topk(kk, dim=1, largest=False).values.sqrt().mean(1)
    return out


def _gamma(n: int, u: float = _U) -> float:
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


_SCRATCH = threading.local()
_SCRATCH_MAX = 64 << 20


def _scratch(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A reusable fp32 work buffer (uninitialised). On the CPU, freshly allocated multi-megabyte tensors
    page-fault on first touch at every call, which costs more than the arithmetic on them, so buffers of
    up to ``_SCRATCH_MAX`` bytes are kept per thread and grown as needed (see :func:`release_scratch`)."""
    n = math.prod(shape)
    if device.type != "cpu" or 4 * n > _SCRATCH_MAX:
        return torch.empty(shape, device=device)
    cache = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = cache.get(name)
    if buf is None or buf.numel() < n:
        buf = cache[name] = torch.empty(n)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Free this thread's work buffers of :func:`nn_distances` (they are reused between calls)."""
    _SCRATCH.__dict__.pop("bufs", None)


def _brute_topk_d2(q: torch.Tensor, g: torch.Tensor, kk: int, tile_bytes: int) -> torch.Tensor:
    """Direct-difference squared distances, kk smallest per query, in bounded memory."""
    rows = max(1, tile_bytes // max(1, 4 * g.shape[0] * g.shape[1]))
    cols = g.shape[0] if rows > 1 else max(1, tile_bytes // (4 * g.shape[1]))
    out = []
    for s in range(0, q.shape[0], rows):
        qs = q[s : s + rows]
        best: torch.Tensor | None = None
        for c in range(0, g.shape[0], cols):
            d2 = ((qs[:, None, :] - g[None, c : c + cols, :]) ** 2).sum(-1)
            cand = d2 if best is None else torch.cat([best, d2], dim=1)
            best = cand.topk(min(kk, cand.shape[1]), dim=1, largest=False).values
        assert best is not None
        out.append(best)
    return torch.cat(out)


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


class _Layout:
    """The gallery's distinct rows as GEMM operands, cut into units of at most ``max_cols`` rows.

    Exact duplicate rows (common: uniform background, fp16 bank) count once, with a multiplicity, so a
    query sitting on such a feature has one candidate instead of thousands. With cells (``cell_shift``
    given: the cell id is ``key >> cell_shift``) the rows are permuted so that each cell is a contiguous
    run, padded to whole ``_SUB_BOX``-row blocks; without, the gallery keeps its order. Excluded rows
    (pads, repeats) score +inf. Each unit has its own centre ``c`` (the mean of its rows): ``aug`` holds
    ``[g - c, |g - c|^2]``, the GEMM operand; ``src`` maps a row back to the gallery. ``units``: (first
    row, end row, rows per sub-block, sub-blocks, max |g - c| over the unit, index).
    """

    def __init__(
        self,
        g: torch.Tensor,
        key: torch.Tensor,
        cell_shift: int | None,
        need_mult: bool,
        max_cols: int,
        dense_radius: float = 0.0,
        coords: torch.Tensor | None = None,
        merge_rows: int = 0,
    ) -> None:
        dev = g.device
        m, dim = g.shape
        # sorted by key = (cell, hash of the row): identical rows are adjacent; keep the first of each run
        skey, order = torch.sort(key, stable=True)
        first = torch.ones(m, dtype=torch.bool, device=dev)
        same = (skey[1:] == skey[:-1]).nonzero().squeeze(1)
        if same.numel():
            dup = (g.index_select(0, order[same]) == g.index_select(0, order[same + 1])).all(1)
            first[same[dup] + 1] = False
        uorder = order[first]
        n_u = uorder.numel()
        run_len = torch.bincount(torch.cumsum(first, 0) - 1, minlength=n_u)
        ucell = None if cell_shift is None else skey[first] >> cell_shift
        n_grid = 0 if ucell is None else int(ucell.max()) + 1  # ids from n_grid on: dense-cluster cells
        if ucell is not None and coords is not None and dense_radius > 0:
            # Dense clusters (a uniform background: thousands of near-identical rows) get cells of their
            # own around their most repeated row, so that their units are tiny, their rounding bound
            # eps ~ (|q - c| + |g - c|)^2 too, and a query there has few near-ties to re-check. (A
            # grouping heuristic: any partition of the rows is valid.)
            pos = torch.full((m,), -1, dtype=torch.long, device=dev)
            pos[uorder] = torch.arange(n_u, device=dev)
            taken = torch.zeros(n_u, dtype=torch.bool, device=dev)
            new_id = ucell.clone()
            extra = n_grid
            for _ in range(_DENSE_CLUSTERS):
                heavy = torch.where(taken, 0, run_len)
                top = int(heavy.argmax())
                if int(heavy[top]) < _DENSE_MIN_REPEATS:
                    break
                c = int(uorder[top])
                cand = ((coords - coords[c]).abs_().amax(1) <= dense_radius).nonzero().squeeze(1)
                cand = cand[pos[cand] >= 0]
                cand = cand[(g.index_select(0, cand) - g[c]).square_().sum(1) <= dense_radius**2]
                iu = pos[cand]
                iu = iu[~taken[iu]]
                new_id[iu] = extra
                taken[iu] = True
                extra += 1
            if bool(taken.any()):
                moved = taken.nonzero().squeeze(1)
                moved = moved[torch.argsort(new_id[moved], stable=True)]
                o = torch.cat([(~taken).nonzero().squeeze(1), moved])
                uorder, ucell, run_len = uorder[o], new_id[o], run_len[o]
        if not need_mult:
            run_len = None
        if cell_shift is None:  # gallery order, one segment
            n_rows = m
            src = torch.arange(m, device=dev)
            excluded = order[~first]
            dest = uorder
            segments = [(0, m)]
        else:
            counts = torch.unique_consecutive(ucell, return_counts=True)[1]
            n_blk = (counts + _SUB_BOX - 1) // _SUB_BOX
            n_cells = counts.numel()
            starts = torch.cumsum(counts, 0) - counts
            pstarts = (torch.cumsum(n_blk, 0) - n_blk) * _SUB_BOX
            cell_of_row = torch.repeat_interleave(torch.arange(n_cells, device=dev), counts)
            dest = pstarts[cell_of_row] + torch.arange(n_u, device=dev) - starts[cell_of_row]
            n_rows = int(n_blk.sum()) * _SUB_BOX
            src = uorder[starts[torch.repeat_interleave(torch.arange(n_cells, device=dev), n_blk * _SUB_BOX)]]
            src[dest] = uorder
            is_pad = torch.ones(n_rows, dtype=torch.bool, device=dev)
            is_pad[dest] = False
            excluded = is_pad.nonzero().squeeze(1)
            # consecutive small cells (neighbours along the last grid axis) share a unit: fewer, fuller GEMMs
            # for the price of a slightly looser box; the dense-cluster cells stay apart
            sizes = (n_blk * _SUB_BOX).tolist()
            special = (torch.unique_consecutive(ucell) >= n_grid).tolist()
            segments, r0, end = [], 0, 0
            for size, alone in zip(sizes, special, strict=True):
                if end > r0 and (alone or end - r0 + size > merge_rows):
                    segments.append((r0, end))
                    r0 = end
                end += size
                if alone:
                    segments.append((r0, end))
                    r0 = end
            if end > r0:
                segments.append((r0, end))
        self.src = src
        self.mult: torch.Tensor | None = None
        if run_len is not None:
            self.mult = torch.zeros(n_rows, dtype=torch.long, device=dev)
            self.mult[dest] = run_len
        units = []
        for r0, end in segments:
            # whole 32-row multiples, then (no cells) a ragged tail of < 32 rows
            cuts = [*range(r0, end - (end - r0) % 32, max_cols), end - (end - r0) % 32, end]
            for a0, a1 in zip(cuts[:-1], cuts[1:], strict=True):
                cols = a1 - a0
                if cols == 0:
                    continue
                # sub-block minima reduce over the middle axis of (rows, sub, nsb): fastest when nsb is a
                # multiple of 32; the tail has single-row sub-blocks
                nsb = next((j for j in (128, 64, 32) if cols % j == 0 and cols // j >= 8), 32)
                units.append((a0, a1, cols // nsb, nsb) if cols % 32 == 0 else (a0, a1, 1, cols))
        n_units = len(units)
        ulen = torch.tensor([u[1] - u[0] for u in units], device=dev)
        unit_of_row = torch.repeat_interleave(torch.arange(n_units, device=dev), ulen)
        gp = (
            g if cell_shift is None else torch.index_select(g, 0, src, out=_scratch("gp", (n_rows, dim), dev))
        )
        aug = _scratch("aug", (n_rows, dim + 1), dev)
        self.cen = torch.empty(n_units, dim, device=dev)
        for j, (a0, a1, _, _) in enumerate(units):
            torch.mean(gp[a0:a1], 0, out=self.cen[j])  # (any centre is valid; this one is near the rows)
            torch.sub(gp[a0:a1], self.cen[j], out=aug[a0:a1, :dim])
        gn = torch.linalg.vector_norm(aug[:, :dim], dim=1)
        gn.index_fill_(0, excluded, 0.0)
        self.rad = torch.zeros(n_units, device=dev).scatter_reduce_(0, unit_of_row, gn, "amax")
        aug[:, dim] = gn.square_()
        aug.index_fill_(0, excluded, 0.0)
        aug[excluded, dim] = math.inf
        self.aug = aug
        self.unit_of_row = unit_of_row
        self.cen2 = torch.cat([self.cen * 2.0, torch.zeros(n_units, 1, device=dev)], dim=1)
        self.units = [(*u, r, i) for i, (u, r) in enumerate(zip(units, self.rad.tolist(), strict=True))]

    def boxes(self, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit: lower and upper corners of the box of its rows' coordinates ``g @ rot``.

        Computed on the centred rows and shifted by ``c @ rot`` (pads sit at the centre, inside the box).
        """
        k = rot.shape[1]
        n_rows = self.aug.shape[0]
        y = torch.mm(self.aug[:, :-1], rot, out=_scratch("yp", (n_rows, k), rot.device))
        lo_b, hi_b = torch.aminmax(y.t().contiguous().view(k, -1, _SUB_BOX), dim=2)
        idx = self.unit_of_row[::_SUB_BOX][None].expand(k, -1)  # (units are whole blocks here)
        n_units = len(self.units)
        lo = torch.full((k, n_units), math.inf, device=rot.device).scatter_reduce_(1, idx, lo_b, "amin")
        hi = torch.full((k, n_units), -math.inf, device=rot.device).scatter_reduce_(1, idx, hi_b, "amax")
        shift = (self.cen @ rot).t()
        return (lo + shift).t().contiguous(), (hi + shift).t().contiguous()


def _grid_key(y: torch.Tensor, ev: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, int]:
    """Cell id of each row (a grid over the leading principal coordinates ``y``, cut at quantiles) in the
    high bits of an int32 key whose low bits hold a hash of the row (last column of ``y``)."""
    n_dims = y.shape[1] - 1
    spread = ev[:n_dims].clamp_min(0).sqrt().tolist()
    fans = [1] * n_dims
    while math.prod(fans) * 2 <= n_cells:
        j = max(range(n_dims), key=lambda i: spread[i] / fans[i])
        fans[j] *= 2
    sample = y[:: max(1, y.shape[0] // 16384)]
    ids = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    for j, f in enumerate(fans):
        if f > 1:
            cuts = torch.quantile(sample[:, j], torch.linspace(0, 1, f + 1, device=y.device)[1:-1])
            ids = ids * f + (y[:, j, None] > cuts).sum(1, dtype=torch.int32)
    shift = 31 - max(1, math.prod(fans) - 1).bit_length()
    return ids.bitwise_left_shift_(shift).bitwise_or_(_hash_bits(y[:, -1], shift)), shift


def _hash_bits(h: torch.Tensor, bits: int) -> torch.Tensor:
    """Low ``bits`` bits of the float32 pattern of ``h`` (identical rows give identical values)."""
    return h.contiguous().view(torch.int32) & ((1 << bits) - 1)


def _hash_vector(dim: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, dim, device=device) + 1.0 / 3.0


class _Search:
    """Phase 3: GEMM tiles over the units, the running bound ``ub``, candidates, exact re-checks."""

    def __init__(
        self,
        q: torch.Tensor,
        g: torch.Tensor,
        lay: _Layout,
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
            d = _scratch("tile", (n, r1 - r0), x.device)
            d3 = d.view(n, sub, nsb)
            # minima over sub-blocks (sub-block j: rows r0 + j + t * nsb, t < sub): distinct rows for the
            # kk-th bound, and a cheap first pass to find the candidate rows
            sbm = _scratch("sbm", (n, nsb), x.device)
            t0 = time.perf_counter()
            for b0 in range(0, n, blk):  # blocks of rows that stay in cache between the GEMM and the minima
                b1 = min(n, b0 + blk)
                torch.mm(x[b0:b1], at, out=d[b0:b1])  # D = d~ - |q - c|^2
                torch.amin(d3[b0:b1], 1, out=sbm[b0:b1])
            self.counters["pairs"] += d.numel()
            if cpu and d.numel() >= 1 << 16 and torch.get_num_threads() > 1:
                _watch_threads(self.pace, (time.perf_counter() - t0) / d.numel())
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


_PROBE: dict = {"at": -math.inf, "threads": 0, "ok": False}


def _watch_threads(pace: list[float], now: float) -> None:
    """Drop to one thread for the rest of the call (and the next half second) when the GEMM blocks get
    several times slower than the best seen: other processes took the cores, parallel regions stall."""
    pace[0] = min(pace[0], now)
    if now > _STALL * pace[0]:
        torch.set_num_threads(1)
        _PROBE.update(at=time.monotonic(), ok=False)


def _parallel_pays(threads: int) -> bool:
    """Whether ``threads`` intra-op threads currently speed up a GEMM block, measured (and remembered
    for half a second). On a machine whose cores are busy with other processes, every parallel region
    waits for a descheduled thread and the engine's hundreds of mid-sized ops get many times slower
    than on one thread; there, one thread it is."""
    now = time.monotonic()
    if _PROBE["threads"] == threads and now - _PROBE["at"] < _PROBE_TTL:
        return bool(_PROBE["ok"])
    a = torch.ones(256, 64)
    b = torch.ones(64, 2048)
    out = torch.empty(256, 2048)

    def timed() -> float:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        return time.perf_counter() - t

    torch.set_num_threads(threads)
    timed()  # (wakes the thread pool)
    torch.set_num_threads(1)
    one = min(timed() for _ in range(2))
    torch.set_num_threads(threads)
    many = sorted(timed() for _ in range(3))[1]
    torch.set_num_threads(1)
    ok = many < 0.8 * one
    _PROBE.update(at=time.monotonic(), threads=threads, ok=ok)
    return ok


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
    before = torch.get_num_threads()
    want = max(1, before if threads is None else int(threads))
    torch.set_num_threads(1)
    try:
        big = queries.shape[0] * gallery.shape[0] * queries.shape[1] >= _THREADS_MIN_WORK
        if want > 1 and big and _parallel_pays(want):
            torch.set_num_threads(want)
        return _nn_distances(queries, gallery, kappa, tile_bytes, stats, query_hw, gallery_hw, prune)
    finally:
        torch.set_num_threads(before)


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
    gam = (_gamma(dim + 12) + 3 * u_in) * 1.01 * (1 + 4 * (dim + 4) * _U) ** 2

    if prune is None:  # cells pay on a CPU, for big problems with few channels
        prune = dev.type == "cpu" and dim <= _PRUNE_MAX_DIM and n_q * n_g * dim >= _PRUNE_MIN_WORK
        prune = prune and n_g >= 8 * _CELL_ROWS

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
    max_cols = max(_SUB_BOX, max_cols // _SUB_BOX * _SUB_BOX)
    hv = _hash_vector(dim, dev)
    lb2: torch.Tensor | None = None
    if prune:
        sample = g[:: max(1, n_g // 32768)]
        sample = sample - sample.mean(0)
        ev, vecs = torch.linalg.eigh((sample.t() @ sample).double())
        rot = vecs.flip(1).float()  # principal axes, by decreasing variance
        nd = min(_GRID_DIMS, dim)
        proj = torch.cat([rot[:, :nd], hv[:, None]], dim=1)  # grid coordinates and the row hash: one GEMM
        yg = torch.mm(g, proj, out=_scratch("yg", (n_g, nd + 1), dev))
        n_cells = min(1 << 10, max(2, n_g // _CELL_ROWS))
        key, shift = _grid_key(yg, ev.flip(0), n_cells)
        rms = float(ev.clamp_min(0).sum().div(sample.shape[0]).sqrt())  # rms distance from the mean
        lay = _Layout(g, key, shift, kk > 1, max_cols, _DENSE_RADIUS * rms, yg[:, :nd], _CELL_ROWS)
        rb = rot[:, : min(_BOX_DIMS, dim)].contiguous()
        lo, hi = lay.boxes(rb)
        yq = q @ rb
        # Rounding of the rotated coordinates (fl((g - c) R) + fl(c R) for the boxes, fl(q R) for the
        # queries, |g - c|, |c| <= gmax): each coordinate is off by <= gamma_{C+2} (|q| + 3 gmax), and R
        # is orthonormal to ~sqrt(C) u. Hence d >= l * shrink - margin with the generous values below,
        # and (l * shrink - margin)^2 >= l^2 shrink^2 - 2.1 s margin since l <= 1.05 s.
        gmax = float((torch.linalg.vector_norm(lay.cen, dim=1) + lay.rad).max()) * 1.001  # >= every |g|
        s = torch.linalg.vector_norm(q, dim=1).add_(gmax)
        margin = 8 * math.sqrt(dim) * (dim + 4) * (_U + u_in) * s
        shrink2 = (1 - 8 * (dim + 4) * _U) ** 2
        offset = 2.1 * s * margin
        lb2 = torch.zeros(lo.shape[0], n_q, device=dev)
        a, b = torch.empty_like(lb2), torch.empty_like(lb2)
        for j in range(lo.shape[1]):  # per coordinate, (units x queries): long contiguous rows
            z = yq[:, j].contiguous()
            torch.sub(lo[:, j, None], z, out=a)
            torch.sub(z, hi[:, j, None], out=b)
            torch.maximum(a, b, out=a).clamp_min_(0)
            lb2.addcmul_(a, a)
        lb2.mul_(shrink2).sub_(offset)
    else:
        lay = _Layout(g, _hash_bits(torch.mv(g, hv), 31), None, kk > 1, max_cols)

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
        result[which] = _brute_topk_d2(q[which], g, kk, tile_bytes)
    if stats is not None:
        stats["fallback"] = stats.get("fallback", 0) + n_bad
        stats["queries"] = stats.get("queries", 0) + n_q
        stats["pairs"] = stats.get("pairs", 0) + counters["pairs"]
        stats["rechecked"] = stats.get("rechecked", 0) + counters["rechecked"]
        stats["candidates"] = stats.get("candidates", 0) + counters["candidates"]
    return result.clamp_min_(0).sqrt_().mean(1)


def cdist_baseline(queries: torch.Tensor, gallery: torch.Tensor, kappa: int = 1) -> torch.Tensor:
    """The naive approach of the popular SPADE-pytorch port (with the reduction on the right axis):
    materialise the whole distance matrix with ``torch.cdist`` and reduce. For benchmarks."""
    d = torch.cdist(queries.float(), gallery.float())
    return d.topk(min(kappa, gallery.shape[0]), dim=1, largest=False).values.mean(1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny) elementwise."""
    a = a.double().cpu()
    b = b.double().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if a.numel() else 0.0


__all__ = ["nn_distances", "nn_distances_reference", "cdist_baseline", "relative_error", "release_scratch"]
