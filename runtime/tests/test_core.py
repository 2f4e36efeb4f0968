"""The runtime's own tests: they run without torch (CI installs the runtime into a bare environment).

The parity with spade-ad itself (same scores, maps, verdicts and masks) is tested in the main suite,
``tests/test_export.py``, where both packages are installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from spade_ad_runtime import imaging
from spade_ad_runtime.deploy import FILES, FORMAT, FORMAT_VERSION, DeployError, file_sha256, header_digest, read_header
from spade_ad_runtime.detector import Detector
from spade_ad_runtime.search import exact_d2, grouped_nn_distances, mean_sqrt, nn_distances


def _canonical(q: np.ndarray, g: np.ndarray, kappa: int) -> np.ndarray:
    """Brute force: exact_d2 of every pair, the kappa smallest per query, mean_sqrt."""
    qi = np.repeat(np.arange(len(q)), len(g))
    gi = np.tile(np.arange(len(g)), len(q))
    e = exact_d2(g[gi], q[qi]).reshape(len(q), len(g))
    return mean_sqrt(np.sort(e, axis=1)[:, : min(kappa, len(g))])


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("dim", [24, 40, 113])
def test_search_is_the_canonical_brute_force(kappa: int, dim: int) -> None:
    r = np.random.default_rng(dim * 10 + kappa)
    hw, images = 49, 6
    q = (r.normal(size=(hw, dim)) + 2).astype(np.float32)
    g = (r.normal(size=(hw * images, dim)) + 2).astype(np.float16).astype(np.float32)
    g[10] = g[11]  # a repeated row counts twice
    q[5] = g[100]  # a query equal to a row: distance exactly 0
    want = _canonical(q, g, kappa)
    for block in (1 << 10, 64 << 20):  # one query per block, or all at once
        got = nn_distances(q, g, kappa, block_bytes=block)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert want[5] == 0.0 or kappa > 1
    ref = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    ref = np.sort(ref, axis=1)[:, :kappa].mean(1)
    assert np.allclose(want, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kappa", [1, 4])
def test_search_is_exact_among_near_ties_and_bad_rows(kappa: int) -> None:
    """Rows one float32 step apart, equal rows, a non-finite gallery row and a non-finite query: the answer is
    still the brute force's, bit for bit (the GEMM only chooses which rows are re-checked exactly)."""
    r = np.random.default_rng(7)
    base = (r.normal(size=(1, 40)) * 3 + 5).astype(np.float32)
    g = np.repeat(base, 60, axis=0)
    for i in range(60):  # neighbours of the base row, some one ulp away in one coordinate
        j = int(r.integers(0, 40))
        g[i, j] = np.nextafter(g[i, j], np.float32(np.inf if i % 2 else -np.inf))
    g = np.concatenate([g, (r.normal(size=(40, 40)) * 3 + 5).astype(np.float32)])
    q = np.concatenate([base + np.float32(1e-3) * r.normal(size=(8, 40)).astype(np.float32), g[60:66]])
    g[70, 3] = np.nan  # a damaged row is never a neighbour
    q = q.astype(np.float32)
    want = _canonical(q, np.delete(g, 70, axis=0), kappa)
    q = np.concatenate([q, np.full((1, 40), np.inf, np.float32)])
    got = nn_distances(q, g, kappa)
    assert np.array_equal(got[:-1].view(np.int32), want.view(np.int32)) and not np.isfinite(got[-1])


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("grouping", ["clusters", "random", "one", "far centres"])
def test_grouped_search_is_the_canonical_brute_force(kappa: int, grouping: str) -> None:
    """Any grouping and any centres give the brute force's answer bit for bit: clusters (what the index
    gives), random groups, a single group, centres far from their rows; with duplicates, near-ties, a
    non-finite row and a non-finite query."""
    r = np.random.default_rng(kappa * 7 + len(grouping))
    centres = (r.normal(size=(12, 24)) * 4).astype(np.float32)
    label = r.integers(0, 12, 900)
    g = (centres[label] + r.normal(size=(900, 24))).astype(np.float16).astype(np.float32)
    g[5] = g[6]  # a duplicated row counts twice
    g[9] = g[10]
    g[9, 3] = np.nextafter(g[9, 3], np.float32(np.inf))  # a row one ulp from another
    g[11, 2] = np.nan
    q = np.concatenate([(centres[r.integers(0, 12, 200)] + r.normal(size=(200, 24))).astype(np.float32),
                        g[[9, 10, 5]], np.full((1, 24), np.inf, np.float32)])
    if grouping == "clusters":
        groups, cen = label, centres
    elif grouping == "random":
        groups, cen = r.integers(0, 5, 900), (r.normal(size=(5, 24)) * 4).astype(np.float32)
    elif grouping == "one":
        groups, cen = np.zeros(900, np.int64), centres[:1]
    else:
        groups, cen = label, centres + np.float32(100)
    got = grouped_nn_distances(q, g, groups, cen, kappa)
    finite = np.isfinite(g).all(axis=1)
    want = _canonical(q[:-1], g[finite], kappa)
    assert np.array_equal(got[:-1].view(np.int32), want.view(np.int32)) and not np.isfinite(got[-1])
    assert np.array_equal(got[:-1].view(np.int32), nn_distances(q, g, kappa)[:-1].view(np.int32))


