"""Score images with a deploy folder: the three stages of SPADE without torch.

Stage 1 runs the exported backbone in onnxruntime (one image at a time, as spade-ad does on a CPU);
stage 2 is the kNN over the training images' global vectors (float64, direct differences, ties to the
lowest index: spade-ad's ``retrieval.image_knn``); stage 3 reads each retrieved image's pyramid rows from
the bank (positioned reads of the safetensors file) and runs the exact search of :mod:`.search`, then
upsamples, averages and smooths the level maps (:mod:`.imaging`).
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from . import imaging, retrieval, workers
from .blas import single_threaded_blas
from .deploy import DeployError, read_header
from .errors import SpadeError
from .gallery import PixelSearch
from .io import load_image, to_rgb_uint8
from .result import VERDICT_RULES, ImageResult, check_min_area
from .tiling import Stitcher, TileGrid, grid_from_dict, iter_tiles, tile_zones, to_native
from .workers import SearchWorkers
from .zone import Zone

# A TensorProto's external_data entry {key: "location", ...} (field 13 holding field 1 = "location"): a graph
# that names files to read its weights from. Export never writes one; the runtime refuses the graph rather
# than let onnxruntime resolve a path (fail-closed: a tensor named exactly "location" is refused too).
_EXTERNAL_DATA = b"\x0a\x08location"

POOL_MIN_IMAGES = 8  # fewer searches are run in this process (starting the workers costs about what they save)
AHEAD = 4  # searches in flight per worker process (memory: their features)


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
        self.grid: TileGrid | None = None
        self.position_scales = np.ones((1, 2))
        if header.get("grid") is not None:  # a tiled model: its grid, and each tile position's score scales
            try:
                self.grid = grid_from_dict(header["grid"])
            except ValueError as exc:
                raise DeployError(f"{folder / 'deploy.json'}: {exc}") from None
            pos = np.asarray(header["calibration"].get("position_scales", np.ones((len(self.grid), 2))), np.float64)
            if pos.shape != (len(self.grid), 2) or not np.all(np.isfinite(pos) & (pos > 0)):
                raise DeployError(f"{folder / 'deploy.json'}: calibration.position_scales must be two positive "
                                  "numbers per tile")
            self.position_scales = pos
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
        # the cores are shared: a batch's searches run on `threads` worker processes beside this one
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
        n, per = self.global_.shape[0], 1 if self.grid is None else len(self.grid)
        if len(self.train_names) * per != n:
            raise DeployError(f"{folder / 'deploy.json'}: {len(self.train_names)} training names for {n} vectors")

    def _read_zone(self, f: Any, shape: Any) -> tuple[Zone | None, np.ndarray | None]:
        """The inspection zone (its own size, and for an untiled model the input frame's), checked against the
        header (a tiled model cuts its zone like its images, :func:`.tiling.tile_zones`)."""
        keys = set(f.keys()) & {"zone", "input_zone"}
        if shape is None and not keys:
            return None, None
        where = self.folder / "global.safetensors"
        if shape is None or keys != ({"zone"} if self.grid is not None else {"zone", "input_zone"}):
            raise DeployError(f"{where}: the inspection zone disagrees with deploy.json")
        zone = f.get_tensor("zone")
        inside = None if self.grid is not None else f.get_tensor("input_zone")
        if list(zone.shape) != list(shape) or zone.dtype != np.uint8 or zone.max() > 1 or inside is not None and (
                tuple(inside.shape) != self.input_shape or inside.dtype != np.uint8 or inside.max() > 1):
            raise DeployError(f"{where}: the inspection zone disagrees with deploy.json")
        try:
            return Zone(zone.astype(bool), str(where)), None if inside is None else inside.astype(bool)
        except SpadeError as exc:
            raise DeployError(str(exc)) from None

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", verify: bool = True, threads: int | None = None) -> Detector:
        """Load and check a deploy folder (``verify``: every file's SHA-256, as model folders are; ``threads``:
        the worker processes that search a batch, default one per CPU core; 1: everything in this process)."""
        folder = Path(folder)
        return cls(folder, read_header(folder, verify), device, threads)

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Refuse, with one line naming it, an image this model cannot take (the inspection zone's aspect ratio)."""
        if self.zone is not None:
            self.zone.at(image.shape[0], image.shape[1], name)

    def features(self, image: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Stage 1: per level (h*w, C) float32 features and the (D,) global vector of one image (grey outside
        the inspection zone), or of one tile of a tiled model (already cut from the filled image)."""
        s = self.settings
        if self.zone is not None and self.grid is None:
            image = self.zone.fill_outside(image)
        x = imaging.to_input(image, s["preprocess"], s["image_size"], self.input_shape)[None]
        outs = self.session.run(None, {self.input_name: x})
        levels = [np.ascontiguousarray(o[0].reshape(o.shape[1], -1).T, np.float32) for o in outs[:-1]]
        return levels, np.asarray(outs[-1][0], np.float32)

    def retrieve(self, gvec: np.ndarray, position: int | None = None) -> tuple[float, np.ndarray]:
        """Stage 2: the kNN score and the gallery (the ``k`` nearest training images, nearest first; for the
        tile at grid ``position`` of a tiled model, bank rows by the ``tile_retrieval`` setting)."""
        s = self.settings
        if self.grid is None:
            return retrieval.knn(gvec, self.global_, s["k_image"], s["k"])
        assert position is not None
        return retrieval.tile_knn(gvec, position, self.global_, len(self.grid), s.get("tile_retrieval", "position"),
                                  s["k_image"], s["k"])

    def level_maps(self, levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
        """Stage 3's search: per level, each position's mean distance to its ``kappa`` nearest gallery features
        (:meth:`.PixelSearch.level_maps`)."""
        return self.search.level_maps(levels, gallery)

    def predict(self, images: Sequence[str | Path | np.ndarray], pixel_threshold: float | None = None,
                min_area: int | None = None) -> list[ImageResult]:
        """Score images (paths, or arrays as spade-ad takes them); ``pixel_threshold`` and ``min_area`` replace
        the model's for the masks and regions, as in ``Spade.predict``.

        The searches of a batch of at least :data:`POOL_MIN_IMAGES` images (of a tiled model: of each image's
        tiles) run on ``threads`` worker processes, one per CPU core by default (:mod:`.workers`, Linux),
        while this process decodes, runs the backbone and finishes the maps; the results do not depend on
        it. The first failing image (in input order) raises."""
        pthr = self.pixel_threshold if pixel_threshold is None else pixel_threshold
        area = self.min_area if min_area is None else check_min_area(min_area)
        n_tiles = 1 if self.grid is None else len(self.grid)
        with single_threaded_blas():
            pool = self._pool(len(images) * n_tiles)
            try:
                searched = self._searched(self._queries(images), pool)
                if self.grid is None:
                    return [self._finish(*meta, maps, pthr=pthr, area=area)  # type: ignore[misc, arg-type]
                            for meta, maps in searched]
                return self._stitched(searched, pthr, area)
            except BrokenProcessPool:
                self.close()
                raise SpadeError("a search worker process ended unexpectedly (out of memory, or killed)") from None

    def _queries(self, images: Sequence[str | Path | np.ndarray]) -> Iterator[tuple[tuple[Any, ...], list[
            np.ndarray], np.ndarray]]:
        """Stages 1 and 2, lazily, image by image (tile by tile for a tiled model): (what the result needs,
        the level features, the gallery) of each search, in order."""
        for index, item in enumerate(images):
            name, image = _read_image(item, index, self.settings.get("max_pixels"))
            self.check_image(image, name)
            shape = (image.shape[0], image.shape[1])
            if self.grid is None:
                levels, gvec = self.features(image)
                knn, gallery = self.retrieve(gvec)
                yield (name, shape, knn, gallery), levels, gallery
                continue
            filled = image if self.zone is None else self.zone.fill_outside(image)
            for pos, tile in enumerate(iter_tiles(filled, self.grid)):
                levels, gvec = self.features(tile)
                knn, gallery = self.retrieve(gvec, pos)
                yield (name, shape, knn, gallery, pos), levels, gallery

    def _searched(self, queries: Iterator[tuple[tuple[Any, ...], list[np.ndarray], np.ndarray]],
                  pool: SearchWorkers | None) -> Iterator[tuple[tuple[Any, ...], list[np.ndarray]]]:
        """Each query's level maps, in order: here, or on the workers with a bounded window of searches in flight
        (this process computes the next queries meanwhile)."""
        if pool is None:
            for meta, levels, gallery in queries:
                yield meta, self.level_maps(levels, gallery)
            return
        window: deque[tuple[tuple[Any, ...], Future[list[np.ndarray]]]] = deque()
        try:
            for meta, levels, gallery in queries:
                window.append((meta, pool.submit(levels, gallery)))
                if len(window) >= AHEAD * pool.processes:
                    first, fut = window.popleft()
                    yield first, fut.result()
            while window:
                first, fut = window.popleft()
                yield first, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()

    def _pool(self, n_searches: int) -> SearchWorkers | None:
        """The worker processes, for a batch of ``n_searches`` (started for the first large enough batch)."""
        if self._workers is None and min(self.threads, n_searches) > 1 and n_searches >= POOL_MIN_IMAGES \
                and self.device == "cpu":
            self._workers = workers.start(self.search, self.threads)  # (None where processes are not forked)
            if self._workers is not None:  # a detector dropped without close() does not leave its workers behind
                weakref.finalize(self, self._workers.close, wait=False)
        return self._workers if n_searches > 1 else None

    def close(self) -> None:
        """Stop the search workers, if any (a later batch starts new ones)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def _input_map(self, level_maps: list[np.ndarray], zone: np.ndarray | None) -> np.ndarray:
        """Level maps -> the input-frame map (0 outside the inspection zone ``zone``, in that frame)."""
        amap = imaging.combine_levels(level_maps, self.input_shape, self.settings["sigma"])
        return amap if zone is None else np.where(zone, amap, np.float32(0))

    def _finish(self, name: str, shape: tuple[int, int], knn: float, gallery: np.ndarray,
                level_maps: list[np.ndarray], *, pthr: float, area: int) -> ImageResult:
        """An untiled model's result from its level maps: the maps, the image score, the verdict's inputs."""
        s = self.settings
        amap = self._input_map(level_maps, self.input_zone)
        score = self._image_score(knn, float(amap.max()))
        full = imaging.map_to_image(amap, s["preprocess"], s["image_size"], *shape)
        if self.zone is not None:
            full = self.zone.clear_outside(full)
        return self._result(name, score, full, amap, gallery, pthr, area)

    def _stitched(self, searched: Iterator[tuple[tuple[Any, ...], list[np.ndarray]]], pthr: float,
                  area: int) -> list[ImageResult]:
        """A tiled model's results: each image's tile maps stitched (spade-ad's ``score_tiles``), its score from
        its tiles' (``tile_image_scores``), its neighbours those of the tile that weighs most."""
        grid = self.grid
        assert grid is not None
        t, s = len(grid), self.settings
        zones = None if self.zone is None else tile_zones(self.zone, grid, self.input_shape)
        out: list[ImageResult] = []
        st, knns, maxima, galleries = Stitcher(grid), [], [], []
        for (name, shape, knn, gallery, pos), level_maps in searched:
            amap = self._input_map(level_maps, None if zones is None else zones[pos])
            if amap.shape != (grid.tile, grid.tile):
                amap = imaging.resize_map(amap, grid.tile, grid.tile)
            st.add(pos, amap)
            knns.append(knn)
            maxima.append(float(amap.max()))
            galleries.append(gallery)
            if pos + 1 < t:
                continue
            stitched = st.result()
            tk, tm = np.asarray(knns, np.float32), np.asarray(maxima, np.float32)
            score = float(retrieval.tile_image_scores(s["image_score"], s.get("tile_pool", "max"),
                                                      self.position_scales, tk[None], tm[None])[0])
            full = to_native(stitched, grid, shape)
            if self.zone is not None:
                full, stitched = self.zone.clear_outside(full), self.zone.clear_outside(stitched)
            best = retrieval.best_tile(tm, self.position_scales)
            out.append(self._result(name, score, full, stitched, galleries[best] // t, pthr, area))
            st, knns, maxima, galleries = Stitcher(grid), [], [], []
        return out

    def _result(self, name: str, score: float, full: np.ndarray, amap: np.ndarray, gallery: np.ndarray,
                pthr: float, area: int) -> ImageResult:
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
