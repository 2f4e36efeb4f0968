from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from spade_ad.errors import SpadeError
from spade_ad.io import atomic_write, decode_image, list_images, load_image, load_mask, save_json, to_rgb_uint8


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


# --- one rule for integer pixel scaling -------------------------------------------------------------


def _picture(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_same_picture_in_any_integer_dtype_gives_identical_output() -> None:
    pic = _picture()
    want = to_rgb_uint8(pic)
    assert np.array_equal(want, pic)
    for dtype in (np.int16, np.int32, np.int64, np.uint32, np.uint64, np.int8):
        src = pic // 2 if dtype == np.int8 else pic  # int8 holds 0..127 only
        out = to_rgb_uint8(src.astype(dtype))
        assert out.dtype == np.uint8
        assert np.array_equal(out, src), dtype
    gray = pic[..., 0]
    assert np.array_equal(to_rgb_uint8(gray.astype(np.int32)), to_rgb_uint8(gray))


def test_uint16_arrays_are_16_bit_and_other_integers_need_bit_depth() -> None:
    v16 = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # up to 65195
    want = np.rint(v16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(to_rgb_uint8(v16)[..., 0], want)
    assert np.array_equal(to_rgb_uint8(v16.astype(np.int32), bit_depth=16)[..., 0], want)
    assert np.array_equal(to_rgb_uint8(v16.astype(np.uint64), bit_depth=16)[..., 1], want)
    with pytest.raises(SpadeError, match=r"^arr: pixel values up to 65195 do not fit 8 bits; pass bit_depth=16"):
        to_rgb_uint8(v16.astype(np.int32), "arr")
    # small values in uint16 are still 16-bit (dtype rule); bit_depth=8 says otherwise explicitly
    small = np.full((10, 10), 200, np.uint16)
    assert to_rgb_uint8(small)[0, 0, 0] == 1
    assert to_rgb_uint8(small, bit_depth=8)[0, 0, 0] == 200
    with pytest.raises(SpadeError, match="do not fit 16 bits"):
        to_rgb_uint8(np.full((10, 10), 70000, np.int64), "big", bit_depth=16)
    with pytest.raises(SpadeError, match="bit_depth must be 8 or 16"):
        to_rgb_uint8(small, bit_depth=12)
    with pytest.raises(SpadeError, match="bit_depth applies to integer pixels only"):
        to_rgb_uint8(np.zeros((10, 10), np.float32), bit_depth=8)


def test_negative_integer_pixels_are_an_error_naming_the_image() -> None:
    arr = np.zeros((10, 10), np.int16)
    arr[3, 3] = -5
    with pytest.raises(SpadeError, match=r"^scan7: negative pixel values \(down to -5\)"):
        to_rgb_uint8(arr, "scan7")
    with pytest.raises(SpadeError, match="scan7: negative"):
        to_rgb_uint8(arr, "scan7", bit_depth=16)


def test_bool_and_float_rules_unchanged() -> None:
    b = np.zeros((10, 10), bool)
    b[0, 0] = True
    out = to_rgb_uint8(b)
    assert out[0, 0, 0] == 255 and out[1, 1, 0] == 0
    assert to_rgb_uint8(np.full((10, 10), 200.0))[0, 0, 0] == 200
    assert to_rgb_uint8(np.full((10, 10), 1.0))[0, 0, 0] == 255


def test_mode_i_tiff_with_8_bit_values_loads_like_the_8_bit_png(tmp_path: Path) -> None:
    gray = _picture()[..., 0]
    png = _save(tmp_path / "g.png", gray)
    tif = tmp_path / "g.tif"
    Image.fromarray(gray.astype(np.int32)).save(tif)  # mode 'I', BitsPerSample 32
    with Image.open(tif) as im:
        assert im.mode == "I"
    assert np.array_equal(load_image(tif), load_image(png))
    assert np.array_equal(load_image(png)[..., 0], gray)


def test_mode_i_tiff_with_16_bit_values_loads_like_the_16_bit_png(tmp_path: Path) -> None:
    v16 = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    png = tmp_path / "g16.png"
    Image.fromarray(v16).save(png)
    tif = tmp_path / "g32.tif"
    Image.fromarray(v16.astype(np.int32)).save(tif)
    assert np.array_equal(load_image(tif), load_image(png))
    too_big = tmp_path / "big.tif"
    Image.fromarray(np.full((10, 10), 70000, np.int32)).save(too_big)
    with pytest.raises(SpadeError, match=r"big\.tif: pixel values up to 70000 do not fit 16 bits"):
        load_image(too_big)
    neg = tmp_path / "neg.tif"
    Image.fromarray(np.full((10, 10), -1, np.int32)).save(neg)
    with pytest.raises(SpadeError, match=r"neg\.tif: negative pixel values"):
        load_image(neg)


def test_mode_i_tiff_uses_the_declared_bit_depth(tmp_path: Path) -> None:
    small = np.full((10, 10), 200, np.uint16)
    tif = tmp_path / "signed16.tif"
    Image.fromarray(small).save(tif, tiffinfo={339: 2})  # SampleFormat=signed: Pillow opens it as mode 'I'
    with Image.open(tif) as im:
        assert im.mode == "I" and im.tag_v2[258] == (16,)
    assert load_image(tif)[0, 0, 0] == 1  # declared 16 bits: 200 / 257, not 200 as 8-bit


# --- EXIF orientation --------------------------------------------------------------------------------

# what a viewer shows for each EXIF orientation, as a numpy transform of the stored HxWxC pixels
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 degrees anticlockwise: turn clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_6_jpeg_comes_back_upright(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:48]  # H=32, W=48 as stored; smooth ramps survive JPEG, and no turn maps onto itself
    stored = np.stack([xx * 5, yy * 7, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    f = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(f, quality=95, exif=_exif(6))
    with Image.open(f) as im:
        assert im.getexif()[0x0112] == 6
        raw = np.asarray(im.convert("RGB"))  # the decoded pixels as stored
    out = load_image(f)
    assert out.shape == (48, 32, 3)  # height and width swapped
    assert np.array_equal(out, np.rot90(raw, -1))  # exactly the stored pixels, turned clockwise
    assert np.abs(out.astype(int) - np.rot90(stored, -1).astype(int)).mean() < 3  # JPEG noise only
    assert np.array_equal(decode_image(f.read_bytes(), "phone.jpg"), out)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_exactly_png(tmp_path: Path, orientation: int) -> None:
    stored = _picture(24, 40)
    f = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(f, exif=_exif(orientation))
    want = UPRIGHT[orientation](stored)
    assert np.array_equal(load_image(f), want)
    assert np.array_equal(decode_image(f.read_bytes()), want)
    mask = np.zeros((24, 40), np.uint8)
    mask[2:5, 30:38] = 255
    m = tmp_path / f"m{orientation}.png"
    Image.fromarray(mask).save(m, exif=_exif(orientation))
    assert np.array_equal(load_mask(m), UPRIGHT[orientation](mask[..., None])[..., 0] > 0)


def test_unreadable_exif_leaves_pixels_as_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = _picture(24, 40)
    f = tmp_path / "bad_exif.png"
    Image.fromarray(stored).save(f, exif=_exif(6))

    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert np.array_equal(load_image(f), stored)


def test_exif_orientation_in_a_tiff_is_applied_once_and_keeps_its_declared_bit_depth(tmp_path: Path) -> None:
    """Pillow turns TIFFs itself while loading (and drops the tag); they must not be turned twice."""
    v16 = (np.arange(24 * 40).reshape(24, 40) * 30).astype(np.uint16)  # < 32768: signed 16-bit
    f = tmp_path / "rot.tif"
    Image.fromarray(v16).save(f, tiffinfo={339: 2, 274: 8})  # mode 'I' declaring 16 bits, orientation 8
    out = load_image(f)
    want = np.rint(v16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], np.rot90(want, 1))


# --- durable atomic writes ---------------------------------------------------------------------------


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = save_json(tmp_path / "sub" / "out.json", {"a": 1})
    assert events == ["fsync file", "rename", "fsync dir"]
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_write_without_folder_fsync_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")  # as on file systems that cannot fsync folders
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert atomic_write(tmp_path / "x.txt", lambda tmp: tmp.write_text("new")).read_text() == "new"


@pytest.mark.parametrize("where", ["writer", "fsync", "rename"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, OSError])
def test_atomic_write_failure_leaves_old_content_and_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, exc_type: type[BaseException]
) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    fresh = tmp_path / "fresh.txt"  # did not exist before: must still not exist

    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc_type("interrupted")

    def writer(tmp: Path) -> None:
        tmp.write_text("half")
        if where == "writer":
            fail()

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    if where == "rename":
        monkeypatch.setattr(os, "replace", fail)
    for dest in (target, fresh):
        with pytest.raises(exc_type):
            atomic_write(dest, writer)
    assert target.read_text() == "old"
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
