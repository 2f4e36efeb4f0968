"""Prediction runs of spade-ad: the model generation a run uses, and the local run of ``spade-ad predict``.

The protocol itself (inputs and their output names, the output folder, ``run.json``, ``predictions.jsonl``,
each image's files and row) is :mod:`spade_ad_runtime.runs`, shared with the runtime's ``predict`` and the Ray
run (:mod:`spade_ad.distributed`) and re-exported here; read its docstring for the rules. This module adds
what needs the torch model: pinning the generation (:func:`pin_model`, :func:`load_pinned`) and scoring
chunks with it (:func:`predict_into`). No typer, rich or Ray here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spade_ad_runtime.runs import (
    COLOUR_SCALE,
    ROWS_FILE,
    RUN_FILE,
    Input,
    Progress,
    RowWriter,
    Run,
    RunSummary,
    check_failed,
    check_options,
    check_output_folder,
    error_row,
    expand_inputs,
    jsonl_line,
    output_names,
    prediction_row,
    previous_outputs,
    read_input,
    remove_debris,
    score_into,
    summary_line,
    unique_stems,
    write_image_outputs,
)

from .errors import SpadeError

if TYPE_CHECKING:
    from .model import Spade


# --------------------------------------------------------------------------- the model generation of a run
@dataclass(frozen=True)
class ModelPin:
    """The model generation a run uses: read once from ``model.json``, then loaded exactly by every worker."""

    folder: str  # absolute path of the model folder
    lineage: str
    generation: int
    header_sha256: str

    def run_source(self, model_dir: str | Path) -> dict[str, Any]:
        """What ``run.json`` says of the model: the folder as given and the generation the run uses."""
        return {"model": str(model_dir), "lineage": self.lineage, "generation": self.generation,
                "header_sha256": self.header_sha256}


def pin_model(model_dir: str | Path) -> ModelPin:
    """The current generation of the model folder (its header, integrity-checked)."""
    from .persistence import read_header

    header = read_header(Path(model_dir))
    lineage, generation, digest = header.get("lineage"), header.get("generation"), header.get("header_sha256")
    if not isinstance(lineage, str) or isinstance(generation, bool) or not isinstance(generation, int) or not \
            isinstance(digest, str):
        raise SpadeError(f"{Path(model_dir) / 'model.json'}: damaged model header (lineage or generation)")
    return ModelPin(os.path.abspath(model_dir), lineage, generation, digest)


def _current_sha(folder: Path) -> str | None:
    from .persistence import read_header

    try:
        return str(read_header(folder).get("header_sha256"))
    except SpadeError:
        return None


def load_pinned(pin: ModelPin, **runtime: Any) -> Spade:
    """Load exactly the generation ``pin`` names (``runtime``: as for :meth:`Spade.load <spade_ad.Spade.load>`).

    Normally that is the folder's current model. If the folder was updated since the run pinned it, the
    generation is loaded from the copy the folder keeps of its recent generations (``generations/``, with
    their data files); if that copy is gone too, one line says so. Never another generation.
    """
    from .model import Spade

    folder = Path(pin.folder)
    if _current_sha(folder) == pin.header_sha256:
        model = Spade.load(folder, **runtime)
        if _current_sha(folder) == pin.header_sha256:  # no commit in between: the load read this header
            return model
    return _load_generation_copy(pin, runtime)


def _load_generation_copy(pin: ModelPin, runtime: dict[str, Any]) -> Spade:
    """Load generation ``pin`` from the header copy the folder keeps under ``generations/`` (with its data
    files); the model folder is only read."""
    from .model import Spade
    from .persistence import generation_file, read_state

    folder = Path(pin.folder)
    gfile = generation_file(folder, pin.lineage, pin.generation)
    if not gfile.is_file():
        raise SpadeError(f"{folder}: the model was updated during this run and generation {pin.generation}, which "
                         "the run started with, is no longer kept in the folder; rerun to use the current generation")
    state = read_state(folder, {"device": "cpu", "weights": None, **runtime}, verify=True, header_file=gfile)
    if state.base_sha256 != pin.header_sha256:
        raise SpadeError(f"{gfile}: differs from the header of generation {pin.generation} that this run started "
                         "with (the folder was changed by another writer); rerun")
    return Spade.from_state(state, folder)


# --------------------------------------------------------------------------- the local run
def run_request(inputs: str | Path | Sequence[str | Path], batch_size: int | None,
                max_pixels: int | None) -> tuple[list[Path], dict[str, Any]]:
    """A predict call's inputs as paths, and the runtime settings it gives (local and Ray runs alike)."""
    given = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    return given, {k: v for k, v in (("batch_size", batch_size), ("max_pixels", max_pixels)) if v is not None}


def predict(
    model_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "cpu",
    weights: str | None = None,
    threshold: float | None = None,
    min_area: int | None = None,
    raw: str = "npy",
    batch_size: int | None = None,
    max_pixels: int | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RunSummary:
    """``spade-ad predict MODEL_DIR INPUTS... --out OUT`` in this process (see the module docstring).

    Returns a :class:`RunSummary`; the command line exits with code 2 when ``n_failed`` > 0.
    """
    check_options(raw, threshold, on_error, min_area)
    out = Path(out)
    given, runtime = run_request(inputs, batch_size, max_pixels)
    pin = pin_model(model_dir)
    model = load_pinned(pin, device=device, weights=weights, **runtime)
    items = expand_inputs(given)
    check_output_folder(out, given, overwrite)
    thr = model.pixel_threshold_ if threshold is None else threshold
    run = Run(out, items, pin.run_source(model_dir), model.image_threshold_, thr, raw, *decision_rule(model, min_area))
    return predict_into(model, run, items, threshold, thr, raw, on_error, progress, min_area)


def decision_rule(model: Spade, min_area: int | None) -> tuple[int, str]:
    """The ``min_area`` (given, or the model's) and ``verdict_rule`` a run records."""
    return (model.settings.min_area if min_area is None else min_area), model.settings.verdict_rule


def predict_into(model: Spade, run: Run, items: Sequence[Input], threshold: float | None, thr: float | None,
                 raw: str, on_error: str = "stop", progress: Progress | None = None,
                 min_area: int | None = None) -> RunSummary:
    """Score ``items`` into ``run`` with ``model``, ``batch_size`` images per chunk (:func:`score_into`)."""
    import torch

    def score(arrays: list[np.ndarray]) -> list[Any]:
        return list(model.predict(arrays, pixel_threshold=threshold, min_area=min_area))

    return score_into(run, items, score, step=model.settings.batch_size, threads=max(1, torch.get_num_threads()),
                      max_pixels=model.settings.max_pixels, thr=thr, raw=raw, generation=len(model.history_),
                      on_error=on_error, progress=progress, check=model.check_image)


__all__ = ["predict", "predict_into", "Run", "RunSummary", "RowWriter", "Input", "ModelPin", "expand_inputs",
           "unique_stems", "read_input", "pin_model", "load_pinned", "check_options", "check_output_folder",
           "previous_outputs", "output_names", "write_image_outputs", "prediction_row", "error_row", "jsonl_line",
           "remove_debris", "summary_line", "check_failed", "Progress", "RUN_FILE", "ROWS_FILE", "COLOUR_SCALE"]
