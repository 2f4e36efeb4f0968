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

LAYOUTS = ("auto", "mvtec", "folder", "csv")
"""Dataset layouts: auto (detect), mvtec (``train/good``, ``test/<defect>``, ``ground_truth/<defect>``; one
category or a root of several), folder (generic: ``good/`` or ``train/good``, ``test/<label>``, optional
``masks/``; see :func:`load_folder_category`), csv (a manifest file: :func:`load_csv_category`)."""


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
        return 0 if self.defect_type == GOOD else 1


@dataclass
class Category:
    name: str
    root: Path
    train: list[Path]
    test: list[TestSample]


GOOD = "good"
"""The defect-free folders' name (``train/good``, ``test/good``), recognised in any case (``Good``, ``GOOD``)."""

LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg")
"""Mask files refused: JPEG's compression noise around a defect's edges reads as extra defect pixels (4% more
on a bottle mask at Pillow's default quality, far more on thin defects), which silently shifts every pixel
metric; masks are read as non-zero = defect, so a lossless format keeps them exact."""


def _child_dir(parent: Path, name: str) -> Path | None:
    """The folder ``parent/name``, its name matched in any case; an error names them if several match."""
    if not parent.is_dir():
        return None
    hits = sorted(d for d in parent.iterdir() if d.name.lower() == name.lower() and d.is_dir())
    if len(hits) > 1:
        names = ", ".join(d.name for d in hits)
        raise SpadeError(f"{parent}: several folders named {name!r} in different cases ({names}); keep one")
    return hits[0] if hits else None


def _label(folder: Path) -> str:
    """A test folder's defect type: ``good`` for the defect-free one (in any case), else the folder's name."""
    return GOOD if folder.name.lower() == GOOD else folder.name


def is_mvtec_category(path: Path) -> bool:
    return (path / "train").is_dir() and (_child_dir(path / "train", GOOD) is not None or (path / "test").is_dir())


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
    good = _child_dir(root, GOOD)
    if good is not None:
        return good
    return _child_dir(root / "train", GOOD)


def is_folder_dataset(path: Path) -> bool:
    """The generic layout (rather than MVTec's): a ``test/`` folder, training images in ``good/``, or
    training images in ``train/good`` with masks in ``masks/`` and no ``ground_truth/``."""
    if not (path / "test").is_dir():
        return False
    if _child_dir(path, GOOD) is not None:
        return True
    return (_child_dir(path / "train", GOOD) is not None and (path / "masks").is_dir()
            and not (path / "ground_truth").is_dir())


def load_folder_category(path: str | Path) -> Category:
    """A generic folder as one category::

        root/good/ (or root/train/good/)   defect-free training images
        root/test/good/                    defect-free test images (``good`` in any case)
        root/test/<label>/                 defective test images, one folder per kind (any name)
        root/masks/<label>/                optional: masks named <stem>_mask.png or <stem>.png, mirroring test/
        root/masks/                        or all masks in one folder, when no stem occurs in two test folders

    With masks, every defective test image needs its mask and every mask belongs to exactly one defective
    test image (see :func:`match_masks`); without them the pixel metrics are undefined.
    """
    root = Path(path)
    if not root.is_dir():
        raise SpadeError(f"{root}: dataset folder does not exist")
    train_dir = _folder_train_dir(root)
    if train_dir is None:
        raise SpadeError(f"{root}: generic folder has no good/ (or train/good/) folder of training images")
    test_root = root / "test"
    test_dirs = sorted(d for d in test_root.iterdir() if d.is_dir()) if test_root.is_dir() else []
    if not test_dirs:
        raise SpadeError(f"{root}: generic folder has no test/<label>/ folders (test/good/, test/<defect>/)")
    tests = _test_images(test_root, test_dirs)
    defects = {t: files for t, files in tests.items() if t != GOOD}
    masks_dir = root / "masks"
    masks: dict[Path, Path] = {}
    if masks_dir.is_dir():
        if any(d.is_dir() for d in masks_dir.iterdir()):
            masks = _masks_by_type(masks_dir, defects)
        else:
            masks = match_masks(list_images(masks_dir), [f for fs in defects.values() for f in fs], masks_dir,
                                 f": put each defect type's masks in {masks_dir}/<type>/ (mirroring test/<type>/)")
    test = [TestSample(f, t, masks.get(f)) for t, files in tests.items() for f in files]
    return Category(root.name, root, list_images(train_dir), test)


