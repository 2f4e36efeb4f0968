"""evaluate_category in bounded memory: the test set predicted in chunks, each image's (mask, map) streamed into
a PixelMetrics and dropped; the numbers are those of one predict call and of the list functions on all maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_metrics import _old_aupro, _old_pixel_auroc

from spade_ad import SpadeSettings, metrics
from spade_ad.data import Category
from spade_ad.data import TestSample as Sample  # (not "Test*": pytest would try to collect it)
from spade_ad.evaluate import METRIC_KEYS, evaluate_category

# batch_size 4: the 6 test images are predicted in two chunks (4 + 2)
PARAMS = SpadeSettings(k=3, k_image=2, image_size=64, calibration_images=0, batch_size=4)


@pytest.fixture(scope="module")
def bottle_subset(bottle: Path) -> Category:
    """6 real bottle training images, 3 good and 3 broken_large test images (read in place)."""
    train = sorted((bottle / "train" / "good").glob("*.png"))[:6]
    test = [Sample(p, "good", None) for p in sorted((bottle / "test" / "good").glob("*.png"))[:3]]
    for p in sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]:
        test.append(Sample(p, "broken_large", bottle / "ground_truth" / "broken_large" / f"{p.stem}_mask.png"))
    return Category("bottle6", bottle, train, test)


@pytest.mark.parametrize("protocol", ["full", "paper"])
def test_streamed_metrics_agree_with_the_list_functions(bottle_subset: Category, protocol: str) -> None:
    params = PARAMS.replace(calibration_images=4)  # thresholds: the numbers at the thresholds are defined
    ev = evaluate_category(bottle_subset, params, protocol, keep_maps=True)
    pred, masks, maps = ev.kept()
    row = ev.row
    assert row["n_test"] == len(pred) == len(masks) == len(maps) == 6
    assert abs(row["image_auroc"] - metrics.image_auroc(ev.labels, pred.scores)) <= 1e-9
    assert abs(row["pixel_auroc"] - metrics.pixel_auroc(masks, maps)) <= 1e-9
    assert abs(row["aupro"] - metrics.aupro(masks, maps)) <= 1e-9
    # and the frozen former implementation (flatten and sort every pixel)
    assert abs(row["pixel_auroc"] - _old_pixel_auroc(masks, maps)) <= 1e-9
    assert abs(row["aupro"] - _old_aupro(masks, maps)) <= 1e-9
    assert 0.5 < row["pixel_auroc"] <= 1 and 0 < row["aupro"] <= 1

    # predicting in chunks gives, bit for bit, what one predict call over the whole test set gives
    whole = ev.model.predict(ev.names)
    assert np.array_equal(whole.scores, pred.scores) and np.array_equal(whole.neighbours, pred.neighbours)
    assert all(np.array_equal(a, b) for a, b in zip(whole.maps, pred.maps, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(whole.input_maps, pred.input_maps, strict=True))
    assert whole.names == pred.names and whole.sizes == pred.sizes

    # the default keeps no map, and measures the same numbers
    lean = evaluate_category(bottle_subset, params, protocol)
    assert lean.pred is None and lean.maps is None and lean.masks is None
    assert np.array_equal(lean.scores, ev.scores)
    for k in METRIC_KEYS:
        assert (lean.row[k] is None and row[k] is None) or abs(lean.row[k] - row[k]) <= 1e-9, k

    # the numbers at the thresholds, and per defect type, from the kept maps by the list functions
    assert row["aupimo"] == metrics.aupimo(masks, maps)
    flagged = [r.verdict == "defective" for r in pred]
    assert (row["image_precision"], row["image_recall"], row["image_f1"]) == metrics.precision_recall_f1(
        ev.labels, flagged, 0.5)
    thr = pred.pixel_threshold
    assert thr is not None
    # the model's own masks (the image's map >= the threshold), moved into the protocol's frame
    own = [r.mask if protocol == "full" else ev.model.prep.mask_to_input(r.mask) for r in pred]
    assert all(o is not None and o.shape == k.shape for o, k in zip(own, masks, strict=True))
    tp = sum(int((o & k).sum()) for o, k in zip(own, masks, strict=True))
    fp = sum(int((o & ~k).sum()) for o, k in zip(own, masks, strict=True))
    fn = sum(int((~o & k).sum()) for o, k in zip(own, masks, strict=True))
    assert row["pixel_precision"] == tp / (tp + fp) and row["pixel_recall"] == tp / (tp + fn)
    kinds = [s.defect_type for s in bottle_subset.test]
    for t, r in row["types"].items():
        keep = [i for i, k in enumerate(kinds) if k in (t, "good")]
        assert r["n_test"] == kinds.count(t)
        assert r["image_auroc"] == metrics.image_auroc([ev.labels[i] for i in keep], pred.scores[keep])
        assert abs(r["aupro"] - metrics.aupro([masks[i] for i in keep], [maps[i] for i in keep])) <= 1e-9
        assert r["image_recall"] == np.mean([flagged[i] for i, k in enumerate(kinds) if k == t])
