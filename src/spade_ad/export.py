"""``spade-ad export``: a model folder -> a deploy folder that ``spade-ad-runtime`` runs without torch.

The backbone (input normalisation included) is exported with torch's own ONNX exporter at the model's
fixed network input shape; the feature bank and the global vectors are copied as they are (safetensors,
read row by row by the runtime: nothing bank-sized enters a graph); ``deploy.json`` carries the settings,
shapes, thresholds, calibration scales and training-image names, and the SHA-256 of every file and of
itself. The folder is written beside its destination and renamed into place: it is complete or absent.
The format is described in ``runtime/src/spade_ad_runtime/deploy.py``; its constants are repeated below
and a test holds the two to each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import SpadeError
from .io import file_sha256, fsync_dir, header_digest
from .model import Spade
from .persistence import read_header
from .scoring import position_scales
from .version import __version__

FORMAT = "spade-ad-deploy"  # = spade_ad_runtime.deploy.FORMAT
FORMAT_VERSION = 1  # = spade_ad_runtime.deploy.FORMAT_VERSION
OPSET = 18  # ONNX opset of backbone.onnx


class _Graph(torch.nn.Module):
    """Image in [0, 255] (1, 3, H, W) -> (*pyramid levels (1, C, h, w), global vector (1, D))."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pyramid, gvec = self.net(self.net.normalise(x))  # type: ignore[operator]
        return (*pyramid, gvec)


def export_onnx(model: Spade, path: Path) -> list[str]:
    """Write the model's backbone as ONNX to ``path``; returns the output names."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise SpadeError(f"export needs {' and '.join(missing)}: pip install 'spade-ad[export]'")
    net = model._net().to("cpu").eval()  # noqa: SLF001 - the estimator's own backbone
    shape = model.state_.prep.input_shape
    names = [f"level{i}" for i in range(len(model.state_.level_shapes))] + ["global"]
    x = torch.zeros(1, 3, *shape)
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):  # the exporter prints its progress
        warnings.simplefilter("ignore")
        torch.onnx.export(_Graph(net), (x,), str(path), dynamo=True, opset_version=OPSET, external_data=False,
                          input_names=["image"], output_names=names)
    return names


def export(model_dir: str | Path, out: str | Path, overwrite: bool = False, weights: str | None = None) -> Path:
    """Export the model folder ``model_dir`` into the deploy folder ``out`` (see the module docstring).
    ``weights``: the backbone's weights file, for backbones whose weights are not bundled (as for ``load``)."""
    src, dst = Path(model_dir), Path(out)
    model = Spade.load(src, weights=weights)
    state = model.state_
    if dst.exists() and not overwrite:
        raise SpadeError(f"{dst}: already exists (use --overwrite to replace it)")
    mheader = read_header(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        outputs = export_onnx(model, tmp / "backbone.onnx")
        shutil.copyfile(state.bank.path, tmp / "bank.safetensors")
        arrays = {"global": state.global_.float().contiguous()}
        if state.zone is not None:  # the zone, and for an untiled model in the input frame too
            arrays["zone"] = torch.from_numpy(state.zone.mask.astype("uint8"))
            if state.grid is None:
                assert state.prep.input_zone is not None
                arrays["input_zone"] = torch.from_numpy(state.prep.input_zone.astype("uint8"))
        save_file(arrays, str(tmp / "global.safetensors"))
        calibration: dict[str, Any] = {"score_scales": list(state.calibration.get("score_scales", (1.0, 1.0)))}
        if state.grid is not None:  # a tiled model's image score divides each tile's by its position's scales
            calibration["position_scales"] = position_scales(state).tolist()
        header: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "exported_by": f"spade-ad {__version__}",
            "model": {"lineage": state.lineage, "generation": state.generation,
                      "header_sha256": mheader["header_sha256"]},
            "settings": state.settings.model_dict(),
            "input_shape": list(state.input_shape),
            "level_shapes": [list(x) for x in state.level_shapes],
            "grid": None if state.grid is None else state.grid.to_dict(),
            "zone": None if state.zone is None else list(state.zone.shape),
            "backbone": {"file": "backbone.onnx", "opset": OPSET, "input": "image",
                         "input_layout": "(1, 3, H, W) float32 RGB in [0, 255]", "outputs": outputs,
                         "weights_id": state.weights_id},
            "train_names": list(state.train_names),
            "image_threshold": state.image_threshold,
            "pixel_threshold": state.pixel_threshold,
            "calibration": calibration,
            "files": {n: file_sha256(tmp / n) for n in ("backbone.onnx", "bank.safetensors", "global.safetensors")},
        }
        header["header_sha256"] = header_digest(header)  # the model header's rule
        (tmp / "deploy.json").write_text(json.dumps(header, indent=1, allow_nan=False) + "\n")
        fsync_dir(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


__all__ = ["export", "export_onnx", "FORMAT", "FORMAT_VERSION", "OPSET"]
