"""Pixel-stage benchmark: our engine against the naive cdist baseline and a per-image faiss index.

    python benchmarks/pixel_stage.py                         # MVTec bottle, EfficientNet-Lite0, k=50
    python benchmarks/pixel_stage.py --synthetic-wrn --levels 1 2   # Wide-ResNet-50-2 shapes, random weights

In one process and on the same features, each test image's pixel stage is timed per pyramid level with

* ``engine``: what ``Spade.predict`` runs: the search over the gallery merged from the fit-time index
  (:func:`spade_ad.correspondence.nn_distances_merged`, merge included; the neighbours' rows are prepared
  once per predict call and not timed here) where it pays, else ``plain``;
* ``plain``: :func:`spade_ad.correspondence.nn_distances` on the gathered gallery (no index);
* ``cdist``:  :func:`spade_ad.correspondence.cdist_baseline`, the whole ``torch.cdist`` matrix then ``topk``
  (the SPADE-pytorch approach, reduced on the right axis);
* ``faiss``:  a ``faiss.IndexFlatL2`` built on that image's gallery and searched with kappa (the SPADE-fast
  approach; CPU only; index construction is included in its time).

The methods run interleaved (their order rotates between repeats) and each (image, level, method) keeps
the best of ``--repeats``, so a noisy, shared machine hurts them alike. Every method's output is checked
against the float64 brute-force reference (:func:`nn_distances_reference`) on ``--check-queries`` random
queries per image and level. In bottle mode ``Spade.fit`` (images/s) and ``Spade.predict`` end to end are
timed as well, the latter once with the engine and once with ``nn_distances`` replaced by the cdist
baseline inside ``spade_ad.correspondence.gallery`` (and the index switched off; interleaved, best of
``--repeats``). ``--profile`` times ``Spade.predict`` stage by stage instead (see :data:`PROFILE_HOOKS`).

Results go to ``benchmarks/results/pixel_stage_<mode>_<device>.json`` with the machine described.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import spade_ad.correspondence as spade_correspondence  # noqa: E402
import spade_ad.correspondence.gallery as spade_gallery  # noqa: E402
from spade_ad.backbones import build_backbone  # noqa: E402
from spade_ad.correspondence import cdist_baseline, nn_distances, nn_distances_reference  # noqa: E402

try:  # the fit-time index (absent from older versions of the code, which --profile can time too)
    from spade_ad.correspondence import nn_distances_merged
    from spade_ad.correspondence.cells import LevelIndex, Prepared, merge, prepare, train_level
    from spade_ad.correspondence.gallery import gallery_cache, indexed_pays
    from spade_ad.correspondence.runtime import engine_threads
except ImportError:
    nn_distances_merged = merge = prepare = train_level = gallery_cache = indexed_pays = engine_threads = None
    LevelIndex = Prepared = Any
from spade_ad.data import load_mvtec_category  # noqa: E402
from spade_ad.evaluate import machine_description  # noqa: E402
from spade_ad.features import extract  # noqa: E402
from spade_ad.io import load_image  # noqa: E402
from spade_ad.model import Spade, pick_device  # noqa: E402
from spade_ad.preprocess import Preprocessor  # noqa: E402
from spade_ad.retrieval import image_knn  # noqa: E402
from spade_ad.synthetic import DEFECT_KINDS, add_defect, render_good  # noqa: E402

try:
    import faiss
except ImportError:  # optional: pip install faiss-cpu (extra "bench")
    faiss = None

METHODS = ("engine", "plain", "cdist", "faiss")
# queries (P, C), gallery (k*P, C), grid (h, w), and the gallery's prepared rows and level index when
# Spade.predict would search it merged from the fit-time index (else None)
Case = tuple[torch.Tensor, torch.Tensor, tuple[int, int], list[Prepared] | None, LevelIndex | None]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device) -> tuple[float, Any]:
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def faiss_search(q: np.ndarray, g: np.ndarray, kappa: int) -> np.ndarray:
    """SPADE-fast: a flat L2 index on this image's gallery, searched for the kappa nearest rows."""
    index = faiss.IndexFlatL2(g.shape[1])
    index.add(g)
    d2, _ = index.search(q, min(kappa, g.shape[0]))
    return np.sqrt(np.maximum(d2, 0.0)).mean(1)


