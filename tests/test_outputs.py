"""What ``spade-ad predict`` writes, and how fast paths keep it exact: the PNG writer against Pillow, the
overlay against its float formula, the mask outline against a whole-picture erosion, images decoded on
several threads, and output writes that fail or are interrupted halfway through a chunk."""

from __future__ import annotations

import io
import json
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from scipy import ndimage

from spade_ad.io import load_image, png_bytes, save_png
from spade_ad.viz import SCALE_MAX, mask_edge, overlay
from spade_ad_runtime.viz import _LUT


# ------------------------------------------------------------------ the PNG writer
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (29, 1), (8, 8), (61, 47), (61, 47, 3), (1, 5, 3), (300, 200, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_bytes_round_trip_through_pillow(shape: tuple[int, ...], dtype: type) -> None:
    if dtype is np.uint16 and len(shape) == 3:
        with pytest.raises(ValueError, match="uint16 HxW"):
            png_bytes(np.zeros(shape, dtype))
        return
    rng = np.random.default_rng(sum(shape))
    top = 65536 if dtype is np.uint16 else 256
    noisy = rng.integers(0, top, shape).astype(dtype)
    smooth = (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % top).astype(dtype)
    if len(shape) == 3:
        smooth = np.repeat(smooth[..., None], 3, axis=2)
    for a in (noisy, smooth, np.zeros(shape, dtype), np.full(shape, top - 1, dtype)):
        data = png_bytes(a)
        Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert back.shape == a.shape and np.array_equal(back.astype(np.int64), a.astype(np.int64))


def test_png_bytes_refuses_what_it_cannot_write() -> None:
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8),
                np.zeros((4, 4), bool), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="png_bytes"):
            png_bytes(bad)


def test_png_bytes_layout_and_non_contiguous_input(tmp_path: Path) -> None:
    a = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    view = np.ascontiguousarray(np.transpose(a, (1, 0, 2)))[::-1]  # and a strided view below
    for x in (view, a[:, ::2], a[::-1, :, :]):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(x)))), x)
    data = png_bytes(a)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (*size, data[24], data[25]) == (9, 7, 8, 2)  # width, height, bit depth, colour type RGB
    idat_len = int.from_bytes(data[33:37], "big")
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert raw[0] == 2 and raw[1:28] == a[0].tobytes()  # filter Up; the first row as it is
    save_png(tmp_path / "a.png", a)
    assert (tmp_path / "a.png").read_bytes() == data


# ------------------------------------------------------------------ the overlay
def _overlay_reference(image: np.ndarray, amap: np.ndarray, threshold: float, mask: np.ndarray | None) -> np.ndarray:
    """The overlay's definition in floats: scale colour at opacity 0.35 + 0.45 * position, cyan outline."""
    norm = amap / threshold
    heat = _LUT[np.clip(norm / SCALE_MAX * 255.0, 0, 255).astype(np.uint8)].astype(np.float64)
    alpha = (0.35 + 0.45 * np.clip(norm / SCALE_MAX, 0, 1))[..., None]
    out = image.astype(np.float64) * (1 - alpha) + heat * alpha
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 200))
        out[edge] = (0, 255, 255)
    return out


def test_overlay_matches_its_float_definition() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (230, 410, 3), dtype=np.uint8)
    amap = (rng.random((230, 410)) * 3.0).astype(np.float32) * 10
    thr = 10.0
    mask = amap >= thr
    for m in (None, mask):
        got = overlay(image, amap, thr, m)
        want = _overlay_reference(image, amap, thr, m)
        assert got.dtype == np.uint8 and got.shape == image.shape
        assert np.abs(got.astype(np.float64) - want).max() <= 1.5  # rounding of the 1/255 opacity steps only
    got = overlay(image, amap, thr, mask)
    edge = mask_edge(mask, 1)  # (230 // 200 pixels wide)
    assert (got[edge] == (0, 255, 255)).all()
    zero = overlay(np.zeros((20, 20, 3), np.uint8), np.full((20, 20), 2 * thr, np.float32), thr, None)
    assert (np.abs(zero.astype(int) - np.round(_LUT[255] * 0.8)) <= 1).all()  # top of the scale at opacity 0.8


@pytest.mark.parametrize("seed", range(6))
def test_mask_edge_equals_eroding_the_whole_picture(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 90, 2)
    mask = ndimage.binary_dilation(rng.random((h, w)) > 0.97, iterations=int(rng.integers(1, 5)))
    if seed == 0:
        mask[:] = False
    if seed == 1:
        mask[:, :3] = True  # touching the border
    if seed == 2:
        mask[:] = True
    for width in (1, 2, 4, 7):
        want = mask & ~ndimage.binary_erosion(mask, iterations=width)
        assert np.array_equal(mask_edge(mask, width), want)


