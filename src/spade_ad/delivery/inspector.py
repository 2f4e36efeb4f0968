"""The web inspector: a FastAPI app serving a small static page and a JSON API over one fitted model.

``create_app(model_dir)`` builds the app from one router per concern (pages, the model, predictions,
changes), sharing one context (the model, the kept uploads, locks, limits); ``spade-ad serve MODEL_DIR``
runs it with uvicorn.

Endpoints (all documented at ``/docs`` and ``/openapi.json``; the docs page's assets are served locally):

* ``POST /predict`` - multipart upload of one image: score, normalised score, verdict, thresholds, nearest
  normal images, the heatmap overlay and mask as base64 images, and the raw map (downsampled float32) so
  a client can recompute masks at any threshold.
* ``GET /correspondence?id=&y=&x=`` - for a recent upload (the server keeps the features of the last
  ``cache_size`` uploads), the normal image and the patch in it that pixel (y, x) was matched to.
* ``GET /thumbnail/{index}?generation=&id=`` - a training image's thumbnail (PNG), ``GET /colour-bar.png``,
  ``GET /info``.

Every answer names the model generation it comes from, and a training image by its index in that generation
and its id: a thumbnail or explanation asked for with another generation's references is refused (409)
rather than answered from the current model (indices shift when images are removed), and thumbnails are
never cached by the browser. Error bodies quote what the client sent shortened and escaped
(:func:`_clip`, at most ``MAX_ECHO`` characters).

The model serialises its own compute (reproducible results under concurrency); decoding, drawing and
encoding run in parallel in FastAPI's thread pool.
"""

from __future__ import annotations

import base64
import hmac
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as Path_
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..drift import DriftMonitor, health_line, monitor_for
from ..errors import SpadeError
from ..io import decode_image, printable
from ..model import Spade
from ..persistence import folder_lock
from ..result import ImageResult, Prediction, normalised
from ..version import __version__
from ..viz import SCALE_MAX, colour_bar, data_uri, encode, overlay, resize_map, resize_rgb, small_size

__all__ = ["create_app"]

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000  # larger uploads are refused from their header (memory), whatever their file size
MAP_SIDE = 256  # the raw map sent to clients is downsampled to at most this many pixels a side
OVERLAY_SIDE = 768  # the overlay picture is downsampled to at most this many pixels a side
N_NEIGHBOURS = 5  # nearest normal images listed per prediction
MAX_ECHO = 80  # characters of a client's value (an id, a host, a file name) quoted in an answer
MAX_DETAIL = 1000  # characters of an error message (everything quoted in it is clipped already)
NO_STORE = {"Cache-Control": "no-store"}  # answers that depend on the model generation
COLOUR_SCALE = f"map / pixel_threshold on a fixed scale [0, {SCALE_MAX:g}] (inferno); 1.0 = at the pixel threshold"


class Neighbour(BaseModel):
    index: int = Field(description="training image index (in the response's model generation)")
    id: str | None = Field(None, description="training image id: SHA-256 of its pixels (null in models saved "
                                             "before ids)")
    name: str = Field(description="training image file name (no folders)")
    thumbnail_url: str = Field(description="its thumbnail in this generation (names the generation and id)")


class NormalsResponse(BaseModel):
    generation: int = Field(description="the model generation these training images belong to")
    normals: list[Neighbour] = Field(description="the training images, by index")


class RawMap(BaseModel):
    width: int
    height: int
    dtype: str = Field("float32-le", description="little-endian float32, row-major")
    data: str = Field(description="base64 of the raw anomaly map (not normalised), downsampled")


class RegionOut(BaseModel):
    box: list[int] = Field(description="(x, y, width, height) of the bounding box, pixels of the image")
    area: int = Field(description="pixels in the region")
    peak: float = Field(description="highest map value in the region")
    peak_at: list[int] = Field(description="(x, y) of the peak")
    mean: float = Field(description="mean map value over the region")
    peak_normalised: float | None = Field(description="peak / pixel threshold")


