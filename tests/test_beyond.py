"""Options beyond the paper (levels, aggregation, image score, aspect-preserving input) and presets.

Each option is checked against a brute-force recomputation of the whole pipeline from the stored bank:
the raw timm features, aggregated by explicit loops, the global kNN by cdist, every level's map by the
float64 reference search, then the image score by its definition.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from spade_ad import Spade, SpadeError, SpadeSettings
from spade_ad.correspondence import combine_levels, nn_distances_reference
from spade_ad.io import load_image, save_png
from spade_ad.preprocess import MAX_ASPECT, aspect_shape, is_aspect_shape
from spade_ad.settings import PRESETS

SMALL = dict(k=3, k_image=2, image_size=64, calibration_images=4)


def _aggregate_by_loops(f: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> each position the mean of the p x p neighbourhood positions inside the map."""
    c, h, w = f.shape
    out = torch.empty_like(f, dtype=torch.float64)
    r = p // 2
    for y in range(h):
        for x in range(w):
            out[:, y, x] = f[:, max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].double().mean(dim=(1, 2))
    return out


def _brute_force(model: Spade, files: list[Path]) -> tuple[list[float], list[np.ndarray]]:
    """Scores and image-frame maps of ``files``, recomputed from scratch (float64 where it matters)."""
    net, s, prep = model._net(), model.settings, model.prep
    scores, maps = [], []
    for f in files:
        img = load_image(f)
        x = net.normalise(prep.to_input(img)[None])
        with torch.no_grad():
            feats = net.body(x)
        g = feats[-1].double().mean(dim=(2, 3))
        d = torch.cdist(g, model.global_.double())[0]
        order = torch.argsort(d, stable=True)
        knn = float(d[order[: s.k_image]].mean())
        neigh = order[: s.k].numpy()
        lmaps = []
        for li, lvl in enumerate(s.level_indices):
            q = _aggregate_by_loops(feats[lvl][0], s.aggregate) if s.aggregate > 1 else feats[lvl][0].double()
            h, w = model.level_shapes_[li]
            assert q.shape[1:] == (h, w)
            q = q.permute(1, 2, 0).reshape(h * w, -1)
            gal = torch.from_numpy(model.bank_.gather(li, neigh).astype(np.float64)).reshape(-1, q.shape[1])
            lmaps.append(nn_distances_reference(q.float(), gal.float(), s.kappa).float().view(1, h, w))
        m_in = combine_levels(lmaps, prep.input_shape, s.sigma)[0]
        top = float(m_in.max())
        if s.image_score == "knn":
            scores.append(knn)
        elif s.image_score == "max":
            scores.append(top)
        else:
            sk, sm = model.calibration_["score_scales"]
            scores.append(knn / sk + top / sm)
        maps.append(prep.map_to_image(m_in, *img.shape[:2]).numpy())
    return scores, maps


@pytest.mark.parametrize("options", [
    dict(levels="1,2", aggregate=3, image_score="combined"),
    dict(levels="0", aggregate=5, image_score="max"),
    dict(levels="0,2", backbone="efficientnet_lite1"),
    dict(preprocess="aspect", levels="0,1", aggregate=3),
])
def test_options_equal_the_brute_force_pipeline(options: dict, tmp_path: Path) -> None:
    """Each option changes exactly what it says: scores and maps agree with the pipeline recomputed by hand."""
    from spade_ad.synthetic import make_dataset

    aspect = options.get("preprocess") == "aspect"
    root = make_dataset(tmp_path, n_train=8, n_test_good=1, n_test_defect=2, size=160 if aspect else 96, seed=3)
    if aspect:  # elongated parts: 64 x 160 strips of the synthetic images
        for f in root.rglob("*.png"):
            save_png(f, load_image(f)[48:112])
    model = Spade(**SMALL, **options).fit(root / "train" / "good")
    files = sorted((root / "test").rglob("*.png"))[:3]
    pred = model.predict(files)
    ref_scores, ref_maps = _brute_force(model, files)
    assert len(model.level_shapes_) == len(model.settings.level_indices) == model.bank_.n_levels
    for i in range(len(files)):
        assert pred.scores[i] == pytest.approx(ref_scores[i], rel=1e-4)
        assert pred.maps[i].shape == load_image(files[i]).shape[:2]
        assert np.abs(pred.maps[i] - ref_maps[i]).max() <= 1e-4 * np.abs(ref_maps[i]).max()
    if options.get("preprocess") == "aspect":
        assert model.input_shape_ == aspect_shape(64, [(64, 160)] * 8) == (64, 160)
        assert pred.input_maps[0].shape == (64, 160)
    again = Spade.load(model.save(tmp_path / "m")).predict(files)  # the options travel with the model
    assert np.array_equal(again.scores, pred.scores) and all(map(np.array_equal, again.maps, pred.maps))


