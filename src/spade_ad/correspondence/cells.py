"""The search index of stage 3: built once at fit time, merged at predict time for the retrieved neighbours.

Any grouping of the gallery rows into units is valid for the exact search (:mod:`.search`); a good one lets
it skip most (query, unit) pairs, and one computed at fit time costs nothing per test image. Per pyramid
level the bank (:mod:`spade_ad.bank`) holds:

* model-wide, small (``codebook<l>.*``): ``centroids`` (G, C) fp32, from k-means on a bounded sample of the
  training rows; ``cuts`` (G, S-1) fp32, distances from each centroid (sample quantiles) that cut its cell
  into S shells; ``shared`` (F, C) fp16, rows that occur bit for bit in several sampled training images
  (uniform background), and ``shared_unit`` (F,) int32, their units;
* per training image (``cells<l>.*``, one row per image like the levels): ``unit`` (H*W,) int32, the unit
  (cell * S + shell) of each position, and ``same`` (H*W,) int32: the position itself, another position
  of the same image holding the same row, or H*W + f when the row equals shared row f.

A unit is one shell of one cell: rows whose nearest centroid is c and whose distance to c lies between
two cuts. Its rows' distances to c span [r_in, r_out], so ``max(|q - c| - r_out, r_in - |q - c|, 0)``
bounds the distance from a query q to every row of the unit from below, for the price of one GEMM of the
queries against the centroids (:func:`unit_bounds`). The index is a function of the level rows alone and
stays valid when training images are added or removed: any centroids, cuts or shared rows give a valid
grouping (they only affect speed), and every claim it makes (which rows are equal) is checked when it is
read (:func:`prepare`), so a damaged index cannot change a result.

At predict time each neighbour's rows are prepared once (:class:`Prepared`: distinct rows sorted by unit,
centred on their centroid, multiplicities) and kept in a bounded cache across test images
(:mod:`.gallery`); a test image's gallery is the concatenation of its neighbours' prepared rows, unit by
unit (:func:`merge`), with every shared row once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..bank import Bank, BankWriter
from ..errors import SpadeError

SHELL_CUTS = (0.5, 0.8, 0.95)  # quantiles of the distance to the centroid that cut a cell into shells
SHELLS = len(SHELL_CUTS) + 1  # shells per cell (S)
ROWS_PER_UNIT = 300  # target rows of a unit in a gallery of k training images
MAX_CELLS = 4096
SAMPLE_IMAGES = 64  # training images sampled for the centroids
SAMPLE_ROWS = 1 << 15  # rows the k-means runs on
SAMPLE_BYTES = 64 << 20  # fp16 rows of the sampled images held at once, at most
KMEANS_ITERS = 8
MAX_SHARED = 4096  # shared rows kept per level
DENSE_CENTRES = 8  # the most repeated shared rows are also centroids
NSB = 32  # sub-blocks per GEMM block (the search's first filter); blocks are padded to a multiple
MAX_BLOCK = 512  # real rows per GEMM block, at most (bigger units are cut into several blocks)
DENSE_FRAC = 0.05  # units with a radius under this fraction of the median are cut into NSB-row blocks
_SEED = 0
_ASSIGN_BATCH = 16  # training images assigned at once


def index_names(level: int) -> tuple[str, str, str, str, str, str]:
    return (f"cells{level}.unit", f"cells{level}.same", f"codebook{level}.centroids", f"codebook{level}.cuts",
            f"codebook{level}.shared", f"codebook{level}.shared_unit")


def index_spec(shapes: list[tuple[int, int]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-training-image tensors of the index, for :class:`~spade_ad.bank.BankWriter` (``shapes``:
    (H*W, C) per level)."""
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    for li, (hw, _) in enumerate(shapes):
        unit, same = index_names(li)[:2]
        spec[unit] = ((hw,), "I32")
        spec[same] = ((hw,), "I32")
    return spec


def n_cells(rows: int) -> int:
    """Cells for a gallery of ``rows`` rows (about ``ROWS_PER_UNIT`` rows per unit)."""
    return max(1, min(MAX_CELLS, round(rows / (ROWS_PER_UNIT * SHELLS))))


def _bits(rows16: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows16, np.float16).view(np.int16)