def test_search_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        nn_distances(np.zeros((3, 4), np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError):
        nn_distances(np.zeros((3, 4), np.float32), np.zeros((0, 4), np.float32))


def test_map_resizing_weights_are_bilinear() -> None:
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(imaging.resize_map(m, 3, 4), m)
    up = imaging.resize_map(m, 6, 8)
    assert up.shape == (6, 8) and up[0, 0] == m[0, 0] and up[-1, -1] == m[-1, -1]
    assert np.allclose(imaging.resize_map(np.ones((5, 7), np.float32), 13, 3), 1.0)


def test_blur_is_reflect_padded_gaussian() -> None:
    r = np.random.default_rng(0)
    m = r.random((20, 30)).astype(np.float32)
    k = imaging.gaussian_kernel1d(2.0)
    rad = (k.size - 1) // 2
    pad = np.pad(m.astype(np.float64), rad, mode="symmetric")  # scipy's 'reflect'
    want = np.array([[(pad[y : y + k.size, x : x + k.size] * np.outer(k, k)).sum() for x in range(30)]
                     for y in range(20)])
    assert np.allclose(imaging.gaussian_blur(m, 2.0), want, atol=1e-6)
    assert imaging.gaussian_blur(m, 0.0) is m


def test_input_preparation() -> None:
    img = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    same = imaging.to_input(img, "resize", 64, (64, 48))
    assert same.shape == (3, 64, 48) and np.array_equal(same, img.transpose(2, 0, 1).astype(np.float32))
    flat = np.full((100, 80, 3), 77, np.uint8)
    assert np.allclose(imaging.to_input(flat, "resize", 32, (32, 32)), 77, atol=1e-4)
    assert imaging.to_input(flat, "paper", 32, (32, 32)).shape == (3, 32, 32)
    assert imaging.crop_box("paper", 224, 256, 256) == (16, 16, 240, 240)


def _folder(tmp_path: Path, version: int = FORMAT_VERSION) -> Path:
    d = tmp_path / "deploy"
    d.mkdir()
    for name in FILES:
        (d / name).write_bytes(name.encode() * 10)
    header = {"format": FORMAT, "format_version": version, "files": {n: file_sha256(d / n) for n in FILES},
              "settings": {k: 1 for k in ("preprocess", "image_size", "k", "k_image", "kappa", "sigma", "image_score")},
              "input_shape": [32, 32], "level_shapes": [[8, 8]], "train_names": [], "calibration": {},
              "model": {"lineage": "L", "generation": 1, "header_sha256": "0" * 64}, "image_threshold": None,
              "pixel_threshold": None, "grid": None}
    header["header_sha256"] = header_digest(header)
    (d / "deploy.json").write_text(json.dumps(header))
    return d


def test_a_sound_header_reads(tmp_path: Path) -> None:
    assert read_header(_folder(tmp_path))["format"] == FORMAT


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "bank.safetensors").write_bytes(b"other"), "bank.safetensors: checksum mismatch"),
        (lambda d: (d / "global.safetensors").unlink(), "global.safetensors: missing"),
        (lambda d: (d / "deploy.json").write_text("{"), "deploy.json: damaged deploy header"),
        (lambda d: (d / "deploy.json").unlink(), "deploy.json: missing"),
        (lambda d: (d / "deploy.json").write_text((d / "deploy.json").read_text().replace("bank", "bonk", 1)),
         "checksum mismatch"),
    ],
)
def test_a_damaged_folder_gets_one_line(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    d = _folder(tmp_path)
    damage(d)
    with pytest.raises(DeployError, match=message) as err:
        read_header(d)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["settings", "model", "level_shapes", "pixel_threshold"])
