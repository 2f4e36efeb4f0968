"""Keeping a model up to date: the time and peak memory to add 10 good images to a model, against a refit.

    python benchmarks/update.py                      # MVTec bottle (199 + 10 images) and a synthetic model
    python benchmarks/update.py --synthetic 10000    # the size of the synthetic model

For each set: fit a model on all images but the last 10 (``spade-ad fit``), copy it, add the last 10
(``spade-ad update --add``), and refit from scratch on all images (``spade-ad fit``); each command runs in
its own process (wall time without start-up, peak RSS). The updated model equals the refit one (checked:
same bank and index files, same thresholds). Results: benchmarks/results/update.json, machine described.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cli_run import run  # noqa: E402

from spade_ad.evaluate import machine_description  # noqa: E402
from spade_ad.synthetic import make_dataset  # noqa: E402

BOTTLE = HERE.parent.parent / "shared" / "datasets" / "mvtec_ad" / "bottle" / "train" / "good"


def one(name: str, files: list[Path], work: Path) -> dict[str, object]:
    base, extra = work / f"{name}_base", work / f"{name}_extra"
    for d, chosen in ((base, files[:-10]), (extra, files[-10:])):
        d.mkdir(parents=True)
        for f in chosen:
            (d / f.name).symlink_to(f.resolve())
    both = work / f"{name}_all"
    both.mkdir()
    for f in files:
        (both / f.name).symlink_to(f.resolve())
    m_base, m_upd, m_ref = work / f"{name}_model", work / f"{name}_updated", work / f"{name}_refit"
    fit_base = run(["fit", str(base), "--out", str(m_base)])
    shutil.copytree(m_base, m_upd)
    add = run(["update", str(m_upd), "--add", str(extra)])
    refit = run(["fit", str(both), "--out", str(m_ref)])
    hu, hr = (json.loads((m / "model.json").read_text()) for m in (m_upd, m_ref))
    same = hu["files"] == hr["files"] and hu["image_threshold"] == hr["image_threshold"] and \
        hu["pixel_threshold"] == hr["pixel_threshold"]
    bank_mb = next(m_ref.glob("bank-*.safetensors")).stat().st_size / 2**20
    row = {"set": name, "n_train": len(files), "added": 10, "fit_base": fit_base, "add_10": add, "refit": refit,
           "speedup": round(refit["seconds"] / add["seconds"], 1), "identical_to_refit": same,
           "bank_mb": round(bank_mb, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=int, default=10000, help="images in the synthetic model (0: skip)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spade-update-bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "update.json")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    rows: list[dict[str, object]] = []
    doc = {"machine": machine_description(), "rows": rows,
           "command": "python benchmarks/update.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save(row: dict[str, object]) -> None:  # after each set: a partial run keeps what it measured
        rows.append(row)
        a.out.write_text(json.dumps(doc, indent=2) + "\n")

    if BOTTLE.is_dir():
        save(one("bottle", sorted(BOTTLE.glob("*.png")), a.workdir))
    if a.synthetic:
        t = time.perf_counter()
        cat = make_dataset(a.workdir / "synthetic", n_train=a.synthetic, n_test_good=1, n_test_defect=1, seed=0)
        print(f"generated {a.synthetic} synthetic images in {time.perf_counter() - t:.0f}s", flush=True)
        save(one(f"synthetic{a.synthetic}", sorted((cat / "train" / "good").glob("*.png")), a.workdir))
    print(f"{'set':>16} {'images':>7} {'add 10 s':>9} {'add RSS MB':>11} {'refit s':>8} {'refit RSS MB':>13} "
          f"{'speed-up':>9} {'identical':>9}")
    for r in rows:
        print(f"{r['set']:>16} {r['n_train']:>7} {r['add_10']['seconds']:>9} {r['add_10']['peak_rss_mb']:>11} "
              f"{r['refit']['seconds']:>8} {r['refit']['peak_rss_mb']:>13} {r['speedup']:>9} "
              f"{str(r['identical_to_refit']):>9}")


if __name__ == "__main__":
    main()
