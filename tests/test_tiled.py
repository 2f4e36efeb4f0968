"""The tiled mode (``tile`` settings, preset ``highres``): a model whose bank rows are tiles.

Exact expectations: tile retrieval against a brute force, stitched maps against the tile maps, a
saved model, an updated model and a Ray-free re-fit bit for bit; calibration leaves out whole images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from spade_ad import Spade, SpadeError, SpadeSettings
from spade_ad.features import TILE_CHUNK, network_inputs
from spade_ad.retrieval import tile_image_scores, tile_knn
from spade_ad.settings import PRESETS
from spade_ad.tiling import Stitcher, make_grid, stitch

TILED = {"tile": 64, "image_size": 64, "tile_span": 1.5, "k": 3, "k_image": 2, "calibration_images": 6}


def part(seed: int, defect: bool = False, shape: tuple[int, int] = (96, 240)) -> np.ndarray:
    """A wide, smoothly shaded part with a little noise; ``defect``: a small dark pit."""
    r = np.random.default_rng(seed)
    h, w = shape
    ramp = np.linspace(60, 200, w)[None, :, None]
    a = np.tile(ramp, (h, 1, 3)) + r.normal(0, 6, (h, w, 3))
    if defect:
        a[50:55, 150:155] = 0
    return np.clip(a, 0, 255).astype(np.uint8)


TRAIN = [part(i) for i in range(7)]


@pytest.fixture(scope="module")
def tiled() -> Spade:
    return Spade(**TILED).fit(TRAIN)


def test_highres_is_a_preset_of_tiled_settings() -> None:
    s = SpadeSettings.from_preset("highres")
    assert s.tile == PRESETS["highres"]["tile"] and s.preprocess == "resize"
    with pytest.raises(SpadeError, match="tile must be 0 .off. or at least 32"):
        SpadeSettings(tile=16)
    with pytest.raises(SpadeError, match="preprocess must be resize with tiles"):
        SpadeSettings(tile=224, preprocess="aspect")


def test_a_tiled_model_finds_a_small_defect_and_maps_it_at_full_resolution(tiled: Spade) -> None:
    assert tiled.grid is not None and len(tiled.grid) > 1
    t = len(tiled.grid)
    assert tiled.bank_.n == t * len(TRAIN) and tiled.state_.n_train == len(TRAIN) and len(tiled.global_) == t * 7
    pred = tiled.predict([part(100), part(101, defect=True)])
    assert [m.shape for m in pred.maps] == [(96, 240), (96, 240)]
    y, x = np.unravel_index(np.argmax(pred.maps[1]), pred.maps[1].shape)
    assert 44 <= y <= 61 and 144 <= x <= 161
    assert pred.scores[1] > pred.scores[0] and pred.verdicts is not None and list(pred.verdicts) == [False, True]
    assert pred.tile_knn is not None and pred.tile_max is not None and pred.tile_neighbours is not None
    assert pred.tile_neighbours[0].shape == (t, 3)
    # the image score is the rule over its tiles, with the positions' calibration medians
    scales = np.asarray(tiled.calibration_["position_scales"])
    s = tiled.settings
    want = tile_image_scores(s.image_score, s.tile_pool, scales, np.stack(pred.tile_knn), np.stack(pred.tile_max))
    assert np.array_equal(pred.scores, want.astype(np.float32))


def test_tile_pooling_rules() -> None:
    knn = np.array([[2.0, 4.0, 6.0]])
    mx = np.array([[1.0, 1.0, 9.0]])
    scales = np.array([[2.0, 1.0], [2.0, 1.0], [3.0, 3.0]])  # per position: (kNN median, maximum median)
    per_tile = {"knn": [1.0, 2.0, 2.0], "max": [1.0, 1.0, 3.0], "combined": [2.0, 3.0, 5.0]}
    for rule, v in per_tile.items():
        assert tile_image_scores(rule, "max", scales, knn, mx)[0] == max(v)
        assert tile_image_scores(rule, "mean", scales, knn, mx)[0] == pytest.approx(sum(v) / 3)
        assert tile_image_scores(rule, "max_mean", scales, knn, mx)[0] == pytest.approx(max(v) + sum(v) / 3)


def test_an_image_of_another_size_is_cut_on_the_fitted_grid(tiled: Spade) -> None:
    pred = tiled.predict([part(5, shape=(120, 300))])
    assert pred.maps[0].shape == (120, 300) and pred.input_maps[0].shape == tiled.grid.scaled_shape  # type: ignore[union-attr]


@pytest.mark.parametrize("retrieval", ["position", "all"])
def test_tile_retrieval_equals_a_brute_force(retrieval: str) -> None:
    g = torch.Generator().manual_seed(0)
    t, n, d = 4, 6, 5
    train = torch.randn(n * t, d, generator=g)
    queries = torch.randn(7, d, generator=g)
    positions = torch.tensor([0, 1, 2, 3, 0, 2, 1])
    exclude = torch.tensor([0, 5, 2, 2, 1, 3, 4])
    scores, idx = tile_knn(queries, positions, train, t, retrieval, k_image=2, k=3, exclude=exclude)
    for b in range(7):
        rows = [r for r in range(n * t) if r // t != int(exclude[b]) and (retrieval == "all" or r % t == positions[b])]
        dist = sorted((float(torch.dist(queries[b].double(), train[r].double())), r) for r in rows)
        assert [r for _, r in dist[:3]] == idx[b].tolist()
        assert scores[b] == pytest.approx(np.mean([v for v, _ in dist[:2]]), rel=1e-6)


def test_calibration_leaves_out_every_tile_of_the_image(tiled: Spade) -> None:
    """A training image scored with its own tiles in the gallery would score 0 at every tile."""
    cal = tiled.calibration_
    assert cal["method"].startswith("leave-one-out") and len(cal["tile_knn"]) == 6
    assert min(min(row) for row in cal["tile_knn"]) > 0 and min(cal["map_maxima"]) > 0
    own = Spade(**{**TILED, "tile_retrieval": "all"}).fit(TRAIN)
    assert min(min(row) for row in own.calibration_["tile_max"]) > 0


def test_stitching_a_tile_at_a_time_equals_stitching_all_and_leaves_no_seams() -> None:
    grid = make_grid(150, 410, tile=64, overlap=0.3, scale=0.8)
    maps = np.random.default_rng(0).random((len(grid), 64, 64))
    st = Stitcher(grid)
    for i in reversed(range(len(grid))):
        st.add(i, maps[i])
    assert np.allclose(st.result(), stitch(maps, grid), rtol=1e-6)
    flat = stitch(np.full((len(grid), 64, 64), 3.0), grid)
    assert flat.shape == grid.scaled_shape and np.allclose(flat, 3.0, rtol=1e-6)


def test_a_long_image_goes_through_the_backbone_a_chunk_at_a_time() -> None:
    grid = make_grid(400, 3000, tile=32, overlap=0.0, scale=1.0)
    chunks = list(network_inputs([np.zeros((400, 3000, 3), np.uint8)], grid))
    assert len(grid) > 2 * TILE_CHUNK and max(len(c) for c in chunks) == TILE_CHUNK
    assert sum(len(c) for c in chunks) == len(grid)


def test_save_load_and_a_damaged_grid(tiled: Spade, tmp_path: Path) -> None:
    from spade_ad.persistence import header_digest

    folder = tiled.save(tmp_path / "m")
    header = json.loads((folder / "model.json").read_text())
    assert header["tile_grid"] == tiled.grid.to_dict()  # type: ignore[union-attr]
    again = Spade.load(folder)
    imgs = [part(101, defect=True), part(7)]
    a, b = tiled.predict(imgs), again.predict(imgs)
    assert np.array_equal(a.scores, b.scores) and all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps, strict=True))
    for change, message in [({"tile_grid": {**header["tile_grid"], "xs": [0, 1]}}, "tile_grid"),
                            ({"tile_grid": None}, "tile_grid"),
                            ({"calibration": {**header["calibration"], "position_scales": [[1, 1]]}},
                             "position_scales")]:
        bad = {**header, **change}
        bad["header_sha256"] = header_digest({k: v for k, v in bad.items() if k != "header_sha256"})
        (folder / "model.json").write_text(json.dumps(bad))
        with pytest.raises(SpadeError, match=message):
            Spade.load(folder)


@pytest.mark.parametrize("retrieval", ["position", "all"])
def test_add_and_remove_equal_a_refit(retrieval: str) -> None:
    settings = {**TILED, "tile_retrieval": retrieval}
    model = Spade(**settings).fit(TRAIN[:5])
    model.add([TRAIN[5], TRAIN[6]], names=["array[5]", "array[6]"]).remove([1])
    ref = Spade(**settings).fit([TRAIN[i] for i in (0, 2, 3, 4, 5, 6)])
    imgs = [part(101, defect=True)]
    a, b = model.predict(imgs), ref.predict(imgs)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps[0], b.maps[0])
    assert model.image_threshold_ == ref.image_threshold_ and model.pixel_threshold_ == ref.pixel_threshold_
    assert torch.equal(model.global_, ref.global_)


def test_a_click_shows_the_matching_normal_tile(tiled: Spade) -> None:
    pred = tiled.predict([part(101, defect=True)], keep_features=True)
    c = pred.correspondence(0, 20, 30)
    assert c.tile is not None and 0 <= c.neighbour < 7
    assert all(0.0 <= v <= 1.0 for v in c.box_frac) and c.box_frac[0] < c.box_frac[2]
    # the match is the nearest feature of that tile's gallery (brute force over every gallery row)
    grid = tiled.grid
    assert grid is not None
    assert tiled.thumbnail(c.neighbour).shape == (128, 128, 3)
    gallery = pred.tile_neighbours[0]  # type: ignore[index]
    feats = pred.features[0][0]  # type: ignore[index]
    best = min(float(np.sqrt(((tiled.bank_.gather(0, [int(r)])[0].astype(np.float64)[None]
                               - feats[t].astype(np.float64)[:, None]) ** 2).sum(-1)).min())
               for t in range(len(grid)) for r in gallery[t])
    assert c.distance >= best


def test_cli_fits_and_predicts_with_tiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    train = tmp_path / "train"
    train.mkdir()
    for i, img in enumerate(TRAIN):
        Image.fromarray(img).save(train / f"{i}.png")
    Image.fromarray(part(101, defect=True)).save(tmp_path / "bad.png")
    code, _, err = run_cli(["fit", str(train), "--out", str(tmp_path / "m"), "--preset", "highres", "--tile", "64",
                            "--image-size", "64", "--k", "3"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", str(tmp_path / "m"), str(tmp_path / "bad.png"), "--out",
                            str(tmp_path / "o")], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["verdict"] == "defective"
    assert Image.open(tmp_path / "o" / row["mask"]).size == (240, 96)