def _test_images(test_root: Path, dirs: list[Path]) -> dict[str, list[Path]]:
    """The images of each test folder by defect type (:func:`_label`); ``good`` once, in whatever case."""
    out: dict[str, list[Path]] = {}
    for d in dirs:
        label = _label(d)
        if label in out:
            names = ", ".join(x.name for x in dirs if _label(x) == label)
            raise SpadeError(f"{test_root}: several folders of defect-free test images ({names}); keep one")
        out[label] = list_images(d)
    return out


def match_masks(masks: list[Path], images: list[Path], folder: Path, advice: str = "") -> dict[Path, Path]:
    """Each of ``images`` (defective test images) to its mask among ``masks`` (files of ``folder``), by name:
    ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. A mask must belong to exactly one image and every image needs
    exactly one mask; masks saved as JPEG are refused (:data:`LOSSY_MASK_SUFFIXES`). ``advice`` ends the
    error for a mask that several images claim."""
    for m in masks:
        if m.suffix.lower() in LOSSY_MASK_SUFFIXES:
            raise SpadeError(f"{m}: masks saved as JPEG are refused (its compression noise would count as defect "
                             "pixels); save the masks losslessly, e.g. as PNG")
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem, []).append(m)
    claims = {img: [m for stem in (f"{img.stem}_mask", img.stem) for m in by_stem.get(stem, [])] for img in images}
    owners: dict[Path, list[Path]] = {}
    for img, found in claims.items():
        for m in found:
            owners.setdefault(m, []).append(img)
    for m, imgs in owners.items():
        if len(imgs) > 1:
            raise SpadeError(f"{m}: the mask of several test images ({', '.join(map(str, imgs))}){advice}")
    for img, found in claims.items():
        if len(found) > 1:
            raise SpadeError(f"{img}: several masks match it ({', '.join(map(str, found))}); keep one")
        if not found:
            raise SpadeError(f"{img}: no mask in {folder} ({img.stem}_mask.png or {img.stem}.png)")
    unused = sorted(set(masks) - set(owners))
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise SpadeError(f"{unused[0]}: a mask that matches no defective test image{more}; remove it or name it "
                         "<stem>_mask.png after its image")
    return {img: found[0] for img, found in claims.items()}


def _masks_by_type(gt_root: Path, defects: dict[str, list[Path]]) -> dict[Path, Path]:
    """Masks in ``gt_root/<type>/`` for the defective test images of each type (``defects``); a folder there
    with no test folder of its name holding masks, or a mask file beside the folders, is an error (``good`` is
    skipped: defect-free images have no masks)."""
    for d in sorted(gt_root.iterdir()):
        if d.is_dir() and d.name not in defects and _label(d) != GOOD and any(
                f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()):
            raise SpadeError(f"{d}: masks for a defect type with no test/{d.name}/ folder")
        if d.is_file() and d.suffix.lower() in IMAGE_SUFFIXES:
            raise SpadeError(f"{d}: a mask beside the per-type folders of {gt_root}; put it in {gt_root}/<type>/ "
                             "(mirroring test/<type>/)")
    out: dict[Path, Path] = {}
    for label, images in defects.items():
        folder = gt_root / label
        if not folder.is_dir():
            raise SpadeError(f"{images[0]}: no mask folder {folder} for test/{label}/")
        out.update(match_masks(list_images(folder), images, folder))
    return out


