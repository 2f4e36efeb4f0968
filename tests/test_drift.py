"""Drift: the rolling window of recent scores against the model's calibration (spade_ad.drift)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from scipy import stats

from spade_ad.drift import MIN_IMAGES, DriftMonitor, health_line


def _monitor(rng: np.random.Generator) -> tuple[DriftMonitor, float]:
    calib = list(rng.normal(10.0, 1.0, 200))
    threshold = float(np.quantile(calib, 0.99, method="higher"))
    return DriftMonitor([c for c in calib if c < threshold], 0.01, window=300), threshold


def test_a_line_of_good_parts_is_ok_and_a_drifting_one_is_not() -> None:
    rng = np.random.default_rng(0)
    m, threshold = _monitor(rng)
    for s in rng.normal(10.0, 1.0, MIN_IMAGES - 1):
        m.add(float(s), "defective" if s >= threshold else "good")
    assert m.health()["status"] == "warming up"
    for s in rng.normal(10.0, 1.0, 300):
        m.add(float(s), "defective" if s >= threshold else "good")
    h = m.health()
    assert h["status"] == "ok" and h["images"] == 300 and h["advice"] is None
    assert 0.3 < h["good_score_percentile"] < 0.7
    # the numbers are the binomial's: the band its central 99%, the p-value its upper tail
    lo, hi = stats.binom.ppf([0.005, 0.995], 300, 0.01) / 300
    assert h["expected_band"] == [lo, hi]
    assert h["binomial_p"] == pytest.approx(stats.binom.sf(h["defective"] - 1, 300, 0.01))
    # lighting changes: good parts score 1.5 higher; the share flagged and the good scores both move
    for s in rng.normal(11.5, 1.0, 300):
        m.add(float(s), "defective" if s >= threshold else "good")
    d = m.health()
    assert d["status"] == "drift" and d["defective_share"] > hi and d["good_score_percentile"] > 0.7
    assert "spade-ad update" in d["advice"] and "drift" in health_line(d)


def test_without_thresholds_there_is_no_verdict_on_drift() -> None:
    m = DriftMonitor(None, 0.01, active=False)
    m.add(1.0, None)
    assert m.health()["status"] == "no thresholds" and m.health()["images"] == 0


def test_the_watcher_records_health_and_history_shows_it(small_train: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from spade_ad import Spade
    from spade_ad.watch import watch

    model_dir = tmp_path / "m"
    Spade(k=3, k_image=2, image_size=64, calibration_images=4).fit(str(small_train / "train" / "good")).save(
        model_dir)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in sorted((small_train / "test").glob("*/*.png")):
        (inbox / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    s = watch(model_dir, inbox, tmp_path / "out", once=True, settle=0.0)
    h = json.loads((tmp_path / "out" / "health.json").read_text())
    assert h["images"] == s.n_rows == 6 and h["status"] == "warming up" and h["generation"] == 1
    assert h["defective"] == s.n_defective
    code, _, err = run_cli(["history", str(model_dir), "--health", str(tmp_path / "out")], capsys)
    assert code == 0 and "health warming up: 6 recent image(s)" in err
    code, _, err = run_cli(["history", str(model_dir), "--health", str(tmp_path)], capsys)
    assert code == 2 and "no health record here" in err


def test_the_inspector_reports_health(small_train: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spade_ad import Spade
    from spade_ad.delivery.inspector import create_app

    model_dir = tmp_path / "m"
    Spade(k=3, k_image=2, image_size=64, calibration_images=4).fit(str(small_train / "train" / "good")).save(
        model_dir)
    c = TestClient(create_app(model_dir), base_url="http://localhost")
    assert c.get("/health").json()["images"] == 0
    for p in sorted((small_train / "test").glob("*/*.png"))[:3]:
        assert c.post("/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).status_code == 200
    h = c.get("/health").json()
    assert h["images"] == 3 and h["status"] == "warming up" and h["generation"] == 1 and "3 recent" in h["line"]