EXACT = 1e-4  # the exactness bar of the project: relative error on every pixel


def rel_errs(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, ref = a.double().cpu(), ref.double().cpu()
    return (a - ref).abs() / ref.abs().clamp_min(1e-12)


def run_case(
    case: Case, kappa: int, methods: list[str], repeats: int, n_check: int, dev: torch.device, seed: int
) -> dict[str, Any]:
    """Time the methods on one (image, level), interleaved, and check them against the reference."""
    q, g, hw, parts, lev = case
    q = q.to(dev).float().contiguous()
    g = g.to(dev).float().contiguous()
    qn = q.cpu().numpy() if "faiss" in methods else None
    gn = g.cpu().numpy() if "faiss" in methods else None
    calls: dict[str, Callable[[], Any]] = {}
    stats: dict[str, int] = {}

    def engine() -> torch.Tensor:
        stats.clear()
        if parts is not None and lev is not None:
            with engine_threads(1, 0.0):
                merged = merge(parts, lev, need_mult=kappa > 1)  # (as level_maps does)
            return nn_distances_merged(q, merged, kappa, stats=stats)
        return nn_distances(q, g, kappa, stats=stats, query_hw=hw, gallery_hw=hw)

    calls["engine"] = engine
    calls["plain"] = lambda: nn_distances(q, g, kappa, query_hw=hw, gallery_hw=hw)
    calls["cdist"] = lambda: cdist_baseline(q, g, kappa)
    calls["faiss"] = lambda: faiss_search(qn, gn, kappa)
    times: dict[str, list[float]] = {m: [] for m in methods}
    outs: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            t, out = timed(calls[m], dev)
            times[m].append(t)
            outs[m] = torch.as_tensor(out).detach().cpu()
            del out
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(q.shape[0], generator=gen)[: min(n_check, q.shape[0])]
    ref = nn_distances_reference(q[idx.to(dev)], g, kappa) if len(idx) else torch.empty(0)
    errs = {m: rel_errs(outs[m][idx], ref) for m in methods}
    return {
        "queries": int(q.shape[0]),
        "gallery": int(g.shape[0]),
        "channels": int(q.shape[1]),
        "seconds": times,
        "best_s": {m: min(v) for m, v in times.items()},
        "max_rel_err": {m: float(errs[m].max()) if len(idx) else 0.0 for m in methods},
        "n_over_1e-4": {m: int((errs[m] > EXACT).sum()) for m in methods},
        "checked_queries": int(len(idx)),
        "engine_stats": dict(stats),
        "indexed": parts is not None,
        "engine_equals_plain_bitwise": bool(torch.equal(outs["engine"], outs["plain"])) if "plain" in outs else None,
    }


def run_cases(
    images: list[list[Case]], levels: list[int], args: argparse.Namespace, dev: torch.device
) -> list[dict[str, Any]]:
    rows = []
    for i, per_level in enumerate(images):
        for li in levels:
            t0 = time.perf_counter()
            res = run_case(per_level[li], args.kappa, args.methods, args.repeats, args.check_queries, dev,
                           seed=1000 * i + li)
            res.update(image=i, level=li)
            rows.append(res)
            best = "  ".join(f"{m} {res['best_s'][m] * 1e3:8.1f} ms" for m in args.methods)
            errs = " ".join(f"{res['max_rel_err'][m]:.1e}" for m in args.methods)
            print(f"  image {i} level {li}: {best}   max rel err {errs}   ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return rows


def summarise(rows: list[dict[str, Any]], levels: list[int], methods: list[str]) -> dict[str, Any]:
    per_level = {}
    for li in levels:
        rs = [r for r in rows if r["level"] == li]
        per_level[li] = {
            "shape": f"{rs[0]['queries']} x {rs[0]['gallery']} x {rs[0]['channels']}",
            "ms_per_image": {m: 1e3 * float(np.mean([r["best_s"][m] for r in rs])) for m in methods},
            "max_rel_err": {m: max(r["max_rel_err"][m] for r in rs) for m in methods},
            "frac_over_1e-4": {m: sum(r["n_over_1e-4"][m] for r in rs) / max(1, sum(r["checked_queries"] for r in rs))
                               for m in methods},
            "gflop_per_image": 2 * rs[0]["queries"] * rs[0]["gallery"] * rs[0]["channels"] / 1e9,
        }
    total = {m: sum(v["ms_per_image"][m] for v in per_level.values()) for m in methods}
    return {
        "levels": per_level,
        "total_ms_per_image": total,
        "max_rel_err": {m: max(v["max_rel_err"][m] for v in per_level.values()) for m in methods},
        "frac_over_1e-4": {m: sum(r["n_over_1e-4"][m] for r in rows) / max(1, sum(r["checked_queries"] for r in rows))
                           for m in methods},
        "checked_queries": sum(r["checked_queries"] for r in rows),
        "ratios": {f"{m}/engine": total[m] / total["engine"] for m in methods if m != "engine"},
        "fallback_queries": sum(r["engine_stats"].get("fallback", 0) for r in rows),
        "indexed_cases": sum(bool(r.get("indexed")) for r in rows),
        "engine_equals_plain_bitwise": all(r.get("engine_equals_plain_bitwise") is not False for r in rows),
    }


def print_table(summary: dict[str, Any], methods: list[str], title: str) -> None:
    others = [m for m in methods if m != "engine"]
    head = f"{'level':>5}  {'queries x gallery x C':>24}  {'GFLOP':>6}  " + "  ".join(f"{m:>9}" for m in methods)
    head += "".join(f"  {m + '/eng':>10}" for m in others) + "   max rel err vs float64 (" + "/".join(methods) + ")"
    print(f"\n{title}")
    print(head)
    for li, v in summary["levels"].items():
        ms = v["ms_per_image"]
        line = f"{li:>5}  {v['shape']:>24}  {v['gflop_per_image']:6.1f}  " + "  ".join(f"{ms[m]:9.1f}" for m in methods)
        line += "".join(f"  {ms[m] / ms['engine']:9.1f}x" for m in others)
        line += "   " + " / ".join(f"{v['max_rel_err'][m]:.1e}" for m in methods)
        print(line)
    tot = summary["total_ms_per_image"]
    gf = sum(v["gflop_per_image"] for v in summary["levels"].values())
    line = f"{'total':>5}  {'':>24}  {gf:6.1f}  " + "  ".join(f"{tot[m]:9.1f}" for m in methods)
    line += "".join(f"  {tot[m] / tot['engine']:9.1f}x" for m in others)
    line += "   " + " / ".join(f"{summary['max_rel_err'][m]:.1e}" for m in methods)
    print(line)
    bad = ", ".join(f"{m} {100 * summary['frac_over_1e-4'][m]:.1f}%" for m in methods)
    print(f"(ms per test image, mean over images of the best of the repeats; engine fallback queries: "
          f"{summary['fallback_queries']}; cases searched through the index: "
          f"{summary['indexed_cases']}; engine = plain bit for bit: "
          f"{summary['engine_equals_plain_bitwise']})")
    print(f"checked queries off the float64 reference by more than 1e-4 relative ({summary['checked_queries']} "
          f"checked): {bad}")


# ---------------------------------------------------------------------------------------------- profile

# (module, attribute, stage): functions whose time (exclusive of the other wrapped ones they call) is
# charged to a stage of Spade.predict. Attributes missing in this version of the code are skipped, so the
# same table profiles the engine before and after the search index.
PROFILE_HOOKS = [
    ("spade_ad.model", "read_item", "read + decode"),
    ("spade_ad.model", "extract", "backbone"),
    ("spade_ad.model", "image_knn", "image kNN"),  # (before stages had their own modules)
    ("spade_ad.scoring", "image_knn", "image kNN"),
    ("spade_ad.bank:Bank", "rows", "gallery reads"),
    ("spade_ad.correspondence.gallery", "prepare", "index: prepare neighbours"),
    ("spade_ad.correspondence.gallery", "prepare_many", "index: prepare neighbours"),
    ("spade_ad.correspondence.gallery", "merge", "index: merge gallery"),
    ("spade_ad.correspondence.gallery", "_search_images", "search: rest"),
    ("spade_ad.correspondence.search", "pruned_layout", "layout (cells, units)"),
    ("spade_ad.correspondence.pruning:Layout", "__init__", "layout (cells, units)"),
    ("spade_ad.correspondence.pruning:Layout", "boxes", "bounds"),
    ("spade_ad.correspondence.search", "_local_bound", "bounds"),
    ("spade_ad.correspondence.search", "unit_bounds", "bounds"),
    ("spade_ad.correspondence.search:_Search", "search", "GEMMs + candidates"),
    ("spade_ad.correspondence.search:_MergedSearch", "first_bound", "GEMMs + candidates"),
    ("spade_ad.correspondence.search:_MergedSearch", "process", "GEMMs + candidates"),
    ("spade_ad.correspondence.search:_Search", "flush", "exact re-check"),
    ("spade_ad.correspondence.search:_MergedSearch", "recheck", "exact re-check"),
    ("spade_ad.correspondence.search", "_nn_distances", "search: rest"),
    ("spade_ad.correspondence.search", "_merged", "search: rest"),
    ("spade_ad.model", "combine_levels", "upsample + smooth"),
    ("spade_ad.correspondence.stage", "combine_levels", "upsample + smooth"),
    ("spade_ad.preprocess:Preprocessor", "map_to_image", "map to image size"),
    ("spade_ad.model:Spade", "predict", "predict: rest"),
]


class StageClock:
    """Wall time per stage, each wrapped call charged exclusive of the wrapped calls inside it, summed over
    threads (where test images are searched on several threads, the stages add up to more than the wall
    time of the whole)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.local = threading.local()
        self.lock = threading.Lock()
        self.undo: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        import importlib

        for target, attr, stage in PROFILE_HOOKS:
            mod_name, _, cls_name = target.partition(":")
            obj: Any = importlib.import_module(mod_name)
            if cls_name:
                obj = getattr(obj, cls_name, None)
            fn = getattr(obj, attr, None) if obj is not None else None
            if fn is None:
                continue
            self.undo.append((obj, attr, fn))
            setattr(obj, attr, self._wrap(fn, stage))

    def remove(self) -> None:
        for obj, attr, fn in reversed(self.undo):
            setattr(obj, attr, fn)
        self.undo.clear()

    def _wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            stack = self.local.__dict__.setdefault("stack", [])
            t = time.perf_counter()
            stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                inner = stack.pop()
                with self.lock:
                    self.acc[stage] = self.acc.get(stage, 0.0) + dt - inner
                if stack:
                    stack[-1] += dt

        return wrapped


def profile_predict(model: Spade, paths: list[Path], repeats: int) -> dict[str, Any]:
    """Spade.predict on ``paths`` with every stage timed; the run with the smallest total is kept."""
    clock = StageClock()
    clock.install()
    runs = []
    try:
        for _ in range(repeats):
            clock.acc = {}
            release = getattr(spade_correspondence, "release_galleries", None)
            if release is not None:
                release()  # each run pays for preparing its neighbours, as one predict call does
            t, c = time.perf_counter(), time.process_time()
            model.predict(paths)
            total, cpu = time.perf_counter() - t, time.process_time() - c
            runs.append((total, dict(clock.acc), cpu))
            print(f"  profile run: {1e3 * total / len(paths):.1f} ms/image ({1e3 * cpu / len(paths):.1f} ms CPU)",
                  flush=True)
    finally:
        clock.remove()
    total, acc, cpu = min(runs, key=lambda r: r[0])
    stages = {k: 1e3 * v / len(paths) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    return {"ms_per_image": stages, "total_ms_per_image": 1e3 * total / len(paths),
            "cpu_ms_per_image": 1e3 * cpu / len(paths),
            "runs_ms_per_image": [1e3 * r[0] / len(paths) for r in runs],
            "runs_cpu_ms_per_image": [1e3 * r[2] / len(paths) for r in runs], "n_images": len(paths)}


def print_profile(prof: dict[str, Any], title: str) -> None:
    print(f"\n{title}")
    for k, v in prof["ms_per_image"].items():
        print(f"  {k:<28} {v:8.1f} ms/image (summed over threads)")
    print(f"  {'total (wall)':<28} {prof['total_ms_per_image']:8.1f} ms/image   (runs: "
          + ", ".join(f"{x:.1f}" for x in prof["runs_ms_per_image"]) + ")")
    print(f"  {'process CPU time':<28} {prof['cpu_ms_per_image']:8.1f} ms/image   (runs: "
          + ", ".join(f"{x:.1f}" for x in prof["runs_cpu_ms_per_image"]) + ")")


# ---------------------------------------------------------------------------------------------- bottle


def spread(samples: list[Any], n: int) -> list[Any]:
    """n test samples taken round-robin over the defect types (good included)."""
    by_type: dict[str, list[Any]] = {}
    for s in samples:
        by_type.setdefault(s.defect_type, []).append(s)
    out: list[Any] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(out) < n and any(queues):
        for qu in queues:
            if qu and len(out) < n:
                out.append(qu.pop(0))
    return out


def bottle(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    cat = load_mvtec_category(args.data)
    if args.model is not None:
        model = Spade.load(args.model, device=str(dev))
        t_fit = math.nan
        print(f"model: {args.model} ({model.bank_.n} training images)", flush=True)
    else:
        model = Spade(device=str(dev), calibration_images=0)
        print(f"fit: {len(cat.train)} training images of {cat.name} ({model.settings.backbone}, "
              f"k={model.settings.k}) ...", flush=True)
        model._net()  # build the backbone outside the fit timing
        t_fit, _ = timed(lambda: model.fit(cat.train), dev)
        print(f"fit: {t_fit:.1f} s, {len(cat.train) / t_fit:.2f} images/s", flush=True)
        if args.save_model is not None:
            model.save(args.save_model)
    rss_fit = peak_rss_mb()
    args.kappa = model.settings.kappa
    tests = spread(cat.test, args.n_images)
    paths = [s.path for s in tests]
    print(f"test images: {', '.join(f'{s.defect_type}/{s.path.name}' for s in tests)}")
    if args.profile:
        print("profile: warm-up ...", flush=True)
        model.predict(paths[:2])
        prof = profile_predict(model, paths, args.repeats)
        return {"data": str(args.data), "backbone": model.settings.backbone, "k": model.settings.k,
                "kappa": model.settings.kappa, "n_train": model.bank_.n, "test_images": [str(p) for p in paths],
                "profile": prof, "peak_rss_mb": {"end": peak_rss_mb()}}

    net = model._net()
    with torch.no_grad():
        levels, gvec = extract(net, [load_image(p) for p in paths], model.prep, dev)
    _, neigh = image_knn(gvec.cpu(), model.global_, model.settings.k_image, model.settings.k)
    images: list[list[Case]] = []
    cache = gallery_cache(model.bank_)
    for b in range(len(paths)):
        per_level: list[Case] = []
        for li, (h, w) in enumerate(model.level_shapes_):
            nb = neigh[b].tolist()
            gal = torch.from_numpy(model.bank_.gather(li, nb)).float()
            lev = cache.levels[li]
            use = lev is not None and indexed_pays(dev, h * w, gal.shape[0] * h * w, gal.shape[-1], args.kappa)
            parts = cache.prepared(li, nb) if use else None  # (prepared once per neighbour: not timed)
            per_level.append((levels[li][b].cpu(), gal.reshape(-1, gal.shape[-1]), (h, w), parts, lev))
        images.append(per_level)
    del levels
    lv = args.levels if args.levels is not None else list(range(len(model.level_shapes_)))
    print(f"pixel stage: {len(images)} images, levels {lv}, methods {args.methods}, best of {args.repeats}",
          flush=True)
    rows = run_cases(images, lv, args, dev)
    del images
    rss_pixel = peak_rss_mb()

    # End to end: Spade.predict with the engine, and with the cdist baseline patched in.
    def naive(queries: torch.Tensor, gallery: torch.Tensor, kappa: int = 1, *_: Any, **__: Any) -> torch.Tensor:
        return cdist_baseline(queries, gallery, kappa)

    def never(*_: Any) -> bool:
        return False

    def one_by_one(one: Callable[[int], None], images: list[int], work: float) -> None:
        for b in images:  # the baseline as it always ran: image after image, torch's threads inside each op
            one(b)

    patches = {"nn_distances": naive, "search_plain": naive, "indexed_pays": never, "_run_images": one_by_one}
    originals = {k: getattr(spade_gallery, k) for k in patches if hasattr(spade_gallery, k)}

    def predict(patched: bool) -> None:
        if patched:  # cdist on every level, never the index
            for k in originals:
                setattr(spade_gallery, k, patches[k])
        if hasattr(spade_correspondence, "release_galleries"):
            spade_correspondence.release_galleries()  # each predict call prepares its neighbours
        try:
            model.predict(paths)
        finally:
            for k, v in originals.items():
                setattr(spade_gallery, k, v)

    print("predict: warm-up ...", flush=True)
    timed(lambda: model.predict(paths[:2]), dev)
    pt: dict[str, list[float]] = {"engine": [], "naive": []}
    pc: dict[str, list[float]] = {"engine": [], "naive": []}  # process CPU time (both threads): a shared
    # machine's other jobs slow the wall clock more than the work done
    for r in range(args.repeats):
        order = ["engine", "naive"] if r % 2 == 0 else ["naive", "engine"]
        for m in order:
            if m == "naive" and not args.predict_naive:
                continue
            c = time.process_time()
            t, _ = timed(lambda m=m: predict(m == "naive"), dev)
            c = time.process_time() - c
            pt[m].append(t)
            pc[m].append(c)
            print(f"  predict {len(paths)} images ({m}): {t:.2f} s wall, {c:.2f} s CPU", flush=True)
    pred = {m: {"seconds": v, "ms_per_image": 1e3 * min(v) / len(paths), "images_per_s": len(paths) / min(v),
                "cpu_seconds": pc[m], "cpu_ms_per_image": 1e3 * min(pc[m]) / len(paths)}
            for m, v in pt.items() if v}
    return {
        "data": str(args.data),
        "backbone": model.settings.backbone,
        "k": model.settings.k,
        "kappa": model.settings.kappa,
        "image_size": model.settings.image_size,
        "level_shapes": [list(s) for s in model.level_shapes_],
        "n_train": len(cat.train),
        "fit": {"seconds": t_fit, "images_per_s": len(cat.train) / t_fit, "calibration_images": 0},
        "test_images": [str(p) for p in paths],
        "pixel_rows": rows,
        "pixel": summarise(rows, lv, args.methods),
        "predict": pred,
        "peak_rss_mb": {"after_fit": rss_fit, "after_pixel_stage": rss_pixel, "end": peak_rss_mb()},
    }


# ---------------------------------------------------------------------------------------------- synthetic WRN


def synthetic_wrn(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    k = args.k
    net = build_backbone("wide_resnet50_2", "random").to(dev)
    gal_imgs = [render_good(rng, args.image_size) for _ in range(k)]
    test_imgs = []
    for i in range(args.n_images):
        img = render_good(rng, args.image_size)
        test_imgs.append(add_defect(img, rng, DEFECT_KINDS[i % len(DEFECT_KINDS)])[0] if i % 2 else img)
    print(f"features: Wide-ResNet-50-2 (random weights) on {k} gallery + {len(test_imgs)} test synthetic images "
          f"at {args.image_size} ...", flush=True)
    t = time.perf_counter()
    feats: list[list[torch.Tensor]] = []
    every = gal_imgs + test_imgs
    with torch.no_grad():
        for s in range(0, len(every), 8):
            lv, _ = extract(net, every[s : s + 8], Preprocessor("resize", args.image_size), dev)
            feats.append([x.cpu() for x in lv])
    t_feat = time.perf_counter() - t
    n_levels = len(feats[0])
    per_level = [torch.cat([f[li] for f in feats]) for li in range(n_levels)]  # (k + n, HW, C)
    del feats
    with torch.no_grad():
        pyr, _ = net(torch.zeros(1, 3, args.image_size, args.image_size, device=dev))
    shapes = [(int(p.shape[2]), int(p.shape[3])) for p in pyr]
    # Gallery rounded through fp16 as in the model's bank; same gallery for every test image. Its index is
    # built as fit builds it (on a sample of the gallery images) when Spade.predict would use it.
    galleries = [per_level[li][:k].reshape(-1, per_level[li].shape[-1]).half().float() for li in range(n_levels)]
    indexes: list[tuple[list[Prepared] | None, LevelIndex | None]] = []
    t = time.perf_counter()
    for li, (h, w) in enumerate(shapes):
        rows16 = per_level[li][:k].half().numpy()
        if not indexed_pays(dev, h * w, k * h * w, rows16.shape[-1], args.kappa):
            indexes.append((None, None))
            continue
        lev = train_level([rows16[i] for i in range(0, k, max(1, k // 16))], k * h * w)
        parts = []
        for i in range(k):
            unit, same = lev.assign(rows16[i])
            parts.append(prepare(rows16[i], unit, same, lev, "synthetic"))
        indexes.append((parts, lev))
    t_index = time.perf_counter() - t
    images = [[(per_level[li][k + i], galleries[li], shapes[li], *indexes[li]) for li in range(n_levels)]
              for i in range(len(test_imgs))]
    desc = [f"{h}x{w}x{c}" for (h, w), c in zip(shapes, net.channels, strict=True)]
    print(f"features: {t_feat:.1f} s; index {t_index:.1f} s; levels {desc}", flush=True)
    lv = args.levels if args.levels is not None else list(range(n_levels))
    print(f"pixel stage: {len(images)} images, levels {lv}, methods {args.methods}, best of {args.repeats}",
          flush=True)
    rows = run_cases(images, lv, args, dev)
    return {
        "backbone": "wide_resnet50_2 (random weights)",
        "k": k,
        "kappa": args.kappa,
        "image_size": args.image_size,
        "level_shapes": [[h, w, c] for (h, w), c in zip(shapes, net.channels, strict=True)],
        "feature_seconds": t_feat,
        "index_seconds": t_index,
        "pixel_rows": rows,
        "pixel": summarise(rows, lv, args.methods),
        "peak_rss_mb": {"end": peak_rss_mb()},
    }


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets/mvtec_ad/bottle"),
                    help="MVTec-layout category (bottle mode)")
    ap.add_argument("--synthetic-wrn", action="store_true",
                    help="Wide-ResNet-50-2 shapes (random weights) on synthetic images instead of bottle")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (faiss always runs on the CPU)")
    ap.add_argument("--n-images", type=int, default=None, help="test images (default 10 bottle, 2 synthetic)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="pyramid levels to time (default all)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="engine is always included")
    ap.add_argument("--check-queries", type=int, default=300,
                    help="random queries per image and level checked against the float64 reference")
    ap.add_argument("--k", type=int, default=50, help="gallery images (synthetic mode)")
    ap.add_argument("--kappa", type=int, default=1, help="nearest gallery features per pixel (synthetic mode)")
    ap.add_argument("--image-size", type=int, default=224, help="synthetic mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss CPU threads (default: leave as is)")
    ap.add_argument("--no-predict-naive", dest="predict_naive", action="store_false",
                    help="bottle mode: skip Spade.predict with the cdist baseline patched in")
    ap.add_argument("--profile", action="store_true",
                    help="bottle mode: only time Spade.predict stage by stage (backbone, gallery, search, ...)")
    ap.add_argument("--model", type=Path, default=None, help="bottle mode: load this model instead of fitting")
    ap.add_argument("--save-model", type=Path, default=None, help="bottle mode: save the fitted model here")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    dev = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
    args.methods = ["engine"] + [m for m in dict.fromkeys(args.methods) if m != "engine"]
    if "faiss" in args.methods and faiss is None:
        print("faiss: not available")
        args.methods.remove("faiss")
    mode = "synthetic_wrn" if args.synthetic_wrn else "bottle"
    if args.n_images is None:
        args.n_images = 2 if args.synthetic_wrn else 10
    machine = machine_description()
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}; device {dev}; "
          f"faiss {faiss.__version__ if faiss is not None else 'not available'}", flush=True)
    t0 = time.perf_counter()
    res = synthetic_wrn(args, dev) if args.synthetic_wrn else bottle(args, dev)
    res = {
        "mode": mode,
        "device": str(dev),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__ if faiss is not None else None,
        "faiss_threads": faiss.omp_get_max_threads() if faiss is not None else None,
        "repeats": args.repeats,
        "n_images": args.n_images,
        "methods": args.methods,
        "check_queries": args.check_queries,
        **res,
        "wall_seconds": time.perf_counter() - t0,
    }
    if args.profile:
        mode = f"{mode}_profile"
    out = args.out or HERE / "results" / f"pixel_stage_{mode}_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    if args.profile:
        print_profile(res["profile"], f"Spade.predict stage by stage, {res['backbone']}, k={res['k']}, "
                      f"{args.n_images} bottle test images, best of {args.repeats}, "
                      f"torch threads {res['torch_threads']}")
        print(f"wall {res['wall_seconds']:.0f} s; saved {out}")
        return

    title = (f"pixel stage, {mode}, {res['backbone']}, k={res['k']}, kappa={res['kappa']}, device {dev}, "
             f"{args.n_images} images, best of {args.repeats}, torch threads {res['torch_threads']}")
    print_table(res["pixel"], args.methods, title)
    if "predict" in res:
        p = res["predict"]
        line = f"Spade.predict end to end: engine {p['engine']['ms_per_image']:.1f} ms/image"
        if "naive" in p:
            line += (f", naive (cdist patched in) {p['naive']['ms_per_image']:.1f} ms/image, "
                     f"ratio {p['naive']['ms_per_image'] / p['engine']['ms_per_image']:.1f}x")
            ce, cn = p["engine"]["cpu_ms_per_image"], p["naive"]["cpu_ms_per_image"]
            line += f" (process CPU time: {ce:.1f} vs {cn:.1f} ms/image, {cn / ce:.1f}x)"
        print(line)
        print(f"fit: {res['n_train']} images in {res['fit']['seconds']:.1f} s = {res['fit']['images_per_s']:.2f} "
              f"images/s (no calibration); predict: {p['engine']['images_per_s']:.2f} images/s")
    rss = ", ".join(f"{k} {v:.0f}" for k, v in res["peak_rss_mb"].items())
    print(f"peak RSS (MB): {rss}")
    print(f"wall {res['wall_seconds']:.0f} s; saved {out}")
    if not math.isfinite(res["pixel"]["total_ms_per_image"]["engine"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
