"""Hostile or unusual inputs for spade_ad.io: pipes, devices, folders, link loops, permissions, I/O errors."""

from __future__ import annotations

import errno
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

import spade_ad_runtime.io as sio  # the module the functions read their defaults from
from spade_ad.errors import SpadeError
from spade_ad.io import MAX_PIXELS, decode_image, list_images, load_image, load_mask

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need os.mkfifo (POSIX)")


def _png(path: Path, value: int = 7, size: int = 16) -> Path:
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _unblock_fifo(path: Path) -> None:
    """Let a reader stuck opening ``path`` go (it then sees end of file), so a failing test cannot hang."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def _within(seconds: float, fn: Callable[[], Any], fifo: Path | None = None) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging) if it does not return within ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            _unblock_fifo(fifo)
            t.join(5)
        pytest.fail(f"{fn} blocked for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --- non-regular files -------------------------------------------------------------------------------


@needs_fifo
def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for fn in (lambda: load_image(fifo), lambda: load_mask(fifo)):
        with pytest.raises(SpadeError, match=r"pipe\.png: not a regular file \(a named pipe\)$"):
            _within(5, fn, fifo)


def test_folder_and_device_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(SpadeError, match=r"dir\.png: not a regular file \(a folder\)$"):
        load_image(folder)
    if os.path.exists("/dev/null"):
        with pytest.raises(SpadeError, match=r"^/dev/null: not a regular file \(a device\)$"):
            _within(5, lambda: load_image("/dev/null"))


@needs_fifo
def test_fifo_swapped_in_after_the_stat_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The type is checked again on the opened descriptor (opened non-blocking), closing the stat/open race."""
    fifo = tmp_path / "race.png"
    os.mkfifo(fifo)
    real_stat = os.stat
    regular = real_stat(_png(tmp_path / "real.png"))

    def lying_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return regular if Path(path) == fifo else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", lying_stat)
    with pytest.raises(SpadeError, match=r"race\.png: not a regular file \(a named pipe\)$"):
        _within(5, lambda: load_image(fifo), fifo)


@needs_fifo
def test_list_images_skips_fifos_folders_and_broken_links(tmp_path: Path) -> None:
    good = _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "c.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "d.png")
    os.symlink(tmp_path / "e.png", tmp_path / "e.png")  # a loop
    os.symlink(good, tmp_path / "f.png")  # a link to a regular file is fine
    files = _within(5, lambda: list_images(tmp_path))
    assert [p.name for p in files] == ["a.png", "f.png"]
    images = _within(5, lambda: [load_image(p) for p in files])
    assert all(im.shape == (16, 16, 3) for im in images)


def test_list_images_honest_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SpadeError, match=r"nope: folder does not exist$"):
        list_images(tmp_path / "nope")
    with pytest.raises(SpadeError, match=r"a\.png: not a folder$"):
        list_images(_png(tmp_path / "a.png"))
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(SpadeError, match=r"loop: symbolic link loop$"):
        list_images(tmp_path / "loop")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(SpadeError, match=r"dangling: broken symbolic link$"):
        list_images(tmp_path / "dangling")


