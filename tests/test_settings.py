"""One definition of every setting: bounds, the estimator's parameters, generated CLI options, and a new
setting added in one place appearing in every command, the model file and ``load``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from spade_ad import Spade, SpadeError, SpadeSettings
from spade_ad import settings as settings_module

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kappa": 10**6}, "kappa must be an integer between 1 and 1000"),
        ({"sigma": 1e9}, r"sigma must be in \[0, 64\]"),
        ({"sigma": float("inf")}, "sigma must be a finite number"),
        ({"sigma": float("nan")}, "sigma must be a finite number"),
        ({"image_size": 2048}, "image_size must be an integer between 32 and 1024"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": "50"}, "k must be a number"),
        ({"false_alarm_rate": 0.0}, r"false_alarm_rate must be in \(0, 1\)"),
        ({"preprocess": "crop"}, "unknown preprocess 'crop'; choose one of: resize, paper"),
        ({"backbone": "vgg"}, "unknown backbone 'vgg'"),
        ({"k_image": -1}, "k_image must be an integer between 1"),
    ],
)
def test_settings_are_validated_with_clear_messages(changes: dict, message: str) -> None:
    with pytest.raises(SpadeError, match=message):
        SpadeSettings(**changes)
    with pytest.raises(SpadeError, match=message):
        Spade(**changes)


def test_get_params_is_every_constructor_parameter() -> None:
    m = Spade(k=7, device="cpu")
    params = m.get_params()
    assert set(params) == set(settings_module.names())
    assert {"device", "weights", "tile_bytes", "batch_size"} <= set(params)
    assert params["k"] == 7 and Spade(**params).settings == m.settings
    assert m.set_params(kappa=3).settings.kappa == 3
    with pytest.raises(SpadeError, match="unknown setting 'kapa'"):
        Spade(kapa=3)
    # runtime settings are not stored in a model
    assert "device" not in SpadeSettings().model_dict() and "k" in SpadeSettings().model_dict()


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def test_fit_benchmark_and_report_list_the_same_generated_options(capsys: pytest.CaptureFixture[str]) -> None:
    wanted = {f"--{f.name.replace('_', '-')}" for f in settings_module.fields() if settings_module.spec_of(f).cli}
    seen = []
    for command in ("fit", "benchmark", "report"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0
        opts = _options(out) & (wanted | {"--tile-bytes"})
        assert opts == wanted, (command, wanted - opts)
        seen.append(opts)
    assert seen[0] == seen[1] == seen[2]


def test_a_new_setting_is_one_edit(tmp_path: Path, small_train: Path) -> None:
    """Add a field to SpadeSettings in a copy of the package: fit, benchmark and report offer it, the model
    file stores it and load gives it back, with no other edit."""
    pkg = tmp_path / "src"
    shutil.copytree(SRC / "spade_ad", pkg / "spade_ad", ignore=shutil.ignore_patterns("__pycache__"))
    path = pkg / "spade_ad" / "settings.py"
    text = path.read_text()
    anchor = "    device: str = setting("
    assert anchor in text
    new = '    dummy_knob: int = setting(3, "a dummy setting for a test", low=0, high=9)\n'
    text = text.replace(anchor, new + anchor, 1)
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    cli = [sys.executable, "-c", "import sys; from spade_ad.delivery.cli import main; sys.argv[0] = 'spade-ad'; main()"]
    for command in ("fit", "benchmark", "report"):
        out = subprocess.run([*cli, command, "--help"], capture_output=True, text=True, env=env, check=True).stdout
        assert "--dummy-knob" in out, command
    model = tmp_path / "m"
    run = subprocess.run([*cli, "fit", str(small_train / "train" / "good"), "--out", str(model), "--k", "2",
                          "--image-size", "64", "--calibration-images", "2", "--dummy-knob", "7"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads((model / "model.json").read_text())["settings"]["dummy_knob"] == 7
    bad = subprocess.run([*cli, "fit", str(small_train / "train" / "good"), "--out", str(tmp_path / "x"),
                          "--dummy-knob", "12"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "dummy_knob must be an integer between 0 and 9, got 12" in bad.stderr
    code = f"from spade_ad import Spade; print(Spade.load({str(model)!r}).settings.dummy_knob)"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert got.stdout.strip() == "7"


def test_model_json_settings_are_revalidated_on_load(small_train: Path, tmp_path: Path) -> None:
    from spade_ad.persistence import header_digest

    m = Spade(k=2, k_image=1, image_size=64, calibration_images=2).fit(small_train / "train" / "good")
    d = m.save(tmp_path / "m")
    header = json.loads((d / "model.json").read_text())
    header["settings"]["kappa"] = 10**6
    header["header_sha256"] = header_digest(header)  # a consistent but invalid header
    (d / "model.json").write_text(json.dumps(header))
    with pytest.raises(SpadeError, match="kappa must be an integer between 1 and 1000"):
        Spade.load(d)
    del header["settings"]["kappa"]
    header["header_sha256"] = header_digest(header)
    (d / "model.json").write_text(json.dumps(header))
    with pytest.raises(SpadeError, match="setting 'kappa' is missing"):
        Spade.load(d)


def test_two_threads_predicting_at_once_match_one_thread(small_train: Path) -> None:
    """Concurrent callers (the inspector's thread pool) get exactly the maps of a single caller."""
    from concurrent.futures import ThreadPoolExecutor

    m = Spade(k=4, k_image=2, image_size=96, calibration_images=0).fit(small_train / "train" / "good")
    files = sorted((small_train / "test").rglob("*.png"))
    alone = [m.predict([f]) for f in files]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda f: m.predict([f]), files * 2))
    for a, b in zip(alone * 2, together, strict=True):
        assert np.array_equal(a.maps[0], b.maps[0]) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.neighbours, b.neighbours)
