"""Stage 3, last step: per-level distance grids -> one smoothed anomaly map in the input frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(device=device, dtype=torch.float32)


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """scipy.ndimage 'reflect' padding (edge sample repeated: d c b a | a b c d | d c b a), any r."""
    n = x.shape[dim]
    j = torch.arange(-r, n + r, device=x.device) % (2 * n)
    j = torch.where(j >= n, 2 * n - 1 - j, j)
    return x.index_select(dim, j)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter(mode='reflect',
    truncate=4) on each map."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, device=maps.device)
    r = (k.numel() - 1) // 2
    x = maps[:, None]
    x = _symmetric_pad(x, r, 3)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = _symmetric_pad(x, r, 2)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def combine_levels(level_maps: list[torch.Tensor], shape: int | tuple[int, int], sigma: float) -> torch.Tensor:
    """Upsample each (B, h, w) level map to ``shape`` (H, W; an int: a square) bilinearly, average with
    equal weight, smooth."""
    hw = (shape, shape) if isinstance(shape, int) else shape
    up = [
        F.interpolate(m[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
        for m in level_maps
    ]
    mean = torch.stack(up).mean(0)
    # one map at a time: a convolution's rounding depends on the batch shape, a map must not depend on
    # which other images were scored with it
    return torch.cat([gaussian_blur(mean[i : i + 1], sigma) for i in range(mean.shape[0])])


__all__ = ["gaussian_blur", "combine_levels", "gaussian_kernel1d"]
