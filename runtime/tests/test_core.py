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
from spade_ad_runtime.search import exact_d2, mean_sqrt, nn_distances


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
    for hw_arg in (None, hw):
        for block in (1 << 10, 64 << 20):  # one query per block, or all at once
            got = nn_distances(q, g, kappa, block_bytes=block, grid_hw=hw_arg)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert want[5] == 0.0 or kappa > 1
    ref = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    ref = np.sort(ref, axis=1)[:, :kappa].mean(1)
    assert np.allclose(want, ref, rtol=1e-6, atol=1e-6)


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
    header = {"format": FORMAT, "format_version": version, "files": {n: file_sha256(d / n) for n in FILES}}
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
    h = json.loads((d / "deploy.json").read_text())
    h.update(settings={}, input_shape=[32, 32], level_shapes=[[8, 8]], image_threshold=None, pixel_threshold=None,
             train_names=[], calibration={}, grid=None)
    h["header_sha256"] = header_digest(h)
    (d / "deploy.json").write_text(json.dumps(h))
    with pytest.raises(DeployError, match="backbone.onnx: cannot load the backbone"):
        Detector.load(d)


def test_torch_is_not_imported() -> None:
    import sys

    import spade_ad_runtime.detector  # noqa: F401

    assert "torch" not in sys.modules
