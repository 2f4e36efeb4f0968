"""The pixel-stage engine against the float64 brute-force reference, query by query."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spade_ad.correspondence import (
    cdist_baseline,
    nn_distances,
    nn_distances_reference,
    release_scratch,
)

FEATS = Path("/tmp/feats.pt")  # optional local fixture of real features (see benchmarks/engine_micro.py)


def _check(
    q: torch.Tensor, g: torch.Tensor, kappa: int = 1, ref: torch.Tensor | None = None, **kw
) -> dict[str, int]:
    """Engine within 1e-4 relative error of the reference on every query (exact zeros stay ~0)."""
    stats: dict[str, int] = {}
    out = nn_distances(q, g, kappa, stats=stats, **kw)
    ref = nn_distances_reference(q, g, kappa) if ref is None else ref
    assert out.dtype == torch.float32 and out.shape == (q.shape[0],)
    err = (out.double() - ref).abs()
    tol = torch.where(ref > 0, 1e-4 * ref, torch.full_like(ref, 1e-4))
    bad = (err > tol).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} queries off, e.g. {out[bad[:3]].tolist()} vs {ref[bad[:3]].tolist()}"
    )
    assert stats["queries"] == q.shape[0]
    assert stats["fallback"] == 0  # the proof has no failure mode; a fallback would mean a broken invariant
    return stats


def _images(k: int, h: int, w: int, c: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """k smooth-ish random feature maps stacked as (k*h*w, c), row-major per image."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, h, w, c, generator=gen)
    noise = torch.randn(k, h, w, c, generator=gen)
    return ((base + 0.5 * noise) * scale).reshape(k * h * w, c)


@pytest.mark.parametrize("kappa", [1, 3, 5])
@pytest.mark.parametrize("prune", [None, True, False])
def test_random_matches_reference(kappa: int, prune: bool | None) -> None:
    gen = torch.Generator().manual_seed(kappa)
    q = torch.randn(200, 16, generator=gen)
    g = torch.randn(3000, 16, generator=gen)
    _check(q, g, kappa, prune=prune)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("hints", [True, False])
def test_grid_hints_and_cells(kappa: int, hints: bool) -> None:
    h = w = 12
    g = _images(20, h, w, 24, seed=1)
    q = _images(1, h, w, 24, seed=2)
    kw = {"query_hw": (h, w), "gallery_hw": (h, w)} if hints else {}
    _check(q, g, kappa, prune=True, **kw)
    _check(q, g, kappa, prune=False, **kw)


def test_single_gallery_image_and_kappa_above_k() -> None:
    h, w = 9, 7
    g = _images(1, h, w, 10, seed=3)
    q = _images(1, h, w, 10, seed=4)
    for kappa in (1, 3, 5):  # the same-position bound has only 1 row: kappa > k must still work
        _check(q, g, kappa, query_hw=(h, w), gallery_hw=(h, w), prune=True)


def test_gallery_smaller_than_kappa() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(17, 8, generator=gen)
    for m in (1, 2, 4):
        g = torch.randn(m, 8, generator=gen)
        _check(q, g, kappa=5)
        _check(q, g, kappa=5, prune=True)
    out = nn_distances(q, torch.zeros(1, 8), 3)
    torch.testing.assert_close(out, q.norm(dim=1))


@pytest.mark.parametrize("kappa", [1, 3, 5])
def test_ties_duplicates_and_exact_matches(kappa: int) -> None:
    gen = torch.Generator().manual_seed(6)
    # quantised features: many exact ties in distance, many identical rows
    g = (torch.randn(4000, 12, generator=gen) * 2).round() / 2
    g = torch.cat([g, g[:500], g[:100]])  # repeated rows (some three times)
    q = torch.cat([(torch.randn(150, 12, generator=gen) * 2).round() / 2, g[:50], g[3000:3050]])
    _check(q, g, kappa, prune=True)
    _check(q, g, kappa, prune=False)
    # queries equal to a gallery row: distance exactly 0 when kappa=1 (and <= the mean otherwise)
    out = nn_distances(g[:50], g, 1, prune=True)
    assert torch.all(out == 0)


def test_repeated_row_counts_up_to_kappa() -> None:
    row = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    g = torch.cat([row, row, row, row + 1.0, torch.randn(300, 4) + 10])
    q = row.clone()
    assert float(nn_distances(q, g, 3)[0]) == 0.0
    torch.testing.assert_close(nn_distances(q, g, 4), torch.tensor([0.5]))  # three zeros and one 2.0
    _check(torch.cat([q, q + 0.25]), g, 5, prune=True)


