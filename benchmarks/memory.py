"""Peak resident memory of `spade-ad fit` and `spade-ad predict` versus the number of training images.

    python benchmarks/memory.py --n-train 500 10000 --out benchmarks/results/memory.json

Synthetic training images (spade_ad.synthetic, 256x256 PNG) are generated once per size into --workdir.
Each command runs in its own process; its peak RSS is read from getrusage(RUSAGE_SELF) at exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cli_run import run  # noqa: E402

from spade_ad.evaluate import machine_description  # noqa: E402
from spade_ad.synthetic import make_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, nargs="+", default=[500, 10000])
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spade-memory"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    a = ap.parse_args()
    rows = []
    for n in a.n_train:
        t = time.perf_counter()
        cat = make_dataset(a.workdir / f"n{n}", n_train=n, n_test_good=a.n_test // 2,
                           n_test_defect=a.n_test - a.n_test // 2, seed=0)
        gen = time.perf_counter() - t
        model = a.workdir / f"model{n}"
        fit = run(["fit", str(cat / "train" / "good"), "--out", str(model)])
        pred = run(["predict", str(model), str(cat / "test" / "good"), str(cat / "test" / "scratch"),
                    "--out", str(a.workdir / f"pred{n}")])
        bank_mb = next(model.glob("bank-*.safetensors")).stat().st_size / 2**20
        row = {"n_train": n, "generate_seconds": round(gen, 1), "fit": fit, "predict": pred,
               "n_test": a.n_test, "bank_mb": round(bank_mb, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"machine": machine_description(), "rows": rows,
           "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'n_train':>8} {'fit s':>8} {'fit RSS MB':>11} {'predict s':>10} {'predict RSS MB':>15} {'bank MB':>8}")
    for r in rows:
        print(f"{r['n_train']:>8} {r['fit']['seconds']:>8} {r['fit']['peak_rss_mb']:>11} "
              f"{r['predict']['seconds']:>10} {r['predict']['peak_rss_mb']:>15} {r['bank_mb']:>8}")


if __name__ == "__main__":
    main()