def _row_hash(bits: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's fp16 bit pattern (equal rows, equal hashes)."""
    w = np.random.default_rng(12345).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (bits.astype(np.uint16).astype(np.uint64) * w).sum(1, dtype=np.uint64)


def _first_equal(bits: np.ndarray) -> np.ndarray:
    """For each row, the first row of the array with the same bit pattern (itself if none before)."""
    n = bits.shape[0]
    h = _row_hash(bits)
    o = np.argsort(h, kind="stable")
    hs = h[o]
    start = np.r_[True, hs[1:] != hs[:-1]] if n else np.zeros(0, bool)
    head = o[np.maximum.accumulate(np.where(start, np.arange(n), 0))] if n else o
    rep = np.arange(n)
    rep[o] = head
    ok = (bits == bits[rep]).all(1)  # hash collisions keep their own row
    return np.where(ok, rep, np.arange(n))


@dataclass(frozen=True)
class LevelIndex:
    """The model-wide part of one level's index (see the module docstring)."""

    centroids: torch.Tensor  # (G, C) fp32
    cuts: torch.Tensor  # (G, S - 1) fp32
    shared: np.ndarray  # (F, C) fp16
    shared_unit: np.ndarray  # (F,) int32

    @property
    def n_units(self) -> int:
        return self.centroids.shape[0] * SHELLS

    def units(self, rows: torch.Tensor) -> torch.Tensor:
        """Unit of each fp32 row: nearest centroid (any choice would be valid), then the shell."""
        c = self.centroids
        s = torch.addmm(c.square().sum(1)[None], rows, c.t(), alpha=-2.0)
        cell = s.argmin(1)
        r = torch.linalg.vector_norm(rows - c.index_select(0, cell), dim=1)
        shell = (r[:, None] > self.cuts.index_select(0, cell)).sum(1)
        return cell * SHELLS + shell

    def assign_many(self, rows16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`assign` for a batch of images' (B, H*W, C) rows: (B, H*W) ``unit`` and ``same``."""
        b, hw, dim = rows16.shape
        unit = self.units(torch.from_numpy(np.ascontiguousarray(rows16, np.float16)).reshape(-1, dim).float())
        unit_np = unit.numpy().astype(np.int32).reshape(b, hw)
        same = np.stack([self._same(r) for r in rows16]) if b else np.zeros((0, hw), np.int32)
        return unit_np, same

    def assign(self, rows16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``unit`` and ``same`` (module docstring) of one training image's (H*W, C) fp16 rows."""
        unit, same = self.assign_many(np.asarray(rows16)[None])
        return unit[0], same[0]

    def _same(self, rows16: np.ndarray) -> np.ndarray:
        hw = rows16.shape[0]
        bits = _bits(rows16)
        same = _first_equal(bits)
        if len(self.shared):
            sb = _bits(self.shared)
            sh = _row_hash(sb)
            order = np.argsort(sh, kind="stable")
            h = _row_hash(bits)
            pos = np.minimum(np.searchsorted(sh[order], h), len(order) - 1)
            f = order[pos]
            hit = (sh[f] == h) & (sb[f] == bits).all(1)
            same = np.where(hit, hw + f, same)  # (copies of a shared row all hit it)
        return same.astype(np.int32)


def train_level(sample: list[np.ndarray], gallery_rows: int) -> LevelIndex:
    """Centroids, cuts and shared rows from sampled training images' (H*W, C) fp16 rows."""
    gen = torch.Generator().manual_seed(_SEED)
    uniq = [r[np.unique(_first_equal(_bits(r)))] for r in sample]
    # shared rows: bit patterns present in at least two sampled images
    allb = np.concatenate([_bits(u) for u in uniq])
    width = allb.shape[1] * 2
    vals, counts = np.unique(allb.view(np.dtype((np.void, width))).ravel(), return_counts=True)
    many = np.argsort(-counts[counts >= 2], kind="stable")[:MAX_SHARED]
    shared = np.frombuffer(vals[counts >= 2][many].tobytes(), np.float16).reshape(-1, allb.shape[1]).copy()
    # k-means on a random sample of the distinct rows
    rows = torch.from_numpy(np.concatenate(uniq)).float()
    if rows.shape[0] > SAMPLE_ROWS:
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:SAMPLE_ROWS]]
    g = max(1, min(n_cells(gallery_rows), rows.shape[0]))
    cen = rows[torch.randperm(rows.shape[0], generator=gen)[:g]].clone()
    rn = rows.square().sum(1)
    cell = torch.zeros(rows.shape[0], dtype=torch.long)
    for _ in range(KMEANS_ITERS):
        cell = torch.addmm(cen.square().sum(1)[None] + rn[:, None], rows, cen.t(), alpha=-2.0).argmin(1)
        n = torch.bincount(cell, minlength=g)
        tot = torch.zeros_like(cen).index_add_(0, cell, rows)
        live = n > 0
        cen[live] = tot[live] / n[live, None].float()
    # the most repeated rows (uniform background) become centroids of their own: near-identical rows
    # then sit in cells of tiny radius, where the search's rounding bound is tiny too
    cen = torch.cat([cen, torch.from_numpy(shared[:DENSE_CENTRES]).float()])
    g = cen.shape[0]
    cell = torch.addmm(cen.square().sum(1)[None] + rn[:, None], rows, cen.t(), alpha=-2.0).argmin(1)
    # shell cuts: quantiles of the sample rows' distances to their centroid, per cell
    r = torch.linalg.vector_norm(rows - cen.index_select(0, cell), dim=1)
    o = torch.argsort(r, stable=True)
    order = o[torch.argsort(cell[o], stable=True)]  # by cell, then distance
    cs, rs = cell[order], r[order]
    n = torch.bincount(cs, minlength=g)
    start = torch.cumsum(n, 0) - n
    cuts = torch.full((g, SHELLS - 1), math.inf)
    ok = n >= 2 * SHELLS
    for s, frac in enumerate(SHELL_CUTS):
        at = start + (n.double() * frac).long()
        cuts[ok, s] = rs[at[ok].clamp_max(max(0, rs.numel() - 1))]
    lev = LevelIndex(cen, cuts, shared, np.zeros(len(shared), np.int32))
    if len(shared):
        lev = LevelIndex(cen, cuts, shared, lev.units(torch.from_numpy(shared).float()).numpy().astype(np.int32))
    return lev


def write_index(writer: BankWriter, k: int) -> None:
    """Build the index of a bank whose level rows are all written (call before ``writer.close()``):
    train each level's model-wide part on a bounded sample, then assign every row, image by image."""
    writer.flush()
    bank = Bank(writer.path)
    n = bank.n
    k_eff = min(k, n)
    levels: list[LevelIndex] = []
    for li in range(bank.n_levels):
        hw, c = bank.level_size(li)
        m = max(2, min(SAMPLE_IMAGES, SAMPLE_BYTES // max(1, hw * c * 2)))
        pick = np.unique(np.linspace(0, n - 1, min(m, n)).round().astype(np.int64))
        sample = [bank.gather(li, [int(i)])[0] for i in pick]
        levels.append(train_level(sample, k_eff * hw))
    for a in range(0, n, _ASSIGN_BATCH):
        idx = list(range(a, min(n, a + _ASSIGN_BATCH)))
        rows: dict[str, np.ndarray] = {}
        for li, lev in enumerate(levels):
            level_rows = bank.gather(li, idx)
            names = index_names(li)
            rows[names[0]], rows[names[1]] = lev.assign_many(level_rows)
        writer.write(a, rows)
    for li, lev in enumerate(levels):
        names = index_names(li)
        writer.append(names[2], lev.centroids.numpy())
        writer.append(names[3], lev.cuts.numpy())
        writer.append(names[4], lev.shared)
        writer.append(names[5], lev.shared_unit)


def load_level(bank: Bank, level: int) -> LevelIndex | None:
    """The model-wide part of ``level``'s index, or ``None`` for a bank written without an index."""
    names = index_names(level)
    if not all(x in bank.meta for x in names):
        return None
    hw, c = bank.level_size(level)
    cen = torch.from_numpy(bank.tensor(names[2]))
    cuts = torch.from_numpy(bank.tensor(names[3]))
    shared = bank.tensor(names[4])
    shared_unit = bank.tensor(names[5])
    g = cen.shape[0]
    ok = (
        cen.ndim == 2 and cen.shape[1] == c and cen.dtype == torch.float32 and g >= 1
        and tuple(cuts.shape) == (g, SHELLS - 1) and shared.ndim == 2 and shared.shape[1] == c
        and shared_unit.shape == (shared.shape[0],)
        and bank.meta[names[0]][1] == (bank.n, hw) and bank.meta[names[1]][1] == (bank.n, hw)
        and bool(torch.isfinite(cen).all()) and not bool(torch.isnan(cuts).any())
        and bool(((shared_unit >= 0) & (shared_unit < g * SHELLS)).all())
    )
    if not ok:
        raise SpadeError(f"{bank.path}: damaged feature bank (search index of level {level})")
    lev = LevelIndex(cen, cuts, shared, shared_unit.astype(np.int32))
    return lev


@dataclass(frozen=True)
class Prepared:
    """One training image's distinct rows at one level, ready to be merged into galleries."""

    aug: torch.Tensor  # (n, C + 1) fp32: [g - c, |g - c|^2], c the centroid of the row's cell; sorted by unit
    g16: torch.Tensor  # (n, C) fp16: the rows themselves (for exact re-checks)
    mult: torch.Tensor  # (n,) int64: how many positions hold each row
    counts: torch.Tensor  # (units,) int64: rows per unit
    r_in: torch.Tensor  # (units,) fp32: smallest computed |g - c| per unit (+inf if empty)
    r_out: torch.Tensor  # (units,) fp32: largest (-inf if empty)
    shared: torch.Tensor  # (F,) int64: positions holding each shared row
    finite: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.aug, self.g16, self.mult, self.counts, self.r_in,
                                                          self.r_out, self.shared))


def _centre(g: torch.Tensor, unit: torch.Tensor, lev: LevelIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """``[g - c, |g - c|^2]`` for rows ``g`` of units ``unit``, and the computed |g - c|."""
    dim = g.shape[1]
    aug = torch.empty(g.shape[0], dim + 1)
    torch.sub(g, lev.centroids.index_select(0, unit // SHELLS), out=aug[:, :dim])
    gn = torch.linalg.vector_norm(aug[:, :dim], dim=1)
    aug[:, dim] = gn.square()
    return aug, gn


def _unit_radii(unit: torch.Tensor, gn: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    r_in = torch.full((n_units,), math.inf).scatter_reduce_(0, unit, gn, "amin")
    r_out = torch.full((n_units,), -math.inf).scatter_reduce_(0, unit, gn, "amax")
    return r_in, r_out


def prepare(rows16: np.ndarray, unit: np.ndarray, same: np.ndarray, lev: LevelIndex, where: str) -> Prepared:
    """A training image's :class:`Prepared` rows from its (H*W, C) fp16 level rows and index rows."""
    return prepare_many(rows16[None], unit[None], same[None], lev, where)[0]


def prepare_many(rows16: np.ndarray, unit: np.ndarray, same: np.ndarray, lev: LevelIndex, where: str) -> list[
        Prepared]:
    """:class:`Prepared` rows of B training images from their (B, H*W, C) fp16 level rows and (B, H*W) index
    rows, all at once. Every claim of the index (which rows are equal) is checked, so a damaged index is
    refused, never trusted; the units only affect speed."""
    n, hw, dim = rows16.shape
    n_sh, n_units = len(lev.shared), lev.n_units
    bits = torch.from_numpy(np.ascontiguousarray(rows16, np.float16)).view(torch.int16).reshape(n * hw, dim)
    same_t = torch.from_numpy(np.asarray(same, np.int64)).reshape(-1)
    unit_t = torch.from_numpy(np.asarray(unit, np.int64)).reshape(-1)
    img = torch.arange(n).repeat_interleave(hw)
    pos = torch.arange(hw).repeat(n)
    own = same_t < hw
    ok = bool(((same_t >= 0) & (same_t < hw + n_sh)).all())
    if ok:
        rep = same_t == pos
        o = (own & ~rep).nonzero().squeeze(1)  # duplicates of another row of the same image, which must
        tgt = same_t.index_select(0, o) + img.index_select(0, o) * hw
        ok = bool(rep.index_select(0, tgt).all())  # stand for itself
        ok = ok and bool((bits.index_select(0, o) == bits.index_select(0, tgt)).all())  # and hold the same bits
        ok = ok and bool(((unit_t >= 0) & (unit_t < n_units))[rep].all())
        if ok and not bool(own.all()):
            s = (~own).nonzero().squeeze(1)
            sb = torch.from_numpy(_bits(lev.shared))
            ok = bool((bits.index_select(0, s) == sb.index_select(0, same_t.index_select(0, s) - hw)).all())
    if not ok:
        raise SpadeError(f"{where}: damaged feature bank (search index)")
    mult_all = torch.bincount(tgt, minlength=n * hw).add_(1)  # (each representative counts itself)
    reps = rep.nonzero().squeeze(1)  # by image, then position
    key = img.index_select(0, reps) * n_units + unit_t.index_select(0, reps)
    order = torch.argsort(key, stable=True)
    reps, key = reps.index_select(0, order), key.index_select(0, order)
    u = key % n_units
    g16 = bits.index_select(0, reps).view(torch.float16)
    g = g16.float()
    aug, gn = _centre(g, u, lev)
    r_in, r_out = _unit_radii(key, gn, n * n_units)
    counts = torch.bincount(key, minlength=n * n_units).view(n, n_units)
    s_img = img[~own] * n_sh + same_t[~own] - hw
    shared = torch.bincount(s_img, minlength=n * n_sh).view(n, n_sh)
    sizes = counts.sum(1).tolist()
    bad = torch.zeros(n, dtype=torch.long).index_add_(0, key // n_units, (~torch.isfinite(gn)).long())
    mult = mult_all.index_select(0, reps)
    out = []
    a = 0
    for i, size in enumerate(sizes):  # (copies: each image's memory can be dropped on its own)
        b = a + size
        out.append(Prepared(
            aug=aug[a:b].clone(),
            g16=g16[a:b].clone(),
            mult=mult[a:b].clone(),
            counts=counts[i].clone(),
            r_in=r_in[i * n_units : (i + 1) * n_units].clone(),
            r_out=r_out[i * n_units : (i + 1) * n_units].clone(),
            shared=shared[i].clone(),
            finite=int(bad[i]) == 0,
        ))
        a = b
    return out


@dataclass(frozen=True)
class Merged:
    """A test image's gallery at one level: its neighbours' distinct rows, unit by unit, in GEMM blocks.

    ``aug`` (R, C + 1): block after block, each padded to a multiple of ``NSB`` rows (pads: zeros and
    +inf, so that they score +inf, and no other row has a non-finite last column); ``src`` maps a row to
    ``g16``, the rows themselves (for exact re-checks; undefined for pads); ``mult``: multiplicities.
    Blocks: first row ``bstart``, rows ``bcols`` (a multiple of ``NSB``), unit ``bunit``; units: blocks
    ``first_block`` .. ``first_block + nblocks``, rows ``count``, radii ``r_in`` / ``r_out``.
    """

    lev: LevelIndex
    aug: torch.Tensor
    src: torch.Tensor
    g16: torch.Tensor
    mult: torch.Tensor | None
    bstart: torch.Tensor
    bcols: torch.Tensor
    bunit: torch.Tensor
    first_block: torch.Tensor
    nblocks: torch.Tensor
    count: torch.Tensor
    r_in: torch.Tensor
    r_out: torch.Tensor
    n_rows: int  # positions of the gallery (with multiplicity)


def shared_part(parts: list[Prepared], lev: LevelIndex) -> Prepared | None:
    """The shared rows present in ``parts``, once each, as one more part (``None`` if there are none)."""
    if not len(lev.shared):
        return None
    tot = torch.stack([p.shared for p in parts]).sum(0)
    present = tot.nonzero().squeeze(1)
    if present.numel() == 0:
        return None
    u = torch.from_numpy(lev.shared_unit.astype(np.int64)).index_select(0, present)
    order = torch.argsort(u, stable=True)
    present, u = present[order], u[order]
    g16 = torch.from_numpy(lev.shared).index_select(0, present)
    aug, gn = _centre(g16.float(), u, lev)
    r_in, r_out = _unit_radii(u, gn, lev.n_units)
    return Prepared(aug, g16, tot.index_select(0, present), torch.bincount(u, minlength=lev.n_units), r_in, r_out,
                    torch.zeros(0, dtype=torch.long), bool(torch.isfinite(g16).all()))


def merge(parts: list[Prepared], lev: LevelIndex, need_mult: bool = False) -> Merged:
    """The gallery made of ``parts`` (the neighbours' prepared rows), unit by unit, cut into blocks
    (``need_mult``: keep the rows' multiplicities, which only kappa > 1 needs)."""
    sh = shared_part(parts, lev)
    allp = parts + ([sh] if sh is not None else [])
    n_units = lev.n_units
    dim = lev.centroids.shape[1]
    counts = torch.stack([p.counts for p in allp])  # (parts, units)
    count = counts.sum(0)
    r_in = torch.stack([p.r_in for p in allp]).amin(0)
    r_out = torch.stack([p.r_out for p in allp]).amax(0)
    # blocks: each unit cut into blocks of at most MAX_BLOCK rows, each padded to a multiple of NSB rows.
    # Units much tighter than the others (near-identical rows: background) get blocks of NSB rows, so
    # that a sub-block is a single row and their many near-ties are re-checked one by one.
    live = count > 0
    typical = float(r_out[live].median()) if bool(live.any()) else 0.0
    size = torch.where(r_out < DENSE_FRAC * typical, NSB, MAX_BLOCK)
    nblocks = (count + size - 1) // size
    first_block = torch.cumsum(nblocks, 0) - nblocks
    n_b = int(nblocks.sum())
    bunit = torch.repeat_interleave(torch.arange(n_units), nblocks)
    bsize = size.index_select(0, bunit)
    j = torch.arange(n_b) - first_block.index_select(0, bunit)
    real = torch.minimum(count.index_select(0, bunit) - j * bsize, bsize)
    bcols = (real + NSB - 1) // NSB * NSB
    bstart = torch.cumsum(bcols, 0) - bcols
    n_pad = int(bcols.sum())
    # destination of every row: its unit's rows in part order, then cut into the unit's blocks
    sizes = counts.sum(1)
    k = len(allp)
    within = torch.cumsum(counts, 1) - counts  # first row of each unit inside each part
    before = torch.cumsum(counts, 0) - counts  # rows of the unit in earlier parts
    pstart = torch.cumsum(sizes, 0) - sizes
    unit_cat = torch.repeat_interleave(torch.arange(n_units).repeat(k), counts.reshape(-1))
    n = unit_cat.numel()
    jj = (before - within - pstart[:, None]).reshape(-1)  # row index within its unit, minus the row's own index
    jj = jj.index_select(0, torch.repeat_interleave(torch.arange(k) * n_units, sizes).add_(unit_cat))
    jj += torch.arange(n)
    us = size.index_select(0, unit_cat)
    dest = bstart.index_select(0, first_block.index_select(0, unit_cat) + jj // us) + jj % us
    aug = torch.empty(n_pad, dim + 1)
    pads = torch.repeat_interleave(bstart + real, bcols - real)
    pads += torch.arange(pads.numel()) - torch.repeat_interleave(torch.cumsum(bcols - real, 0) - (bcols - real),
                                                                 bcols - real)
    aug.index_fill_(0, pads, 0.0)
    aug[:, dim].index_fill_(0, pads, math.inf)  # pads score +inf
    src = torch.empty(n_pad, dtype=torch.long)
    a = 0
    for p in allp:  # (straight from each part: no concatenated copy)
        b = a + p.aug.shape[0]
        aug.index_copy_(0, dest[a:b], p.aug)
        a = b
    src.index_copy_(0, dest, torch.arange(n))
    mult = None
    if need_mult:
        mult = torch.zeros(n_pad, dtype=torch.long)
        mult.index_copy_(0, dest, torch.cat([p.mult for p in allp]))
    return Merged(
        lev=lev,
        aug=aug,
        src=src,
        g16=torch.cat([p.g16 for p in allp]),
        mult=mult,
        bstart=bstart,
        bcols=bcols,
        bunit=bunit,
        first_block=first_block,
        nblocks=nblocks,
        count=count,
        r_in=r_in,
        r_out=r_out,
        n_rows=int(sum(int(p.mult.sum()) for p in allp)),
    )


__all__ = ["LevelIndex", "Prepared", "Merged", "index_spec", "write_index", "load_level", "prepare", "prepare_many",
           "merge",
           "n_cells", "train_level", "SHELLS", "NSB"]