def test_list_images_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "a.png")

    def deny(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(SpadeError, match=r": permission denied$"):
        list_images(tmp_path)


# --- honest messages ---------------------------------------------------------------------------------


def test_symbolic_link_loop_and_broken_link(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(SpadeError, match=r"a\.png: symbolic link loop$"):
        load_image(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    with pytest.raises(SpadeError, match=r"link\.png: broken symbolic link$"):
        load_image(tmp_path / "link.png")
    with pytest.raises(SpadeError, match=r"link\.png: broken symbolic link$"):
        load_mask(tmp_path / "link.png")
    with pytest.raises(SpadeError, match=r"missing\.png: file does not exist$"):
        load_image(tmp_path / "missing.png")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SpadeError, match=r"empty\.png: the file is empty$"):
        load_image(tmp_path / "empty.png")


def test_permission_denied_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = _png(tmp_path / "secret.png")

    def deny(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(SpadeError, match=r"secret\.png: permission denied$"):
        load_image(img)


def test_permission_denied_and_io_error_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = _png(tmp_path / "x.png")
    raised: list[BaseException] = [PermissionError(errno.EACCES, "Permission denied")]

    def failing_open(*args: Any, **kwargs: Any) -> Image.Image:
        raise raised[0]

    monkeypatch.setattr(Image, "open", failing_open)
    with pytest.raises(SpadeError, match=r"x\.png: permission denied$"):
        load_image(img)
    raised[0] = PermissionError("no errno given")
    with pytest.raises(SpadeError, match=r"x\.png: permission denied$"):
        load_mask(img)
    raised[0] = OSError(errno.EIO, os.strerror(errno.EIO))
    with pytest.raises(SpadeError, match=rf"x\.png: cannot read \({os.strerror(errno.EIO)}\)$"):
        load_image(img)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    img = _png(tmp_path / "locked.png")
    img.chmod(0)
    try:
        with pytest.raises(SpadeError, match=r"locked\.png: permission denied$"):
            load_image(img)
    finally:
        img.chmod(0o644)


# --- pixel cap ---------------------------------------------------------------------------------------


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_bytes(width: int, height: int, idat: bytes, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _lying_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (its data is a few bytes)."""
    return _png_bytes(width, height, zlib.compress(bytes(64)))


def _bomb_png(side: int = 20000) -> bytes:
    """A real, valid side x side 1-bit black PNG: about 50 KB on disk, 400 M pixels once decoded."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]  # streamed: never holds the raw 50 MB
    parts.append(comp.flush())
    return _png_bytes(side, side, b"".join(parts))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every attempt to decode pixels (ImageFile.load); a refusal must come before any."""
    calls: list[str] = []
    real = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        calls.append(f"{self.format} {self.size}")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_max_pixels_default() -> None:
    assert MAX_PIXELS == 100_000_000


def test_huge_header_is_refused_before_decoding(tmp_path: Path, no_decoding: list[str]) -> None:
    data = _lying_png(100_000, 100_000)
    assert len(data) < 200
    f = tmp_path / "liar.png"
    f.write_bytes(data)
    msg = r"liar\.png: image is too large \(100000x100000 pixels; at most 100,000,000 pixels\)$"
    with pytest.raises(SpadeError, match=msg):
        load_image(f)
    with pytest.raises(SpadeError, match=msg):
        load_mask(f)
    with pytest.raises(SpadeError, match=r"^up\.png: image is too large \(100000x100000 pixels; at most 100,000,000"):
        decode_image(data, "up.png")
    assert no_decoding == []


def test_real_decompression_bomb_gives_one_line_not_pillows_error(tmp_path: Path, no_decoding: list[str]) -> None:
    small = _bomb_png(64)  # the same recipe decodes to a valid all-black image
    assert np.array_equal(decode_image(small), np.zeros((64, 64, 3), np.uint8))
    no_decoding.clear()
    data = _bomb_png()
    assert len(data) < 200_000
    f = tmp_path / "bomb.png"
    f.write_bytes(data)
    with pytest.raises(Image.DecompressionBombError):  # what plain Pillow does with it
        Image.open(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(SpadeError, match=r"bomb\.png: image is too large \(20000x20000 pixels; at most 100,000,"):
            load_image(f)
        with pytest.raises(SpadeError, match=r"^upload: image is too large \(20000x20000 pixels"):
            decode_image(data)
    assert no_decoding == []


def test_max_pixels_keyword_and_module_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _png(tmp_path / "s.png", size=16)
    assert load_image(f, max_pixels=256).shape == (16, 16, 3)
    with pytest.raises(SpadeError, match=r"s\.png: image is too large \(16x16 pixels; at most 255 pixels\)$"):
        load_image(f, max_pixels=255)
    with pytest.raises(SpadeError, match=r"s\.png: image is too large"):
        load_mask(f, max_pixels=100)
    with pytest.raises(SpadeError, match=r"^u: image is too large \(16x16 pixels; at most 100 pixels\)$"):
        decode_image(f.read_bytes(), "u", max_pixels=100)
    monkeypatch.setattr(sio, "MAX_PIXELS", 200)  # None means the module default, read at call time
    with pytest.raises(SpadeError, match=r"at most 200 pixels"):
        load_image(f)


def test_pillows_own_limit_never_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; our cap replaces both."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn = _png(tmp_path / "warn.png", size=40)  # 1600 pixels: Pillow would warn
    err = _png(tmp_path / "err.png", size=64)  # 4096 pixels: Pillow would raise DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(warn).shape == (40, 40, 3)
        assert load_image(err).shape == (64, 64, 3)
        assert load_mask(err).shape == (64, 64)
        assert decode_image(err.read_bytes()).shape == (64, 64, 3)
        with pytest.raises(SpadeError, match=r"err\.png: image is too large \(64x64 pixels; at most 1,000 pixels\)$"):
            load_image(err, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow itself still guards other callers
        Image.open(warn).close()


# --- decode_image ------------------------------------------------------------------------------------


def test_decode_image_messages_and_result(tmp_path: Path) -> None:
    f = _png(tmp_path / "ok.png", value=9)
    out = decode_image(f.read_bytes(), "ok.png")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and int(out.max()) == 9
    assert np.array_equal(out, load_image(f))
    with pytest.raises(SpadeError, match=r"^upload: the file is empty$"):
        decode_image(b"")
    with pytest.raises(SpadeError, match=r"^notes\.txt: not an image file"):
        decode_image(b"hello", "notes.txt")
    with pytest.raises(SpadeError, match=r"^half\.png: corrupt or truncated image"):
        decode_image(_png(tmp_path / "n.png", size=64).read_bytes()[:60], "half.png")
