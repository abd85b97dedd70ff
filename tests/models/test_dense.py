"""Padding-free models give dense tile maps equal to their per-patch outputs."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from histodetect.models.classifier import build_model
from histodetect.models.dense import dense_capable, dense_logits, patch_feature_size


def _images(n: int, side: int) -> torch.Tensor:
    """Noise on smooth random shading: content that differs from one window to the next."""
    shading = F.interpolate(torch.randn(n, 3, side // 24, side // 24), size=side, mode="bilinear")
    return 2 * shading + torch.randn(n, 3, side, side)


def _varied(arch: str) -> torch.nn.Module:
    """The model with batch-norm statistics measured on such images and a strong head."""
    torch.manual_seed(0)
    model = build_model(arch)
    model.train()
    with torch.no_grad():
        model(_images(32, 96))
        model.head[-1].weight.mul_(50)
    return model.eval()


@pytest.mark.parametrize("arch", ["densecnn", "smallfcn"])
def test_a_tile_pass_equals_one_pass_per_patch(arch):
    model = _varied(arch)
    assert dense_capable(model)
    k = patch_feature_size(model, 96)
    n = 4
    tile = _images(2, 32 * n + 64)
    with torch.no_grad():
        dense = dense_logits(model, tile, k)
        each = torch.stack(
            [
                torch.stack(
                    [
                        model(tile[:, :, 32 * i : 32 * i + 96, 32 * j : 32 * j + 96])
                        for j in range(n)
                    ],
                    -1,
                )
                for i in range(n)
            ],
            -2,
        )
    assert dense.shape == each.shape == (2, n, n)
    assert each.std() > 100 * 1e-4  # outputs differ far beyond the tolerance: a shift would show
    assert (dense - each).abs().max() < 1e-4


def test_densecnn_is_about_the_size_of_smallcnn_and_smallcnn_is_not_dense():
    dense, padded = build_model("densecnn"), build_model("smallcnn")
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, padded)]
    assert 0.3 < params[0] / params[1] < 1.5
    assert not dense_capable(padded)
