"""Loading a model again and again in one process (the inspector does it on every update) costs O(1):
old banks are collected, their files closed (a deleted bank file's space is freed), memory stays flat."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from spade_ad import Spade
from spade_ad.correspondence import gallery

LOADS = 30


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _open_deleted(folder: Path) -> list[str]:
    """Files of ``folder`` that this process holds open (or mapped) although they were deleted."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)) and target.endswith("(deleted)"):
            out.append(target)
    maps = Path("/proc/self/maps").read_text().splitlines()
    return out + [line for line in maps if str(folder) in line and line.endswith("(deleted)")]


def test_loading_a_model_many_times_keeps_no_old_bank(small_train: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the indexed search (and so the per-bank gallery cache) also for this small model
    monkeypatch.setattr(gallery, "INDEX_MIN_WORK", 0.0)
    monkeypatch.setattr(gallery, "INDEX_MIN_QUERIES", 0)
    folder = tmp_path / "model"
    Spade(k=3, k_image=2, image_size=64, calibration_images=3).fit(small_train / "train" / "good").save(folder)
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    banks: list[weakref.ref[object]] = []
    rss: list[float] = [_rss_mb()]
    for i in range(LOADS):
        model = Spade.load(folder)
        banks.append(weakref.ref(model.bank_))
        model.predict([image], keep_features=True).correspondence(0, 10, 10)
        # a new generation: the bank file this load read is replaced (deleted) on save
        model.add([image], names=[f"again-{i}.png"]) if i % 2 == 0 else model.remove([f"again-{i - 1}.png"])
        banks.append(weakref.ref(model.bank_))
        model.save(folder)
        del model
        gc.collect()
        rss.append(_rss_mb())
        assert sum(b.path.parent == folder for b in list(gallery._CACHES)) <= 1  # (other tests' banks aside)
    alive = [r for r in banks if r() is not None]
    assert alive == [], f"{len(alive)} of {len(banks)} banks are still alive after their models were dropped"
    assert _open_deleted(folder) == []
    # memory: what the 2nd..last loads added together is small against what the first one cost
    first, rest = rss[1] - rss[0], rss[-1] - rss[1]
    assert rest < max(first, 16.0), f"RSS grew {rest:.0f} MB over {LOADS - 1} loads (the first took {first:.0f} MB)"
