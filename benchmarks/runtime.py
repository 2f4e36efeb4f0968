"""spade-ad against spade-ad-runtime on the same CPU, in one run: one image (start-up included) and a batch.

Fits a model on the first N training images of a category (``--preset`` settings), saves and exports it,
then times, each in a fresh process: ``spade-ad predict MODEL IMAGE --out ...`` and
``spade-ad-runtime predict DEPLOY IMAGE --out ...`` (process start, imports, loading and writing the files
included; the median of ``--repeat`` runs each, alternating), and the throughput of both libraries on a batch
of test images (loading excluded: the second pass over the batch, after a first that warms both up; the
median of ``--repeat`` fresh processes each, alternating). Prints and saves one JSON document.

    python benchmarks/runtime.py --data ../shared/datasets/mvtec_ad/bottle --train 30 --batch 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spade_ad import Spade, SpadeSettings
from spade_ad.evaluate import machine_description
from spade_ad.export import export

RESULTS = Path(__file__).resolve().parent / "results"

BATCH = """
import sys, time
paths = sys.argv[3:]
if sys.argv[1] == "runtime":
    from spade_ad_runtime.detector import Detector
    d = Detector.load(sys.argv[2]); d.predict(paths)
    t = time.perf_counter(); d.predict(paths)
else:
    from spade_ad import Spade
    m = Spade.load(sys.argv[2]); m.predict(paths)
    t = time.perf_counter(); m.predict(paths)
print(time.perf_counter() - t)
"""


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    train = sorted((args.data / "train" / "good").glob("*.png"))[: args.train]
    tests = [p for sub in sorted((args.data / "test").iterdir()) for p in sorted(sub.glob("*.png"))][:: 3][: args.batch]
    settings = SpadeSettings() if args.preset == "paper" else SpadeSettings.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        model, deploy = Path(tmp) / "model", Path(tmp) / "deploy"
        Spade(settings).fit([str(p) for p in train]).save(model)
        t0 = time.perf_counter()
        export(model, deploy)
        export_s = time.perf_counter() - t0
        one = str(tests[0])
        times: dict[str, list[float]] = {"spade-ad": [], "runtime": []}
        for i in range(args.repeat):
            times["spade-ad"].append(_timed(["spade-ad", "predict", str(model), one, "--out", f"{tmp}/a{i}"]))
            times["runtime"].append(_timed(["spade-ad-runtime", "predict", str(deploy), one, "--out", f"{tmp}/b{i}"]))
        torch_one, runtime_one = (statistics.median(times[k]) for k in ("spade-ad", "runtime"))
        paths = [str(p) for p in tests]
        rates: dict[str, list[float]] = {"spade-ad": [], "runtime": []}
        for _ in range(args.repeat):  # alternating, each in a fresh process: the machine's drift hits both
            for kind, folder in (("spade-ad", model), ("runtime", deploy)):
                res = subprocess.run([sys.executable, "-c", BATCH, kind, str(folder), *paths], check=True,
                                     capture_output=True, text=True)
                rates[kind].append(len(paths) / float(res.stdout.strip().splitlines()[-1]))
        out = {k: statistics.median(v) for k, v in rates.items()}
    doc = {"machine": machine_description(), "data": args.data.name, "preset": args.preset, "n_train": len(train),
           "export_seconds": round(export_s, 1),
           "one_image_seconds": {"spade-ad predict": round(torch_one, 2),
                                 "spade-ad-runtime predict": round(runtime_one, 2),
                                 "ratio": round(runtime_one / torch_one, 2), "runs": times},
           "batch_images_per_second": {**{k: round(v, 3) for k, v in out.items()},
                                       "ratio": round(out["runtime"] / out["spade-ad"], 2),
                                       "runs": {k: [round(x, 3) for x in v] for k, v in rates.items()}},
           "batch": len(paths)}
    print(json.dumps(doc, indent=1))
    dst = args.out or RESULTS / f"runtime_{args.data.name}_{args.preset}.json"
    dst.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"saved {dst}")


if __name__ == "__main__":
    main()
