from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.backbones import BACKBONES, build_backbone, bundled_state_dict
from spade_ad.errors import SpadeError


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_bundled_lites_have_genuine_imagenet_weights_cat_is_a_cat(name: str) -> None:
    """The bundled weights, mapped in order onto timm's tf_efficientnet_liteN, classify chelsea as a cat."""
    import timm
    from skimage.data import chelsea

    spec = BACKBONES[name]
    model = timm.create_model(spec.timm_name, pretrained=False)
    model.load_state_dict(bundled_state_dict(spec))
    model.eval()
    img = torch.from_numpy(chelsea().copy()).permute(2, 0, 1)[None].float()
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    x = img / 127.5 - 1.0  # inputs scaled to [-1, 1]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"predicted ImageNet class {top}"
    assert float(probs[281:286].sum()) > 0.5


def test_lite0_pyramid_shapes() -> None:
    net = build_backbone("efficientnet_lite0")
    assert net.channels == [24, 40, 112] and net.strides == [4, 8, 16] and net.global_dim == 320
    assert net.weights_id.startswith("sha256:")
    pyr, g = net(net.normalise(torch.zeros(2, 3, 224, 224)))
    assert [tuple(p.shape) for p in pyr] == [(2, 24, 56, 56), (2, 40, 28, 28), (2, 112, 14, 14)]
    assert tuple(g.shape) == (2, 320)


@pytest.mark.parametrize(("name", "channels", "gdim"), [("efficientnet_lite1", [24, 40, 112], 320),
                                                         ("efficientnet_lite2", [24, 48, 120], 352)])
def test_larger_lites_pyramid_shapes(name: str, channels: list[int], gdim: int) -> None:
    net = build_backbone(name)
    assert net.channels == channels and net.strides == [4, 8, 16] and net.global_dim == gdim
    assert net.weights_id.startswith("sha256:")


@pytest.mark.parametrize(
    ("name", "channels", "gdim"),
    [
        ("wide_resnet50_2", [256, 512, 1024], 2048),
        ("resnet18", [64, 128, 256], 512),
        ("resnet50", [256, 512, 1024], 2048),
    ],
)
def test_resnet_code_paths_with_random_weights(name: str, channels: list[int], gdim: int) -> None:
    net = build_backbone(name, "random")
    assert net.channels == channels and net.strides == [4, 8, 16] and net.global_dim == gdim
    assert net.weights_id == "random:seed0"
    pyr, g = net(net.normalise(torch.zeros(1, 3, 64, 64)))
    assert [p.shape[1] for p in pyr] == channels and [p.shape[-1] for p in pyr] == [16, 8, 4]
    assert tuple(g.shape) == (1, gdim)


def test_resnet_loads_a_local_state_dict_file(tmp_path) -> None:
    import timm

    src = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        src.conv1.weight.fill_(0.01)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    net = build_backbone("resnet18", str(path))
    assert torch.allclose(net.body.conv1.weight, torch.full_like(net.body.conv1.weight, 0.01))
    assert net.weights_id.startswith("sha256:")


def test_unavailable_or_bad_weights_give_clear_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpadeError, match="--weights PATH"):
        build_backbone("wide_resnet50_2")
    with pytest.raises(SpadeError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "none.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(SpadeError, match=r"bad\.pth: cannot read weights"):
        build_backbone("resnet18", str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(SpadeError, match="do not fit backbone resnet18"):
        build_backbone("resnet18", str(wrong))
    with pytest.raises(SpadeError, match="unknown backbone"):
        build_backbone("vgg16")


def test_pickle_payload_in_weights_is_refused(tmp_path) -> None:
    """weights_only loading: a state_dict file carrying arbitrary objects does not execute code."""
    evil = tmp_path / "evil.pth"
    torch.save({"x": np.dtype}, evil, _use_new_zipfile_serialization=True)
    with pytest.raises(SpadeError, match="cannot read weights"):
        build_backbone("resnet18", str(evil))
