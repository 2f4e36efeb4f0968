"""Score images with a deploy folder: the three stages of SPADE without torch.

Stage 1 runs the exported backbone in onnxruntime (one image at a time, as spade-ad does on a CPU);
stage 2 is the kNN over the training images' global vectors (float64, direct differences, ties to the
lowest index: spade-ad's ``retrieval.image_knn``); stage 3 reads each retrieved image's pyramid rows from
the bank (positioned reads of the safetensors file) and runs the exact search of :mod:`.search`, then
upsamples, averages and smooths the level maps (:mod:`.imaging`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from . import imaging, workers
from .blas import single_threaded_blas
from .deploy import DeployError, read_header
from .errors import SpadeError
from .gallery import PixelSearch
from .io import load_image, to_rgb_uint8
from .result import VERDICT_RULES, ImageResult, check_min_area
from .workers import SearchWorkers
from .zone import Zone

# A TensorProto's external_data entry {key: "location", ...} (field 13 holding field 1 = "location"): a graph
# that names files to read its weights from. Export never writes one; the runtime refuses the graph rather
# than let onnxruntime resolve a path (fail-closed: a tensor named exactly "location" is refused too).
_EXTERNAL_DATA = b"\x0a\x08location"

POOL_MIN_IMAGES = 8  # a smaller batch is scored in this process (starting the workers costs about what they save)


def _read_image(item: str | Path | np.ndarray, index: int, max_pixels: int | None) -> tuple[str, np.ndarray]:
    """An image path or array as (name, HxWx3 uint8), read by spade-ad's rules (:mod:`.io`)."""
    if isinstance(item, np.ndarray):
        return f"array[{index}]", to_rgb_uint8(item, f"array[{index}]")
    return str(item), load_image(item, max_pixels=max_pixels)


class Detector:
    """A loaded deploy folder. ``Detector.load(folder).predict(images)`` gives one ``ImageResult`` per image."""

    def __init__(self, folder: Path, header: dict[str, Any], device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = folder
        self.device = device
        self.threads = max(1, threads if threads is not None else os.cpu_count() or 1)
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
        # the cores are shared among the images scored at once (one per worker thread, each single-threaded)
        opts.intra_op_num_threads = max(1, (os.cpu_count() or 1) // self.threads)
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
        self.search = PixelSearch(folder / "bank.safetensors", self.level_shapes, s["kappa"])
        self._workers: SearchWorkers | None = None
        self._no_fork = False
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
    def load(cls, folder: str | Path, device: str = "cpu", verify: bool = True, threads: int | None = None) -> Detector:
        """Load and check a deploy folder (``verify``: every file's SHA-256, as model folders are; ``threads``:
        images scored at once, default one per CPU core)."""
        folder = Path(folder)
        header = read_header(folder, verify)
        if header.get("grid") is not None:
            raise DeployError(f"{folder / 'deploy.json'}: tiled models are not yet supported by this runtime")
        return cls(folder, header, device, threads)

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

    def level_maps(self, levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
        """Stage 3's search: per level, each position's mean distance to its ``kappa`` nearest gallery features
        (:meth:`.PixelSearch.level_maps`)."""
        return self.search.level_maps(levels, gallery)

    def predict(self, images: Sequence[str | Path | np.ndarray], pixel_threshold: float | None = None,
                min_area: int | None = None) -> list[ImageResult]:
        """Score images (paths, or arrays as spade-ad takes them); ``pixel_threshold`` and ``min_area`` replace
        the model's for the masks and regions, as in ``Spade.predict``.

        A batch of at least :data:`POOL_MIN_IMAGES` images is searched on ``threads`` worker processes (one
        per CPU core by default, :mod:`.workers`; threads where processes are not forked) while this process
        decodes and runs the backbone; the results do not depend on it. The first failing image (in input
        order) raises."""
        pthr = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        area = self.min_area if min_area is None else check_min_area(min_area)
        jobs = list(enumerate(images))
        with single_threaded_blas():
            pool = self._pool(len(jobs))
            if pool is None and min(len(jobs), self.threads) > 1:  # (no fork: one image per thread)
                with ThreadPoolExecutor(min(len(jobs), self.threads), "spade-rt-score") as threads:
                    return list(threads.map(lambda job: self._finish(*self._first_stages(*job),
                                                                     pthr=pthr, area=area), jobs))
            if pool is None:
                return [self._finish(*self._first_stages(i, item), pthr=pthr, area=area) for i, item in jobs]
            pending: list[tuple[str, tuple[int, int], float, np.ndarray, Future[list[np.ndarray]]]] = []
            try:
                for i, item in jobs:  # this process: decoding and the backbone; the workers: the searches
                    name, shape, knn, gallery, levels = self._first_stages(i, item, search=False)
                    pending.append((name, shape, knn, gallery, pool.submit(levels, gallery)))
                return [self._finish(name, shape, knn, gallery, fut.result(), pthr=pthr, area=area)
                        for name, shape, knn, gallery, fut in pending]
            except BrokenProcessPool:
                self.close()
                raise SpadeError("a search worker process ended unexpectedly (out of memory, or killed)") from None
            finally:
                for *_, fut in pending:
                    fut.cancel()

    def _pool(self, n_images: int) -> SearchWorkers | None:
        """The worker processes for a batch of ``n_images`` (started for the first large enough batch)."""
        processes = min(self.threads, n_images)
        if self._workers is None and processes > 1 and n_images >= POOL_MIN_IMAGES and self.device == "cpu" \
                and not self._no_fork:
            self._workers = workers.start(self.search, self.threads)
            self._no_fork = self._workers is None
        return self._workers if processes > 1 else None

    def close(self) -> None:
        """Stop the search workers, if any (a later batch starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _first_stages(self, index: int, item: str | Path | np.ndarray, search: bool = True) -> tuple[
            str, tuple[int, int], float, np.ndarray, list[np.ndarray]]:
        """Read one image, run stages 1 and 2 and (``search``) stage 3's search: (name, image shape, kNN score,
        gallery, level features or level maps)."""
        name, image = _read_image(item, index, self.settings.get("max_pixels"))
        self.check_image(image, name)
        levels, gvec = self.features(image)
        knn, gallery = self.retrieve(gvec)
        return name, (image.shape[0], image.shape[1]), knn, gallery, (
            self.level_maps(levels, gallery) if search else levels)

    def _finish(self, name: str, shape: tuple[int, int], knn: float, gallery: np.ndarray,
                level_maps: list[np.ndarray], *, pthr: float, area: int) -> ImageResult:
        """Stage 3's maps from the level maps, the image score, the result."""
        s = self.settings
        amap = imaging.combine_levels(level_maps, self.input_shape, s["sigma"])
        if self.input_zone is not None:
            amap = np.where(self.input_zone, amap, np.float32(0))
        score = self._image_score(knn, float(amap.max()))
        full = imaging.map_to_image(amap, s["preprocess"], s["image_size"], *shape)
        if self.zone is not None:
            full = self.zone.clear_outside(full)
        neigh = tuple(int(j) for j in gallery)
        return ImageResult(name, score, full, amap, neigh, tuple(self.train_names[j] for j in neigh),
                           self.image_threshold, pthr, area, self.verdict_rule)

    def _image_score(self, knn: float, top: float) -> float:
        rule = self.settings["image_score"]
        if rule == "knn":
            return knn
        if rule == "max":
            return top
        f = np.float32
        return float(f(f(knn) / f(self.score_scales[0])) + f(f(top) / f(self.score_scales[1])))


__all__ = ["Detector"]
