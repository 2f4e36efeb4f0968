"""Micro-benchmark of the pixel-stage engine against the naive cdist baseline on real features.

Usage: python benchmarks/engine_micro.py [--feats /tmp/feats.pt] [--repeats 3] [--kappa 1] [--threads N]
                                         [--check 400] [--no-reference]

The features file holds {'g': [gallery (k*H*W, C) per level], 'q': [queries (H*W, C) per level]}. The
gallery is rounded through fp16 as in the model's bank. Baseline and engine run interleaved in the same
process, best of ``--repeats`` each, so that a noisy machine hurts both alike. The engine's output is
checked against the float64 brute force on ``--check`` queries per level (evenly spaced, plus the
nearest ones, where near-ties are densest; 0 = all queries), and the largest relative error reported.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from spade_ad.correspondence import cdist_baseline, nn_distances, nn_distances_reference, relative_error


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--feats", default="/tmp/feats.pt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kappa", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", type=int, default=400, help="queries per level checked (0: all; slow)")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 reference check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.feats)
    levels = []
    for g, q in zip(data["g"], data["q"], strict=True):
        side = math.isqrt(q.shape[0])
        hw = (side, side) if side * side == q.shape[0] else None
        levels.append((q.float(), g.half().float(), hw))
    print(f"threads={torch.get_num_threads()} kappa={args.kappa} repeats={args.repeats}")
    tot_b = tot_e = 0.0
    worst = 0.0
    for li, (q, g, hw) in enumerate(levels):
        tb, te = [], []
        stats: dict[str, int] = {}
        out = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            cdist_baseline(q, g, args.kappa)
            tb.append(time.perf_counter() - t)
            stats = {}
            t = time.perf_counter()
            out = nn_distances(q, g, args.kappa, stats=stats, query_hw=hw, gallery_hw=hw)
            te.append(time.perf_counter() - t)
        assert out is not None
        err = float("nan")
        if not args.no_reference:
            pick = torch.arange(q.shape[0])
            if 0 < args.check < q.shape[0]:
                spaced = torch.linspace(0, q.shape[0] - 1, args.check // 2).long()
                pick = torch.unique(torch.cat([spaced, out.argsort()[: args.check - spaced.numel()]]))
            err = relative_error(out[pick], nn_distances_reference(q[pick], g, args.kappa))
            worst = max(worst, err)
        b, e = min(tb), min(te)
        tot_b += b
        tot_e += e
        print(
            f"level {li}: {q.shape[0]} x {g.shape[0]} x {q.shape[1]}  baseline {b * 1e3:8.1f} ms  "
            f"engine {e * 1e3:7.1f} ms  ratio {b / e:5.1f}x  max rel err {err:.1e}  "
            f"fallback {stats.get('fallback', 0)}/{stats.get('queries', 0)}  "
            f"pairs {stats.get('pairs', 0) / (q.shape[0] * g.shape[0]):.1%}  "
            f"rechecked {stats.get('rechecked', 0)}"
        )
    print(
        f"total: baseline {tot_b * 1e3:.1f} ms  engine {tot_e * 1e3:.1f} ms  ratio {tot_b / tot_e:.1f}x  "
        f"max rel err {worst:.1e}"
    )


if __name__ == "__main__":
    main()