def test_many_tiles_last_partial_tile_and_last_row() -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(40, 6, generator=gen) + 100.0
    g = torch.randn(2053, 6, generator=gen)  # not a multiple of any tile or sub-block
    g[-1] = q[0] + 1e-3  # the unique nearest neighbour of query 0 is the very last gallery row
    for prune in (False, True):
        stats = _check(q, g, 1, tile_bytes=4096, prune=prune)
        assert stats["pairs"] >= q.shape[0]  # something was computed
        out = nn_distances(q, g, 1, tile_bytes=4096, prune=prune)
        assert abs(float(out[0]) - float((q[0] - g[-1]).norm())) < 1e-6
    _check(q, g, 3, tile_bytes=2048, prune=True)


def test_large_norms_small_distances() -> None:
    """Cancellation: |x| ~ 1e3, nearest distance ~1e-2 (the GEMM form alone would be far off)."""
    gen = torch.Generator().manual_seed(8)
    centre = torch.randn(1, 32, generator=gen) * 300.0
    g = centre + torch.randn(5000, 32, generator=gen)
    q = g[torch.randint(0, 5000, (120,), generator=gen)] + 1e-3 * torch.randn(120, 32, generator=gen)
    for prune in (False, True):
        _check(q, g, 1, prune=prune)
        _check(q, g, 3, prune=prune)
    naive = cdist_baseline(q, g, 1)
    ref = nn_distances_reference(q, g, 1)
    assert float(((naive.double() - ref).abs() / ref).max()) > 1e-3  # the naive form really is inexact here


