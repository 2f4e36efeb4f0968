"""Datasets: the MVTec AD layout and a generic folder layout; the evaluation protocols' names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpadeError
from .io import IMAGE_SUFFIXES, list_images, load_image, load_mask

PROTOCOLS = ("full", "paper")
"""full: metrics at each mask's own resolution; paper: the paper's preprocessing (resize, centre crop) and
metrics on the crop (see :mod:`spade_ad.evaluate`)."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise SpadeError(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    return protocol


@dataclass
class TestSample:
    path: Path
    defect_type: str  # "good" for defect-free images
    mask_path: Path | None  # None: no mask file (all pixels normal for good images)

    @property
    def label(self) -> int:
        return 0 if self.defect_type == "good" else 1


@dataclass
class Category:
    name: str
    root: Path
    train: list[Path]
    test: list[TestSample]


def is_mvtec_category(path: Path) -> bool:
    return (path / "train" / "good").is_dir() or ((path / "train").is_dir() and (path / "test").is_dir())


def find_categories(data: str | Path) -> list[Path]:
    """``data`` is one MVTec-layout category folder or a root holding several."""
    root = Path(data)
    if not root.is_dir():
        raise SpadeError(f"{root}: dataset folder does not exist")
    if is_mvtec_category(root):
        return [root]
    cats = sorted(p for p in root.iterdir() if p.is_dir() and is_mvtec_category(p))
    if not cats:
        raise SpadeError(
            f"{root}: no MVTec-layout category here (expected {root}/train/good or {root}/<category>/train/good)"
        )
    return cats


def _mask_for(gt_dir: Path, image: Path) -> Path | None:
    for cand in (f"{image.stem}_mask", image.stem):
        for suffix in IMAGE_SUFFIXES:
            p = gt_dir / f"{cand}{suffix}"
            if p.is_file():
                return p
    return None


def load_mvtec_category(path: str | Path) -> Category:
    root = Path(path)
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise SpadeError(f"{root}: category has no train/good folder")
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise SpadeError(f"{root}: category has no test folder")
    train = list_images(train_dir)
    test: list[TestSample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        files = list_images(defect_dir)
        for f in files:
            mask = None
            if defect_dir.name != "good":
                mask = _mask_for(root / "ground_truth" / defect_dir.name, f)
                if mask is None:
                    raise SpadeError(f"{f}: no ground-truth mask in {root / 'ground_truth' / defect_dir.name}")
            test.append(TestSample(f, defect_dir.name, mask))
    if not test:
        raise SpadeError(f"{test_dir}: no test images")
    return Category(root.name, root, train, test)


def load_folder_dataset(train_dir: str | Path, test_dirs: dict[str, Path], masks_dir: Path | None) -> Category:
    """Generic layout: good images in ``train_dir``; test folders by label ("good" = defect-free);
    optional ``masks_dir`` with masks matched by file stem (``stem.png`` or ``stem_mask.png``)."""
    train = list_images(train_dir)
    test: list[TestSample] = []
    for label, d in test_dirs.items():
        for f in list_images(d):
            mask = _mask_for(masks_dir, f) if masks_dir is not None and label != "good" else None
            test.append(TestSample(f, label, mask))
    return Category(Path(train_dir).name, Path(train_dir), train, test)


def load_sample(sample: TestSample) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, ground-truth mask HxW bool; all False for a defect-free image)."""
    img = load_image(sample.path)
    return img, load_truth(sample, img.shape[:2])


def load_truth(sample: TestSample, shape: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask of ``sample`` for an image of ``shape`` (all False without a mask file)."""
    return load_mask(sample.mask_path, shape) if sample.mask_path else np.zeros(shape, bool)
