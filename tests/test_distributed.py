"""Fit and predict on Ray (``spade_ad.distributed``, ``--ray``): the same rows, outputs and model files as a
local run, every input exactly once when a worker process is killed and a node is removed mid-run, and one
error row per unreadable image.

Runs on a local Ray with 2 CPUs (started once, shut down at the end of the module) and a simulated
two-node cluster (``ray.cluster_utils.Cluster``) for the faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'spade-ad[ray]' (CI installs it)")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'spade-ad[ray]' (CI installs it)")

from spade_ad import Spade, distributed  # noqa: E402

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=3)
FIT_ARGS = ["--k", "3", "--k-image", "2", "--image-size", "64", "--calibration-images", "3"]
OBJECT_STORE = 80 << 20  # small: three engineers share 24 GB


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ray") / "model"
    Spade(**FAST).fit(small_train / "train" / "good").save(d)
    return d


@pytest.fixture(scope="module")
def _ray_module() -> Iterator[None]:
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_module: None) -> Iterator[None]:
    """A local Ray (2 CPUs, or as many as torch uses here, so that one worker fits), kept for the module."""
    import torch

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, torch.get_num_threads()), include_dashboard=False,
                 log_to_driver=False, object_store_memory=OBJECT_STORE, logging_level="warning")
    yield


def _files(folder: Path) -> dict[str, bytes]:
    """The files of an output or model folder; a model header without what differs between any two fits
    (the lineage id, the times in the history, and the checksums over them)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name in ("run.json", ".lock", "generations") or p.is_dir():
            continue
        data = p.read_bytes()
        if p.name == "model.json":
            header = json.loads(data)
            for key in ("lineage", "header_sha256"):
                header.pop(key)
            for entry in header["history"]:
                entry.pop("time")
            data = json.dumps(header, sort_keys=True).encode()
        out[p.name] = data
    return out


