"""Stage 1: images -> (feature pyramid, global vector) with a backbone, in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import FeatureExtractor


def resize_batch(images: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """HxWx3 uint8 arrays of any sizes -> (B,3,size,size) float tensor in [0,255] (antialiased bilinear)."""
    out = []
    for img in images:
        t = torch.from_numpy(np.require(img, np.uint8, ['C', 'W'])).to(device).permute(2, 0, 1)[None].float()
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(t)
    return torch.cat(out).clamp_(0, 255)


def batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


@torch.no_grad()
def extract(
    backbone: FeatureExtractor,
    images: Sequence[np.ndarray],
    image_size: int,
    device: torch.device,
    amp: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One batch: pyramid levels as (B, H*W, C) fp32 and global vectors (B, D) fp32, on ``device``."""
    x = backbone.normalise(resize_batch(images, image_size, device))
    use_amp = amp and device.type == "cuda"
    ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    with ctx:
        pyramid, global_vec = backbone(x)
    levels = [p.float().permute(0, 2, 3, 1).reshape(p.shape[0], -1, p.shape[1]).contiguous() for p in pyramid]
    return levels, global_vec.float()


def level_shapes(backbone: FeatureExtractor, image_size: int) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level for a square input of ``image_size``."""
    with torch.no_grad():
        pyramid, _ = backbone(torch.zeros(1, 3, image_size, image_size, device=backbone.mean.device))
    return [(int(p.shape[2]), int(p.shape[3])) for p in pyramid]


ProgressFn = Callable[[int], None]