def test_a_partial_header_gets_one_line(tmp_path: Path, field: str) -> None:
    d = _folder(tmp_path)
    h = json.loads((d / "deploy.json").read_text())
    del h[field]
    h["header_sha256"] = header_digest(h)  # a sound checksum over a header that lacks a field
    (d / "deploy.json").write_text(json.dumps(h))
    with pytest.raises(DeployError, match=f"missing or invalid field '{field}'"):
        read_header(d)


@pytest.mark.parametrize("grid, scales, message", [
    ({"height": 96}, None, "tile grid lacks"),
    ("mangled", None, "tile grid disagrees"),
    ("sound", [[1.0, 1.0]], "position_scales must be two positive numbers per tile"),
    ("sound", [[1.0, 0.0]] * 4, "position_scales must be two positive numbers per tile"),
])
def test_a_tiled_header_is_checked(tmp_path: Path, grid: object, scales: object, message: str) -> None:
    """A tiled deploy header's grid is rebuilt from its size, tile, overlap and scale and must agree; each tile
    position needs its two score scales: otherwise one line naming deploy.json."""
    from spade_ad_runtime.tiling import make_grid

    d = _folder(tmp_path)
    header = json.loads((d / "deploy.json").read_text())
    sound = make_grid(96, 96, 64, 0.25, 1.0).to_dict()
    header["grid"] = sound if grid == "sound" else {**sound, "xs": [0, 7]} if grid == "mangled" else grid
    if scales is not None:
        header["calibration"] = {"position_scales": scales}
    header["header_sha256"] = header_digest(header)
    (d / "deploy.json").write_text(json.dumps(header))
    with pytest.raises(DeployError, match=message) as err:
        Detector.load(d)
    assert str(err.value).startswith(str(d / "deploy.json")) and "\n" not in str(err.value)


def test_a_newer_format_names_the_upgrade(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="newer than this runtime reads"):
        read_header(_folder(tmp_path, FORMAT_VERSION + 1))