def test_predict_equals_a_local_run_field_for_field_and_byte_for_byte(
        model_dir: Path, small_train: Path, tmp_path: Path, local_ray: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [str(small_train / "test" / "scratch"), str(small_train / "test" / "good"),
              str(small_train / "test" / "blob" / "000.png")]
    code, _, err = run_cli(["predict", str(model_dir), *inputs, "--out", str(tmp_path / "local"), "--batch-size", "2"],
                           capsys)
    assert code == 0, err
    summary = distributed.predict(model_dir, inputs, tmp_path / "ray", batch_size=2)  # 3 steps, as the local run
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(local) == sorted(remote) and len(local) == 1 + 3 * 5  # predictions.jsonl + 3 files per image
    assert remote == local  # rows (field for field, in input order), overlays, maps, masks: identical bytes
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["status"] == "complete" and run["n_images"] == 5 and run["n_failed"] == 0
    assert sorted(run["outputs"]) == sorted(n for n in remote if n != "predictions.jsonl")
    assert summary.n_rows == 5 and summary.n_failed == 0 and sum(w["images"] for w in summary.workers.values()) == 5
    assert not [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]  # no spool, no temp files


def test_colliding_names_get_their_own_files_as_in_a_local_run(
        model_dir: Path, small_train: Path, tmp_path: Path, local_ray: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    from test_runs import colliding_inputs

    inputs = colliding_inputs(small_train, tmp_path / "in")
    code, _, err = run_cli(["predict", str(model_dir), *inputs, "--out", str(tmp_path / "local"), "--batch-size", "2"],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", str(model_dir), *inputs, "--out", str(tmp_path / "ray"), "--batch-size", "2",
                            "--ray", "local"], capsys)
    assert code == 0, err
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert remote == local and len(local) == 1 + 6 * 3  # every input its own three files, the same names and bytes
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert sorted(run["outputs"]) == sorted(n for n in remote if n != "predictions.jsonl")


def test_workers_load_the_generation_the_driver_pinned(
        model_dir: Path, small_train: Path, tmp_path: Path, local_ray: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from spade_ad import runs

    folder, before = tmp_path / "model", tmp_path / "before"
    shutil.copytree(model_dir, folder)
    shutil.copytree(model_dir, before)
    real_pin = runs.pin_model

    def pin_then_update(d: str | Path) -> runs.ModelPin:
        pin = real_pin(d)
        model = Spade.load(folder)  # an update committed after the driver pinned, before the workers load
        model.add([str(small_train / "test" / "good" / "001.png")], names=["extra.png"]).save(folder)
        return pin

    monkeypatch.setattr(runs, "pin_model", pin_then_update)
    inputs = [small_train / "test" / "scratch", small_train / "test" / "good"]
    distributed.predict(folder, inputs, tmp_path / "o", batch_size=2)
    header = json.loads((before / "model.json").read_text())
    assert json.loads((folder / "model.json").read_text())["generation"] == header["generation"] + 1
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert (run["generation"], run["header_sha256"]) == (header["generation"], header["header_sha256"])
    old = Spade.load(before)
    assert (run["image_threshold"], run["pixel_threshold"]) == (old.image_threshold_, old.pixel_threshold_)
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert {r["generation"] for r in rows} == {header["generation"]}
    expected = [old.predict([r["file"] for r in rows[a : a + 2]]) for a in range(0, len(rows), 2)]
    assert [r["score"] for r in rows] == [float(s) for p in expected for s in p.scores]


def test_fit_on_ray_writes_the_same_model_files(small_train: Path, tmp_path: Path, local_ray: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    train = str(small_train / "train" / "good")
    code, _, err = run_cli(["fit", train, "--out", str(tmp_path / "local"), *FIT_ARGS], capsys)
    assert code == 0, err
    code, _, err = run_cli(["fit", train, "--out", str(tmp_path / "ray"), *FIT_ARGS, "--ray", "local"], capsys)
    assert code == 0, err
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert [n.split("-")[0] for n in sorted(remote)] == ["bank", "index", "model.json"]
    assert remote == local  # the same content-addressed bank/index names and bytes, the same header


def test_a_tiled_model_fits_and_predicts_on_ray_as_locally(small_train: Path, tmp_path: Path, local_ray: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    train = str(small_train / "train" / "good")
    tiled = [*FIT_ARGS, "--tile", "64", "--tile-span", "2"]
    code, _, err = run_cli(["fit", train, "--out", str(tmp_path / "local"), *tiled], capsys)
    assert code == 0, err
    code, _, err = run_cli(["fit", train, "--out", str(tmp_path / "ray"), *tiled, "--ray", "local"], capsys)
    assert code == 0, err
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    grid = json.loads((tmp_path / "local" / "model.json").read_text())["tile_grid"]
    assert grid is not None and len(grid["ys"]) * len(grid["xs"]) > 1
    inputs = [str(small_train / "test" / "scratch"), str(small_train / "test" / "good")]
    code, _, err = run_cli(["predict", str(tmp_path / "local"), *inputs, "--out", str(tmp_path / "o_local"),
                            "--batch-size", "2"], capsys)
    assert code == 0, err
    distributed.predict(tmp_path / "local", inputs, tmp_path / "o_ray", batch_size=2)
    assert _files(tmp_path / "o_ray") == _files(tmp_path / "o_local")


def test_unreadable_image_gets_an_error_row_and_exit_code_2(model_dir: Path, small_train: Path, tmp_path: Path,
                                                            local_ray: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "c.png"):
        (src / name).write_bytes((small_train / "test" / "good" / "000.png").read_bytes())
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # in the middle of the run
    code, _, err = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "o"), "--ray", "local",
                            "--batch-size", "2"], capsys)
    line = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert "2 images in" in line and "1 failed" in line and "error: 1 of 3 images could not be read" in line
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(src / n) for n in ("a.png", "b.png", "c.png")]
    assert set(rows[1]) == {"file", "error"} and rows[1]["error"].startswith(f"{src / 'b.png'}: ")
    assert "\n" not in rows[1]["error"] and rows[0]["verdict"] and rows[2]["overlay"] == "in_c_overlay.png"
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["status"] == "complete" and run["n_failed"] == 1 and not any("in_b" in n for n in run["outputs"])
    assert not (tmp_path / "o" / "in_b_overlay.png").exists()

    # the local predict offers the same: --on-error skip gives the same rows; stop (its default) stops
    code, _, _ = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "l"), "--on-error", "skip",
                          "--batch-size", "2"], capsys)
    assert code == 2
    assert (tmp_path / "l" / "predictions.jsonl").read_bytes() == (tmp_path / "o" / "predictions.jsonl").read_bytes()
    code, _, err = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "s"), "--ray", "local",
                            "--on-error", "stop", "--batch-size", "1"], capsys)
    assert code == 2 and f"{src / 'b.png'}: " in " ".join(err.split())


def test_interrupted_run_keeps_the_rows_so_far_in_order(model_dir: Path, small_train: Path, tmp_path: Path,
                                                         local_ray: None) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        distributed.predict(model_dir, [small_train / "test"/ "scratch", small_train / "test" / "good"], out,
                            batch_size=1, progress=interrupt)
    run = json.loads((out / "run.json").read_text())
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert run["status"] == "interrupted" and run["n_images"] == len(rows) >= 2
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)  # input order (these sort alike)
    on_disk = sorted(p.name for p in out.iterdir() if p.name not in ("run.json", "predictions.jsonl"))
    assert sorted(run["outputs"]) == on_disk  # exactly the files written: a rerun into OUT is not refused
    assert not [n for n in on_disk if n.startswith(".")]


