"""The fit-time search index (cells, shells, shared rows) and the search over merged galleries: against the
float64 brute force (1e-4 relative on every query) and bit for bit against the plain engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import spade_ad.correspondence.gallery as gallery_mod
from spade_ad import Spade
from spade_ad.bank import Bank, BankWriter
from spade_ad.correspondence import level_maps, nn_distances, nn_distances_merged, nn_distances_reference
from spade_ad.correspondence.cells import LevelIndex, index_names, index_spec, load_level, merge, prepare, train_level
from spade_ad.correspondence.gallery import GalleryCache
from spade_ad.errors import SpadeError

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"


def _images(k: int, hw: int, c: int, seed: int, kind: str) -> np.ndarray:
    """k training images' (hw, C) fp16 rows with the structures that matter to the index."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, hw, c, generator=gen) * 3
    x = base + torch.randn(k, hw, c, generator=gen)
    if kind in ("background", "dense"):
        bg = torch.randn(c, generator=gen) * 4
        x[:, : hw // 3] = bg  # identical rows within and across images (uniform background)
    if kind == "dense":
        centre = torch.randn(c, generator=gen) * 4
        n = hw // 4
        x[:, hw // 3 : hw // 3 + n] = centre + 2e-3 * torch.randn(k, n, c, generator=gen)  # near-ties
    if kind == "quantised":
        x = (x * 2).round() / 2  # many exact ties in distance and identical rows
    return x.half().numpy()


def _gallery(rows: np.ndarray, lev: LevelIndex, need_mult: bool) -> tuple[torch.Tensor, object]:
    parts = []
    for r in rows:
        unit, same = lev.assign(r)
        parts.append(prepare(r, unit, same, lev, "test"))
    return torch.from_numpy(rows).float().reshape(-1, rows.shape[-1]), merge(parts, lev, need_mult)


def _queries(rows: np.ndarray, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.from_numpy(rows).float().reshape(-1, rows.shape[-1])
    pick = flat[torch.randint(0, flat.shape[0], (n // 2,), generator=gen)]
    near = pick + 1e-3 * torch.randn(pick.shape, generator=gen)  # hair's breadth from a row
    far = torch.randn(n - n // 2, rows.shape[-1], generator=gen) * 4
    return torch.cat([near, pick[: n // 8], far])  # (and some queries equal to a row: distance 0)


def _check(q: torch.Tensor, g: torch.Tensor, merged: object, kappa: int) -> dict[str, int]:
    stats: dict[str, int] = {}
    out = nn_distances_merged(q, merged, kappa, stats=stats)  # type: ignore[arg-type]
    ref = nn_distances_reference(q, g, kappa)
    err = (out.double() - ref).abs()
    tol = torch.where(ref > 0, 1e-4 * ref, torch.full_like(ref, 1e-4))
    assert bool((err <= tol).all()), f"{int((err > tol).sum())} queries off the reference"
    plain = nn_distances(q, g, kappa, prune=True)
    assert torch.equal(out, plain), "merged gallery and plain engine differ in some bit"
    assert torch.equal(out, nn_distances(q, g, kappa, prune=False))
    assert stats["fallback"] == 0 and stats["queries"] == q.shape[0]
    return stats


@pytest.mark.parametrize("kappa", [1, 3, 5])
@pytest.mark.parametrize("kind", ["smooth", "background", "dense", "quantised"])
def test_merged_gallery_matches_reference_and_engine(kind: str, kappa: int) -> None:
    rows = _images(12, 400, 16, seed=len(kind) + kappa, kind=kind)
    lev = train_level(list(rows[::3]), 12 * 400)
    g, merged = _gallery(rows, lev, need_mult=kappa > 1)
    _check(_queries(rows, 300, seed=kappa), g, merged, kappa)
    if kind == "background":
        assert merged.n_rows == g.shape[0] and merged.aug.shape[0] < 0.8 * g.shape[0]  # duplicates once


def test_any_codebook_is_exact() -> None:
    """Centroids, cuts and shared rows only affect speed: absurd ones give the same bits."""
    rows = _images(8, 300, 12, seed=3, kind="dense")
    q = _queries(rows, 200, seed=4)
    good = train_level(list(rows[::2]), 8 * 300)
    _, want = _gallery(rows, good, need_mult=True)
    far = torch.randn(5, 12) * 1e3
    for lev in (
        LevelIndex(far, torch.full((5, 3), np.inf), good.shared, good.shared_unit % 20),
        LevelIndex(torch.zeros(1, 12), torch.tensor([[0.0, 0.0, 0.0]]), good.shared[:0], good.shared_unit[:0]),
        LevelIndex(good.centroids, -good.cuts, good.shared, good.shared_unit),
    ):
        g, merged = _gallery(rows, lev, need_mult=True)
        for kappa in (1, 4):
            _check(q, g, merged, kappa)
            assert torch.equal(nn_distances_merged(q, merged, kappa), nn_distances_merged(q, want, kappa))


def test_loops_split_over_two_threads_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import spade_ad.correspondence.runtime as runtime

    rows = _images(10, 300, 16, seed=13, kind="dense")
    lev = train_level(list(rows[::2]), 10 * 300)
    g, merged = _gallery(rows, lev, need_mult=True)
    q = _queries(rows, 256, seed=14)
    want = [nn_distances_merged(q, merged, kappa, threads=1) for kappa in (1, 3)]
    monkeypatch.setattr(runtime, "_SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(runtime, "_THREADS_MIN_WORK", 0)
    monkeypatch.setattr(runtime, "parallel_pays", lambda threads: True)
    before = torch.get_num_threads()
    for kappa, w in zip((1, 3), want, strict=True):
        assert torch.equal(nn_distances_merged(q, merged, kappa, threads=2), w)
        _check(q, g, merged, kappa)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("tile_bytes", [1 << 10, 5 << 10, 1 << 16])
def test_work_tiles_do_not_change_a_bit(tile_bytes: int) -> None:
    """GEMM blocks of one width share a buffer that is reduced when full: blocks cut across buffers, many small
    blocks in one buffer and widths changing within a chunk all give the bits of the default tiles."""
    rows = _images(10, 300, 16, seed=21, kind="dense")  # wide blocks and NSB-row blocks (near-ties)
    lev = train_level(list(rows[::2]), 10 * 300)
    g, merged = _gallery(rows, lev, need_mult=True)
    q = _queries(rows, 256, seed=22)
    assert len(set(merged.bcols.tolist())) > 2
    for kappa in (1, 3):
        want = nn_distances_merged(q, merged, kappa)
        assert torch.equal(nn_distances_merged(q, merged, kappa, tile_bytes=tile_bytes), want)
    _check(q, g, merged, 2)


def test_small_galleries_and_kappa_above_unit_sizes() -> None:
    rows = _images(1, 40, 6, seed=5, kind="smooth")
    lev = train_level([rows[0]], 40)
    g, merged = _gallery(rows, lev, need_mult=True)
    q = _queries(rows, 30, seed=6)
    for kappa in (1, 7, 39, 40, 60):  # up to the whole gallery, and beyond it
        _check(q, g, merged, kappa)


def test_non_finite_queries_fall_back_like_the_engine() -> None:
    rows = _images(3, 64, 8, seed=7, kind="smooth")
    lev = train_level(list(rows), 3 * 64)
    g, merged = _gallery(rows, lev, need_mult=False)
    q = _queries(rows, 20, seed=8)
    q[3, 2] = float("nan")
    stats: dict[str, int] = {}
    out = nn_distances_merged(q, merged, 1, stats=stats)  # type: ignore[arg-type]
    assert stats["fallback"] == 1
    torch.testing.assert_close(out, nn_distances(q, g, 1), equal_nan=True)
    # a NaN query's nearest centroid is the first one, here a cell without rows
    far = LevelIndex(torch.cat([torch.full((1, 8), -1e3), lev.centroids]),
                     torch.cat([torch.full((1, 3), float("inf")), lev.cuts]), lev.shared, lev.shared_unit + 4)
    _, empty_first = _gallery(rows, far, need_mult=False)
    torch.testing.assert_close(nn_distances_merged(q, empty_first, 1), out, equal_nan=True)  # type: ignore[arg-type]


def test_damaged_index_is_refused() -> None:
    rows = _images(2, 50, 6, seed=9, kind="background")
    lev = train_level(list(rows), 100)
    unit, same = lev.assign(rows[0])
    prepare(rows[0], unit, same, lev, "ok")
    bad_same = same.copy()
    bad_same[bad_same == np.arange(50)] = (np.arange(50)[bad_same == np.arange(50)] + 1) % 50  # unequal rows
    bad_unit = unit.copy()
    bad_unit[:] = lev.n_units + 3
    bad_shared = same.copy()
    bad_shared[-1] = 50 + len(lev.shared) + 5
    for u, s in ((unit, bad_same), (bad_unit, same), (unit, bad_shared)):
        with pytest.raises(SpadeError, match="damaged feature bank"):
            prepare(rows[0], u, s, lev, "bank")


def _write_bank(path: Path, levels: list[np.ndarray], with_index: bool, k: int) -> Bank:
    shapes = [(lv.shape[1], lv.shape[2]) for lv in levels]
    spec: dict[str, tuple[tuple[int, ...], str]] = {f"level{i}": (sh, "F16") for i, sh in enumerate(shapes)}
    if with_index:
        spec.update(index_spec(shapes))
    w = BankWriter(path, len(levels[0]), spec)
    w.write(0, {f"level{i}": lv for i, lv in enumerate(levels)})
    if with_index:
        from spade_ad.correspondence.cells import write_index

        write_index(w, k)
    w.close()
    return Bank(path)


def test_bank_index_and_level_maps_with_and_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old banks (no index) and new ones give the same level maps bit for bit; the cache may evict."""
    monkeypatch.setattr(gallery_mod, "INDEX_MIN_WORK", 0)
    monkeypatch.setattr(gallery_mod, "INDEX_MIN_QUERIES", 0)
    h = w = 12
    levels_np = [_images(10, h * w, 16, seed=10, kind="dense"), _images(10, 36, 24, seed=11, kind="smooth")]
    old = _write_bank(tmp_path / "old.safetensors", levels_np, False, 4)
    new = _write_bank(tmp_path / "new.safetensors", levels_np, True, 4)
    assert load_level(old, 0) is None and load_level(new, 0) is not None
    assert new.tensor(index_names(0)[2]).shape[1] == 16 and new.n == 10
    assert np.array_equal(new.gather(0, [3]), old.gather(0, [3]))
    gen = torch.Generator().manual_seed(12)
    test = [torch.randn(3, h * w, 16, generator=gen) * 3, torch.randn(3, 36, 24, generator=gen)]
    neigh = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [9, 8, 1, 0]])
    for kappa in (1, 3):
        want = level_maps(test, neigh, old, [(h, w), (6, 6)], kappa, 1 << 20)
        got = level_maps(test, neigh, new, [(h, w), (6, 6)], kappa, 1 << 20)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    small = GalleryCache(new, max_bytes=1)  # evicts all but the current image's neighbours
    parts = small.prepared(0, [0, 1, 2])
    assert len(small.entries) == 3 and small.prepared(0, [5])[0].aug.shape[1] == 17 and len(small.entries) == 1
    assert parts[0].nbytes > 0


def test_model_predictions_identical_with_or_without_index(
    small_train: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gallery_mod, "INDEX_MIN_WORK", 0)
    monkeypatch.setattr(gallery_mod, "INDEX_MIN_QUERIES", 0)
    model = Spade(k=4, k_image=2, image_size=64, calibration_images=2).fit(small_train / "train" / "good")
    files = sorted((small_train / "test").rglob("*.png"))[:3]
    with_index = model.predict(files)
    assert load_level(model.bank_, 0) is not None
    monkeypatch.setattr(gallery_mod, "INDEX_MIN_WORK", float("inf"))  # the plain engine on the same bank
    plain = model.predict(files)
    assert np.array_equal(np.stack(with_index.maps), np.stack(plain.maps))
    assert np.array_equal(with_index.scores, plain.scores)


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="MVTec bottle not present")
def test_real_bottle_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """EfficientNet-Lite0 features of real bottle images: merged galleries equal the engine bit for bit at
    every level, and the reference on a sample of queries (evenly spaced, plus the nearest: background)."""
    from spade_ad.data import load_mvtec_category

    cat = load_mvtec_category(BOTTLE)
    model = Spade(k=6, k_image=3, calibration_images=0).fit(cat.train[::35])
    from spade_ad.features import extract
    from spade_ad.io import load_image
    from spade_ad.retrieval import image_knn

    tests = [cat.test[0].path, cat.test[-1].path]
    levels, gvec = extract(model._net(), [load_image(p) for p in tests], model.prep, torch.device("cpu"))
    _, neigh = image_knn(gvec, model.global_, 3, 6)
    for li, (h, w) in enumerate(model.level_shapes_):
        lev = load_level(model.bank_, li)
        assert lev is not None
        names = index_names(li)
        for b in range(len(tests)):
            nb = neigh[b].tolist()
            parts = [prepare(model.bank_.gather(li, [i])[0], model.bank_.rows(names[0], [i])[0],
                             model.bank_.rows(names[1], [i])[0], lev, "bank") for i in nb]
            merged = merge(parts, lev, need_mult=True)
            g = torch.from_numpy(model.bank_.gather(li, nb)).float().reshape(-1, levels[li].shape[-1])
            q = levels[li][b]
            for kappa in (1, 3) if li == 2 else (1,):
                out = nn_distances_merged(q, merged, kappa)
                assert torch.equal(out, nn_distances(q, g, kappa, query_hw=(h, w), gallery_hw=(h, w)))
                n = 8 if li == 0 else 20
                pick = torch.cat([torch.arange(0, q.shape[0], q.shape[0] // n), out.argsort()[:n]])
                ref = nn_distances_reference(q[pick], g, kappa)
                err = (out[pick].double() - ref).abs()
                assert bool((err <= torch.where(ref > 0, 1e-4 * ref, torch.full_like(ref, 1e-4))).all())
