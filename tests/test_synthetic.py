"""Tests for the synthetic MVTec-style data set generator."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from spade_ad.synthetic import DEFECT_KINDS, add_defect, make_dataset, render_good


def _files(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


def test_layout_and_counts(default_set: Path) -> None:
    assert default_set.name == "widget"
    expected = {"train/good": 40, "test/good": 10, "test/scratch": 10, "test/blob": 10}
    for sub, n in expected.items():
        names = sorted(p.name for p in (default_set / sub).iterdir())
        assert names == [f"{i:03d}.png" for i in range(n)], sub
    for kind in DEFECT_KINDS:
        masks = sorted(p.name for p in (default_set / "ground_truth" / kind).iterdir())
        assert masks == [f"{i:03d}_mask.png" for i in range(10)]
    assert sorted(p.name for p in (default_set / "ground_truth").iterdir()) == sorted(DEFECT_KINDS)
    assert not list(default_set.rglob("*.tmp")) and not list(default_set.rglob(".*"))


def test_image_and_mask_formats(default_set: Path) -> None:
    for path in default_set.glob("*/*/*.png"):
        with Image.open(path) as im:
            if path.parts[-3] == "ground_truth":
                assert im.mode == "L"
                arr = np.asarray(im)
                assert set(np.unique(arr).tolist()) <= {0, 255}
                img_path = default_set / "test" / path.parent.name / path.name.replace("_mask", "")
                with Image.open(img_path) as img:
                    assert img.size == im.size
            else:
                assert im.mode == "RGB"
                assert im.size == (256, 256)


def test_masks_nonempty_with_plausible_area(default_set: Path) -> None:
    for kind in DEFECT_KINDS:
        for path in (default_set / "ground_truth" / kind).glob("*.png"):
            frac = float((_load(path) > 0).mean())
            assert 0.0005 <= frac <= 0.05, (path, frac)


def test_defects_visible_in_written_images(default_set: Path) -> None:
    """Inside the mask the defect image departs from the typical good image far more than outside."""
    goods = np.stack([_load(p).astype(np.float32) for p in sorted((default_set / "train/good").glob("*.png"))])
    reference = np.median(goods, axis=0)
    for kind in DEFECT_KINDS:
        for path in sorted((default_set / "test" / kind).glob("*.png")):
            mask = _load(default_set / "ground_truth" / kind / path.name.replace(".png", "_mask.png")) > 0
            dev = np.abs(_load(path).astype(np.float32) - reference).mean(axis=-1)
            assert dev[mask].mean() > 2.0 * dev[~mask].mean(), (path, dev[mask].mean(), dev[~mask].mean())


def test_deterministic_byte_identical(tmp_path: Path) -> None:
    kwargs = {"n_train": 4, "n_test_good": 2, "n_test_defect": 4, "size": 128, "seed": 7}
    a = make_dataset(tmp_path / "a", "part", **kwargs)
    b = make_dataset(tmp_path / "b", "part", **kwargs)
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 4 + 2 + 4 + 4
    assert files_a == files_b
    c = make_dataset(tmp_path / "c", "part", **{**kwargs, "seed": 8})
    assert _files(c).keys() == files_a.keys()
    assert all(_files(c)[k] != v for k, v in files_a.items())


def test_images_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    small = make_dataset(tmp_path / "s", n_train=2, n_test_good=1, n_test_defect=2, size=96)
    large = make_dataset(tmp_path / "l", n_train=5, n_test_good=3, n_test_defect=6, size=96)
    for rel, data in _files(small).items():
        assert (large / rel).read_bytes() == data, rel


def test_rerun_overwrites_and_prunes(tmp_path: Path) -> None:
    make_dataset(tmp_path / "r", n_train=5, n_test_good=3, n_test_defect=6, size=96, seed=1)
    (tmp_path / "r" / "widget" / "train" / "good" / "notes.txt").write_text("keep me")
    base = make_dataset(tmp_path / "r", n_train=3, n_test_good=1, n_test_defect=1, size=96, seed=2)
    fresh = make_dataset(tmp_path / "f", n_train=3, n_test_good=1, n_test_defect=1, size=96, seed=2)
    got = _files(base)
    assert got.pop("train/good/notes.txt") == b"keep me"
    assert got == _files(fresh)
    assert sorted(p.name for p in (base / "test" / "scratch").iterdir()) == ["000.png"]
    assert not list((base / "test" / "blob").iterdir())
    assert not list((base / "ground_truth" / "blob").iterdir())


def test_odd_defect_split(tmp_path: Path) -> None:
    base = make_dataset(tmp_path, n_train=1, n_test_good=0, n_test_defect=5, size=64)
    assert len(list((base / "test" / "scratch").iterdir())) == 3
    assert len(list((base / "test" / "blob").iterdir())) == 2
    assert len(list((base / "ground_truth" / "scratch").iterdir())) == 3


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_add_defect_changes_exactly_the_masked_pixels(kind: str) -> None:
    for i in range(12):
        rng = np.random.default_rng((123, i))
        good = render_good(rng, 256)
        before = good.copy()
        bad, mask = add_defect(good, rng, kind)
        assert np.array_equal(good, before), "input image must not be modified"
        assert bad.shape == good.shape and bad.dtype == np.uint8
        assert mask.shape == good.shape[:2] and mask.dtype == bool
        assert 0.0005 <= mask.mean() <= 0.05
        diff = np.abs(bad.astype(np.int16) - good).mean(axis=-1)
        inside, outside = diff[mask].mean(), diff[~mask].mean()
        assert inside > 20.0, inside
        assert inside > 50.0 * outside, (inside, outside)
        # Every changed pixel is in the mask or in its one-pixel anti-aliased fringe.
        assert not (diff > 0)[~ndimage.binary_dilation(mask, iterations=1)].any()
        # Most masked pixels change visibly.
        assert (diff[mask] > 8).mean() > 0.8


def test_good_images_vary_modestly(default_set: Path) -> None:
    goods = [_load(p).astype(np.float32) for p in sorted((default_set / "train/good").glob("*.png"))[:10]]
    mads = [float(np.abs(a - b).mean()) for a, b in itertools.combinations(goods, 2)]
    assert min(mads) > 2.0, "good images should not be copies of one another"
    assert max(mads) < 35.0, "nuisance variation should stay modest"
    # Same part, same place: a mean good image is a close template for every good image.
    template = np.mean(goods, axis=0)
    assert all(float(np.abs(g - template).mean()) < 20.0 for g in goods)


def test_render_good_shape_and_validation() -> None:
    img = render_good(np.random.default_rng(0), 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError):
        render_good(np.random.default_rng(0), 8)
    with pytest.raises(ValueError):
        add_defect(img, np.random.default_rng(0), "crack")
    with pytest.raises(ValueError):
        make_dataset("unused", n_train=-1)
