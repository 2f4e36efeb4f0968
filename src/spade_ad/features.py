"""Stage 1: images -> feature pyramid (strides 4, 8, 16) and global vector, with an ImageNet backbone.

Images are prepared by the model's :class:`~spade_ad.preprocess.Preprocessor`. On a CPU the backbone
runs one image at a time: convolution results depend on the batch shape in the last bits, and one at
a time they do not, so an image gets the same features (and the same scores) whether it is scored in
a batch by ``spade-ad predict``, alone by the inspector, or during ``fit``; it is also faster on a CPU.
On a GPU images run in batches under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .backbones import FeatureExtractor
from .preprocess import Preprocessor


def batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive batches covering ``range(n)``."""
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


@torch.no_grad()
def extract(
    backbone: FeatureExtractor,
    images: Sequence[np.ndarray],
    prep: Preprocessor,
    device: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pyramid levels as (B, H*W, C) fp32 and global vectors (B, D) fp32, on ``device``."""
    x = torch.stack([prep.to_input(img, device) for img in images])
    x = backbone.normalise(x)
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            pyramid, global_vec = backbone(x)
    else:
        outs = [backbone(x[i : i + 1]) for i in range(len(x))]
        pyramid = [torch.cat([o[0][li] for o in outs]) for li in range(len(outs[0][0]))]
        global_vec = torch.cat([o[1] for o in outs])
    levels = [p.float().permute(0, 2, 3, 1).reshape(p.shape[0], -1, p.shape[1]).contiguous() for p in pyramid]
    return levels, global_vec.float()


def level_shapes(backbone: FeatureExtractor, prep: Preprocessor) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level for the network input of ``prep``."""
    with torch.no_grad():
        pyramid, _ = backbone(torch.zeros(1, 3, *prep.input_shape, device=backbone.mean.device))
    return [(int(p.shape[2]), int(p.shape[3])) for p in pyramid]


__all__ = ["extract", "level_shapes", "batches"]
