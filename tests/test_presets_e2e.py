"""End to end on the real data beyond bottle's defaults: MPDD metal_plate, the presets on both categories,
and the tiled mode on BSData's small pits. Floors sit just under what benchmarks/ablation.py and
benchmarks/highres.py measured (benchmarks/results/ablation.json, highres_*.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_bottle_e2e import ARTIFACTS

from spade_ad import SpadeSettings
from spade_ad.data import load_mvtec_category
from spade_ad.evaluate import evaluate_category

# (category, preset, protocol) -> floors
FLOORS = {
    # measured 0.9848 / 0.9887 / 0.9385 (the faithful default)
    ("metal_plate", "paper", "full"): {"image_auroc": 0.98, "pixel_auroc": 0.985, "aupro": 0.93},
    # measured 1.0000 / 0.9949 / 0.9575
    ("metal_plate", "accurate", "full"): {"image_auroc": 0.995, "pixel_auroc": 0.993, "aupro": 0.95},
    # measured 0.9984 / 0.9921 / 0.9293
    ("metal_plate", "fast", "full"): {"image_auroc": 0.99, "pixel_auroc": 0.99, "aupro": 0.92},
    # measured 1.0000 / 0.9858 / 0.9583: the paper's WRN-50-2 pixel figure (0.984) with a 10x smaller backbone
    ("bottle", "accurate", "paper"): {"image_auroc": 0.995, "pixel_auroc": 0.984, "aupro": 0.95},
    # measured 1.0000 / 0.9802 / 0.9240
    ("bottle", "fast", "paper"): {"image_auroc": 0.995, "pixel_auroc": 0.977, "aupro": 0.915},
    # measured 0.9992 / 0.9772 / 0.9512 (benchmarks/results/highres_*.json): within 0.01 of the default; the
    # test fits every 2nd training image (105, half the time): measured 0.9992 / 0.9768 / 0.9503
    ("bottle", "highres", "full"): {"image_auroc": 0.99, "pixel_auroc": 0.975, "aupro": 0.945},
    # measured 1.0000 / 0.9878 / 0.9384
    ("metal_plate", "highres", "full"): {"image_auroc": 0.99, "pixel_auroc": 0.985, "aupro": 0.93},
}
TRAIN_STEP = {("bottle", "highres", "full"): 2}  # every n-th training image (what the floor was measured with)


@pytest.mark.slow
@pytest.mark.parametrize(("category", "preset", "protocol"), list(FLOORS))
def test_real_categories_meet_the_floors(category: str, preset: str, protocol: str, bottle: Path,
                                         metal_plate: Path) -> None:
    cat = load_mvtec_category(bottle if category == "bottle" else metal_plate)
    cat = dataclasses.replace(cat, train=cat.train[:: TRAIN_STEP.get((category, preset, protocol), 1)])
    ev = evaluate_category(cat, SpadeSettings.from_preset(preset), protocol)
    row = ev.row
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{category}_{preset}_{protocol}.json").write_text(json.dumps(row, indent=2))
    print(category, preset, protocol, row)
    assert ev.model.settings.preset == preset
    for key, floor in FLOORS[category, preset, protocol].items():
        assert row[key] >= floor, f"{category} {preset} {protocol} {key} = {row[key]:.4f} < {floor}"

# BSData, every 5th training (110) and test (61) image: measured paper 0.8734 / 0.9770 / 0.6439,
# highres 0.8907 / 0.9912 / 0.8654
BSDATA_SUBSET_FLOORS = {"image_auroc": 0.88, "pixel_auroc": 0.99, "aupro": 0.85}


@pytest.mark.slow
def test_tiles_find_small_pits_the_untiled_default_misses(bsdata: Path) -> None:
    """BSData (1130x460 ball screws, small pitting), every 5th training and test image: highres's maps
    against the default's on the same images (the full sets: AUPRO 0.859 against 0.689)."""
    full = load_mvtec_category(bsdata)
    cat = dataclasses.replace(full, train=full.train[::5], test=full.test[::5])
    rows = {p: evaluate_category(cat, SpadeSettings.from_preset(p), "full").row for p in ("paper", "highres")}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bsdata_subset_highres.json").write_text(json.dumps(rows, indent=2))
    print(rows)
    for key, floor in BSDATA_SUBSET_FLOORS.items():
        assert rows["highres"][key] >= floor, f"bsdata subset highres {key} = {rows['highres'][key]:.4f} < {floor}"
    assert rows["highres"]["aupro"] >= rows["paper"]["aupro"] + 0.1
    assert rows["highres"]["pixel_auroc"] > rows["paper"]["pixel_auroc"]
