"""The watcher's memory over many images: a real ``spade-ad watch`` process fed ``--images`` files one after
another (copies of the synthetic widget test images under new names, written then renamed, moved out once
scored), its resident memory sampled as it goes. Prints and saves one JSON document: images per second and
the memory after each tenth of the images (flat: it does not grow with the number scored).

    python benchmarks/watch_memory.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import rss_mb  # (benchmarks/ is the script's folder)

from spade_ad import Spade
from spade_ad.evaluate import machine_description
from spade_ad.synthetic import make_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spade-watch-"))
    data = make_dataset(work / "data", n_train=16, n_test_good=4, n_test_defect=4, size=128, seed=3)
    Spade(image_size=64, k=5, calibration_images=8).fit(str(data / "train" / "good")).save(work / "model")
    sources = [p.read_bytes() for p in sorted((data / "test").glob("*/*.png"))]
    inbox, out, done = work / "inbox", work / "out", work / "done"
    inbox.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "spade_ad.delivery.cli", "watch", str(work / "model"), str(inbox),
                          "--out", str(out), "--move-to", str(done), "--settle", "0.05", "--interval", "0.02"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    t0 = time.monotonic()
    step = max(1, args.images // 10)
    for i in range(args.images):
        part = inbox / f"img{i:06d}.png.part"
        part.write_bytes(sources[i % len(sources)])
        os.replace(part, inbox / f"img{i:06d}.png")
        while len(os.listdir(inbox)) > 8:  # keep a short queue, as a camera at the line's pace would
            time.sleep(0.005)
        if (i + 1) % step == 0:
            samples.append([i + 1, round(rss_mb(p.pid), 1)])
            print(f"{i + 1} images fed, watcher {samples[-1][1]} MB", flush=True)
    while len(os.listdir(done)) < args.images and time.monotonic() - t0 < 3600:
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    samples.append([args.images, round(rss_mb(p.pid), 1)])
    p.terminate()
    p.wait(timeout=60)
    rows = (out / "predictions.jsonl").read_text().count("\n")
    doc = {"images": args.images, "rows": rows, "seconds": round(seconds, 1),
           "images_per_second": round(args.images / seconds, 1), "rss_mb_after_n_images": samples,
           "machine": machine_description(), "command": " ".join(sys.argv)}
    print(json.dumps(doc, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "watch_memory.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
