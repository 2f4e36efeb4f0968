"""The HTML report: one self-contained file with every test image, filters, and F1 numbers that agree with metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

from spade_ad import SpadeSettings, metrics
from spade_ad.data import load_mvtec_category
from spade_ad.delivery.report import threshold_metrics, write_report
from spade_ad.evaluate import evaluate_category

PARAMS = SpadeSettings(k=3, k_image=2, image_size=64, calibration_images=4)


@pytest.fixture(scope="module")
def evaluated(small_train: Path) -> tuple[Any, ...]:
    cat = load_mvtec_category(small_train)
    ev = evaluate_category(cat, PARAMS, "full", keep_maps=True)
    return cat, ev.row, ev.model, ev.pred, ev.masks, ev.labels, ev


@pytest.fixture(scope="module")
def report(evaluated: tuple[Any, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(tmp_path_factory.mktemp("report") / "report.html", evaluated[-1])


def test_report_is_one_self_contained_file(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched from anywhere: no external src/href, no script or stylesheet files
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and not re.search(r"<script[^>]+src", text)
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    # the curves and the histogram are embedded pictures
    for alt in ("ROC curve", "PRO curve", "score histogram", "colour bar"):
        assert f'alt="{alt}"' in text


def test_report_has_a_row_per_test_image_sorted_by_score(report: Path, evaluated: tuple[Any, ...]) -> None:
    cat, _, _, pred, _, labels, _ = evaluated
    text = report.read_text(encoding="utf-8")
    rows = re.findall(r'<tr data-label="(\w+)" data-outcome="(\w*)" data-score="([^"]+)">', text)
    assert len(rows) == len(cat.test) == len(pred.scores)
    for s in cat.test:
        assert f"{s.path.parent.name}/{s.path.name}" in text
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert sorted(scores) == sorted(float(x) for x in pred.scores)
    assert sum(r[0] == "defective" for r in rows) == sum(labels)
    for row in rows:  # every row has an outcome consistent with its label
        assert row[1] in (("tp", "fn") if row[0] == "defective" else ("tn", "fp"))
    for key in ("all", "misses", "false-alarms", "defective", "good"):
        assert f'data-filter="{key}"' in text
    assert 'id="sort"' in text and "<script>" in text
    # each image's defect regions: counted in its row, listed in report.json as the result lists them
    notes = re.findall(r'<span class="muted(?: regions)?">(no defect region|(\d+) regions?: [^<]*)</span></td>', text)
    entries = json.loads(report.with_suffix(".json").read_text())["images"]
    assert len(notes) == len(entries) == len(rows)
    by_name = {r.name: r for r in pred}
    for (note, count), entry in zip(notes, entries, strict=True):
        want = [r.as_dict() for r in by_name[entry["name"]].regions]
        assert entry["regions"] == want and (int(count) if count else 0) == len(want), note
    assert any(entry["regions"] for entry in entries)


def test_report_f1_numbers_agree_with_metrics(report: Path, evaluated: tuple[Any, ...]) -> None:
    _, row, model, pred, _, labels, _ = evaluated
    doc = json.loads(report.with_suffix(".json").read_text())
    d = doc["decision"]
    thr = model.image_threshold_
    assert thr is not None and d["image_threshold"] == pytest.approx(thr)
    p, r, f1 = metrics.precision_recall_f1(labels, pred.scores, thr)
    assert (d["precision"], d["recall"], d["f1"]) == pytest.approx((p, r, f1))
    t_best, f1_best = metrics.best_f1_threshold(labels, pred.scores)
    assert d["best_f1_threshold"] == pytest.approx(t_best) and d["best_f1"] == pytest.approx(f1_best)
    assert d["best_f1"] >= d["f1"] - 1e-12
    y = np.asarray(labels)
    good = pred.scores[y == 0]
    assert d["false_alarm_rate"] == pytest.approx(float(np.mean(good >= thr)))
    assert d["true_positives"] + d["false_negatives"] == int(y.sum())
    assert d["false_positives"] + d["true_negatives"] == int((y == 0).sum())
    assert doc["metrics"]["image_auroc"] == pytest.approx(row["image_auroc"])
    assert len(doc["images"]) == len(labels)
    # and the HTML shows the same F1
    text = report.read_text(encoding="utf-8")
    assert f"<th>F1 at calibrated threshold</th><td>{d['f1']:.4f}</td>" in text
    assert f"<th>best F1</th><td>{d['best_f1']:.4f}</td>" in text


def test_threshold_metrics_edge_cases() -> None:
    only_good = threshold_metrics([0, 0, 0], [1.0, 2.0, 3.0], 2.5)
    assert only_good["false_alarm_rate"] == pytest.approx(1 / 3)
    assert only_good["f1"] is None and only_good["best_f1"] is None
    none = threshold_metrics([0, 1], [1.0, 2.0], None)
    assert none["f1"] is None and none["false_alarm_rate"] is None and none["best_f1"] == pytest.approx(1.0)
    perfect = threshold_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5)
    assert perfect["f1"] == 1.0 and perfect["false_alarm_rate"] == 0.0 and perfect["miss_rate"] == 0.0
    assert perfect["best_f1_threshold"] == pytest.approx(0.8)


def test_report_title_and_paper_protocol(small_train: Path, tmp_path: Path) -> None:
    ev = evaluate_category(load_mvtec_category(small_train), PARAMS, "paper", keep_maps=True)
    out = write_report(tmp_path / "r.html", ev, title="paper crop")
    assert "<title>paper crop</title>" in out.read_text(encoding="utf-8")
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["settings"]["preprocess"] == "paper" and doc["settings"]["protocol"] == "paper"
    assert [r["score"] for r in sorted(doc["images"], key=lambda r: r["name"])] == [
        float(s) for _, s in sorted(zip(ev.pred.names, ev.pred.scores, strict=True))]
    assert ev.maps[0].shape == (64, 64) and ev.pred.maps[0].shape == (96, 96)


def test_cli_report(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["report", str(small_train), "--out", str(tmp_path / "rep"), "--k", "3",
                              "--k-image", "2", "--image-size", "64", "--calibration-images", "3"], capsys)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert path == tmp_path / "rep" / "report.html" and path.is_file()
    assert (tmp_path / "rep" / "report.json").is_file()
    assert "F1" in err and "false-alarm rate" in " ".join(err.split())


def test_cli_report_refuses_a_root_of_several_categories(small_train: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a", "b"):
        (root / name).symlink_to(small_train, target_is_directory=True)
    code, _, err = run_cli(["report", str(root), "--out", str(tmp_path / "rep")], capsys)
    assert code == 2 and "report takes one category" in " ".join(err.split())


def test_report_on_a_tiled_model(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["report", str(small_train), "--out", str(tmp_path / "rep"), "--k", "3",
                              "--k-image", "2", "--image-size", "64", "--calibration-images", "3",
                              "--tile", "64", "--tile-span", "2"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["settings"]["tile"] == 64
    assert len(doc["images"]) == 6
    assert all(r["neighbours"] and all(isinstance(n, str) for n in r["neighbours"]) for r in doc["images"])
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert html.count('class="nb"') == 6 * 3  # every row shows its nearest normal images (tile mosaics)
