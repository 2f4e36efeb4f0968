"""``spade-ad export`` and spade-ad-runtime: the deploy folder, and the same answers without torch.

The runtime's own tests (``runtime/tests``) run in an environment without torch; here both packages are
installed, so the runtime is held to spade-ad itself: its exact search to the engine, its image and map
resizing to torch's, and a deploy folder's scores, maps, verdicts and masks to the model's.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from spade_ad import Spade, SpadeSettings
from spade_ad import export as exp
from spade_ad.correspondence import nn_distances as engine_nn
from spade_ad.correspondence import search as engine
from spade_ad.correspondence.maps import combine_levels
from spade_ad.preprocess import Preprocessor
from spade_ad_runtime import deploy, imaging
from spade_ad_runtime import detector as detector_module
from spade_ad_runtime import search as rt
from spade_ad_runtime.detector import Detector

RANDOM = ["--weights", "random"]  # the test models' backbone


def test_one_format_one_search_rule() -> None:
    """The constants the two packages share are the same (the runtime reads what export writes; the
    search's error bounds are the engine's)."""
    assert (exp.FORMAT, exp.FORMAT_VERSION) == (deploy.FORMAT, deploy.FORMAT_VERSION)
    for dim in (24, 40, 112, 320):
        assert rt.G_E(dim) == engine.G_E(dim)
        assert rt.eps_factor(dim) == engine._eps_factor(dim, 0.0)


@pytest.mark.parametrize("kappa", [1, 5])
def test_runtime_search_equals_the_engine(kappa: int) -> None:
    """Same squared distances and the same final means, bit for bit (the canonical answer: exact_d2 of the
    kappa nearest rows, correctly rounded square roots summed in a fixed order). torch's own CPU sqrt is not
    always correctly rounded (about one value in five one unit off, torch 2.14, AVX2): the engine takes the
    roots in float64, as the runtime does."""
    r = np.random.default_rng(kappa)
    hw = 196
    q = (r.normal(size=(hw, 40)) + 1).astype(np.float32)
    g = (r.normal(size=(hw * 8, 40)) + 1).astype(np.float16).astype(np.float32)
    a = torch.from_numpy(g[np.tile(np.arange(len(g)), hw)])
    b = torch.from_numpy(q[np.repeat(np.arange(hw), len(g))])
    assert np.array_equal(engine.exact_d2(a, b).numpy(), rt.exact_d2(a.numpy(), b.numpy()))
    want = engine_nn(torch.from_numpy(q), torch.from_numpy(g), kappa).numpy()
    assert np.array_equal(want.view(np.int32), rt.nn_distances(q, g, kappa).view(np.int32))
    d2 = np.sort(r.random((5000, kappa)).astype(np.float32) * np.float32(1e-3), axis=1)
    assert np.array_equal(engine.mean_sqrt(torch.from_numpy(d2)).numpy().view(np.int32),
                          rt.mean_sqrt(d2).view(np.int32))


def test_the_two_searches_agree_on_real_features(bottle: Path, tmp_path: Path) -> None:
    """On real bottle features (the runtime's, given to both), the engine's search of the gallery merged from
    the fit-time index and the runtime's grouped search (first bound from each query's own position) give
    the same level maps, bit for bit, for kappa 1 and 3 (the search's kappa is its own argument)."""
    from spade_ad.correspondence.gallery import indexed_pays
    from spade_ad.correspondence.gallery import level_maps as engine_maps

    train, tests = _pick(bottle, 5, 1)
    model = Spade(SpadeSettings()).fit([str(p) for p in train])
    model.save(tmp_path / "model")
    exp.export(tmp_path / "model", tmp_path / "deploy")
    det = Detector.load(tmp_path / "deploy")
    state = model.state_
    hw = state.level_shapes[0][0] * state.level_shapes[0][1]
    for kappa in (1, 3):
        assert indexed_pays(torch.device("cpu"), hw, 5 * hw, 24, kappa)  # level 0 takes the merged gallery
        det.search.kappa = kappa
        for path in tests[:2]:
            levels, gvec = det.features(np.asarray(Image.open(path).convert("RGB")))
            _, gallery = det.retrieve(gvec)
            got = det.level_maps(levels, gallery)
            want = engine_maps([torch.from_numpy(x)[None] for x in levels], torch.from_numpy(gallery)[None],
                               state.bank, state.level_shapes, kappa, 4 << 20)
            for a, b in zip(got, want, strict=True):
                assert np.array_equal(a.view(np.int32), b[0].numpy().view(np.int32))


def test_runtime_resizing_matches_torch() -> None:
    r = np.random.default_rng(0)
    img = r.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    for mode, shape in (("resize", None), ("aspect", (320, 224)), ("paper", None)):
        p = Preprocessor(mode, 224, shape)
        assert np.abs(p.to_input(img).numpy() - imaging.to_input(img, mode, 224, p.input_shape)).max() < 1e-3
        m = torch.rand(*p.input_shape)
        assert np.abs(p.map_to_image(m, 300, 200).numpy() - imaging.map_to_image(m.numpy(), mode, 224, 300, 200)
                      ).max() < 1e-6
    for shape in ((120, 90), (600, 400), (301, 199)):  # tiles' rescale: torch's bilinear, AA when shrinking
        shrink = shape[0] < 300 or shape[1] < 200
        t = torch.nn.functional.interpolate(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None],
                                            size=shape, mode="bilinear", align_corners=False, antialias=shrink)
        want = t[0].permute(1, 2, 0).numpy()
        got = imaging.rescale(img, shape)
        assert got.dtype == np.uint8 and np.abs(got.astype(np.float32) - want).max() <= 0.5 + 1e-3
        fm = r.random((40, 30)).astype(np.float32)
        tm = torch.nn.functional.interpolate(torch.from_numpy(fm)[None, None], size=shape, mode="bilinear",
                                             align_corners=False, antialias=shape[0] < 40 or shape[1] < 30)
        assert np.abs(imaging.rescale(fm, shape) - tm[0, 0].numpy()).max() < 1e-5
    lv = [torch.rand(1, 56, 56), torch.rand(1, 28, 28), torch.rand(1, 14, 14)]
    want = combine_levels(lv, 224, 4.0)[0].numpy()
    assert np.abs(want - imaging.combine_levels([x[0].numpy() for x in lv], (224, 224), 4.0)).max() < 1e-6