class PredictResponse(BaseModel):
    id: str = Field(description="key for /correspondence; the server keeps the last few uploads")
    filename: str
    width: int
    height: int
    score: float = Field(description="image anomaly score")
    normalised_score: float | None = Field(description="score / image threshold (1.0 = at the threshold)")
    verdict: str | None = Field(description="'defective' or 'good' by the model's verdict rule: the score at or "
                                "over the image threshold ('score'), or a surviving defect region ('regions')")
    verdict_rule: str = Field(description="'score' or 'regions'")
    min_area: int = Field(description="defect regions of fewer pixels are dropped from the mask and the regions")
    regions: list[RegionOut] | None = Field(description="the mask's 8-connected components at the pixel threshold, "
                                            "largest first")
    image_threshold: float | None
    pixel_threshold: float | None
    max_pixel_score: float
    defect_fraction: float | None = Field(description="fraction of pixels at or over the pixel threshold")
    neighbours: list[Neighbour] = Field(description="nearest normal training images, nearest first")
    generation: int = Field(description="the model generation that scored the image (its training images)")
    overlay: str = Field(description="data URI (JPEG): the image blended with its heatmap, fixed colour scale")
    mask: str | None = Field(description="data URI (PNG): mask at the pixel threshold, at the image's resolution")
    zone: str | None = Field(None, description="data URI (PNG, RGBA): the model's inspection zone at the image's "
                             "resolution, shaded where it is ignored (transparent where inspected); null: no zone")
    map: RawMap
    colour_scale: str = COLOUR_SCALE


class CorrespondenceResponse(BaseModel):
    id: str
    y: int
    x: int
    generation: int = Field(description="the model generation that scored the upload and matched the pixel")
    neighbour: int = Field(description="training image index of the matched normal feature (in `generation`)")
    neighbour_id: str | None = Field(description="its id (see Neighbour.id)")
    neighbour_name: str
    level: int = Field(description="feature pyramid level (0 = finest)")
    distance: float = Field(description="feature distance to the matched normal feature")
    y_frac: float = Field(description="centre of the matched patch, fraction of the normal image's height")
    x_frac: float
    box_frac: list[float] = Field(description="matched patch (y0, x0, y1, x1) as fractions of the normal image")
    thumbnail_url: str = Field(description="the matched image's thumbnail (names the generation and id)")
    tile: int | None = Field(None, description="a tiled model: the grid position (row-major) of the matched tile")
    tile_box_frac: list[float] | None = Field(None, description="a tiled model: the matched tile (y0, x0, y1, x1) "
                                                                "as fractions of the normal image")
    pixel_score: float = Field(description="anomaly map value near (y, x)")
    pixel_score_normalised: float | None


class InfoResponse(BaseModel):
    version: str
    backbone: str
    n_train: int
    k: int
    image_size: int
    preprocess: str = Field(description="how images become the network input (resize, or the paper's crop)")
    image_threshold: float | None
    pixel_threshold: float | None
    calibration: dict[str, Any]
    max_upload_bytes: int
    generation: int = Field(description="the model's generation (1 = as fitted; each update adds one)")
    updates_allowed: bool = Field(description="whether POST/DELETE /normals may change the model")
    scale_max: float
    colour_scale: str


class AddNormal(BaseModel):
    id: str = Field(description="the `id` of an upload returned by /predict")


class UpdateResponse(BaseModel):
    generation: int = Field(description="the model's new generation")
    action: str = Field(description="add, remove or calibrate (a known defect kept)")
    n_train: int
    image_threshold: float | None
    pixel_threshold: float | None
    before: dict[str, Any] | None = Field(description="training-image count and thresholds before the change")
    added: list[str]
    removed: list[str]
    defects_added: list[str] = Field(default_factory=list, description="images kept as known defects")


class ErrorResponse(BaseModel):
    detail: str


@dataclass
class _Entry:
    pred: Prediction  # one image, features kept, maps dropped, no reference to its model (see scored_by)
    scored_by: weakref.ref[Spade]  # the model that scored it (weakly: an old generation is not kept alive)
    generation: int
    small_map: np.ndarray  # map at <= MAP_SIDE, for the pixel score at a clicked point
    image: np.ndarray | None  # the decoded upload (kept only when updates are allowed: "mark as normal")
    filename: str


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is too large (more than {limit / 1048576:.3g} MB; the server accepts at most "
                              f"{limit:,} bytes)")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _public_name(name: str) -> str:
    """A training image's file name without its folders (the server does not reveal paths)."""
    return PurePath(name.replace("\\", "/")).name or name


