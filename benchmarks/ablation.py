"""Ablation: the presets and each option beyond the paper on its own, on the shared real categories.

Each configuration is one ``spade-ad benchmark`` run in its own process (fit on the good training
images, predict the test set, metrics), so its peak RSS is its own. Prints a table and saves
``benchmarks/results/ablation.json`` after every run (a partial table survives an interruption).

    python benchmarks/ablation.py                          # everything (about an hour on 2 cores)
    python benchmarks/ablation.py --only paper,accurate --category metal_plate --protocol full
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cli_run import run  # noqa: E402

from spade_ad.evaluate import machine_description  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CATEGORIES = {"bottle": SHARED / "mvtec_ad", "metal_plate": SHARED / "mpdd"}  # each folder holds one category
# name -> command-line options; options are applied over the paper preset unless a preset is named
CONFIGS: dict[str, list[str]] = {
    "paper": [],
    "aggregate=3": ["--aggregate", "3"],
    "levels=1,2": ["--levels", "1,2"],
    "image_score=max": ["--image-score", "max"],
    "image_score=combined": ["--image-score", "combined"],
    "backbone=lite1": ["--backbone", "efficientnet_lite1"],
    "backbone=lite2": ["--backbone", "efficientnet_lite2"],
    "image_size=320": ["--image-size", "320"],
    "image_size=320+sigma=6": ["--image-size", "320", "--sigma", "6"],
    "preset=accurate": ["--preset", "accurate"],
    "preset=fast": ["--preset", "fast"],
}
KEYS = ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "predict_seconds_per_image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated configuration names (default: all)")
    ap.add_argument("--category", action="append", choices=list(CATEGORIES), help="default: both")
    ap.add_argument("--protocol", action="append", choices=["paper", "full"], help="default: both")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=OPTIONS",
                    help='an extra configuration, e.g. "agg5=--aggregate 5 --levels 1,2" (repeatable)')
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ablation.json"))
    args = ap.parse_args()
    for extra in args.config:
        name, _, options = extra.partition("=")
        CONFIGS[name] = options.split()
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    doc["machine"] = machine_description()
    rows: list[dict] = doc["rows"]
    for category in args.category or list(CATEGORIES):
        for protocol in args.protocol or ["paper", "full"]:
            for name in names:
                with tempfile.TemporaryDirectory() as tmp:
                    measured = run(["benchmark", str(CATEGORIES[category]), "--protocol", protocol,
                                    *CONFIGS[name], "--out", tmp])
                    metrics = json.loads((Path(tmp) / "metrics.json").read_text())
                r = metrics["categories"][category]
                row = {"category": category, "protocol": protocol, "config": name,
                       **{k: r[k] for k in KEYS}, "peak_rss_mb": measured["peak_rss_mb"],
                       "settings": metrics["settings"]}
                rows[:] = [x for x in rows if (x["category"], x["protocol"], x["config"]) != (category, protocol, name)]
                rows.append(row)
                print(f"{category:12s} {protocol:5s} {name:22s} image {r['image_auroc']:.4f}  pixel "
                      f"{r['pixel_auroc']:.4f}  aupro {r['aupro']:.4f}  fit {r['fit_seconds']:7.1f} s  predict "
                      f"{r['predict_seconds_per_image']:.3f} s/img  peak {measured['peak_rss_mb']:.0f} MB", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The saved rows as a Markdown table."""
    lines = ["| category | protocol | configuration | image AUROC | pixel AUROC | AUPRO | fit s | predict s/img | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['protocol']} | {r['config']} | {r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_seconds']:.1f} | "
                     f"{r['predict_seconds_per_image']:.3f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