def test_fp16_bank_background_duplicates() -> None:
    """Like the real bank: fp16-rounded gallery with a large near-constant background."""
    h = w = 16
    g = _images(12, h, w, 24, seed=9, scale=8.0)
    g.view(12, h, w, 24)[:, :6] = 20.0 + 0.01 * torch.randn(12, 6, w, 24)  # background rows
    g = g.half().float()
    q = _images(1, h, w, 24, seed=10, scale=8.0)
    q.view(h, w, 24)[:6] = 20.0 + 0.01 * torch.randn(6, w, 24)
    for kappa in (1, 3):
        _check(q, g, kappa, query_hw=(h, w), gallery_hw=(h, w), prune=True)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dense_clusters_tiny_distances_far_from_the_unit_centre(seed: int) -> None:
    """Regression: queries a hair's breadth from a row of a dense cluster, processed against other units
    whose centre is far away: the running bound (~1e-7) must not be lost to rounding against |q - c|^2."""
    gen = torch.Generator().manual_seed(seed)
    h = w = 15
    c_dim = (4, 8, 24)[seed - 1]
    g = torch.randn(12 * h * w, c_dim, generator=gen) * 3
    for _ in range(3):  # exact and near-exact repeats around a few centres
        centre = torch.randn(c_dim, generator=gen) * 5
        idx = torch.randint(0, g.shape[0], (g.shape[0] // 5,), generator=gen)
        g[idx] = centre + 1e-3 * torch.randn(idx.numel(), c_dim, generator=gen)
        g[idx[: idx.numel() // 2]] = centre
    g = g.half().float()
    q = torch.randn(h * w, c_dim, generator=gen) * 3
    q[: h * w // 3] = g[torch.randint(0, g.shape[0], (h * w // 3,), generator=gen)] + 1e-4 * torch.randn(
        h * w // 3, c_dim, generator=gen
    )
    for kappa in (1, 2, 5):
        ref = nn_distances_reference(q, g, kappa)
        for tile_bytes in (1 << 16, 8 << 20):
            _check(q, g, kappa, ref, prune=True, tile_bytes=tile_bytes)
            _check(q, g, kappa, ref, prune=True, tile_bytes=tile_bytes, query_hw=(h, w), gallery_hw=(h, w))


def test_reduced_precision_matmul_setting_stays_exact() -> None:
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(64, 20, generator=gen) * 5
    g = torch.randn(2000, 20, generator=gen) * 5
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        _check(q, g, 1, prune=True)
    finally:
        torch.set_float32_matmul_precision(before)


def test_inputs_validation_dtype_and_threads() -> None:
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(30, 5, generator=gen)
    g = torch.randn(400, 5, generator=gen)
    ref = nn_distances(q, g, 2)
    torch.testing.assert_close(
        nn_distances(q.half(), g.half(), 2), nn_distances(q.half().float(), g.half().float(), 2)
    )
    threads = torch.get_num_threads()
    torch.testing.assert_close(nn_distances(q.double(), g.double(), 2, threads=None), ref)
    assert torch.get_num_threads() == threads  # restored
    assert nn_distances(q[:0], g).shape == (0,)
    with pytest.raises(ValueError):
        nn_distances(q, g[:, :4])
    with pytest.raises(ValueError):
        nn_distances(q, g[:0])
    release_scratch()
    torch.testing.assert_close(nn_distances(q, g, 2), ref)


@pytest.mark.parametrize("stall", [3.0, 1e-9])
def test_threads_probe_and_stall_watch(monkeypatch: pytest.MonkeyPatch, stall: float) -> None:
    """Two threads (when the probe says they pay), and the drop to one thread mid-call (forced here by a
    tiny stall factor), give the same exact answers and leave torch's thread setting as it was."""
    import spade_ad.correspondence.runtime as runtime

    monkeypatch.setattr(runtime, "_THREADS_MIN_WORK", 0)
    monkeypatch.setattr(runtime, "_STALL", stall)
    monkeypatch.setattr(runtime, "_PROBE", {"at": -1e9, "threads": 0, "ok": False})
    monkeypatch.setattr(runtime, "parallel_pays", lambda threads: True)
    h = w = 16
    g = _images(24, h, w, 12, seed=14)
    q = _images(1, h, w, 12, seed=15)
    before = torch.get_num_threads()
    for prune in (True, False):
        _check(q, g, 1, prune=prune, threads=2, tile_bytes=1 << 18)
        _check(q, g, 3, prune=prune, threads=2, query_hw=(h, w), gallery_hw=(h, w))
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("kappa", [1, 4])
def test_results_are_canonical(kappa: int) -> None:
    """Layout, pruning, tile size, query batching and gallery order do not change a single bit: the answer
    is a function of the gallery's rows alone (see 'Canonical results' in search.py)."""
    h = w = 14
    g = _images(16, h, w, 12, seed=16).half().float()
    g.view(16, h, w, 12)[:, :4] = 3.0  # duplicates and exact ties
    q = _images(1, h, w, 12, seed=17)
    q[:20] = g[100:120]
    want = nn_distances(q, g, kappa, prune=False)
    for kw in ({"prune": True}, {"prune": True, "tile_bytes": 1 << 16}, {"query_hw": (h, w), "gallery_hw": (h, w)}):
        assert torch.equal(nn_distances(q, g, kappa, **kw), want)  # type: ignore[arg-type]
    assert torch.equal(nn_distances(q, g.flip(0), kappa, prune=True), want)
    assert torch.equal(torch.cat([nn_distances(q[:50], g, kappa), nn_distances(q[50:], g, kappa)]), want)


def test_stats_reports_fallback_and_work() -> None:
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(50, 8, generator=gen)
    g = torch.randn(1000, 8, generator=gen)
    stats: dict[str, int] = {}
    nn_distances(q, g, 1, stats=stats)
    nn_distances(q, g, 1, stats=stats)  # counters accumulate over calls
    assert stats["fallback"] == 0 and stats["queries"] == 100
    assert stats["pairs"] > 0 and stats["rechecked"] >= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_reference() -> None:
    h = w = 14
    g = _images(30, h, w, 24, seed=14)
    q = _images(1, h, w, 24, seed=15)
    for prune in (False, True):
        out = nn_distances(q.cuda(), g.cuda(), 1, query_hw=(h, w), gallery_hw=(h, w), prune=prune)
        ref = nn_distances_reference(q, g, 1)
        assert out.is_cuda
        assert float(((out.cpu().double() - ref).abs() / ref).max()) <= 1e-4


@pytest.mark.skipif(not FEATS.exists(), reason="local real-feature fixture /tmp/feats.pt not present")
def test_real_features() -> None:
    """EfficientNet-Lite0 features of MVTec bottle: the engine on the full grids of the three levels, the
    reference on a sample of queries (the float64 brute force is slow): evenly spaced ones, plus the
    nearest (background, many near-ties) and the farthest."""
    data = torch.load(FEATS)
    for level in range(len(data["q"])):
        g = data["g"][level].half().float()  # the bank is fp16
        q = data["q"][level].float()
        side = int(q.shape[0] ** 0.5)
        for kappa in (1, 3) if level == 2 else (1,):
            stats: dict[str, int] = {}
            out = nn_distances(q, g, kappa, stats=stats, query_hw=(side, side), gallery_hw=(side, side))
            n = 16 if level == 0 else 40
            order = out.argsort()
            pick = torch.cat([torch.arange(0, q.shape[0], q.shape[0] // n), order[:n], order[-n // 2 :]])
            ref = nn_distances_reference(q[pick], g, kappa)
            err = (out[pick].double() - ref).abs()
            assert torch.all(err <= torch.where(ref > 0, 1e-4 * ref, torch.full_like(ref, 1e-4)))
            assert stats["fallback"] == 0
