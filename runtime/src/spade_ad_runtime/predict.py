"""``spade-ad-runtime predict``: score image files with a deploy folder into an output folder.

The run protocol is spade-ad's own (:mod:`.runs`: the same output names, files, ``run.json`` and
``predictions.jsonl`` rows, the same refusals); only the scorer differs (:class:`.Detector`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .detector import Detector
from .runs import (
    BATCH_SIZE,
    Progress,
    Run,
    RunSummary,
    check_options,
    check_output_folder,
    expand_inputs,
    score_into,
)


def predict(
    deploy_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "cpu",
    threshold: float | None = None,
    min_area: int | None = None,
    raw: str = "npy",
    batch_size: int = BATCH_SIZE,
    max_pixels: int | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
    progress: Progress | None = None,
    detector: Detector | None = None,
) -> RunSummary:
    """``spade-ad-runtime predict DEPLOY INPUTS... --out OUT``: the files and rows of ``spade-ad predict``.

    ``batch_size``: images decoded per step (rows are appended after each). ``max_pixels``: larger images are refused
    from their header (default: ``io.MAX_PIXELS``, as for spade-ad). Returns the
    :class:`.RunSummary`; the command exits with code 2 when ``n_failed`` > 0.
    """
    check_options(raw, threshold, on_error, min_area)
    out = Path(out)
    given = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    det = detector or Detector.load(deploy_dir, device=device)
    items = expand_inputs(given)
    check_output_folder(out, given, overwrite)
    thr = det.pixel_threshold if threshold is None else threshold
    model = det.header["model"]  # the generation the deploy folder was exported from
    source = {"deploy": str(deploy_dir), **{k: model[k] for k in ("lineage", "generation", "header_sha256")}}
    area = det.min_area if min_area is None else min_area
    run = Run(out, items, source, det.image_threshold, thr, raw, area, det.verdict_rule)
    return score_into(run, items, lambda arrays: det.predict(arrays, pixel_threshold=threshold, min_area=min_area),
                      step=batch_size,
                      threads=os.cpu_count() or 1, max_pixels=max_pixels, thr=thr, raw=raw,
                      generation=model["generation"], on_error=on_error, progress=progress,
                      check=det.check_image)


__all__ = ["predict"]