def test_image_score_rules_on_one_model(small_train: Path) -> None:
    """``max`` is the input-frame map's maximum; ``combined`` is knn/median + max/median of the calibration."""
    files = sorted((small_train / "test").rglob("*.png"))[:4]
    knn = Spade(**SMALL).fit(small_train / "train" / "good")
    mx = Spade(**SMALL, image_score="max").fit(small_train / "train" / "good")
    both = Spade(**SMALL, image_score="combined").fit(small_train / "train" / "good")
    pk, pm, pc = knn.predict(files), mx.predict(files), both.predict(files)
    assert np.array_equal(pm.scores, np.array([m.max() for m in pm.input_maps], dtype=np.float32))
    assert all(map(np.array_equal, pk.maps, pm.maps)) and all(map(np.array_equal, pk.maps, pc.maps))
    cal = both.calibration_
    sk, sm = cal["score_scales"]
    assert sk == pytest.approx(float(np.median(knn.calibration_["image_scores"])))
    assert sm == pytest.approx(float(np.median(cal["map_maxima"])))
    want = pk.scores.astype(np.float64) / sk + pm.scores.astype(np.float64) / sm
    np.testing.assert_allclose(pc.scores, want, rtol=1e-6)
    assert mx.image_threshold_ == mx.pixel_threshold_  # both are the same quantile of the same maxima


def test_aspect_shape_rule() -> None:
    assert aspect_shape(224, [(500, 1250)] * 3) == (224, 576)  # 224 * 2.5 = 560 -> 576 (a multiple of 32)
    assert aspect_shape(224, [(1250, 500), (1000, 500), (1300, 500)]) == (576, 224)
    assert aspect_shape(224, [(900, 900)]) == (224, 224)
    assert aspect_shape(100, [(10, 1000)]) == (100, round(100 * MAX_ASPECT / 32) * 32)  # clipped
    for size in (32, 100, 120, 224, 1024):  # a stored input shape is checked against the same rule
        for ratio in (0.1, 0.4, 1.0, 1.3, 2.5, 9.0):
            assert is_aspect_shape(size, aspect_shape(size, [(round(1000 * ratio), 1000)]))
    assert not is_aspect_shape(64, (64, 100)) and not is_aspect_shape(64, (64, 1024))
    assert not is_aspect_shape(64, (60, 128))


def test_accurate_keeps_proportions_and_equals_its_square_resize_on_square_images() -> None:
    assert PRESETS["accurate"]["preprocess"] == "aspect"
    rng = np.random.default_rng(3)
    train = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(5)]
    test = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8), rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)]
    small = dict(image_size=64, k=3, k_image=2, calibration_images=3)
    kept = Spade(preset="accurate", **small).fit(train)
    squashed = Spade(preset="accurate", preprocess="resize", **small).fit(train)
    assert kept.input_shape_ == squashed.input_shape_ == (64, 64)
    a, b = kept.predict(test), squashed.predict(test)
    assert np.array_equal(a.scores, b.scores) and all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps, strict=True))
    wide = Spade(preset="accurate", **small).fit([np.resize(t, (40, 100, 3)) for t in train])
    assert wide.input_shape_ == (64, 160)  # elongated parts keep their proportions


