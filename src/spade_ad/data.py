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

LAYOUTS = ("auto", "mvtec", "folder")
"""Dataset layouts: auto (detect), mvtec (``train/good``, ``test/<defect>``, ``ground_truth/<defect>``; one
category or a root of several), folder (generic: ``good/`` or ``train/good``, ``test/<label>``, optional
``masks/``; see :func:`load_folder_category`)."""


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


def find_categories(data: str | Path, also: str = "") -> list[Path]:
    """``data`` is one MVTec-layout category folder or a root holding several.

    ``also`` is appended to the error raised when there is none (e.g. another layout that was looked for).
    """
    root = Path(data)
    if not root.is_dir():
        raise SpadeError(f"{root}: dataset folder does not exist")
    if is_mvtec_category(root):
        return [root]
    cats = sorted(p for p in root.iterdir() if p.is_dir() and is_mvtec_category(p))
    if not cats:
        raise SpadeError(
            f"{root}: no MVTec-layout category here (expected {root}/train/good or {root}/<category>/train/good)"
            + also
        )
    return cats


def _folder_train_dir(root: Path) -> Path | None:
    for d in (root / "good", root / "train" / "good"):
        if d.is_dir():
            return d
    return None


def is_folder_dataset(path: Path) -> bool:
    """The generic layout (rather than MVTec's): a ``test/`` folder, training images in ``good/``, or
    training images in ``train/good`` with masks in ``masks/`` and no ``ground_truth/``."""
    if not (path / "test").is_dir():
        return False
    if (path / "good").is_dir():
        return True
    return (path / "train" / "good").is_dir() and (path / "masks").is_dir() and not (path / "ground_truth").is_dir()


def load_folder_category(path: str | Path) -> Category:
    """A generic folder as one category, read by :func:`load_folder_dataset`::

        root/good/ (or root/train/good/)   defect-free training images
        root/test/good/                    defect-free test images
        root/test/<label>/                 defective test images, one folder per kind (any name)
        root/masks/                        optional: masks named <stem>.png or <stem>_mask.png

    With ``masks/``, every defective test image needs its mask; without it the pixel metrics are undefined.
    """
    root = Path(path)
    if not root.is_dir():
        raise SpadeError(f"{root}: dataset folder does not exist")
    train_dir = _folder_train_dir(root)
    if train_dir is None:
        raise SpadeError(f"{root}: generic folder has no good/ (or train/good/) folder of training images")
    test_root = root / "test"
    test_dirs = {d.name: d for d in sorted(test_root.iterdir()) if d.is_dir()} if test_root.is_dir() else {}
    if not test_dirs:
        raise SpadeError(f"{root}: generic folder has no test/<label>/ folders (test/good/, test/<defect>/)")
    masks_dir = root / "masks" if (root / "masks").is_dir() else None
    cat = load_folder_dataset(train_dir, test_dirs, masks_dir)
    if masks_dir is not None:
        for s in cat.test:
            if s.label and s.mask_path is None:
                raise SpadeError(f"{s.path}: no mask in {masks_dir} ({s.path.stem}.png or {s.path.stem}_mask.png)")
    return Category(root.name, root, cat.train, cat.test)


def resolve_layout(data: str | Path, layout: str = "auto") -> str:
    """``mvtec`` or ``folder``: ``layout`` itself, or for ``auto`` the one :func:`is_folder_dataset` tells."""
    if layout not in LAYOUTS:
        raise SpadeError(f"unknown layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    root = Path(data)
    return "folder" if root.is_dir() and is_folder_dataset(root) else "mvtec"


def load_categories(data: str | Path, layout: str = "auto") -> list[Category]:
    """The categories of ``data`` in ``layout`` (one of :data:`LAYOUTS`; ``auto`` tells them apart)."""
    root = Path(data)
    if resolve_layout(root, layout) == "folder":
        return [load_folder_category(root)]
    also = "" if layout == "mvtec" else f", nor a generic folder ({root}/good or {root}/train/good, and {root}/test)"
    return [load_mvtec_category(p) for p in find_categories(root, also)]


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
