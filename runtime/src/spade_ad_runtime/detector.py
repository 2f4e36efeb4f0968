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
from .result import VERDICT_RULES, ImageResult, check_min_area
from .search import Grouped, group_gallery, grouped_nn_distances, nn_distances
from .zone import Zone

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
        try:  # settings added after the first deploy format: a folder without them has the defaults
            self.min_area = check_min_area(s.get("min_area", 0))
        except SpadeError as exc:
            raise DeployError(f"{folder / 'deploy.json'}: {exc}") from None
        self.verdict_rule = s.get("verdict_rule", "score")
        if self.verdict_rule not in VERDICT_RULES:
            raise DeployError(f"{folder / 'deploy.json'}: unknown verdict_rule {self.verdict_rule!r} (a deploy "
                              "folder from a newer spade-ad?)")
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
            self.zone, self.input_zone = self._read_zone(f, header.get("zone"))
        self._bank = safe_open(str(folder / "bank.safetensors"), framework="numpy")
        self._levels = [self._bank.get_slice(f"level{i}") for i in range(len(self.level_shapes))]
        keys = set(self._bank.keys())
        self._index = [self._read_index(i, keys) for i in range(len(self.level_shapes))]
        self._galleries: dict[tuple[int, tuple[int, ...]], Grouped] = {}
        n = self.global_.shape[0]
        if len(self.train_names) != n:
            raise DeployError(f"{folder / 'deploy.json'}: {len(self.train_names)} training names for {n} vectors")

    def _read_zone(self, f: Any, shape: Any) -> tuple[Zone | None, np.ndarray | None]:
        """The inspection zone (its own size, and the input frame's), checked against the header."""
        keys = set(f.keys())
        if shape is None and not keys & {"zone", "input_zone"}:
            return None, None
        where = self.folder / "global.safetensors"
        if shape is None or not {"zone", "input_zone"} <= keys:
            raise DeployError(f"{where}: the inspection zone disagrees with deploy.json")
        zone, inside = f.get_tensor("zone"), f.get_tensor("input_zone")
        if list(zone.shape) != list(shape) or tuple(inside.shape) != self.input_shape or zone.dtype != np.uint8 \
                or inside.dtype != np.uint8 or zone.max() > 1 or inside.max() > 1:
            raise DeployError(f"{where}: the inspection zone disagrees with deploy.json")
        try:
            return Zone(zone.astype(bool), str(where)), inside.astype(bool)
        except SpadeError as exc:
            raise DeployError(str(exc)) from None

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", verify: bool = True) -> Detector:
        """Load and check a deploy folder (``verify``: every file's SHA-256, as model folders are)."""
        folder = Path(folder)
        header = read_header(folder, verify)
        if header.get("grid") is not None:
            raise DeployError(f"{folder / 'deploy.json'}: tiled models are not yet supported by this runtime")
        return cls(folder, header, device)

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Refuse, with one line naming it, an image this model cannot take (the inspection zone's aspect ratio)."""
        if self.zone is not None:
            self.zone.at(image.shape[0], image.shape[1], name)

    def features(self, image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Stage 1: per level (h*w, C) float32 features and the (D,) global vector of one image (grey outside
        the inspection zone)."""
        s = self.settings
        if self.zone is not None:
            image = self.zone.fill_outside(image)
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

    def _read_index(self, level: int, keys: set[str]) -> tuple[Any, np.ndarray] | None:
        """The bank's fit-time search index of ``level``, if it has one: each training image's unit per position
        (read per gallery image) and the units' centres (unit = cell * shells + shell; a cell's centroid)."""
        names = (f"cells{level}.unit", f"codebook{level}.centroids", f"codebook{level}.cuts")
        if not all(k in keys for k in names):
            return None
        centroids = np.asarray(self._bank.get_tensor(names[1]), np.float32)
        shells = int(self._bank.get_slice(names[2]).get_shape()[1]) + 1
        return self._bank.get_slice(names[0]), np.repeat(centroids, shells, axis=0)

    def level_maps(self, levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
        """Stage 3's search: per level, each position's mean distance to its ``kappa`` nearest gallery features
        (grouped by the bank's index where it has one: the same answer, fewer pairs computed)."""
        out = []
        rows = sorted(int(i) for i in gallery)
        kappa = self.settings["kappa"]
        for li, (h, w) in enumerate(self.level_shapes):
            if self._index[li] is None:
                out.append(nn_distances(levels[li], self._rows(li, rows), kappa).reshape(h, w))
            else:
                out.append(grouped_nn_distances(levels[li], self._grouped(li, rows), kappa=kappa).reshape(h, w))
        return out

    def _rows(self, level: int, rows: list[int]) -> np.ndarray:
        g = np.concatenate([self._levels[level][r : r + 1] for r in rows])  # positioned reads, one image each
        return g.reshape(-1, g.shape[-1]).astype(np.float32)

    def _grouped(self, level: int, rows: list[int]) -> Grouped:
        """The gallery of training images ``rows`` at ``level``, grouped by the index; the last few galleries
        are kept (with k at least the training images, every test image has the same gallery)."""
        key = (level, tuple(rows))
        if key in self._galleries:
            return self._galleries[key]
        index = self._index[level]
        assert index is not None
        g = self._rows(level, rows)
        units = np.concatenate([index[0][r : r + 1] for r in rows]).reshape(-1).astype(np.int64)
        if units.shape[0] != g.shape[0] or units.min() < 0 or units.max() >= index[1].shape[0]:
            raise DeployError(f"{self.folder / 'bank.safetensors'}: damaged search index (level {level})")
        grouped = group_gallery(g, units, index[1])
        while len(self._galleries) >= 2 * len(self.level_shapes):  # bounded: the oldest goes first
            self._galleries.pop(next(iter(self._galleries)))
        self._galleries[key] = grouped
        return grouped

    def predict(self, images: Sequence[str | Path | np.ndarray], pixel_threshold: float | None = None,
                min_area: int | None = None) -> list[ImageResult]:
        """Score images (paths, or arrays as spade-ad takes them); ``pixel_threshold`` and ``min_area`` replace
        the model's for the masks and regions, as in ``Spade.predict``."""
        s = self.settings
        pthr = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        area = self.min_area if min_area is None else check_min_area(min_area)
        results = []
        for i, item in enumerate(images):
            name, image = _read_image(item, i, s.get("max_pixels"))
            self.check_image(image, name)
            levels, gvec = self.features(image)
            knn, gallery = self.retrieve(gvec)
            amap = imaging.combine_levels(self.level_maps(levels, gallery), self.input_shape, s["sigma"])
            if self.input_zone is not None:
                amap = np.where(self.input_zone, amap, np.float32(0))
            score = self._image_score(knn, float(amap.max()))
            full = imaging.map_to_image(amap, s["preprocess"], s["image_size"], image.shape[0], image.shape[1])
            if self.zone is not None:
                full = self.zone.clear_outside(full)
            neigh = tuple(int(j) for j in gallery)
            results.append(ImageResult(name, score, full, amap, neigh, tuple(self.train_names[j] for j in neigh),
                                       self.image_threshold, pthr, area, self.verdict_rule))
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
