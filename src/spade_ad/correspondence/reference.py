"""Brute-force reference and the naive baselines of stage 3's search (for tests and benchmarks).

:func:`nn_distances_reference` is the ground truth every fast path is checked against (direct
differences in float64); :func:`cdist_baseline` is what the popular SPADE-pytorch port does.
"""

from __future__ import annotations

import torch


def nn_distances_reference(queries: torch.Tensor, gallery: torch.Tensor, kappa: int = 1) -> torch.Tensor:
    """Mean Euclidean distance from each query row to its ``kappa`` nearest gallery rows (float64)."""
    q = queries.detach().to("cpu", torch.float64)
    g = gallery.detach().to("cpu", torch.float64)
    kk = min(kappa, g.shape[0])
    out = torch.empty(q.shape[0], dtype=torch.float64)
    step = max(1, (32 << 20) // max(1, g.shape[0] * g.shape[1] * 8))
    for s in range(0, q.shape[0], step):
        d2 = ((q[s : s + step, None, :] - g[None, :, :]) ** 2).sum(-1)
        out[s : s + step] = d2.topk(kk, dim=1, largest=False).values.sqrt().mean(1)
    return out



def brute_topk_d2(q: torch.Tensor, g: torch.Tensor, kk: int, tile_bytes: int) -> torch.Tensor:
    """Direct-difference squared distances, kk smallest per query, in bounded memory."""
    rows = max(1, tile_bytes // max(1, 4 * g.shape[0] * g.shape[1]))
    cols = g.shape[0] if rows > 1 else max(1, tile_bytes // (4 * g.shape[1]))
    out = []
    for s in range(0, q.shape[0], rows):
        qs = q[s : s + rows]
        best: torch.Tensor | None = None
        for c in range(0, g.shape[0], cols):
            d2 = ((qs[:, None, :] - g[None, c : c + cols, :]) ** 2).sum(-1)
            cand = d2 if best is None else torch.cat([best, d2], dim=1)
            best = cand.topk(min(kk, cand.shape[1]), dim=1, largest=False).values
        assert best is not None
        out.append(best)
    return torch.cat(out)



def cdist_baseline(queries: torch.Tensor, gallery: torch.Tensor, kappa: int = 1) -> torch.Tensor:
    """The naive approach of the popular SPADE-pytorch port (with the reduction on the right axis):
    materialise the whole distance matrix with ``torch.cdist`` and reduce. For benchmarks."""
    d = torch.cdist(queries.float(), gallery.float())
    return d.topk(min(kappa, gallery.shape[0]), dim=1, largest=False).values.mean(1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny) elementwise."""
    a = a.double().cpu()
    b = b.double().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if a.numel() else 0.0


__all__ = ["nn_distances_reference", "brute_topk_d2", "cdist_baseline", "relative_error"]