def test_presets_are_named_settings_and_explicit_settings_win(tmp_path: Path, small_train: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name, values in PRESETS.items():
        s = SpadeSettings.from_preset(name)
        assert s.preset == name and all(getattr(s, k) == v for k, v in values.items())
    acc = Spade(preset="accurate", k=7)
    assert acc.settings.k == 7 and acc.settings.preset == "accurate"
    assert acc.settings.aggregate == PRESETS["accurate"]["aggregate"] and acc.settings.image_size == 320
    assert Spade().settings == SpadeSettings()  # the paper preset is the default
    with pytest.raises(SpadeError, match="unknown preset"):
        SpadeSettings.from_preset("best")
    with pytest.raises(SpadeError, match="preset="):
        Spade(SpadeSettings(), preset="fast")
    code, _, err = run_cli(["fit", str(small_train / "train" / "good"), "--out", str(tmp_path / "m"),
                            "--preset", "fast", "--k", "4", "--image-size", "64", "--calibration-images", "3"], capsys)
    assert code == 0, err
    stored = json.loads((tmp_path / "m" / "model.json").read_text())["settings"]
    assert stored["preset"] == "fast" and stored["k"] == 4 and stored["levels"] == PRESETS["fast"]["levels"]
    assert Spade.load(tmp_path / "m").settings.aggregate == PRESETS["fast"]["aggregate"]


def test_models_saved_before_these_settings_load_with_the_papers_values(tmp_path: Path, small_train: Path) -> None:
    from spade_ad.persistence import header_digest

    model = Spade(**SMALL).fit(small_train / "train" / "good")
    folder = model.save(tmp_path / "m")
    header = json.loads((folder / "model.json").read_text())
    for key in ("preset", "levels", "aggregate", "image_score", "tile", "tile_overlap", "tile_scale", "tile_span",
                "tile_retrieval", "tile_pool"):
        del header["settings"][key]
    del header["input_shape"], header["tile_grid"]
    header["header_sha256"] = header_digest({k: v for k, v in header.items() if k != "header_sha256"})
    (folder / "model.json").write_text(json.dumps(header))
    old = Spade.load(folder)
    assert old.settings == model.settings and old.input_shape_ == (64, 64)
    files = sorted((small_train / "test").rglob("*.png"))[:2]
    assert np.array_equal(old.predict(files).scores, model.predict(files).scores)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("aggregate", 2, "aggregate must be odd"),
    ("aggregate", 11, "aggregate must be an integer between 1 and 9"),
    ("levels", "3", "unknown levels"),
    ("image_score", "mean", "unknown image_score"),
    ("preprocess", "tile", "unknown preprocess"),
])
def test_bad_option_values_are_refused(option: str, value: object, message: str) -> None:
    with pytest.raises(SpadeError, match=message):
        SpadeSettings(**{option: value})


def test_damaged_score_scales_or_input_shape_are_refused(tmp_path: Path, small_train: Path) -> None:
    from spade_ad.persistence import header_digest

    folder = Spade(**SMALL, image_score="combined").fit(small_train / "train" / "good").save(tmp_path / "m")
    good = json.loads((folder / "model.json").read_text())
    for key, value, message in [("calibration", {**good["calibration"], "score_scales": [0, 1]}, "score_scales"),
                                ("input_shape", [64, 128], "input_shape")]:
        header = {**good, key: value}
        header["header_sha256"] = header_digest({k: v for k, v in header.items() if k != "header_sha256"})
        (folder / "model.json").write_text(json.dumps(header))
        with pytest.raises(SpadeError, match=message):
            Spade.load(folder)


def test_scores_and_maps_do_not_depend_on_the_batch(small_train: Path) -> None:
    """Bit for bit: an image's map and score are the same whether scored alone or with others."""
    model = Spade(**SMALL).fit(small_train / "train" / "good")
    files = sorted((small_train / "test").rglob("*.png"))
    together = model.set_params(batch_size=16).predict(files)
    alone = model.set_params(batch_size=1).predict(files)
    pairs = model.set_params(batch_size=2).predict(files[::-1])
    assert np.array_equal(together.scores, alone.scores) and np.array_equal(together.scores, pairs.scores[::-1])
    assert all(map(np.array_equal, together.maps, alone.maps))
    assert all(map(np.array_equal, together.maps, pairs.maps[::-1]))