def _clip(value: object, limit: int = MAX_ECHO) -> str:
    """A client's value quoted for an answer: escaped (``repr``) and, if long, cut with its length said."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def _bounded(detail: str) -> str:
    """An error message cut to ``MAX_DETAIL`` characters (a last guard: values in it are clipped already)."""
    return detail if len(detail) <= MAX_DETAIL else f"{detail[:MAX_DETAIL]}... ({len(detail):,} characters)"


def _short_name(name: str, limit: int = MAX_ECHO) -> str:
    """An upload's file name as the server repeats it: printable, at most ``limit`` characters (end kept)."""
    name = printable(name)
    return name if len(name) <= limit else f"{name[: limit // 2]}...{name[-(limit // 2) + 3 :]}"


def _generation(spade: Spade) -> int:
    """The model's generation (1 = as fitted; each update adds one)."""
    return len(getattr(spade, "history_", []))


def _image_id(spade: Spade, index: int) -> str | None:
    """Training image ``index``'s id, which it keeps across generations (``Spade.train_ids_``: SHA-256 of its
    pixels), or None for models without ids."""
    ids = getattr(spade, "train_ids_", None)
    return ids[index] if ids is not None else None


def _thumbnail_url(spade: Spade, index: int) -> str:
    """Where training image ``index`` of ``spade`` is served: the URL names the generation and the image id,
    so it never stands for another image (see ``GET /thumbnail``)."""
    image_id = _image_id(spade, index)
    return f"/thumbnail/{index}?generation={_generation(spade)}" + (f"&id={image_id}" if image_id else "")


def _neighbour(spade: Spade, index: int) -> Neighbour:
    """Training image ``index`` of ``spade`` as the API shows it (index, id, name without folders, thumbnail)."""
    return Neighbour(index=index, id=_image_id(spade, index), name=_public_name(spade.train_names_[index]),
                     thumbnail_url=_thumbnail_url(spade, index))


