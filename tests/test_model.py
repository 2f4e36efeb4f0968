"""The estimator: fit/predict on arrays and folders, exactness against a brute-force pipeline,
save/load reproducibility in a fresh process, and damaged model files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spade_ad import Spade, SpadeError
from spade_ad.correspondence import combine_levels, nn_distances_reference
from spade_ad.errors import NotFittedError
from spade_ad.features import extract

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=3)


@pytest.fixture(scope="module")
def fitted(small_train: Path) -> Spade:
    return Spade(**FAST).fit(small_train / "train" / "good")


def test_predict_shapes_and_sizes(fitted: Spade, small_train: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), rng.integers(0, 255, (90, 40), dtype=np.uint8)]
    res = fitted.predict(imgs)
    assert res.scores.shape == (2,)
    assert [m.shape for m in res.maps] == [(50, 70), (90, 40)]
    assert res.masks is not None and [m.shape for m in res.masks] == [(50, 70), (90, 40)]
    assert res.neighbours.shape == (2, 3)
    assert all(m.dtype == np.float32 for m in res.maps)


def test_predict_equals_brute_force_pipeline(fitted: Spade, small_train: Path) -> None:
    """Every stage recomputed by brute force from the stored bank gives the same maps (rel 1e-4)."""
    files = sorted((small_train / "test" / "scratch").glob("*.png"))[:2]
    res = fitted.predict(files)
    from spade_ad.io import load_image

    net = fitted._net()
    s = fitted.settings
    for i, f in enumerate(files):
        img = load_image(f)
        levels, g = extract(net, [img], fitted.prep, torch.device("cpu"))
        d = torch.cdist(g.double(), fitted.global_.double())[0]
        order = torch.argsort(d, stable=True)
        assert res.scores[i] == pytest.approx(float(d[order[: s.k_image]].mean()), rel=1e-5)
        neigh = order[: s.k].numpy()
        assert list(res.neighbours[i]) == list(neigh)
        lmaps = []
        for li, (h, w) in enumerate(fitted.level_shapes_):
            gal = torch.from_numpy(fitted.bank_.gather(li, neigh).astype(np.float32)).reshape(-1, levels[li].shape[-1])
            lmaps.append(nn_distances_reference(levels[li][0], gal, s.kappa).float().view(1, h, w))
        ref = fitted.prep.map_to_image(combine_levels(lmaps, s.image_size, s.sigma)[0], *img.shape[:2]).numpy()
        rel = np.abs(res.maps[i] - ref) / np.abs(ref)
        assert rel.max() < 1e-4


def test_thresholds_are_calibrated_from_good_images(fitted: Spade) -> None:
    assert fitted.image_threshold_ is not None and fitted.pixel_threshold_ is not None
    cal = fitted.calibration_
    assert cal["n_images"] == 3 and len(cal["image_scores"]) == 3
    assert fitted.image_threshold_ == max(cal["image_scores"])  # quantile 0.99 of 3 values -> the max


def test_save_load_reproduces_predictions_in_a_fresh_process(fitted: Spade, small_train: Path, tmp_path: Path) -> None:
    fitted.save(tmp_path / "m")
    files = sorted((small_train / "test" / "blob").glob("*.png"))
    res = fitted.predict(files)
    np.save(tmp_path / "want.npy", np.stack(res.maps))
    code = (
        "import sys, numpy as np; from spade_ad import Spade;"
        f"m = Spade.load({str(tmp_path / 'm')!r}); r = m.predict({[str(f) for f in files]!r});"
        f"np.save({str(tmp_path / 'got.npy')!r}, np.stack(r.maps)); print(repr(list(r.scores)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert eval(out.stdout.strip()) == [float(s) for s in res.scores]  # noqa: S307
    assert np.array_equal(np.load(tmp_path / "got.npy"), np.load(tmp_path / "want.npy"))
    header = json.loads((tmp_path / "m" / "model.json").read_text())
    assert header["format_version"] == 2 and header["settings"]["k"] == 3
    assert header["weights"].startswith("sha256:")
    assert not any(p.suffix in (".pkl", ".pt", ".pth") for p in (tmp_path / "m").iterdir())


def test_damaged_model_folders(fitted: Spade, tmp_path: Path) -> None:
    d = fitted.save(tmp_path / "m")
    with pytest.raises(SpadeError, match="does not exist"):
        Spade.load(tmp_path / "nope")
    [bank] = d.glob("bank-*.safetensors")
    data = bank.read_bytes()
    bank.write_bytes(data[:-100])
    with pytest.raises(SpadeError, match=r"bank-[0-9a-f]+\.safetensors: checksum mismatch"):
        Spade.load(d)
    with pytest.raises(SpadeError, match=r"bank-[0-9a-f]+\.safetensors: damaged feature bank"):
        Spade.load(d, verify=False)
    bank.write_bytes(data)
    [index] = d.glob("index-*.safetensors")
    index.unlink()
    with pytest.raises(SpadeError, match=r"index-[0-9a-f]+\.safetensors: model file is missing"):
        Spade.load(d)
    fitted.save(d)
    header = json.loads((d / "model.json").read_text())
    header["format_version"] = 99
    from spade_ad.persistence import header_digest

    header["header_sha256"] = header_digest(header)
    (d / "model.json").write_text(json.dumps(header))
    with pytest.raises(SpadeError, match="format version 99 is not supported"):
        Spade.load(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(SpadeError, match=r"model\.json: damaged model header"):
        Spade.load(d)


def test_errors_before_fit_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError, match="not fitted"):
        Spade().predict([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(SpadeError, match="k must be an integer between 1 and"):
        Spade(k=0).fit([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(SpadeError, match="unknown backbone"):
        Spade(backbone="nope").fit([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(SpadeError, match="no image files"):
        Spade().fit(tmp_path)


def test_single_training_image_and_k_larger_than_training_set() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = Spade(k=50, k_image=5, image_size=64).fit([img])
    assert m.image_threshold_ is None  # no leave-one-out possible with one image
    res = m.predict([img, 255 - img])
    assert res.masks is None and res.neighbours.shape == (2, 1)
    # the training image itself matches itself: only the fp16 storage rounding of the bank remains
    assert res.scores[0] == pytest.approx(0.0, abs=1e-4)
    assert res.maps[0].max() < 0.01 * res.maps[1].mean()
    assert res.scores[1] > 1.0


def test_grayscale_rgba_and_mixed_sizes_in_one_training_set() -> None:
    rng = np.random.default_rng(4)
    imgs = [
        rng.integers(0, 255, (64, 64), dtype=np.uint8),
        rng.integers(0, 255, (80, 50, 4), dtype=np.uint8),
        rng.integers(0, 65535, (70, 70), dtype=np.uint16),
    ]
    m = Spade(k=2, k_image=1, image_size=64, calibration_images=2).fit(imgs)
    res = m.predict(imgs)
    assert [x.shape for x in res.maps] == [(64, 64), (80, 50), (70, 70)]


def test_correspondence_points_at_the_matching_place(tmp_path: Path) -> None:
    """A test image that is a training image: each pixel matches itself (same image, same cell)."""
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    m = Spade(k=4, k_image=1, image_size=64, calibration_images=0).fit(imgs)
    res = m.predict([imgs[2]], keep_features=True)
    for y, x in [(0, 0), (10, 37), (63, 63)]:
        c = res.correspondence(0, y, x)
        assert c.neighbour == 2 and c.level == 0 and c.distance < 0.05
        y0, x0, y1, x1 = c.box_pixels(64, 64)
        assert y0 <= y < y1 and x0 <= x < x1
    assert m.correspondence(imgs[2], 10, 37) == res.correspondence(0, 10, 37)
    assert m.thumbnail(2).shape == (128, 128, 3)
    m.save(tmp_path / "m")
    again = Spade.load(tmp_path / "m")
    assert np.array_equal(again.thumbnail(3), m.thumbnail(3))
    with pytest.raises(SpadeError, match="outside the image"):
        res.correspondence(0, 64, 0)
    with pytest.raises(SpadeError, match="keep_features"):
        m.predict([imgs[0]]).correspondence(0, 1, 1)


def test_fitted_state_is_one_object_that_storage_reads_and_writes(fitted: Spade, tmp_path: Path) -> None:
    from spade_ad.persistence import read_state, save_state
    from spade_ad.state import FittedState

    state = fitted.state_
    assert isinstance(state, FittedState)
    assert fitted.bank_ is state.bank and fitted.train_names_ is state.train_names and fitted.offset_ == (
        state.image_threshold)
    save_state(state, tmp_path / "m")  # storage needs no estimator
    back = read_state(tmp_path / "m", {"device": "cpu", "weights": None}, verify=True)
    assert back.train_names == state.train_names and back.image_threshold == state.image_threshold
    assert torch.equal(back.global_, state.global_) and back.level_shapes == state.level_shapes
    with pytest.raises(NotFittedError, match="not fitted"):
        Spade().state_  # noqa: B018
    assert not hasattr(Spade(), "bank_")  # NotFittedError is an AttributeError too (as in scikit-learn)


def test_decision_function_is_the_score_minus_the_threshold(fitted: Spade) -> None:
    imgs = [np.full((64, 64, 3), v, np.uint8) for v in (0, 128)]
    scores = fitted.score_samples(imgs)
    assert np.array_equal(scores, fitted.predict(imgs).scores)
    d = fitted.decision_function(imgs)
    assert fitted.offset_ is not None and np.array_equal(d, scores - fitted.offset_)
    verdicts = [r.verdict for r in fitted.predict(imgs)]
    assert [("defective" if x >= 0 else "good") for x in d] == verdicts  # positive (or 0) = defective


def test_set_params_changes_only_runtime_settings_once_fitted(small_train: Path) -> None:
    model = Spade(**FAST)
    assert model.set_params(k=4).settings.k == 4  # before fit: any setting
    model.fit(small_train / "train" / "good")
    assert model.set_params(batch_size=3).settings.batch_size == 3 == model.state_.settings.batch_size
    with pytest.raises(SpadeError, match="k decide"):
        model.set_params(k=5)
    assert model.settings.k == 4
