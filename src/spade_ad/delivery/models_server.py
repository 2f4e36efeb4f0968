"""``spade-ad serve MODELS_DIR``: every model folder of a folder, served side by side.

Each model folder ``MODELS_DIR/<name>`` is served under ``/models/<name>/`` by its own inspector app
(:func:`spade_ad.delivery.inspector.create_app`: predict, correspondence, thumbnails, feedback, health, all
as for a single model; URLs in its answers are relative to that root). ``GET /models`` lists the folders
(scanned on every call: a folder added appears, a damaged one is listed as unavailable with its reason and
does not stop the others); the page at ``/`` lets the user pick one.

Models are loaded on first use and kept while their estimated memory (backbone parameters, global vectors,
zone) fits in ``max_memory``; the least recently used is unloaded first (a request still running on it
finishes with it). A model changed on disk by another process is served in its new generation from the
next request on (each request uses one generation throughout: the inspector's own rule).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from ..errors import SpadeError
from ..persistence import read_header

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a model folder's name as served


def is_models_dir(folder: Path) -> bool:
    """A folder of model folders (not itself a model folder)."""
    return folder.is_dir() and not (folder / "model.json").exists() and any(
        (d / "model.json").exists() for d in folder.iterdir() if d.is_dir())


@dataclass
class _Loaded:
    app: FastAPI
    model: Any  # the Spade the app was created with (for its size)
    size: int


def model_bytes(model: Any) -> int:
    """A loaded model's memory, estimated: the backbone's parameters, the global vectors, the zone."""
    net = model._net()  # noqa: SLF001 - the estimator's own backbone, built on load
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    zone = model.state_.zone
    return int(params + model.global_.numel() * model.global_.element_size()
               + (zone.mask.size if zone is not None else 0))


class Registry:
    """The model folders of ``root``, loaded on demand within ``max_memory`` bytes (least recently used out)."""

    def __init__(self, root: Path, max_memory: int, app_options: dict[str, Any]) -> None:
        self.root, self.max_memory, self.options = root, max_memory, app_options
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}

    def listing(self) -> list[dict[str, Any]]:
        """Every model folder: name, availability (or why not), generation, images, thresholds, preset."""
        out = []
        with self.lock:
            loaded = set(self.loaded)
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []:
            if not (d / "model.json").exists() or not NAME.fullmatch(d.name):
                continue
            entry: dict[str, Any] = {"name": d.name, "loaded": d.name in loaded}
            try:
                h = read_header(d)
                entry.update(available=True, reason=None, generation=h.get("generation"), images=h.get("n_train"),
                             image_threshold=h.get("image_threshold"), pixel_threshold=h.get("pixel_threshold"),
                             preset=(h.get("settings") or {}).get("preset", "paper"))
            except SpadeError as exc:
                entry.update(available=False, reason=str(exc))
            out.append(entry)
        return out

    def app(self, name: str) -> FastAPI:
        """The inspector app of model ``name`` (loaded now if needed); 404 / 503 with the reason otherwise."""
        from .inspector import create_app

        if not NAME.fullmatch(name) or not (self.root / name / "model.json").exists():
            raise HTTPException(404, f"no model {name!r} in {self.root}")
        with self.lock:
            found = self.loaded.get(name)
            if found is not None:
                self.loaded.move_to_end(name)
                return found.app
        with self.loading.setdefault(name, threading.Lock()):  # one load per model; others are not held up
            with self.lock:
                found = self.loaded.get(name)
            if found is not None:
                return found.app
            try:
                app = create_app(self.root / name, **self.options)
            except SpadeError as exc:
                raise HTTPException(503, f"model {name} is unavailable: {exc}") from None
            model = app.state.inspector.model
            loaded = _Loaded(app, model, model_bytes(model))
        with self.lock:
            self.loaded[name] = loaded
            self.loaded.move_to_end(name)
            while len(self.loaded) > 1 and sum(x.size for x in self.loaded.values()) > self.max_memory:
                self.loaded.popitem(last=False)  # the least recently used goes first
        return app

    def memory(self) -> int:
        with self.lock:
            return sum(x.size for x in self.loaded.values())


class _Dispatch:
    """ASGI: ``/models/<name>/<rest>`` -> ``<rest>`` of model ``name``'s app (its root path extended)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        path = scope.get("path", "")
        parts = path.split("/", 3)  # "", "models", name, rest
        if len(parts) < 3 or not parts[2]:
            await JSONResponse({"detail": "name a model: /models/<name>/..."}, status_code=404)(scope, receive, send)
            return
        name = parts[2]
        try:
            app = await anyio.to_thread.run_sync(self.registry.app, name)
        except HTTPException as exc:
            await JSONResponse({"detail": exc.detail}, status_code=exc.status_code)(scope, receive, send)
            return
        prefix = f"/models/{name}"
        inner = dict(scope)
        inner["path"] = path[len(prefix):] or "/"
        inner["raw_path"] = inner["path"].encode()
        inner["root_path"] = scope.get("root_path", "") + prefix
        await app(inner, receive, send)


def create_models_app(models_dir: str | Path, max_memory: int = 2 << 30, **app_options: Any) -> Any:
    """The server of every model folder in ``models_dir`` (see the module docstring); ``app_options`` go to each
    model's :func:`~spade_ad.delivery.inspector.create_app` (device, limits, allowed hosts, updates, token)."""
    from .inspector import LOCAL_HOSTS, STATIC_DIR, _host_only, _SameOrigin

    root = Path(models_dir)
    if not root.is_dir():
        raise SpadeError(f"{root}: models folder does not exist")
    if max_memory <= 0:
        raise SpadeError(f"--max-memory must be positive, got {max_memory}")
    registry = Registry(root, max_memory, app_options)
    app = FastAPI(title="spade-ad models", docs_url=None, redoc_url=None, openapi_url=None)
    hosts = {_host_only(h) for h in (app_options.get("allowed_hosts") or [])} | set(LOCAL_HOSTS)
    app.state.registry = registry

    @app.get("/models")
    def models() -> dict[str, Any]:
        return {"models": registry.listing(), "memory_bytes": registry.memory(), "max_memory_bytes": max_memory}

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return _Server(app, _Dispatch(registry), _SameOrigin, hosts)


class _Server:
    """The ASGI app: ``/models/<name>/...`` to that model's app, everything else to the listing app; the host
    and origin are checked first (before a model is loaded for a foreign request)."""

    def __init__(self, api: FastAPI, dispatch: _Dispatch, guard: Any, hosts: set[str]) -> None:
        self.api, self.dispatch = api, dispatch
        self.registry = dispatch.registry
        self.guarded = guard(self._route, hosts=hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.guarded(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/models/"):
            await self.dispatch(scope, receive, send)
        else:
            await self.api(scope, receive, send)


__all__ = ["create_models_app", "is_models_dir", "Registry", "model_bytes"]