# ------------------------------------------------------------------ decoding on several threads
def test_images_decoded_on_threads_are_the_ones_decoded_alone(bottle: Path) -> None:
    files = sorted((bottle / "test" / "broken_large").glob("*.png"))[:6]
    alone = [load_image(f) for f in files]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(load_image, files * 2))
    assert all(np.array_equal(a, b) for a, b in zip(alone * 2, together, strict=True))


def test_read_items_keeps_order_and_raises_the_first_error(bottle: Path, tmp_path: Path) -> None:
    from spade_ad.errors import SpadeError
    from spade_ad.model import read_item, read_items

    files = sorted((bottle / "test" / "good").glob("*.png"))[:5]
    arr = np.zeros((16, 16, 3), np.uint8)
    items: list[Path | np.ndarray] = [files[0], arr, *files[1:]]
    names = [str(x) for x in items]
    got = read_items(items, names)
    assert all(np.array_equal(a, read_item(x, n)) for a, x, n in zip(got, items, names, strict=True))
    bad1, bad2 = tmp_path / "bad1.png", tmp_path / "bad2.png"
    bad1.write_bytes(b"not an image")
    bad2.write_bytes(b"")
    with pytest.raises(SpadeError, match="bad1.png: not an image file"):
        read_items([files[0], bad1, files[1], bad2], [str(files[0]), str(bad1), str(files[1]), str(bad2)])


def test_other_formats_still_decode_under_the_limit_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIF checks Pillow's pixel limit while loading: it is loaded with the limit lifted (under the lock)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    f = tmp_path / "a.gif"
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(f)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            assert load_image(f).shape == (40, 40, 3)
        except BaseException as exc:  # noqa: BLE001 - collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and Image.MAX_IMAGE_PIXELS == 100


# ------------------------------------------------------------------ writes that fail or are interrupted
@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spade_ad import Spade

    d = tmp_path_factory.mktemp("outputs") / "model"
    Spade(k=3, k_image=2, image_size=64, calibration_images=3).fit(small_train / "train" / "good").save(d)
    return d


def _failing_writes(monkeypatch: pytest.MonkeyPatch, fail_on: str, exc: BaseException) -> None:
    """Make writing the outputs of the image whose stem ends with ``fail_on`` raise ``exc`` (after its overlay)."""
    from spade_ad_runtime import runs  # the protocol's home: its chunk loop writes the outputs

    real = runs.write_image_outputs

    def write(out: Path, stem: str, *args: object) -> dict[str, str | None]:
        if stem.endswith(fail_on):
            save_png(out / f"{stem}_overlay.png", np.zeros((8, 8), np.uint8))
            raise exc
        return real(out, stem, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "write_image_outputs", write)


@pytest.mark.parametrize("failure", ["disk full", "interrupt"])
def test_a_failed_write_in_a_chunk_leaves_every_file_listed(failure: str, model_dir: Path, small_train: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from spade_ad.errors import SpadeError

    good = small_train / "test" / "good"
    files = sorted(good.glob("*.png"))
    stem = f"good_{files[1].stem}"
    exc = SpadeError(f"{stem}_map.npy: cannot write (No space left on device)") if failure == "disk full" \
        else KeyboardInterrupt()
    _failing_writes(monkeypatch, stem, exc)
    out = tmp_path / "o"
    code, _, err = run_cli(["predict", str(model_dir), str(good), "--out", str(out)], capsys)
    assert code == (2 if failure == "disk full" else 130)
    assert ("No space left on device" if failure == "disk full" else "interrupted") in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and run["n_images"] == 0
    assert (out / "predictions.jsonl").read_text() == ""  # no row committed, and no earlier run's rows
    on_disk = {p.name for p in out.iterdir()} - {"run.json", "predictions.jsonl"}
    assert on_disk <= set(run["outputs"]), f"files not listed in run.json: {on_disk - set(run['outputs'])}"
    assert f"{stem}_overlay.png" in on_disk  # (half of the failed image's files)
    assert {f"good_{files[0].stem}_{k}" for k in ("overlay.png", "map.npy")} <= on_disk  # the other one finished
    assert not [n for n in on_disk if n.endswith(".tmp")]
    monkeypatch.undo()
    code, _, _ = run_cli(["predict", str(model_dir), str(good), "--out", str(out)], capsys)  # no --overwrite needed
    assert code == 0 and len((out / "predictions.jsonl").read_text().splitlines()) == len(files)


def test_chunk_sizes_do_not_change_the_outputs(model_dir: Path, small_train: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = [str(small_train / "test" / d) for d in ("good", "scratch", "blob")]
    outputs = []
    for batch in ("1", "3", "16"):  # (the images of a chunk are read and written on several threads)
        out = tmp_path / f"o{batch}"
        code, _, _ = run_cli(["predict", str(model_dir), *src, "--out", str(out), "--batch-size", batch], capsys)
        assert code == 0
        rows = (out / "predictions.jsonl").read_text()
        outputs.append((rows, {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("run.json",)}))
    assert all(o == outputs[0] for o in outputs[1:])