def _parity(train: list[Path], tests: list[Path], settings: SpadeSettings, tmp: Path,
            zoned: bool = False) -> tuple[float, float]:
    zone = None
    if zoned:  # an inspection zone: the middle of the image, less a corner
        h, w = np.asarray(Image.open(train[0])).shape[:2]
        zone = np.zeros((h, w), bool)
        zone[h // 8 : h - h // 8, w // 8 : w - w // 8] = True
        zone[: h // 2, : w // 3] = False
    model = Spade(settings).fit([str(p) for p in train], zone=zone)
    model.save(tmp / "model")
    exp.export(tmp / "model", tmp / "deploy")
    pred = model.predict([str(p) for p in tests])
    got = Detector.load(tmp / "deploy").predict([str(p) for p in tests])
    worst_score = worst_map = 0.0
    for i, res in enumerate(got):
        assert res.name == str(tests[i])
        worst_score = max(worst_score, abs(res.score - pred.scores[i]) / abs(pred.scores[i]))
        worst_map = max(worst_map, float(np.abs(res.map - pred.maps[i]).max() / np.abs(pred.maps[i]).max()))
        assert res.verdict == pred[i].verdict
        if zone is not None:
            assert not res.map[~model.state_.zone.at(*res.map.shape)].any()  # type: ignore[union-attr]
        # masks: identical except where the map is within the maps' tolerance of the threshold (a value
        # computed by two different backbone kernels can fall on either side of it)
        thr = pred.pixel_threshold
        assert res.mask is not None and thr is not None
        differ = res.mask != pred[i].mask
        assert np.all(np.abs(pred.maps[i][differ] - thr) <= 1e-5 * thr), int(differ.sum())
        assert res.neighbours == pred[i].neighbours and res.neighbour_names == pred[i].neighbour_names
        row = pred[i].summary()
        assert res.summary().keys() == row.keys()
        assert abs(res.summary()["defect_pixels"] - row["defect_pixels"]) <= int(differ.sum())
        if not differ.any():
            assert_same_regions(res.summary()["regions"], row["regions"], pred.maps[i])
    return worst_score, worst_map


def _pick(root: Path, n_train: int, per_type: int) -> tuple[list[Path], list[Path]]:
    train = sorted((root / "train" / "good").glob("*.png"))[:n_train]
    tests = [p for sub in sorted((root / "test").iterdir()) for p in sorted(sub.glob("*.png"))[:per_type]]
    return train, tests


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paper", "fast", "accurate", "highres"])
@pytest.mark.parametrize("data, per_type", [("bottle", 1), ("metal_plate", 2)])
def test_runtime_gives_spade_ad_answers(data: str, per_type: int, preset: str, tmp_path: Path,
                                        request: pytest.FixtureRequest) -> None:
    """bottle and metal_plate test images, the default and every preset: scores and maps within 1e-5 (``fast``
    with the regions verdict rule and a least region area: the same verdicts, masks and regions; ``accurate``
    with an inspection zone; ``highres``, tiled, with one on metal_plate: the same tiles to the byte, the
    same stitching, the same per-position score scales)."""
    train, tests = _pick(request.getfixturevalue(data), 12, per_type)
    regions = {"min_area": 400, "verdict_rule": "regions"} if preset == "fast" else {}
    s = SpadeSettings() if preset == "paper" else SpadeSettings.from_preset(preset, **regions)
    zoned = preset == "accurate" or preset == "highres" and data == "metal_plate"
    score, amap = _parity(train, tests, s, tmp_path, zoned=zoned)
    assert score < 1e-5 and amap < 1e-5, (score, amap)


def test_export_cli(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    Spade(SpadeSettings(weights="random", k=3)).fit(str(small_train / "train" / "good")).save(model)
    code, out, err = run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)
    assert code == 0, err
    header = deploy.read_header(tmp_path / "d")
    assert header["backbone"]["weights_id"] == "random:seed0" and header["backbone"]["opset"] == exp.OPSET
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted([*deploy.FILES, deploy.HEADER])
    code, out, err = run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)
    assert code == 2 and "already exists (use --overwrite" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "e"), *RANDOM], capsys)
    assert code == 2 and "model folder does not exist" in err and not (tmp_path / "e").exists()
    before = (tmp_path / "d" / "deploy.json").read_bytes()
    code, out, err = run_cli(["export", str(model), "--out", str(tmp_path / "d"), "--overwrite", *RANDOM], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "d" / "deploy.json").read_bytes())["files"]["bank.safetensors"] == \
        json.loads(before)["files"]["bank.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["d", "model"]  # no staging folder left beside it


def test_an_interrupted_export_leaves_nothing(small_train: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    Spade(SpadeSettings(weights="random", k=3)).fit(str(small_train / "train" / "good")).save(model)

    def stop(*args: object) -> list[str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(exp, "export_onnx", stop)
    with pytest.raises(KeyboardInterrupt):
        exp.export(model, tmp_path / "out" / "d", weights="random")
    assert os.listdir(tmp_path / "out") == []


def assert_same_regions(r1: list[dict[str, Any]], r2: list[dict[str, Any]], amap: np.ndarray) -> None:
    """Two rows' regions of one mask: the same boxes and areas; peaks and means within the parity tolerance
    (a peak's position may move between pixels whose values tie within it)."""
    assert [(r["box"], r["area"]) for r in r1] == [(r["box"], r["area"]) for r in r2]
    for a, b in zip(r1, r2, strict=True):
        for key in ("peak", "mean", "peak_normalised"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
        (x1, y1), (x2, y2) = a["peak_at"], b["peak_at"]
        assert abs(amap[y1, x1] - amap[y2, x2]) <= 1e-5 * abs(a["peak"])


@pytest.mark.parametrize("tiled", [False, True])
def test_runtime_predict_writes_what_spade_ad_predict_writes(small_train: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str], tiled: bool) -> None:
    """The same inputs give the same files, names, run.json and rows from both commands (numbers within the
    parity tolerance), an unreadable image the same row and exit code; a tiled model (64-pixel tiles of the
    96-pixel images, 4 each) too."""
    from PIL import Image

    from spade_ad_runtime import cli as rt_cli

    model = tmp_path / "model"
    tiles = {"tile": 64, "tile_scale": 1.0, "tile_span": 0.0} if tiled else {}
    Spade(SpadeSettings(weights="random", k=3, **tiles)).fit(str(small_train / "train" / "good")).save(model)
    assert run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)[0] == 0
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    inputs = [str(p) for p in sorted((small_train / "test").iterdir())] + [str(junk)]
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    code, _, err1 = run_cli(["predict", str(model), *inputs, "--out", str(o1), "--on-error", "skip", *RANDOM], capsys)
    with pytest.raises(SystemExit) as exit2:
        rt_cli.main(["predict", str(tmp_path / "d"), *inputs, "--out", str(o2), "--on-error", "skip"])
    err2 = capsys.readouterr().err
    assert code == exit2.value.code == 2
    assert "1 of" in err1 and err1.split("error:")[1].replace("o1", "o2") == err2.split("error:")[1]
    assert sorted(p.name for p in o1.iterdir()) == sorted(p.name for p in o2.iterdir())
    run1, run2 = (json.loads((o / "run.json").read_text()) for o in (o1, o2))
    assert run1.pop("model") == str(model) and run2.pop("deploy") == str(tmp_path / "d")
    assert {k: v for k, v in run1.items() if k != "seconds"} == {k: v for k, v in run2.items() if k != "seconds"}
    rows1, rows2 = ([json.loads(x) for x in (o / "predictions.jsonl").read_text().splitlines()] for o in (o1, o2))
    assert len(rows1) == len(rows2) == len(list(small_train.glob("test/*/*.png"))) + 1
    thr = run1["pixel_threshold"]
    for a, b in zip(rows1, rows2, strict=True):
        assert a.keys() == b.keys()
        for key, va in a.items():
            if isinstance(va, float):
                assert abs(va - b[key]) <= 1e-5 * abs(va) + 1e-9, (key, va, b[key])
            elif key not in ("defect_pixels", "regions"):
                assert va == b[key], key
        if "error" in a:
            continue
        m1, m2 = np.load(o1 / a["map"]), np.load(o2 / b["map"])
        assert m1.shape == m2.shape and np.abs(m1 - m2).max() <= 1e-5 * np.abs(m1).max()
        k1, k2 = (np.asarray(Image.open(o / a["mask"])) > 0 for o in (o1, o2))
        assert np.all(np.abs(m1[k1 != k2] - thr) <= 1e-5 * thr) and abs(a["defect_pixels"] - b["defect_pixels"]) \
            == int((k1 != k2).sum())
        if np.array_equal(k1, k2):  # the same mask: the same regions, their scores within the tolerance
            assert_same_regions(a["regions"], b["regions"], m1)
        v1, v2 = (np.asarray(Image.open(o / a["overlay"])).astype(int) for o in (o1, o2))
        assert v1.shape == v2.shape and np.mean(v1 != v2) < 0.01  # a colour step where a value sits on a bin edge


def test_both_packages_are_one_version() -> None:
    """spade-ad pins the runtime it shares its protocol with to its own version."""
    import tomllib

    import spade_ad
    import spade_ad_runtime

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"spade-ad-runtime=={spade_ad.__version__}" in deps
    assert spade_ad_runtime.__version__ == spade_ad.__version__


def test_a_graph_that_reads_external_data_is_refused(tmp_path: Path) -> None:
    """A deploy folder whose backbone names an external weights file (here one outside the folder) is refused
    with one line before onnxruntime could open that file."""
    import onnx
    from onnx import TensorProto, helper

    from spade_ad_runtime.deploy import DeployError

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.ones(4, np.float32).tobytes())
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../outside.bin")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    d = tmp_path / "deploy"
    d.mkdir()
    onnx.save(helper.make_model(graph), str(d / "backbone.onnx"))
    for name in ("bank.safetensors", "global.safetensors"):
        (d / name).write_bytes(b"x")
    header = {"format": deploy.FORMAT, "format_version": deploy.FORMAT_VERSION,
              "files": {n: deploy.file_sha256(d / n) for n in deploy.FILES},
              "settings": {k: 1 for k in ("preprocess", "image_size", "k", "k_image", "kappa", "sigma", "image_score")},
              "input_shape": [4, 4], "level_shapes": [[1, 1]], "train_names": [], "calibration": {},
              "model": {"lineage": "L", "generation": 1, "header_sha256": "0" * 64}, "image_threshold": None,
              "pixel_threshold": None, "grid": None}
    header["header_sha256"] = deploy.header_digest(header)
    (d / "deploy.json").write_text(json.dumps(header))
    with pytest.raises(DeployError, match="backbone.onnx: the graph refers to external data files") as err:
        Detector.load(d)
    assert "\n" not in str(err.value)


def test_the_index_changes_the_work_not_the_answer(small_train: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The runtime's search grouped by the bank's fit-time index gives the bits of the plain search."""
    model = tmp_path / "model"
    Spade(SpadeSettings(weights="random", k=3, kappa=2)).fit(str(small_train / "train" / "good")).save(model)
    assert run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)[0] == 0
    det = Detector.load(tmp_path / "d")
    assert all(ix is not None for ix in det.search.index)
    images = [str(p) for p in sorted(small_train.glob("test/*/*.png"))]
    grouped = det.predict(images)
    det.search.index = [None] * len(det.search.index)
    plain = det.predict(images)
    for a, b in zip(grouped, plain, strict=True):
        assert np.array_equal(a.input_map, b.input_map) and a.score == b.score


def test_the_runtime_command_interrupted_by_a_signal(small_train: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A real `spade-ad-runtime predict` process stopped by SIGINT or SIGTERM mid-run: exit 130 or 143 with its
    line, run.json says interrupted and lists exactly the files that exist, every row is a complete line."""
    import signal
    import subprocess
    import sys
    import time

    model = tmp_path / "model"
    Spade(SpadeSettings(weights="random", k=3)).fit(str(small_train / "train" / "good")).save(model)
    assert run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)[0] == 0
    many = tmp_path / "many"
    many.mkdir()
    for i in range(400):  # enough work to be interrupted mid-run
        (many / f"{i:03d}.png").symlink_to(next((small_train / "test" / "good").glob("*.png")))
    # batches of 2 are scored in the command's process, batches of 16 on its search workers
    for sig, code, word, batch in ((signal.SIGINT, 130, "interrupted", "2"), (signal.SIGTERM, 143, "terminated", "2"),
                                   (signal.SIGINT, 130, "interrupted", "16")):
        out = tmp_path / f"o{code}_{batch}"
        p = subprocess.Popen([sys.executable, "-m", "spade_ad_runtime.cli", "predict", str(tmp_path / "d"),
                              str(many), "--out", str(out), "--batch-size", batch], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not ((out / "predictions.jsonl").is_file() and (out / "predictions.jsonl").stat().st_size) \
                and time.time() < deadline:
            time.sleep(0.05)  # the first rows are written
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode == code and err.strip().endswith(word), err
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "interrupted" and 0 < run["n_images"] < 400
        assert sorted(run["outputs"]) == sorted(f.name for f in out.iterdir()
                                                if f.name not in ("run.json", "predictions.jsonl"))
        rows = (out / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == run["n_images"] and all(json.loads(r)["file"] for r in rows)


@pytest.mark.parametrize("tiled", [False, True])
def test_a_batch_searched_on_worker_processes_gives_the_same_bits(small_train: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  tiled: bool) -> None:
    """A batch large enough is searched on forked worker processes (not this one): the results are those of
    the one-process path, bit for bit (a tiled model's tiles too); closing stops the workers."""
    model = tmp_path / "model"
    tiles = {"tile": 64, "tile_scale": 1.0, "tile_span": 0.0} if tiled else {}
    Spade(SpadeSettings(weights="random", k=3, **tiles)).fit(str(small_train / "train" / "good")).save(model)
    assert run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)[0] == 0
    images = [str(p) for p in sorted(small_train.glob("test/*/*.png"))] * 2
    assert len(images) >= detector_module.POOL_MIN_IMAGES
    alone = Detector.load(tmp_path / "d", threads=1).predict(images)
    det = Detector.load(tmp_path / "d", threads=2)
    pooled = det.predict(images)
    assert det._workers is not None
    pids = [p.pid for p in det._workers._pool._processes.values()]  # type: ignore[attr-defined]
    assert len(pids) == 2 and os.getpid() not in pids
    for a, b in zip(alone, pooled, strict=True):
        assert a.name == b.name and a.score == b.score and a.neighbours == b.neighbours
        assert np.array_equal(a.map, b.map) and np.array_equal(a.input_map, b.input_map)
    det.close()
    assert det._workers is None and not any(map(_running, pids))
    det = Detector.load(tmp_path / "d", threads=2)  # dropped without close(): its workers end with it
    det.predict(images)
    assert det._workers is not None
    pids = [p.pid for p in det._workers._pool._processes.values()]  # type: ignore[attr-defined]
    del det
    gc.collect()
    deadline = time.time() + 30
    while any(map(_running, pids)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, pids))


def test_search_workers_end_with_their_process(small_train: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A process scoring a batch on workers is killed (SIGKILL: nothing of it runs): its workers end too."""
    import signal
    import subprocess
    import sys
    import time

    model = tmp_path / "model"
    Spade(SpadeSettings(weights="random", k=3)).fit(str(small_train / "train" / "good")).save(model)
    assert run_cli(["export", str(model), "--out", str(tmp_path / "d"), *RANDOM], capsys)[0] == 0
    images = [str(p) for p in sorted(small_train.glob("test/*/*.png"))] * 2
    script = (f"import sys, time\nfrom spade_ad_runtime import Detector\nd = Detector.load({str(tmp_path / 'd')!r}, "
              f"threads=2)\nd.predict({images!r})\n"
              "print(*[p.pid for p in d._workers._pool._processes.values()], flush=True)\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2 and all(map(_running, pids))
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.time() + 30
    while any(map(_running, pids)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, pids))


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
