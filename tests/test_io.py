from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad.errors import SpadeError
from spade_ad.io import atomic_write, list_images, load_image, load_mask, to_rgb_uint8


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def test_grayscale_rgba_16bit_and_palette_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) % 256
    g = load_image(_save(tmp_path / "g.png", gray.astype(np.uint8)))
    assert g.shape == (48, 64, 3) and g.dtype == np.uint8
    assert np.array_equal(g[..., 0], gray) and np.array_equal(g[..., 2], gray)

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    r = load_image(_save(tmp_path / "a.png", rgba))
    assert r.shape == (20, 30, 3) and r[0, 0, 0] == 200

    g16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(g16).save(p16)
    x = load_image(p16)
    assert x.shape == (40, 40, 3) and x.dtype == np.uint8
    assert x[..., 0].max() == round(int(g16.max()) * 255 / 65535)

    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (20, 30, 3)


def test_arrays_of_other_types() -> None:
    f = np.full((10, 10), 0.5, np.float32)
    assert to_rgb_uint8(f)[0, 0, 0] == 128
    assert to_rgb_uint8(np.ones((10, 10, 1), np.uint8))[0, 0, 1] == 1
    with pytest.raises(SpadeError, match="NaN"):
        to_rgb_uint8(np.full((10, 10), np.nan))
    with pytest.raises(SpadeError, match="too small"):
        to_rgb_uint8(np.zeros((4, 4, 3), np.uint8))


def test_corrupt_and_non_image_files_name_the_file(tmp_path: Path) -> None:
    txt = tmp_path / "notes.png"
    txt.write_text("hello")
    with pytest.raises(SpadeError, match=r"notes\.png: not an image"):
        load_image(txt)
    good = _save(tmp_path / "x.png", np.zeros((64, 64, 3), np.uint8) + 7)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpadeError, match=r"trunc\.png"):
        load_image(trunc)
    with pytest.raises(SpadeError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(SpadeError, match="no image files"):
        list_images(tmp_path)
    with pytest.raises(SpadeError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_mask_size_mismatch_is_an_error(tmp_path: Path) -> None:
    m = _save(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    assert load_mask(m, (10, 12)).shape == (10, 12)
    with pytest.raises(SpadeError, match=r"m\.png: mask size 12x10 does not match its image \(13x10\)"):
        load_mask(m, (10, 13))


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
