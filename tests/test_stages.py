"""Stage 2 (image kNN), maps (upsampling + smoothing) and the feature bank, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from spade_ad.bank import Bank, BankWriter
from spade_ad.correspondence import combine_levels, gaussian_blur
from spade_ad.errors import SpadeError
from spade_ad.preprocess import Preprocessor
from spade_ad.retrieval import image_knn


def test_image_knn_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 16))
    test = rng.normal(size=(5, 16))
    scores, idx = image_knn(torch.from_numpy(test), torch.from_numpy(train), k_image=3, k=7)
    for i in range(5):
        d = np.sqrt(((train - test[i]) ** 2).sum(1))
        order = np.argsort(d, kind="stable")
        assert list(idx[i].numpy()) == list(order[:7])
        assert scores[i].item() == pytest.approx(d[order[:3]].mean(), rel=1e-6)


def test_image_knn_k_larger_than_training_set_and_exclusion() -> None:
    train = torch.tensor([[0.0], [1.0], [3.0]])
    scores, idx = image_knn(torch.tensor([[0.0]]), train, k_image=5, k=50)
    assert idx.tolist() == [[0, 1, 2]] and scores.item() == pytest.approx(4 / 3)
    scores, idx = image_knn(torch.tensor([[0.0]]), train, k_image=1, k=50, exclude=torch.tensor([0]))
    assert idx.tolist() == [[1, 2]] and scores.item() == pytest.approx(1.0)


def test_image_knn_ties_are_deterministic() -> None:
    train = torch.zeros(6, 4)
    _, idx = image_knn(torch.zeros(1, 4), train, k_image=2, k=4)
    assert idx.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("shape", [(224, 224), (31, 57), (3, 5)])
def test_gaussian_blur_equals_scipy_reflect(shape: tuple[int, int]) -> None:
    x = torch.rand(2, *shape)
    got = gaussian_blur(x, 4.0).numpy()
    want = np.stack([gaussian_filter(x[i].double().numpy(), 4.0, mode="reflect", truncate=4.0) for i in range(2)])
    assert np.abs(got - want).max() < 1e-5


def test_combine_levels_equal_weights_and_constant_maps() -> None:
    a = torch.full((1, 4, 4), 2.0)
    b = torch.full((1, 2, 2), 4.0)
    out = combine_levels([a, b], 16, sigma=4.0)
    assert out.shape == (1, 16, 16) and torch.allclose(out, torch.full_like(out, 3.0))
    m = Preprocessor("resize", 16).map_to_image(out[0], 30, 50)
    assert m.shape == (30, 50) and torch.allclose(m, torch.full_like(m, 3.0))


def test_bank_streams_rows_and_is_valid_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    shapes = [(12, 3), (4, 5)]
    full = [rng.normal(size=(7, p, c)).astype(np.float16) for p, c in shapes]
    w = BankWriter(tmp_path / "bank.safetensors", 7, {f"level{i}": (sh, "F16") for i, sh in enumerate(shapes)})
    for s in (4, 0):  # out of order, uneven batches (last partial batch)
        e = 7 if s == 4 else 4
        w.write(s, {f"level{i}": lv[s:e] for i, lv in enumerate(full)})
    w.close()
    loaded = load_file(str(tmp_path / "bank.safetensors"))
    for i, lv in enumerate(full):
        assert np.array_equal(loaded[f"level{i}"], lv)
    bank = Bank(tmp_path / "bank.safetensors")
    assert bank.n == 7
    assert np.array_equal(bank.gather(0, np.array([6, 2])), full[0][[6, 2]])


def test_truncated_bank_is_reported(tmp_path: Path) -> None:
    w = BankWriter(tmp_path / "bank.safetensors", 3, {"level0": ((10, 4), "F16")})
    w.write(0, {"level0": np.zeros((3, 10, 4))})
    w.close()
    data = (tmp_path / "bank.safetensors").read_bytes()
    (tmp_path / "bank.safetensors").write_bytes(data[:-10])
    with pytest.raises(SpadeError, match="truncated"):
        Bank(tmp_path / "bank.safetensors")
    (tmp_path / "bank.safetensors").write_bytes(b"\x01")
    with pytest.raises(SpadeError, match="damaged feature bank"):
        Bank(tmp_path / "bank.safetensors")
