"""End to end on the real MVTec AD bottle category with default settings: the accuracy floors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spade_ad import SpadeSettings
from spade_ad.data import load_mvtec_category
from spade_ad.evaluate import evaluate_category

# Floors: the paper protocol ones are the issue's; the full-protocol ones sit just under what was measured.
FLOORS = {
    "paper": {"image_auroc": 0.995, "pixel_auroc": 0.975, "aupro": 0.93},
    "full": {"image_auroc": 0.99, "pixel_auroc": 0.98, "aupro": 0.95},  # measured 0.9952 / 0.9842 / 0.9584
}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["paper", "full"])
def test_bottle_default_settings_meet_the_floors(bottle: Path, protocol: str) -> None:
    cat = load_mvtec_category(bottle)
    assert len(cat.train) == 209 and len(cat.test) == 83
    ev = evaluate_category(cat, SpadeSettings(), protocol, keep_maps=True)
    row, model, pred, labels = ev.row, ev.model, ev.pred, ev.labels
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"bottle_{protocol}.json").write_text(json.dumps(row, indent=2))
    print(protocol, row)
    for key, floor in FLOORS[protocol].items():
        assert row[key] >= floor, f"{protocol} {key} = {row[key]:.4f} < {floor}"
    # maps in the protocol's frame (the crop for paper), and always at the images' own resolution for users
    assert all(m.shape == k.shape for m, k in zip(ev.maps, ev.masks, strict=True))
    assert ev.maps[0].shape == ((224, 224) if protocol == "paper" else (900, 900))
    assert pred.maps[0].shape == (900, 900)
    assert model.settings.preprocess == ("paper" if protocol == "paper" else "resize")
    # the calibrated thresholds flag few good test images
    good = [s for s, y in zip(pred.scores, labels, strict=True) if y == 0]
    assert model.image_threshold_ is not None
    assert sum(s >= model.image_threshold_ for s in good) <= len(good) // 2
