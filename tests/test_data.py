"""Dataset layouts: every mask belongs to exactly one test image (generic and MVTec layouts), lossy masks are
refused, and defect-free folders are recognised in any case."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad.data import load_categories, load_folder_category, load_mvtec_category
from spade_ad.errors import SpadeError


def _png(path: Path, value: int = 128, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mask(path: Path, box: tuple[int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[box[0] : box[1], box[0] : box[1]] = 255
    Image.fromarray(m).save(path)
    return path


def _generic(root: Path, good: str = "good") -> Path:
    """good/ (2), test/<good> (2), test/broken_large/000..003, test/contamination/000..003; no masks yet."""
    for i in range(2):
        _png(root / "good" / f"t{i}.png", 100 + i)
        _png(root / "test" / good / f"g{i}.png", 110 + i)
    for kind in ("broken_large", "contamination"):
        for i in range(4):
            _png(root / "test" / kind / f"{i:03d}.png", 150 + i)
    return root


def _message(exc: pytest.ExceptionInfo[SpadeError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_flat_masks_shared_by_two_defect_folders_are_refused(tmp_path: Path) -> None:
    root = _generic(tmp_path / "parts")
    for i in range(4):  # broken_large's masks only: contamination/000.png would be scored against them
        _mask(root / "masks" / f"{i:03d}_mask.png", (0, 4 + i))
    with pytest.raises(SpadeError) as exc:
        load_categories(root)
    text = _message(exc)
    assert text.startswith(f"{root / 'masks' / '000_mask.png'}: the mask of several test images")
    assert str(root / "test" / "broken_large" / "000.png") in text
    assert str(root / "test" / "contamination" / "000.png") in text
    assert f"{root / 'masks'}/<type>/" in text


def test_masks_per_defect_type_mirror_the_test_folders(tmp_path: Path) -> None:
    root = _generic(tmp_path / "parts")
    for kind, start in (("broken_large", 0), ("contamination", 8)):
        for i in range(4):
            _mask(root / "masks" / kind / f"{i:03d}_mask.png", (start, start + 2 + i))
    cat = load_folder_category(root)
    defective = [s for s in cat.test if s.label]
    assert len(defective) == 8 and len(cat.test) == 10
    for s in defective:
        assert s.mask_path == root / "masks" / s.defect_type / f"{s.path.stem}_mask.png"
    # a per-type folder without a test folder, or a mask beside the folders, is an error
    _mask(root / "masks" / "scratch" / "000_mask.png", (0, 2))
    with pytest.raises(SpadeError, match=re.escape(f"{root / 'masks' / 'scratch'}: masks for a defect type")):
        load_folder_category(root)
    (root / "masks" / "scratch" / "000_mask.png").unlink()
    (root / "masks" / "scratch").rmdir()
    _mask(root / "masks" / "000_mask.png", (0, 2))
    with pytest.raises(SpadeError, match=re.escape(f"{root / 'masks' / '000_mask.png'}: a mask beside")):
        load_folder_category(root)


def test_a_mask_of_no_test_image_and_two_masks_of_one_image_are_errors(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    _png(root / "good" / "t.png")
    _png(root / "test" / "good" / "g.png")
    _png(root / "test" / "dent" / "a.png")
    _mask(root / "masks" / "a_mask.png", (0, 3))
    _mask(root / "masks" / "b_mask.png", (0, 3))  # no test image b
    with pytest.raises(SpadeError) as exc:
        load_folder_category(root)
    assert _message(exc).startswith(f"{root / 'masks' / 'b_mask.png'}: a mask that matches no defective test image")
    (root / "masks" / "b_mask.png").unlink()
    _mask(root / "masks" / "a.png", (0, 3))
    with pytest.raises(SpadeError, match=re.escape(f"{root / 'test' / 'dent' / 'a.png'}: several masks match it")):
        load_folder_category(root)
    (root / "masks" / "a.png").unlink()
    assert load_folder_category(root).test[0].mask_path == root / "masks" / "a_mask.png"


def test_jpeg_masks_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "parts"
    _png(root / "good" / "t.png")
    _png(root / "test" / "good" / "g.png")
    _png(root / "test" / "dent" / "a.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:9, 4:9] = 255
    (root / "masks").mkdir()
    Image.fromarray(m).save(root / "masks" / "a_mask.jpg")
    with pytest.raises(SpadeError) as exc:
        load_folder_category(root)
    assert _message(exc).startswith(f"{root / 'masks' / 'a_mask.jpg'}: masks saved as JPEG are refused")


def test_mvtec_ground_truth_gets_the_same_checks(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    _png(root / "train" / "good" / "t.png")
    _png(root / "test" / "good" / "000.png")
    _png(root / "test" / "crack" / "000.png")
    _mask(root / "ground_truth" / "crack" / "000_mask.png", (0, 3))
    assert [s.mask_path for s in load_mvtec_category(root).test if s.label] == [
        root / "ground_truth" / "crack" / "000_mask.png"]
    _mask(root / "ground_truth" / "crack" / "001_mask.png", (0, 3))  # no test image 001
    with pytest.raises(SpadeError, match=re.escape(f"{root / 'ground_truth' / 'crack' / '001_mask.png'}: a mask")):
        load_mvtec_category(root)
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    _mask(root / "ground_truth" / "hole" / "000_mask.png", (0, 3))  # no test/hole
    with pytest.raises(SpadeError, match=re.escape(f"{root / 'ground_truth' / 'hole'}: masks for a defect type")):
        load_mvtec_category(root)
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    Image.open(root / "ground_truth" / "crack" / "000_mask.png").save(root / "ground_truth" / "crack" / "000.jpg")
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(SpadeError, match="masks saved as JPEG are refused"):
        load_mvtec_category(root)


@pytest.mark.parametrize("good", ["Good", "GOOD"])
def test_good_folders_in_any_case(tmp_path: Path, good: str) -> None:
    root = _generic(tmp_path / "parts", good=good)
    for kind in ("broken_large", "contamination"):
        for i in range(4):
            _mask(root / "masks" / kind / f"{i:03d}.png", (0, 3))
    cat = load_categories(root)[0]
    assert sorted({s.defect_type for s in cat.test}) == ["broken_large", "contamination", "good"]
    assert sum(1 for s in cat.test if s.label == 0) == 2
    assert all(s.mask_path is None for s in cat.test if s.label == 0)
    # MVTec layout too: train/<good> and test/<good>
    mv = tmp_path / "cat"
    _png(mv / "train" / good / "t.png")
    _png(mv / "test" / good / "000.png")
    _png(mv / "test" / "crack" / "000.png")
    _mask(mv / "ground_truth" / "crack" / "000_mask.png", (0, 3))
    assert [s.label for s in load_categories(mv)[0].test] == [0, 1]
    # two defect-free folders differing only in case are refused by name
    _png(mv / "test" / "good" / "001.png")
    if (mv / "test" / "good").samefile(mv / "test" / good):
        return  # a case-insensitive file system: they are one folder
    with pytest.raises(SpadeError, match="several folders of defect-free test images"):
        load_mvtec_category(mv)
