"""Score images with a deploy folder: the three stages of SPADE without torch.

Stage 1 runs the exported backbone in onnxruntime (one image at a time, as spade-ad does on a CPU);
stage 2 is the kNN over the training images' global vectors (float64, direct differences, ties to the
lowest index: spade-ad's ``retrieval.image_knn``); stage 3 reads each retrieved image's pyramid rows from
the bank (positioned reads of the safetensors file) and runs the exact search of :mod:`.search`, then
upsamples, averages and smooths the level maps (:mod:`.imaging`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from . import imaging
from .deploy import DeployError, read_header
from .errors import SpadeError
from .io import load_image, to_rgb_uint8
from .result import ImageResult
from .search import nn_distances

# A TensorProto's external_data entry {key: "location", ...} (field 13 holding field 1 = "location"): a graph
# that names files to read its weights from. Export never writes one; the runtime refuses the graph rather
# than let onnxruntime resolve a path (fail-closed: a tensor named exactly "location" is refused too).
_EXTERNAL_DATA = b"\x0a\x08location"


def _read_image(item: str | Path | np.ndarray, index: int, max_pixels: int | None) -> tuple[str, np.ndarray]:
    """An image path or array as (name, HxWx3 uint8), read by spade-ad's rules (:mod:`.io`)."""
    if isinstance(item, np.ndarray):
        return f"array[{index}]", to_rgb_uint8(item, f"array[{index}]")
    return str(item), load_image(item, max_pixels=max_pixels)


class Detector:
    """A loaded deploy folder. ``Detector.load(folder).predict(images)`` gives one ``ImageResult`` per image."""

    def __init__(self, folder: Path, header: dict[str, Any], device: str = "cpu") -> None:
        import onnxruntime as ort

        self.folder = folder
        self.header = header
        s = header["settings"]
        self.settings = s
        self.input_shape = tuple(header["input_shape"])
        self.level_shapes = [tuple(x) for x in header["level_shapes"]]
        self.image_threshold = header["image_threshold"]
        self.pixel_threshold = header["pixel_threshold"]
        self.train_names = list(header["train_names"])
        scales = header["calibration"].get("score_scales", [1.0, 1.0])
        self.score_scales = (float(scales[0]), float(scales[1]))
        providers = ["CPUExecutionProvider"]
        if device not in ("cpu", "cuda"):
            raise SpadeError(f"--device must be cpu or cuda, got {device!r}")
        if device == "cuda":  # never a silent fall-back to the CPU
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise SpadeError("--device cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu "
                                 "instead of onnxruntime, with a CUDA driver)")
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        model = (folder / "backbone.onnx").read_bytes()
        if _EXTERNAL_DATA in model:
            raise DeployError(f"{folder / 'backbone.onnx'}: the graph refers to external data files; a deploy "
                              "folder's graph holds its weights (nothing outside the folder is read)")
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise DeployError(f"{folder / 'backbone.onnx'}: cannot load the backbone ({exc})") from None
        self.input_name = self.session.get_inputs()[0].name
        with safe_open(str(folder / "global.safetensors"), framework="numpy") as f:
            self.global_ = np.asarray(f.get_tensor("global"), np.float64)
        self._bank = safe_open(str(folder / "bank.safetensors"), framework="numpy")
        self._levels = [self._bank.get_slice(f"level{i}") for i in range(len(self.level_shapes))]
        n = self.global_.shape[0]
        if len(self.train_names) != n:
            raise DeployError(f"{folder / 'deploy.json'}: {len(self.train_names)} training names for {n} vectors")

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", verify: bool = True) -> Detector:
        """Load and check a deploy folder (``verify``: every file's SHA-256, as model folders are)."""
        folder = Path(folder)
        header = read_header(folder, verify)
        if header.get("grid") is not None:
            raise DeployError(f"{folder / 'deploy.json'}: tiled models are not yet supported by this runtime")
        return cls(folder, header, device)

    def features(self, image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Stage 1: per level (h*w, C) float32 features and the (D,) global vector of one image."""
        s = self.settings
        x = imaging.to_input(image, s["preprocess"], s["image_size"], self.input_shape)[None]
        outs = self.session.run(None, {self.input_name: x})
        levels = [np.ascontiguousarray(o[0].reshape(o.shape[1], -1).T, np.float32) for o in outs[:-1]]
        return levels, np.asarray(outs[-1][0], np.float32)

    def retrieve(self, gvec: np.ndarray) -> tuple[float, np.ndarray]:
        """Stage 2: the kNN score and the gallery (the ``k`` nearest training images, nearest first)."""
        s = self.settings
        d = np.sqrt(((self.global_ - gvec.astype(np.float64)[None]) ** 2).sum(1))
        n = d.shape[0]
        kk = min(max(s["k"], s["k_image"]), n)
        idx = np.argsort(d, kind="stable")[:kk]
        score = float(np.float32(d[idx[: min(s["k_image"], n)]].mean()))
        return score, idx[: min(s["k"], n)]

    def level_maps(self, levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
        """Stage 3's search: per level, each position's mean distance to its ``kappa`` nearest gallery features."""
        out = []
        rows = sorted(int(i) for i in gallery)
        for li, (h, w) in enumerate(self.level_shapes):
            g = np.concatenate([self._levels[li][r : r + 1] for r in rows])  # positioned reads, one row each
            g = g.reshape(-1, g.shape[-1]).astype(np.float32)
            out.append(nn_distances(levels[li], g, self.settings["kappa"]).reshape(h, w))
        return out

    def predict(self, images: Sequence[str | Path | np.ndarray],
                pixel_threshold: float | None = None) -> list[ImageResult]:
        """Score images (paths, or arrays as spade-ad takes them); ``pixel_threshold`` replaces the model's for
        the masks, as in ``Spade.predict``."""
        s = self.settings
        pthr = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        results = []
        for i, item in enumerate(images):
            name, image = _read_image(item, i, s.get("max_pixels"))
            levels, gvec = self.features(image)
            knn, gallery = self.retrieve(gvec)
            amap = imaging.combine_levels(self.level_maps(levels, gallery), self.input_shape, s["sigma"])
            score = self._image_score(knn, float(amap.max()))
            full = imaging.map_to_image(amap, s["preprocess"], s["image_size"], image.shape[0], image.shape[1])
            neigh = tuple(int(j) for j in gallery)
            results.append(ImageResult(name, score, full, amap, neigh, tuple(self.train_names[j] for j in neigh),
                                       self.image_threshold, pthr))
        return results

    def _image_score(self, knn: float, top: float) -> float:
        rule = self.settings["image_score"]
        if rule == "knn":
            return knn
        if rule == "max":
            return top
        f = np.float32
        return float(f(f(knn) / f(self.score_scales[0])) + f(f(top) / f(self.score_scales[1])))


__all__ = ["Detector"]
