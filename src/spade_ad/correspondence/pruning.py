"""The CPU pruning of stage 3's exact search: the gallery cut into cells and GEMM units, and a lower
bound on the distance from every query to every unit (boxes on principal axes).

Any grouping of the gallery rows is valid for the exact search (:mod:`.search`); a good one lets it
skip most (query, unit) pairs. Without cells (small problems, many channels, GPUs) the same
:class:`Layout` holds the de-duplicated gallery in its own order, cut into units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .runtime import scratch

SUB_BOX = 32  # cells are padded to whole blocks of this many rows
U = 2.0**-24  # fp32 unit roundoff
_BOX_DIMS = 6  # principal coordinates of the unit boxes (the lower bounds)
_GRID_DIMS = 4  # principal coordinates cut into the cell grid
PRUNE_MIN_WORK = 4e9  # P * M * C below which the cells cost more than they save
PRUNE_MAX_DIM = 128  # above, boxes on a few principal coordinates prune little (and eigh gets costly)
CELL_ROWS = 1024  # target gallery rows per cell
_DENSE_CLUSTERS = 2  # at most this many dense clusters get cells of their own
_DENSE_MIN_REPEATS = 8  # ... when their centre row is repeated at least this often
_DENSE_RADIUS = 0.02  # ... of this radius, relative to the gallery's rms distance from its mean


@dataclass
class _Placement:
    """Where the distinct rows go in the operand: ``dest`` (per distinct row), ``src`` (per operand row: its
    gallery row), the ``excluded`` operand rows (pads, repeats), and the segments cut into units."""

    n_rows: int
    src: torch.Tensor
    excluded: torch.Tensor
    dest: torch.Tensor
    segments: list[tuple[int, int]]


class Layout:
    """The gallery's distinct rows as GEMM operands, cut into units of at most ``max_cols`` rows.

    Exact duplicate rows (common: uniform background, fp16 bank) count once, with a multiplicity, so a
    query sitting on such a feature has one candidate instead of thousands. With cells (``cell_shift``
    given: the cell id is ``key >> cell_shift``) the rows are permuted so that each cell is a contiguous
    run, padded to whole ``SUB_BOX``-row blocks; without, the gallery keeps its order. Excluded rows
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
        m = g.shape[0]
        order, first, uorder, run_len, skey = _distinct_rows(g, key)
        ucell = None if cell_shift is None else skey[first] >> cell_shift
        n_grid = 0 if ucell is None else int(ucell.max()) + 1  # ids from n_grid on: dense-cluster cells
        if ucell is not None and coords is not None and dense_radius > 0:
            uorder, ucell, run_len = _dense_cells(g, coords, dense_radius, uorder, ucell, run_len, n_grid)
        if ucell is None:  # no cells: gallery order, one segment
            place = _Placement(m, torch.arange(m, device=g.device), order[~first], uorder, [(0, m)])
        else:
            place = _cell_placement(uorder, ucell, n_grid, merge_rows)
        self.src = place.src
        self.mult: torch.Tensor | None = None
        if need_mult:
            self.mult = torch.zeros(place.n_rows, dtype=torch.long, device=g.device)
            self.mult[place.dest] = run_len
        self._operands(g, place, _cut_units(place.segments, max_cols), permuted=ucell is not None)

    def _operands(
        self, g: torch.Tensor, place: _Placement, units: list[tuple[int, int, int, int]], permuted: bool
    ) -> None:
        """Centre, radius and ``aug`` of each unit (``permuted``: the operand rows are not in gallery order)."""
        dev, dim, n_rows = g.device, g.shape[1], place.n_rows
        n_units = len(units)
        ulen = torch.tensor([u[1] - u[0] for u in units], device=dev)
        unit_of_row = torch.repeat_interleave(torch.arange(n_units, device=dev), ulen)
        gp = g if not permuted else torch.index_select(g, 0, place.src, out=scratch("gp", (n_rows, dim), dev))
        aug = scratch("aug", (n_rows, dim + 1), dev)
        self.cen = torch.empty(n_units, dim, device=dev)
        for j, (a0, a1, _, _) in enumerate(units):
            torch.mean(gp[a0:a1], 0, out=self.cen[j])  # (any centre is valid; this one is near the rows)
            torch.sub(gp[a0:a1], self.cen[j], out=aug[a0:a1, :dim])
        gn = torch.linalg.vector_norm(aug[:, :dim], dim=1)
        gn.index_fill_(0, place.excluded, 0.0)
        self.rad = torch.zeros(n_units, device=dev).scatter_reduce_(0, unit_of_row, gn, "amax")
        aug[:, dim] = gn.square_()
        aug.index_fill_(0, place.excluded, 0.0)
        aug[place.excluded, dim] = math.inf
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
        y = torch.mm(self.aug[:, :-1], rot, out=scratch("yp", (n_rows, k), rot.device))
        lo_b, hi_b = torch.aminmax(y.t().contiguous().view(k, -1, SUB_BOX), dim=2)
        idx = self.unit_of_row[::SUB_BOX][None].expand(k, -1)  # (units are whole blocks here)
        n_units = len(self.units)
        lo = torch.full((k, n_units), math.inf, device=rot.device).scatter_reduce_(1, idx, lo_b, "amin")
        hi = torch.full((k, n_units), -math.inf, device=rot.device).scatter_reduce_(1, idx, hi_b, "amax")
        shift = (self.cen @ rot).t()
        return (lo + shift).t().contiguous(), (hi + shift).t().contiguous()


