"""Peak memory and time of pixel ROC-AUC + AUPRO: former flatten-and-sort vs list functions vs PixelMetrics.

Synthetic test set: maps of 1130x460 float32 (smoothed noise plus a bump on the defects), a third of
the images defect-free, the others with 1-3 elliptic defects. Each variant runs in its own child
process, so that its peak RSS (``ru_maxrss``) is its own; the RSS after importing ``spade_ad`` (torch
included) is reported as the baseline and subtracted ("growth"):

* ``old``: the former implementation (a frozen copy lives in ``tests/test_metrics.py``): build the
  lists of all maps and masks, flatten every pixel, sort them all (once for pixel_auroc, once for aupro);
* ``list``: the same lists, then today's :func:`spade_ad.metrics.pixel_auroc` and :func:`~spade_ad.metrics.aupro`
  (which feed a PixelMetrics);
* ``new``: one image generated at a time, fed to :class:`spade_ad.metrics.PixelMetrics`, then both metrics.

"metric time" excludes generating the synthetic images. Usage::

    python benchmarks/metrics_memory.py --images 300 --old-images 100

(``old`` needs about 20 MiB per image: ~6 GB at 300 images.)

Results (2 shared CPU cores under a load of 3-5 from other work, so wall times are noisy; CPU times
are the steadier figure; RSS growth = peak minus the RSS after importing spade_ad):

=======  ======  ===============  ==========================  ===================
variant  images  peak RSS growth  metric CPU (wall)           per image CPU (wall)
=======  ======  ===============  ==========================  ===================
new      300     60 MiB           16.0 s (32.5 s)             53 ms (108 ms)
list     300     827 MiB          23.4 s (56.4 s)             78 ms (188 ms)
new      80      59 MiB           3.4 s (5.5 s)               42 ms (68 ms)
old      80      1600 MiB         22.8 s (45.2 s)             285 ms (565 ms)
=======  ======  ===============  ==========================  ===================

``new`` agrees with ``old`` at 80 images (pixel AUROC identical, AUPRO within 2.2e-16) and with
``list`` at 300 images (identical); ``list`` holds the 300 maps and masks (780 MB) itself.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

H, W = 1130, 460
ROOT = Path(__file__).resolve().parent.parent


def synthetic_image(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    mask = np.zeros((H, W), dtype=bool)
    if i % 3:
        yy, xx = np.ogrid[:H, :W]
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, H), rng.integers(0, W)
            ry, rx = rng.integers(5, 80), rng.integers(5, 80)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = ndimage.gaussian_filter(rng.standard_normal((H, W)).astype(np.float32), sigma=3.0)
    amap = (noise * 10.0 + ndimage.gaussian_filter(mask.astype(np.float32), sigma=6.0) * 2.0).astype(np.float32)
    return mask, amap


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, n_images: int) -> dict[str, float]:
    from spade_ad import metrics  # imports the package (torch): the baseline

    if variant == "old":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_metrics import _old_aupro, _old_pixel_auroc

        auroc_fn, aupro_fn = _old_pixel_auroc, _old_aupro
    else:
        auroc_fn, aupro_fn = metrics.pixel_auroc, metrics.aupro
    base = _rss_mib()
    t_gen = t_feed = c_gen = 0.0
    c0 = time.process_time()
    if variant in ("old", "list"):
        masks, maps = [], []
        for i in range(n_images):
            tg, cg = time.perf_counter(), time.process_time()
            mask, amap = synthetic_image(i)
            t_gen += time.perf_counter() - tg
            c_gen += time.process_time() - cg
            masks.append(mask)
            maps.append(amap)
        t1 = time.perf_counter()
        auroc = auroc_fn(masks, maps)
        t2 = time.perf_counter()
        pro = aupro_fn(masks, maps)
        t3 = time.perf_counter()
    else:
        with metrics.PixelMetrics() as acc:
            for i in range(n_images):
                tg, cg = time.perf_counter(), time.process_time()
                mask, amap = synthetic_image(i)
                t_gen += time.perf_counter() - tg
                c_gen += time.process_time() - cg
                tf = time.perf_counter()
                acc.add(mask, amap)
                t_feed += time.perf_counter() - tf
            t1 = time.perf_counter()
            auroc = acc.pixel_auroc()  # one pass computes both
            t2 = time.perf_counter()
            pro = acc.aupro()
            t3 = time.perf_counter()
    total = t_feed + (t3 - t1)
    cpu = time.process_time() - c0 - c_gen  # CPU seconds of the metric work (all threads)
    return {
        "images": n_images,
        "pixel_auroc": auroc,
        "aupro": pro,
        "peak_rss_mib": _rss_mib(),
        "baseline_rss_mib": base,
        "feed_s": t_feed,
        "auroc_s": t2 - t1,
        "aupro_s": t3 - t2,
        "metrics_s": total,
        "metrics_cpu_s": cpu,
        "ms_per_image": 1000 * total / n_images,
        "generate_s": t_gen,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="images for the new and list variants")
    p.add_argument("--old-images", type=int, default=None, help="images for the old variant (default: --images)")
    p.add_argument("--variants", default="new,list,old", help="comma-separated subset of new, list, old")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", choices=["new", "list", "old"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.images)))
        return
    results: dict[str, dict[str, float]] = {}
    for variant in args.variants.split(","):
        n = args.old_images if variant == "old" and args.old_images else args.images
        out = subprocess.run(
            [sys.executable, __file__, "--images", str(n), "--child", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        r = results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        growth = r["peak_rss_mib"] - r["baseline_rss_mib"]
        print(
            f"{variant:>4}: {n} images of {H}x{W} ({n * H * W / 1e6:.0f} M pixels): "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"(after import {r['baseline_rss_mib']:.0f}, growth {growth:.0f} MiB = {growth / n:.2f} MiB/image)\n"
            f"      metric time {r['metrics_s']:.1f} s = {r['ms_per_image']:.1f} ms/image, "
            f"CPU {r['metrics_cpu_s']:.1f} s (add {r['feed_s']:.1f} s, "
            f"pixel_auroc {r['auroc_s']:.1f} s, aupro {r['aupro_s']:.1f} s); "
            f"pixel AUROC {r['pixel_auroc']!r}, AUPRO {r['aupro']!r}",
            flush=True,
        )
    same_n = [v for v in results if results[v]["images"] == results.get("new", {}).get("images")]
    for v in same_n:
        if v != "new":
            print(
                f"|new - {v}|: pixel AUROC {abs(results['new']['pixel_auroc'] - results[v]['pixel_auroc']):.3g}, "
                f"AUPRO {abs(results['new']['aupro'] - results[v]['aupro']):.3g}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