def _header_stat(folder: Path | None) -> tuple[int, int, int] | None:
    """What tells that ``model.json`` was replaced (inode, modification time, size); None if unreadable."""
    try:
        st = (folder / "model.json").stat() if folder is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def _host_only(value: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> host, lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1 : v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class _SameOrigin:
    """ASGI middleware against DNS rebinding and cross-site requests: the ``Host`` header must name an
    allowed host, and a request that sends data (POST, PUT, PATCH, DELETE) must come from the same origin
    (``Origin`` equal to the ``Host``, or no ``Origin`` and no cross-site ``Sec-Fetch-Site``)."""

    def __init__(self, app: Any, hosts: set[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        if _host_only(host) not in self.hosts:
            await JSONResponse({"detail": f"host {_clip(host)} is not served here (start the inspector with "
                                          "--allow-host to add one)"}, status_code=421)(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            origin = headers.get("origin")
            cross = headers.get("sec-fetch-site") in ("cross-site", "same-site")
            if (origin is not None and origin.split("://", 1)[-1].lower() != host.lower()) or cross:
                await JSONResponse({"detail": "cross-origin requests may not send data to the inspector"},
                                   status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LimitBody:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (by Content-Length, or while streaming)."""

    def __init__(self, app: Any, limit: int, file_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            err = _TooLarge(self.file_limit)
            await JSONResponse({"detail": err.detail}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.file_limit)
            return message

        await self.app(scope, limited, send)


REQUEST_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "not an image, corrupt or truncated file, bad request"},
    413: {"model": ErrorResponse, "description": "upload larger than the server's limit"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no or wrong token"},
    403: {"model": ErrorResponse, "description": "read-only inspector, or a cross-origin request"},
    404: {"model": ErrorResponse, "description": "unknown upload id or training image"},
    409: {"model": ErrorResponse, "description": "the model changed since the client saw it"},
}


@dataclass(eq=False)
class _Context:
    """What the routers share: the model as the folder holds it, the uploads and thumbnails kept, their locks,
    the limits and the token."""

    model: Spade  # swapped whole on an update or reload: a request uses one model
    folder: Path | None
    device: str
    weights: str | None
    max_upload_bytes: int
    max_pixels: int
    cache_size: int
    allow_updates: bool
    token: str | None
    header: tuple[int, int, int] | None  # model.json as ``model`` was read from it (see current)
    update_lock: threading.Lock = field(default_factory=threading.Lock)
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    cache: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    thumbs: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (generation, index) -> PNG, current model
    drift: dict[int, DriftMonitor] = field(default_factory=dict)  # generation -> its window of recent scores

    def monitor(self, spade: Spade) -> DriftMonitor:
        """The drift window of ``spade``'s generation (a new generation starts a new window)."""
        gen = _generation(spade)
        with self.cache_lock:
            if gen not in self.drift:
                self.drift.clear()
                self.drift[gen] = monitor_for(spade)
            return self.drift[gen]

    def current(self) -> Spade:
        """The model as the folder holds it now: reloaded once ``model.json`` changed (another writer, such as
        ``spade-ad update`` or ``rollback``); the last good one while the folder cannot be read."""
        stat = _header_stat(self.folder)
        if self.folder is None or stat is None or stat == self.header:
            return self.model
        with self.update_lock:
            if stat != self.header:
                try:
                    self.model = Spade.load(self.folder, device=self.device, weights=self.weights)
                except SpadeError:
                    return self.model
                self.header = stat
                self.thumbs.clear()
        return self.model


def create_app(
    model_dir: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    device: str = "cpu",
    cache_size: int = 16,
    model: Spade | None = None,
    weights: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_pixels: int | None = None,
    allow_updates: bool = False,
    token: str | None = None,
) -> FastAPI:
    """The inspector app for the model in ``model_dir`` (or an already fitted/loaded ``model``).

    ``max_pixels``: refuse uploads with more pixels, read from their header (default ``MAX_PIXELS``).
    ``allowed_hosts``: host names accepted in the ``Host`` header (default: this machine's loopback names);
    any other is refused (DNS rebinding). Requests that change anything must come from the same origin.
    ``allow_updates``: offer ``POST /normals`` and ``DELETE /normals/{id}?generation=G`` (they change the model
    in ``model_dir``), each with ``Authorization: Bearer <token>``; without it the inspector is read-only.
    A change holds the folder's lock (:func:`spade_ad.persistence.folder_lock`) across load -> change -> save,
    so it applies to the model as it is on disk then, whoever else (``spade-ad update``, another server)
    writes the folder; a removal names the generation it was chosen in and is refused (409) once that moved.
    """
    ctx = _context(model_dir, max_upload_bytes, device, cache_size, model, weights, max_pixels, allow_updates,
                   token)
    app = _bare_app(ctx, allowed_hosts)
    app.state.inspector = ctx  # (the models server reads the model it serves)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # (routers do not carry mounts)
    for router in (_pages(ctx), _model_routes(ctx), _predictions(ctx), _changes(ctx)):
        app.include_router(router)
    return app


def _context(model_dir: str | Path | None, max_upload_bytes: int, device: str, cache_size: int, model: Spade | None,
             weights: str | None, max_pixels: int | None, allow_updates: bool, token: str | None) -> _Context:
    """``create_app``'s arguments checked, and the model loaded unless given, as the routers' shared context."""
    if model is None:
        if model_dir is None:
            raise SpadeError("create_app needs a model folder (or a model)")
        model = Spade.load(model_dir, device=device, weights=weights)
    if max_upload_bytes <= 0:
        raise SpadeError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if max_pixels is None:
        max_pixels = MAX_PIXELS
    if max_pixels < 64:
        raise SpadeError(f"max_pixels must be at least 64, got {max_pixels}")
    if allow_updates and (model_dir is None or not token):
        raise SpadeError("updates need the model folder and a token")
    folder = Path(model_dir) if model_dir is not None else None
    return _Context(model=model, folder=folder, device=device, weights=weights, max_upload_bytes=max_upload_bytes,
                    max_pixels=max_pixels, cache_size=cache_size, allow_updates=allow_updates, token=token,
                    header=_header_stat(folder))


def _bare_app(ctx: _Context, allowed_hosts: list[str] | None) -> FastAPI:
    """The app without routes: its docs (served offline), the body-size and same-origin guards, error answers."""
    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(
        title="spade-ad inspector",
        version=__version__,
        description="SPADE anomaly detection on uploaded images: scores, heatmaps, masks and, for any pixel, the "
        "normal image patch it was matched to. " + COLOUR_SCALE + ".",
        static_url="/docs-assets",
    )
    # added last = runs first: the host and origin are checked before a body is read
    app.add_middleware(_LimitBody, limit=ctx.max_upload_bytes + 64 * 1024, file_limit=ctx.max_upload_bytes)
    app.add_middleware(_SameOrigin, hosts={_host_only(h) for h in (allowed_hosts or [])} | set(LOCAL_HOSTS))
    app.exception_handler(SpadeError)(_spade_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_invalid)
    return app


async def _spade_error(request: Request, exc: SpadeError) -> JSONResponse:
    return JSONResponse({"detail": _bounded(str(exc))}, status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"detail": _bounded(detail)}, status_code=exc.status_code, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer, with each offending value quoted by :func:`_clip` (not echoed whole)."""
    errs = [{"loc": [str(x)[:MAX_ECHO] for x in e.get("loc", ())], "msg": _bounded(str(e.get("msg", ""))),
             "type": str(e.get("type", "")), **({"input": _clip(e["input"])} if "input" in e else {})}
            for e in exc.errors()[:10]]
    return JSONResponse({"detail": errs}, status_code=422)


# --- pages and assets ---------------------------------------------------------------------------------------


def _pages(ctx: _Context) -> APIRouter:
    """The page and what it draws with: /, /favicon.ico, /colour-bar.png (/static is mounted by
    ``create_app``, /docs and its assets by FastAPIOffline)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @router.get("/colour-bar.png", summary="The heatmap colour bar (PNG), labelled in raw pixel scores",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def colour_bar_png() -> Response:
        spade = ctx.current()
        return Response(encode(colour_bar(height=256, width=70, threshold=spade.pixel_threshold_)),
                        media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return router


# --- the model: settings, training images -------------------------------------------------------------------


def _model_routes(ctx: _Context) -> APIRouter:
    """What the model is: /info, a training image's thumbnail, the list of training images (GET /normals)."""
    router = APIRouter()

    @router.get("/info", response_model=InfoResponse, summary="The model: thresholds, settings, upload limit")
    def info() -> InfoResponse:
        return _info(ctx, ctx.current())

    @router.get("/thumbnail/{index}", summary="Thumbnail (PNG) of training image `index`", response_class=Response,
                responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse},
                           409: {"model": ErrorResponse, "description": "the model changed since that generation"}})
    def thumbnail(
        index: int,
        generation: Annotated[int | None, Query(description="the generation `index` refers to (as in the "
                                                             "thumbnail_url of /predict and /correspondence)")] = None,
        id: Annotated[str | None, Query(description="the image's id in that generation")] = None,
    ) -> Response:
        spade = ctx.current()
        _check_training_image(spade, index, generation, id)
        return Response(_thumbnail_png(ctx, spade, index), media_type="image/png", headers=NO_STORE)

    @router.get("/normals", response_model=NormalsResponse,
                summary="The training images (normals): index, id, name")
    def list_normals() -> NormalsResponse:
        spade = ctx.current()
        return NormalsResponse(generation=_generation(spade),
                               normals=[_neighbour(spade, i) for i in range(spade.state_.n_train)])

    return router


def _info(ctx: _Context, spade: Spade) -> InfoResponse:
    """GET /info's answer: the model's settings and thresholds (calibration without its per-image lists)."""
    calib = {k: v for k, v in (spade.calibration_ or {}).items() if k not in ("image_scores", "map_maxima")}
    return InfoResponse(
        version=__version__, backbone=spade.settings.backbone, n_train=int(spade.state_.n_train), k=spade.settings.k,
        image_size=spade.settings.image_size, preprocess=spade.settings.preprocess,
        image_threshold=spade.image_threshold_,
        pixel_threshold=spade.pixel_threshold_, calibration=calib, max_upload_bytes=ctx.max_upload_bytes,
        generation=_generation(spade), updates_allowed=ctx.allow_updates,
        scale_max=SCALE_MAX, colour_scale=COLOUR_SCALE,
    )


def _check_training_image(spade: Spade, index: int, generation: int | None, image_id: str | None) -> None:
    """Refuse a reference to a training image that ``spade`` does not hold as the client saw it: another
    generation (409: indices shift), no such index (404), another image at that index (409)."""
    now = _generation(spade)
    if generation is not None and generation != now:
        raise HTTPException(409, f"training image {index} of generation {generation} is not served any more "
                                 f"(the model is at generation {now}): upload the image again")
    if not (0 <= index < spade.state_.n_train):
        raise HTTPException(404, f"no training image {index} (the model has {spade.state_.n_train})")
    if image_id is not None and image_id != _image_id(spade, index):
        raise HTTPException(409, f"training image {index} is not image {_clip(image_id)} in generation {now}")


def _thumbnail_png(ctx: _Context, spade: Spade, index: int) -> bytes:
    """Training image ``index``'s thumbnail as PNG, drawn once per generation."""
    key = (_generation(spade), index)
    data = ctx.thumbs.get(key)
    if data is None:
        data = encode(np.asarray(spade.thumbnail(index)))
        with ctx.cache_lock:
            if ctx.model is spade:  # (not after an update cleared the cache for the new model)
                ctx.thumbs[key] = data
    return data


# --- predictions: scoring an upload, explaining a pixel -------------------------------------------------------


def _predictions(ctx: _Context) -> APIRouter:
    """Scoring an upload (POST /predict) and explaining one of its pixels (GET /correspondence)."""
    router = APIRouter()

    @router.post("/predict", response_model=PredictResponse, responses=REQUEST_ERRORS,
                 summary="Score one uploaded image (multipart field `file`)")
    def predict(file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, BMP, TIFF, WebP)")]
                ) -> PredictResponse:
        name, image = _read_upload(ctx, file)
        spade = ctx.current()
        pred = spade.predict([image], keep_features=True)
        res = pred[0]
        over = _overlay(image, res)
        h, w = image.shape[:2]
        small_map = resize_map(res.map, small_size(h, w, MAP_SIDE))
        ctx.monitor(spade).add(res.score, res.verdict)
        key = _remember(ctx, _Entry(pred=replace(pred, maps=[], input_maps=[], state=None),
                                    scored_by=weakref.ref(spade), generation=_generation(spade), small_map=small_map,
                                    image=image if ctx.allow_updates else None, filename=name))
        return _predict_response(key, name, image, spade, res, over, small_map)

    @router.get("/health", summary="The model's health (200 while the server is up): the share of recent uploads "
                "judged defective against its false-alarm rate, and where the good ones score against its "
                "calibration (spade_ad.drift)")
    def model_health() -> dict[str, Any]:
        spade = ctx.current()
        h = ctx.monitor(spade).health()
        return {"generation": _generation(spade), **h, "line": health_line(h)}

    @router.get("/correspondence", response_model=CorrespondenceResponse,
                summary="The correspondence of pixel (y, x): the normal patch it matched",
                responses={**REQUEST_ERRORS, 404: {"model": ErrorResponse, "description": "upload no longer cached"}})
    def correspondence(
        id: Annotated[str, Query(description="the `id` returned by /predict")],
        y: Annotated[int, Query(description="row in the uploaded image's own pixels")],
        x: Annotated[int, Query(description="column in the uploaded image's own pixels")],
        level: Annotated[int, Query(description="feature pyramid level (0 = finest)")] = 0,
    ) -> CorrespondenceResponse:
        entry = _cached(ctx, id)
        spade = ctx.current()
        if entry.scored_by() is not spade:
            raise HTTPException(409, f"upload {_clip(id)} was scored by generation {entry.generation} and the model "
                                     f"is now at generation {_generation(spade)}: upload the image again")
        return _correspondence_response(entry, spade, id, y, x, level)

    return router


def _read_upload(ctx: _Context, file: UploadFile) -> tuple[str, np.ndarray]:
    """An upload's name as the server repeats it and its pixels; refused if too large (413) or not an image
    (400). The file's bytes are dropped before the model runs."""
    name = _short_name(Path(file.filename or "upload").name)
    data = file.file.read(ctx.max_upload_bytes + 1)
    if len(data) > ctx.max_upload_bytes:
        raise _TooLarge(ctx.max_upload_bytes)
    return name, decode_image(data, name, max_pixels=ctx.max_pixels)


def _overlay(image: np.ndarray, res: ImageResult) -> np.ndarray:
    """The upload blended with its heatmap (fixed colour scale), at most ``OVERLAY_SIDE`` pixels a side."""
    h, w = image.shape[:2]
    hw = small_size(h, w, OVERLAY_SIDE)
    return overlay(resize_rgb(image, hw), resize_map(res.map, hw), res.pixel_threshold, None)


def _remember(ctx: _Context, entry: _Entry) -> str:
    """Keep an upload for /correspondence and POST /normals (the last ``cache_size`` only); its new id."""
    key = uuid.uuid4().hex
    with ctx.cache_lock:
        ctx.cache[key] = entry
        while len(ctx.cache) > ctx.cache_size:
            ctx.cache.popitem(last=False)
    return key


def _zone_picture(spade: Spade, height: int, width: int) -> str | None:
    """The inspection zone at an image's size as a shade: dark translucent where ignored, clear where inspected."""
    zone = spade.state_.zone
    if zone is None:
        return None
    ignored = ~zone.at(height, width)
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = ignored.astype(np.uint8) * 150
    return data_uri(rgba, "PNG")


def _predict_response(key: str, name: str, image: np.ndarray, spade: Spade, res: ImageResult, over: np.ndarray,
                      small_map: np.ndarray) -> PredictResponse:
    """POST /predict's answer: scores, verdict, neighbours, the pictures and the downsampled raw map."""
    h, w = image.shape[:2]
    mh, mw = small_map.shape
    mask = res.mask
    summary = res.summary()
    return PredictResponse(
        id=key, filename=name, width=w, height=h, score=res.score,
        normalised_score=res.normalised_score, verdict=res.verdict, verdict_rule=res.verdict_rule,
        min_area=res.min_area, regions=summary["regions"],
        image_threshold=res.image_threshold, pixel_threshold=res.pixel_threshold, max_pixel_score=res.max_pixel_score,
        defect_fraction=summary["defect_fraction"],
        neighbours=[_neighbour(spade, int(j)) for j in res.neighbours[:N_NEIGHBOURS]],
        generation=_generation(spade),
        overlay=data_uri(over, "JPEG"),
        mask=data_uri(mask, "PNG") if mask is not None else None,
        zone=_zone_picture(spade, h, w),
        map=RawMap(width=mw, height=mh, dtype="float32-le",
                   data=base64.b64encode(small_map.astype("<f4").tobytes()).decode("ascii")),
    )


def _cached(ctx: _Context, upload_id: str) -> _Entry:
    """The upload kept under ``upload_id`` (now the most recently used), or 404 once it left the cache."""
    with ctx.cache_lock:
        entry = ctx.cache.get(upload_id)
        if entry is not None:
            ctx.cache.move_to_end(upload_id)
    if entry is None:
        raise HTTPException(404, f"upload {_clip(upload_id)} is no longer cached (the server keeps the last "
                                 f"{ctx.cache_size}); upload the image again")
    return entry


def _correspondence_response(entry: _Entry, spade: Spade, upload_id: str, y: int, x: int,
                             level: int) -> CorrespondenceResponse:
    """GET /correspondence's answer: the normal patch pixel (y, x) matched, and the map's value near it."""
    c = replace(entry.pred, state=spade.state_).correspondence(0, y, x, level)
    h, w = entry.pred.sizes[0]
    sm = entry.small_map
    v = float(sm[min(sm.shape[0] - 1, int(y * sm.shape[0] / h)), min(sm.shape[1] - 1, int(x * sm.shape[1] / w))])
    return CorrespondenceResponse(
        id=upload_id, y=y, x=x, generation=entry.generation, neighbour=c.neighbour,
        neighbour_id=_image_id(spade, c.neighbour), neighbour_name=_public_name(c.neighbour_name), level=c.level,
        distance=c.distance, y_frac=c.y_frac, x_frac=c.x_frac, box_frac=list(c.box_frac),
        thumbnail_url=_thumbnail_url(spade, c.neighbour), tile=c.tile,
        tile_box_frac=None if c.tile_box_frac is None else list(c.tile_box_frac), pixel_score=v,
        pixel_score_normalised=normalised(v, entry.pred.pixel_threshold),
    )


# --- changes to the model's good images -----------------------------------------------------------------------


def _changes(ctx: _Context) -> APIRouter:
    """Changing the model (needs --allow-updates and the token): mark an upload as normal (POST /normals) or as
    a missed defect (POST /defects), remove a training image (DELETE /normals/{image})."""
    router = APIRouter()

    @router.post("/normals", response_model=UpdateResponse, responses=WRITE_ERRORS,
                 summary="Mark an upload as normal: add it to the model's good images (needs --allow-updates)")
    def add_normal(body: AddNormal, request: Request) -> UpdateResponse:
        source = _authorise(ctx, request)
        image, name = _upload(ctx, body.id)
        return _change(ctx, lambda m: m.add([image], names=[name], source=source))

    @router.post("/defects", response_model=UpdateResponse, responses=WRITE_ERRORS,
                 summary="Mark an upload as a missed defect: keep it as a known defect of the model (needs "
                 "--allow-updates); the operating point is measured again with it")
    def add_defect(body: AddNormal, request: Request) -> UpdateResponse:
        source = _authorise(ctx, request)
        image, name = _upload(ctx, body.id)
        return _change(ctx, lambda m: m.calibrate([(image, None)], source=source, names=[name]), gated=False)

    @router.delete("/normals/{image}", response_model=UpdateResponse, responses=WRITE_ERRORS,
                   summary="Remove a training image from the model's good images (needs --allow-updates)")
    def remove_normal(
        image: Annotated[str, Path_(description="the training image's id (or, in models saved before ids, its "
                                               "index), as /normals, /predict list it")],
        generation: Annotated[int, Query(description="the model generation the client saw it in (the `generation` "
                                                     "of /normals or /predict)")],
        request: Request,
    ) -> UpdateResponse:
        source = _authorise(ctx, request)
        return _change(ctx, lambda m: m.remove([_training_index(m, image, generation)], source=source), generation)

    return router


def _upload(ctx: _Context, upload_id: str) -> tuple[np.ndarray, str]:
    """A cached upload's pixels and the name a change records for it; 404 once it left the cache."""
    with ctx.cache_lock:
        entry = ctx.cache.get(upload_id)
    if entry is None or entry.image is None:
        raise HTTPException(404, f"upload {_clip(upload_id)} is not cached any more; upload the image again")
    return entry.image, f"inspector/{upload_id[:12]}-{entry.filename}"


def _authorise(ctx: _Context, request: Request) -> str:
    """Writes need --allow-updates and the bearer token (compared in constant time); the change's source."""
    if not ctx.allow_updates:
        raise HTTPException(403, "the inspector is read-only: start it with --allow-updates to change the model")
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), (ctx.token or "").encode()):
        raise HTTPException(401, "a valid token is needed (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    return f"inspector {request.client.host if request.client else 'unknown'}"


def _training_index(spade: Spade, image: str, generation: int) -> int:
    """The index of training image ``image`` (its id, or its index in models saved before ids); 404 if none."""
    ids = spade.train_ids_
    if image in ids:
        return ids.index(image)
    if image.isdigit() and int(image) < spade.state_.n_train and ids[int(image)] is None:
        return int(image)
    raise HTTPException(404, f"no training image {image!r} in generation {generation}")


def _change(ctx: _Context, apply: Callable[[Spade], object], generation: int | None = None,
            gated: bool = True) -> UpdateResponse:
    """Apply a change to the model as the folder holds it now (read, changed and saved under the folder's
    lock, so no other writer comes in between), then swap it in: requests running meanwhile use the old
    model, later ones the new one, never a mix. With ``generation``: refused (409) unless the folder is
    still at that generation (what the client saw). ``gated``: the defect gate applies (a change of the good
    images may not make the model judge good a known defect it judged defective before)."""
    assert ctx.folder is not None
    with ctx.update_lock, folder_lock(ctx.folder):
        stat = _header_stat(ctx.folder)
        new = Spade.load(ctx.folder, device=ctx.device, weights=ctx.weights)
        if generation is not None and generation != len(new.history_):
            raise HTTPException(409, f"the model changed since you saw it (generation {generation}, now "
                                     f"{len(new.history_)}); reload and choose again")
        before = set(new.missed_defects()) if gated else set()
        apply(new)
        missed = [d for d in new.missed_defects() if d not in before] if gated else []
        if missed:  # the defect gate (forcing it is for the command line)
            raise HTTPException(409, f"this change would judge {len(missed)} known defect(s) good: "
                                     f"{', '.join(_public_name(x) for x in missed)}; nothing was changed (spade-ad "
                                     "update --force on the command line accepts it)")
        new.save(ctx.folder)
        ctx.model = new
        ctx.header = _header_stat(ctx.folder) if stat is not None else None
        ctx.thumbs.clear()
    return _update_response(new)


def _update_response(spade: Spade) -> UpdateResponse:
    """The answer to a change: its history entry (file names without folders) and the new model's figures."""
    e = spade.history_[-1]
    return UpdateResponse(generation=e["generation"], action=e["action"], n_train=int(spade.state_.n_train),
                          image_threshold=spade.image_threshold_, pixel_threshold=spade.pixel_threshold_,
                          before=e["before"], added=[_public_name(x) for x in e["added"]],
                          removed=[_public_name(x) for x in e["removed"]],
                          defects_added=[_public_name(x) for x in e.get("defects_added", [])])
