"""The tile grid, cutting and stitching (spade_ad.tiling): geometry only, no model."""

from __future__ import annotations

import numpy as np
import pytest

from spade_ad import tiling

SIZES = [(460, 1130), (900, 900), (512, 512), (100, 700), (37, 41), (224, 224), (225, 449)]
SETUPS = [(224, 0.25, 1.0), (224, 0.5, 0.5), (320, 0.3, 1.0), (64, 0.0, 1.0), (96, 0.75, 0.37)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("setup", SETUPS)
def test_grid_covers_every_pixel_flush_and_overlapping(size: tuple[int, int], setup: tuple[int, float, float]) -> None:
    tile, overlap, scale = setup
    g = tiling.make_grid(*size, tile=tile, overlap=overlap, scale=scale)
    ph, pw = g.padded_shape
    cover = np.zeros((ph, pw), dtype=int)
    for y, x in g.origins:
        assert 0 <= y and y + tile <= ph and 0 <= x and x + tile <= pw
        cover[y : y + tile, x : x + tile] += 1
    assert cover.min() >= 1
    for starts in (g.ys, g.xs):
        assert starts[0] == 0
        assert list(starts) == sorted(set(starts))
        steps = np.diff(starts)
        assert (steps <= max(1, int(tile * (1 - overlap) + 1e-9))).all()  # overlap at least the requested
    assert g.ys[-1] + tile == ph and g.xs[-1] + tile == pw  # last tile flush with the border
    assert len(g) == len(g.ys) * len(g.xs) == len(g.origins)


def test_grid_is_deterministic_and_documented() -> None:
    a = tiling.make_grid(460, 1130, tile=224, overlap=0.5, scale=0.5)
    b = tiling.make_grid(460, 1130, tile=224, overlap=0.5, scale=0.5)
    assert a == b and a.to_dict() == b.to_dict()
    assert a.scaled_shape == (230, 565) and a.ys == (0, 6) and a.xs == (0, 85, 170, 256, 341)


@pytest.mark.parametrize("bad", [dict(tile=0), dict(overlap=1.0), dict(overlap=-0.1), dict(scale=0.0)])
def test_grid_refuses_bad_arguments(bad: dict[str, float]) -> None:
    kw: dict[str, float] = dict(tile=224, overlap=0.25, scale=1.0) | bad
    with pytest.raises(ValueError):
        tiling.make_grid(460, 1130, tile=int(kw["tile"]), overlap=kw["overlap"], scale=kw["scale"])


def test_blend_weights_positive_and_partition_of_unity_on_two_tile_overlaps() -> None:
    g = tiling.make_grid(230, 565, tile=224, overlap=0.5)
    w = tiling.blend_weights(g)
    assert w.shape == (len(g), 224, 224) and (w > 0).all()
    # one row of tiles, 25% overlap: exactly two tiles overlap, their weights sum to 1 everywhere
    g1 = tiling.make_grid(224, 565, tile=224, overlap=0.25)
    w1 = tiling.blend_weights(g1)
    t1 = np.zeros(g1.padded_shape)
    for (y, x), wi in zip(g1.origins, w1, strict=True):
        t1[y : y + 224, x : x + 224] += wi
    np.testing.assert_allclose(t1, 1.0, atol=1e-12)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("setup", SETUPS)
def test_stitch_constant_gives_the_constant(size: tuple[int, int], setup: tuple[int, float, float]) -> None:
    tile, overlap, scale = setup
    g = tiling.make_grid(*size, tile=tile, overlap=overlap, scale=scale)
    out = tiling.stitch(np.full((len(g), tile, tile), 3.25, np.float32), g)
    assert out.shape == g.scaled_shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.25, rtol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("setup", SETUPS)
def test_stitch_of_cut_map_gives_the_map_back(size: tuple[int, int], setup: tuple[int, float, float]) -> None:
    tile, overlap, scale = setup
    g = tiling.make_grid(*size, tile=tile, overlap=overlap, scale=scale)
    rng = np.random.default_rng(0)
    amap = rng.standard_normal(g.scaled_shape).astype(np.float32)
    native = tiling.make_grid(*g.scaled_shape, tile=tile, overlap=overlap)  # the same tiles, no rescale
    assert (native.ys, native.xs) == (g.ys, g.xs)
    tiles = tiling.cut_tiles(amap, native)
    assert tiles.shape == (len(g), tile, tile)
    np.testing.assert_allclose(tiling.stitch(tiles, g), amap, rtol=1e-6, atol=1e-6)


def test_cut_tiles_scales_pads_and_keeps_dtype() -> None:
    img = np.random.default_rng(1).integers(0, 256, (460, 1130, 3), dtype=np.uint8)
    g = tiling.make_grid(460, 1130, tile=224, overlap=0.5, scale=0.5)
    tiles = tiling.cut_tiles(img, g)
    assert tiles.shape == (len(g), 224, 224, 3) and tiles.dtype == np.uint8
    small = tiling.rescale(img, g.scaled_shape)
    y, x = g.origins[-1]
    np.testing.assert_array_equal(tiles[-1], small[y : y + 224, x : x + 224])
    # native scale: tiles are exact crops
    g1 = tiling.make_grid(460, 1130, tile=320, overlap=0.25)
    t1 = tiling.cut_tiles(img, g1)
    y, x = g1.origins[3]
    np.testing.assert_array_equal(t1[3], img[y : y + 320, x : x + 320])
    # an axis shorter than the tile is edge-padded, and the padding cropped off when stitching
    tiny = np.arange(37 * 41, dtype=np.float32).reshape(37, 41)
    g2 = tiling.make_grid(37, 41, tile=64)
    t2 = tiling.cut_tiles(tiny, g2)
    assert t2.shape == (1, 64, 64) and (t2[0, 40:, :41] == tiny[-1]).all()
    np.testing.assert_array_equal(tiling.stitch(t2, g2), tiny)


def test_no_seam_when_tiles_disagree() -> None:
    """Tiles whose maps are a smooth map plus a per-tile offset stitch into a map without jumps: the
    blend ramps across each overlap, so no neighbouring pixels differ by more than a small fraction of
    the offsets (hard cuts would jump by the full difference of the offsets)."""
    g = tiling.make_grid(460, 1130, tile=224, overlap=0.5)
    yy, xx = np.mgrid[0 : g.scaled_shape[0], 0 : g.scaled_shape[1]]
    smooth = (np.sin(yy / 50.0) + np.cos(xx / 70.0)).astype(np.float32)
    tiles = tiling.cut_tiles(smooth, g).astype(np.float64)
    offsets = np.random.default_rng(2).uniform(-1.0, 1.0, len(g))
    out = tiling.stitch(tiles + offsets[:, None, None], g).astype(np.float64)
    base_step = max(np.abs(np.diff(smooth, axis=0)).max(), np.abs(np.diff(smooth, axis=1)).max())
    for axis in (0, 1):
        step = np.abs(np.diff(out, axis=axis)).max()
        assert step < base_step + 0.05 * np.ptp(offsets), (axis, step)
    # the unperturbed tiles give the smooth map back exactly
    np.testing.assert_allclose(tiling.stitch(tiles, g), smooth, rtol=1e-6, atol=1e-6)


def test_to_native_resizes_back() -> None:
    g = tiling.make_grid(460, 1130, tile=224, overlap=0.5, scale=0.5)
    m = np.full(g.scaled_shape, 2.0, np.float32)
    out = tiling.to_native(m, g)
    assert out.shape == (460, 1130) and out.dtype == np.float32
    np.testing.assert_allclose(out, 2.0, rtol=1e-6)
    assert tiling.to_native(m, g, (10, 20)).shape == (10, 20)