def test_nothing_outside_the_folder_is_read(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((d / "bank.safetensors").read_bytes())
    (d / "bank.safetensors").unlink()
    os.symlink(outside, d / "bank.safetensors")  # same bytes, same checksum: refused for being a link
    with pytest.raises(DeployError, match="not a plain file"):
        read_header(d)
    h = json.loads((d / "deploy.json").read_text())
    h["files"] = {("../outside.bin" if n == "bank.safetensors" else n): v for n, v in h["files"].items()}
    h["header_sha256"] = header_digest(h)
    (d / "deploy.json").write_text(json.dumps(h))
    with pytest.raises(DeployError, match="'files' must name exactly"):
        read_header(d)


def test_a_graph_that_is_not_onnx_gets_one_line(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    with pytest.raises(DeployError, match="backbone.onnx: cannot load the backbone"):
        Detector.load(d)


def test_cuda_without_a_cuda_provider_is_refused_not_ignored(tmp_path: Path) -> None:
    import onnxruntime as ort

    from spade_ad_runtime.errors import SpadeError

    d = _folder(tmp_path)
    with pytest.raises(SpadeError, match="--device must be cpu or cuda"):
        Detector.load(d, device="tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(SpadeError, match="--device cuda: this onnxruntime has no CUDA provider"):
        Detector.load(d, device="cuda")


def test_torch_is_not_imported() -> None:
    import sys

    import spade_ad_runtime.detector  # noqa: F401

    assert "torch" not in sys.modules


# ------------------------------------------------------------------ the predict run, with a stand-in scorer
class _Scorer:
    """Stands in for a loaded Detector (no backbone here): the map is the image's red channel over 100."""

    image_threshold = 1.0
    pixel_threshold = 1.5
    header = {"model": {"lineage": "L", "generation": 3, "header_sha256": "0" * 64}}
    min_area, verdict_rule = 0, "score"

    def check_image(self, image, name):  # type: ignore[no-untyped-def]
        pass

    def predict(self, images, pixel_threshold=None, min_area=None):  # type: ignore[no-untyped-def]
        from spade_ad_runtime.result import ImageResult

        thr = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        area = self.min_area if min_area is None else min_area
        out = []
        for img in images:
            m = img[..., 0].astype(np.float32) / 100
            out.append(ImageResult("array", float(m.max()), m, m, (0,), ("train.png",), self.image_threshold, thr,
                                   area, self.verdict_rule))
        return out


def _images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    for name, red in (("a", 10), ("b", 200)):
        arr = np.zeros((20, 30, 3), np.uint8)
        arr[5:9, 5:12, 0] = red
        Image.fromarray(arr).save(folder / f"{name}.png")
    (folder / "c.png").write_bytes(b"not an image")
    return folder


def test_predict_writes_spade_ads_files_and_rows(tmp_path: Path) -> None:
    from spade_ad_runtime.predict import predict

    imgs = _images(tmp_path / "in")
    s = predict("deploy", [imgs], tmp_path / "out", on_error="skip", detector=_Scorer())  # type: ignore[arg-type]
    assert (s.n_rows, s.n_failed, s.n_defective) == (3, 1, 1)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(imgs / n) for n in ("a.png", "b.png", "c.png")]
    assert rows[1]["verdict"] == "defective" and rows[1]["defect_pixels"] == 28 and rows[1]["generation"] == 3
    assert rows[1]["overlay"] == "in_b_overlay.png" and rows[1]["mask"] == "in_b_mask.png"
    assert rows[1]["regions"] == [{"box": [5, 5, 7, 4], "area": 28, "peak": 2.0, "peak_at": [5, 5], "mean": 2.0,
                                   "peak_normalised": 2.0 / 1.5}]
    assert rows[0]["regions"] == [] and rows[0]["verdict"] == "good"
    assert "c.png" in rows[2]["error"] and set(rows[2]) == {"file", "error"}
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "complete" and run["deploy"] == "deploy" and run["generation"] == 3
    assert sorted(run["outputs"]) == sorted(p.name for p in (tmp_path / "out").iterdir()
                                            if p.name not in ("run.json", "predictions.jsonl"))
    want = np.zeros((20, 30), np.float32)
    want[5:9, 5:12] = 2.0
    assert np.array_equal(np.load(tmp_path / "out" / "in_b_map.npy"), want)


def test_the_command_gives_one_line_and_exit_2_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spade_ad_runtime.cli import main

    imgs = _images(tmp_path / "in")
    for argv, message in (
        (["predict", str(tmp_path / "nope"), str(imgs), "--out", str(tmp_path / "o")], "nope: deploy folder does not"),
        (["predict", str(tmp_path / "nope"), str(imgs), "--out", str(tmp_path / "o"), "--raw", "tiff"],
         "--raw must be npy or png16"),
        (["predict", str(_folder(tmp_path)), str(imgs), "--out", str(tmp_path / "o")], "cannot load the backbone"),
        (["predict", "d", str(imgs), "--out", str(tmp_path / "o"), "--batch-size", "0"],
         "--batch-size must be at least 1"),
        (["predict", "d", str(imgs), "--out", str(tmp_path / "o"), "--max-pixels", "0"],
         "--max-pixels must be at least 1"),
    ):
        with pytest.raises(SystemExit) as code:
            main(argv)
        err = capsys.readouterr().err
        assert code.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