def test_score_dataset_scores_arrays_like_predict(model_dir: Path, local_ray: None) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64), dtype=np.uint8)]
    items = [{"image": images[0], "name": "first", "label": 1}, {"image": np.full((8, 8), -5), "name": "bad",
                                                                  "label": 2},
             {"image": images[1], "name": "second", "label": 3}]
    scored = distributed.score_dataset(ray.data.from_items(items), model_dir, batch_size=1)
    rows = sorted(scored.take_all(), key=lambda r: r["label"])
    assert [r["name"] for r in rows] == ["first", "bad", "second"] and "image" not in rows[0]
    assert [bool(r["failed"]) for r in rows] == [False, True, False]
    assert "bad: negative pixel values" in json.loads(rows[1]["prediction"])["error"]
    model = Spade.load(model_dir)
    expected = [model.predict([img])[0] for img in images]  # one image per batch, as batch_size=1
    for r, res in zip((rows[0], rows[2]), expected, strict=True):
        assert json.loads(r["prediction"]) == {"file": r["name"], **res.summary(), "generation": len(model.history_)}


def test_every_input_exactly_once_when_a_worker_is_killed_and_a_node_removed(
        model_dir: Path, small_train: Path, tmp_path: Path, _ray_module: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ray.cluster_utils import Cluster

    src = tmp_path / "in"
    src.mkdir()
    originals = sorted((small_train / "test").glob("*/*.png"))
    for i in range(20):
        (src / f"{i:02d}.png").symlink_to(originals[i % len(originals)])
    ray.shutdown()  # the module's local Ray: this test runs its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": OBJECT_STORE})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
    faults: list[str] = []

    def inject(stage: str, done: int, total: int) -> None:
        if done >= 4 and not faults:  # kill a worker process that is scoring (not one still loading the model)
            workers = [pid for node in nodes for pid, cmd in _children(_raylet(node))
                       if "_Scorer" in cmd and "__init__" not in cmd]
            os.kill(workers[0], signal.SIGKILL)
            faults.append(f"killed {workers[0]}")
        elif done >= 10 and len(faults) == 1:
            cluster.remove_node(nodes[1])
            faults.append("removed node")

    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        summary = distributed.predict(model_dir, [src], tmp_path / "ray", workers=2, threads=1, batch_size=1,
                                      progress=inject)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(faults) == 2, faults
    rows = [json.loads(x) for x in (tmp_path / "ray" / "predictions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(src / f"{i:02d}.png") for i in range(20)]  # each once, in order
    assert summary.n_rows == 20 and summary.n_failed == 0
    assert all((tmp_path / "ray" / r[k]).is_file() for r in rows for k in ("overlay", "map", "mask"))
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["status"] == "complete"
    assert not [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]  # a killed writer's debris

    # and the rows are those of a local run with the workers' thread count
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(["predict", str(model_dir), str(src), "--out", str(tmp_path / "local"), "--batch-size",
                                "1"], capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")


def _raylet(node: object) -> int:
    return int(node.all_processes["raylet"][0].process.pid)  # type: ignore[attr-defined]


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``parent`` (the worker processes of one node)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append((int(d), cmd))
    return found


def test_options_and_a_missing_ray_give_one_line(model_dir: Path, small_train: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    one = str(small_train / "test" / "good" / "000.png")
    for argv, message in ((["--workers", "2"], "--workers needs --ray"),
                          (["--on-error", "maybe"], "--on-error must be skip or stop, got 'maybe'"),
                          (["--ray", "local", "--workers", "0"], "workers must be an integer >= 1, got 0")):
        code, _, err = run_cli(["predict", str(model_dir), one, "--out", str(tmp_path / "o"), *argv], capsys)
        assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = run_cli(["predict", str(model_dir), one, "--out", str(tmp_path / "o"), "--ray", "local"], capsys)
    assert code == 2 and "Ray is not installed" in err and "pip install 'spade-ad[ray]'" in " ".join(err.split())


def test_the_core_never_imports_ray() -> None:
    code = ("import sys, spade_ad, spade_ad.model, spade_ad.distributed, spade_ad.delivery.cli, "
            "spade_ad.delivery.inspector; assert 'ray' not in sys.modules, 'ray was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert r.returncode == 0, r.stderr