def pruning_pays(device: torch.device, n_q: int, n_g: int, dim: int) -> bool:
    """Cells pay on a CPU, for big problems with few channels (a measured rule of thumb)."""
    return device.type == "cpu" and dim <= PRUNE_MAX_DIM and n_q * n_g * dim >= PRUNE_MIN_WORK and n_g >= 8 * CELL_ROWS


def pruned_layout(
    q: torch.Tensor, g: torch.Tensor, kk: int, max_cols: int, u_in: float
) -> tuple[Layout, torch.Tensor]:
    """Cells and units of the gallery ``g``, and ``lb2`` (units x queries): lower bounds on d^2 of every
    row of a unit from each query (``u_in``: unit roundoff of reduced-precision GEMM inputs, or 0)."""
    dev = q.device
    n_q, n_g, dim = q.shape[0], g.shape[0], q.shape[1]
    hv = hash_vector(dim, dev)
    sample = g[:: max(1, n_g // 32768)]
    sample = sample - sample.mean(0)
    ev, vecs = torch.linalg.eigh((sample.t() @ sample).double())
    rot = vecs.flip(1).float()  # principal axes, by decreasing variance
    nd = min(_GRID_DIMS, dim)
    proj = torch.cat([rot[:, :nd], hv[:, None]], dim=1)  # grid coordinates and the row hash: one GEMM
    yg = torch.mm(g, proj, out=scratch("yg", (n_g, nd + 1), dev))
    n_cells = min(1 << 10, max(2, n_g // CELL_ROWS))
    key, shift = _grid_key(yg, ev.flip(0), n_cells)
    rms = float(ev.clamp_min(0).sum().div(sample.shape[0]).sqrt())  # rms distance from the mean
    lay = Layout(g, key, shift, kk > 1, max_cols, _DENSE_RADIUS * rms, yg[:, :nd], CELL_ROWS)
    rb = rot[:, : min(_BOX_DIMS, dim)].contiguous()
    lo, hi = lay.boxes(rb)
    yq = q @ rb
    # Rounding of the rotated coordinates (fl((g - c) R) + fl(c R) for the boxes, fl(q R) for the
    # queries, |g - c|, |c| <= gmax): each coordinate is off by <= gamma_{C+2} (|q| + 3 gmax), and R
    # is orthonormal to ~sqrt(C) u. Hence d >= l * shrink - margin with the generous values below,
    # and (l * shrink - margin)^2 >= l^2 shrink^2 - 2.1 s margin since l <= 1.05 s.
    gmax = float((torch.linalg.vector_norm(lay.cen, dim=1) + lay.rad).max()) * 1.001  # >= every |g|
    s = torch.linalg.vector_norm(q, dim=1).add_(gmax)
    margin = 8 * math.sqrt(dim) * (dim + 4) * (U + u_in) * s
    shrink2 = (1 - 8 * (dim + 4) * U) ** 2
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
    return lay, lb2


def _distinct_rows(
    g: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, first, uorder, run_len, skey)``: the rows sorted by key, which of them start a run of
    identical rows, the gallery index and run length of each distinct row, and the sorted keys."""
    m = g.shape[0]
    # sorted by key = (cell, hash of the row): identical rows are adjacent; keep the first of each run
    skey, order = torch.sort(key, stable=True)
    first = torch.ones(m, dtype=torch.bool, device=g.device)
    same = (skey[1:] == skey[:-1]).nonzero().squeeze(1)
    if same.numel():
        dup = (g.index_select(0, order[same]) == g.index_select(0, order[same + 1])).all(1)
        first[same[dup] + 1] = False
    uorder = order[first]
    run_len = torch.bincount(torch.cumsum(first, 0) - 1, minlength=uorder.numel())
    return order, first, uorder, run_len, skey


def _dense_cells(
    g: torch.Tensor,
    coords: torch.Tensor,
    dense_radius: float,
    uorder: torch.Tensor,
    ucell: torch.Tensor,
    run_len: torch.Tensor,
    n_grid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(uorder, ucell, run_len)`` with the rows of up to ``_DENSE_CLUSTERS`` dense clusters moved to the
    end, in cells of their own (ids from ``n_grid`` on)."""
    # Dense clusters (a uniform background: thousands of near-identical rows) get cells of their
    # own around their most repeated row, so that their units are tiny, their rounding bound
    # eps ~ (|q - c| + |g - c|)^2 too, and a query there has few near-ties to re-check. (A
    # grouping heuristic: any partition of the rows is valid.)
    dev, m, n_u = g.device, g.shape[0], uorder.numel()
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
    if not bool(taken.any()):
        return uorder, ucell, run_len
    moved = taken.nonzero().squeeze(1)
    moved = moved[torch.argsort(new_id[moved], stable=True)]
    o = torch.cat([(~taken).nonzero().squeeze(1), moved])
    return uorder[o], new_id[o], run_len[o]


def _cell_placement(uorder: torch.Tensor, ucell: torch.Tensor, n_grid: int, merge_rows: int) -> _Placement:
    """Each cell a contiguous run of the operand, padded to whole ``SUB_BOX``-row blocks."""
    dev, n_u = uorder.device, uorder.numel()
    counts = torch.unique_consecutive(ucell, return_counts=True)[1]
    n_blk = (counts + SUB_BOX - 1) // SUB_BOX
    n_cells = counts.numel()
    starts = torch.cumsum(counts, 0) - counts
    pstarts = (torch.cumsum(n_blk, 0) - n_blk) * SUB_BOX
    cell_of_row = torch.repeat_interleave(torch.arange(n_cells, device=dev), counts)
    dest = pstarts[cell_of_row] + torch.arange(n_u, device=dev) - starts[cell_of_row]
    n_rows = int(n_blk.sum()) * SUB_BOX
    src = uorder[starts[torch.repeat_interleave(torch.arange(n_cells, device=dev), n_blk * SUB_BOX)]]
    src[dest] = uorder
    is_pad = torch.ones(n_rows, dtype=torch.bool, device=dev)
    is_pad[dest] = False
    excluded = is_pad.nonzero().squeeze(1)
    special = (torch.unique_consecutive(ucell) >= n_grid).tolist()
    return _Placement(n_rows, src, excluded, dest, _merged_segments((n_blk * SUB_BOX).tolist(), special, merge_rows))


def _merged_segments(sizes: list[int], special: list[bool], merge_rows: int) -> list[tuple[int, int]]:
    """Row ranges of the units' segments, from the cells' padded ``sizes`` (``special``: a dense-cluster cell)."""
    # consecutive small cells (neighbours along the last grid axis) share a unit: fewer, fuller GEMMs
    # for the price of a slightly looser box; the dense-cluster cells stay apart
    segments: list[tuple[int, int]] = []
    r0, end = 0, 0
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
    return segments


def _cut_units(segments: list[tuple[int, int]], max_cols: int) -> list[tuple[int, int, int, int]]:
    """``(first row, end row, rows per sub-block, sub-blocks)`` of each unit: the segments cut at ``max_cols``."""
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
    return units


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
    return ids.bitwise_left_shift_(shift).bitwise_or_(hash_bits(y[:, -1], shift)), shift


def hash_bits(h: torch.Tensor, bits: int) -> torch.Tensor:
    """Low ``bits`` bits of the float32 pattern of ``h`` (identical rows give identical values)."""
    return h.contiguous().view(torch.int32) & ((1 << bits) - 1)


def hash_vector(dim: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, dim, device=device) + 1.0 / 3.0