def resolve_layout(data: str | Path, layout: str = "auto") -> str:
    """``mvtec`` or ``folder``: ``layout`` itself, or for ``auto`` the one :func:`is_folder_dataset` tells."""
    if layout not in LAYOUTS:
        raise SpadeError(f"unknown layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    root = Path(data)
    if root.suffix.lower() == ".csv" and not root.is_dir():
        return "csv"
    return "folder" if root.is_dir() and is_folder_dataset(root) else "mvtec"


def load_categories(data: str | Path, layout: str = "auto") -> list[Category]:
    """The categories of ``data`` in ``layout`` (one of :data:`LAYOUTS`; ``auto`` tells them apart)."""
    root = Path(data)
    resolved = resolve_layout(root, layout)
    if resolved == "csv":
        return [load_csv_category(root)]
    if resolved == "folder":
        return [load_folder_category(root)]
    also = "" if layout == "mvtec" else f", nor a generic folder ({root}/good or {root}/train/good, and {root}/test)"
    return [load_mvtec_category(p) for p in find_categories(root, also)]


def load_mvtec_category(path: str | Path) -> Category:
    """An MVTec-layout category: ``train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``."""
    root = Path(path)
    train_dir = _child_dir(root / "train", GOOD)
    if train_dir is None:
        raise SpadeError(f"{root}: category has no train/good folder")
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise SpadeError(f"{root}: category has no test folder")
    tests = _test_images(test_dir, sorted(p for p in test_dir.iterdir() if p.is_dir()))
    if not tests:
        raise SpadeError(f"{test_dir}: no test images")
    defects = {t: files for t, files in tests.items() if t != GOOD}
    gt = root / "ground_truth"
    if defects and not gt.is_dir():
        raise SpadeError(f"{root}: category has no ground_truth folder (the masks of test/<type>/ images)")
    masks = _masks_by_type(gt, defects) if gt.is_dir() else {}
    test = [TestSample(f, t, masks.get(f)) for t, files in tests.items() for f in files]
    return Category(root.name, root, list_images(train_dir), test)


CSV_COLUMNS = ("image", "split", "label", "mask")


def load_csv_category(path: str | Path) -> Category:
    """A category listed in a CSV manifest (for data not arranged in folders), one row per image::

        image,split,label,mask
        parts/a.png,train,good,
        parts/b.png,test,good,
        parts/c.png,test,scratch,masks/c.png

    ``split`` is ``train`` (good images to fit on) or ``test``; ``label`` is ``good`` or the defect type;
    ``mask`` (optional column and value) a defective test image's mask, any non-zero pixel a defect. Paths are
    relative to the CSV's folder (absolute ones are taken as they are). Every problem is one line naming the
    CSV file and its line.
    """
    import csv

    src = Path(path)
    try:
        with open(src, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))  # (the line the row ends on: rows may span lines)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SpadeError(f"{src}: cannot read the CSV manifest ({exc})") from None
    missing = [c for c in CSV_COLUMNS[:3] if c not in header]
    if not rows or missing:
        raise SpadeError(f"{src}: a CSV manifest needs a header with columns {', '.join(CSV_COLUMNS)} (mask "
                         f"optional) and one row per image{'; missing: ' + ', '.join(missing) if rows else ''}")
    base = src.parent
    train: list[Path] = []
    test: list[TestSample] = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        where = f"{src}:{line}"
        image, split = (row.get("image") or "").strip(), (row.get("split") or "").strip().lower()
        label, mask = (row.get("label") or "").strip(), (row.get("mask") or "").strip()
        if not image:
            raise SpadeError(f"{where}: no image path")
        file = base / image
        if not file.is_file():
            raise SpadeError(f"{where}: {image}: image file does not exist")
        if file.resolve() in seen:
            raise SpadeError(f"{where}: {image} is listed twice (also on line {seen[file.resolve()]})")
        seen[file.resolve()] = line
        good = label.lower() == GOOD
        if split not in ("train", "test"):
            raise SpadeError(f"{where}: split must be train or test, got {split!r}")
        if not label:
            raise SpadeError(f"{where}: no label (good, or the defect type)")
        if split == "train":
            if not good or mask:
                raise SpadeError(f"{where}: training images are good images without masks")
            train.append(file)
            continue
        mask_path = None
        if mask:
            if good:
                raise SpadeError(f"{where}: a good image has no mask")
            mask_path = base / mask
            if mask_path.suffix.lower() in LOSSY_MASK_SUFFIXES:
                raise SpadeError(f"{where}: {mask}: masks saved as JPEG are refused; save them losslessly (PNG)")
            if not mask_path.is_file():
                raise SpadeError(f"{where}: {mask}: mask file does not exist")
        test.append(TestSample(file, GOOD if good else label, mask_path))
    unmasked = [s for s in test if s.label and s.mask_path is None]
    if unmasked and any(s.mask_path is not None for s in test):  # pixel metrics would count it all normal
        raise SpadeError(f"{src}: {unmasked[0].path}: a defective test image without a mask, while others have "
                         "masks; give every defective image its mask (or none of them)")
    if not train:
        raise SpadeError(f"{src}: no training images (rows with split train)")
    if not test:
        raise SpadeError(f"{src}: no test images (rows with split test)")
    return Category(src.stem, base, train, test)


def load_sample(sample: TestSample) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, ground-truth mask HxW bool; all False for a defect-free image)."""
    img = load_image(sample.path)
    return img, load_truth(sample, img.shape[:2])


def load_truth(sample: TestSample, shape: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask of ``sample`` for an image of ``shape`` (all False without a mask file)."""
    return load_mask(sample.mask_path, shape) if sample.mask_path else np.zeros(shape, bool)
