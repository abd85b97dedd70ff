"""Padding-free fully-convolutional classifier and dense (one pass per tile) tumour maps."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from histodetect.errors import HistodetectError

DENSE_ARCH = "densecnn"  # the padding-free model we recommend for dense slide maps


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Valid 3x3 convolution, batch norm, ReLU, 2x2 max-pool: ``s`` px become ``(s - 2) // 2``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallFCN(nn.Module):
    """A CPU-sized CNN without zero padding, so one pass over a tile equals a pass per patch.

    Five valid-convolution stages each halve the size, so a 96 px patch becomes one feature
    vector whose receptive field is 94 px: the whole patch, centre box and context. Without
    padding every output depends only on the pixels under it, and with a total stride of 32 a
    tile of ``32 * n + 64`` px yields exactly the n x n outputs of its n x n patches at stride
    32 (``dense_logits``). The widths grow slowly because the dense pass saves most work in
    the high-resolution early stages; the coarse stages cost about as much either way.
    """

    dense_stride = 32
    min_input = 94

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128, 128)) -> None:
        super().__init__()
        chans = (3, *widths)
        self.stages = nn.Sequential(*(_stage(a, b) for a, b in itertools.pairwise(chans)))
        # A 1x1 layer mixes the last features without changing any geometry.
        self.mix = nn.Sequential(
            nn.Conv2d(widths[-1], widths[-1], 1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
        )
        self.num_features = widths[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps before pooling: 1x1 for a 96 px patch, n x n for a 32n+64 px tile."""
        if min(x.shape[-2:]) < self.min_input:
            raise HistodetectError(
                f"smallfcn needs inputs of at least {self.min_input} px, got "
                f"{tuple(x.shape[-2:])}; train it on whole 96 px patches (data.crop: 96)."
            )
        return self.mix(self.stages(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


def _conv(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    """Valid (unpadded) convolution, batch norm, ReLU."""
    return [nn.Conv2d(c_in, c_out, kernel, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]


class DenseCNN(nn.Module):
    """Our padding-free CNN for exact dense slide maps, the size and speed of ``smallcnn``.

    A padding-free network spends border on every 3x3 layer (2s px at 1/s resolution), and
    all its border must fit in the 96 px patch. Here each resolution from 1 to 1/8 gets one
    3x3 layer (2 + 4 + 8 + 16 = 30 px of border) and a 96 px patch ends as a 2x2 feature
    map at 1/32, averaged like a global pool (as ``smallcnn`` averages its 3x3 map): each
    feature sees 62 px, the two rows together the whole patch. Capacity comes from width
    and from 1x1 layers after each 3x3, which mix features without spending border. Without
    padding every output depends only on the pixels under it, so a tile of ``32 n + 64`` px
    yields exactly the n x n outputs of its patches (``dense_logits`` averages 2x2 windows).
    """

    dense_stride = 32
    min_input = 94
    # (kernel, width) layers at resolutions 1, 1/2, 1/4, 1/8, 1/16, a 2x2 max-pool after
    # each, then 1x1 layers at 1/32.
    scales: tuple[tuple[tuple[int, int], ...], ...] = (
        ((3, 32),),
        ((3, 64), (1, 64)),
        ((3, 128), (1, 128)),
        ((3, 256), (1, 256)),
        ((1, 256),),
    )
    mix: tuple[int, ...] = (256,)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for scale in self.scales:
            for kernel, width in scale:
                layers += _conv(c, width, kernel)
                c = width
            layers.append(nn.MaxPool2d(2))
        for width in self.mix:
            layers += _conv(c, width, 1)
            c = width
        self.features = nn.Sequential(*layers)
        self.num_features = c

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps before pooling: 2x2 for a 96 px patch, n+1 x n+1 for a 32n+64 tile."""
        if min(x.shape[-2:]) < self.min_input:
            raise HistodetectError(
                f"densecnn needs inputs of at least {self.min_input} px, got "
                f"{tuple(x.shape[-2:])}; train it on whole 96 px patches (data.crop: 96)."
            )
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


def dense_stride(model: nn.Module) -> int:
    """Pixels between neighbouring dense outputs (0 when the model has no dense stride)."""
    members = getattr(model, "members", None)
    if members is not None:  # an ensemble maps densely only when all members agree
        strides = {dense_stride(m) for m in members}
        return strides.pop() if len(strides) == 1 else 0
    return int(getattr(getattr(model, "backbone", None), "dense_stride", 0))


def dense_capable(model: nn.Module) -> bool:
    """True when ``model`` (a Classifier or ensemble) can compute exact dense maps."""
    members = getattr(model, "members", None)
    if members is not None:
        return dense_stride(model) > 0 and all(dense_capable(m) for m in members)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "dense_stride"):
        return False
    for m in backbone.modules():
        padding = getattr(m, "padding", 0)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and any(
            p != 0 for p in np.atleast_1d(padding)
        ):
            return False  # zero padding makes border outputs differ from whole-patch outputs
    return True


def patch_feature_size(model: nn.Module, crop: int) -> int | tuple[int, ...]:
    """Side of the feature map one ``crop`` px patch produces (1 for smallfcn at 96 px).

    For an ensemble, one side per member.
    """
    members = getattr(model, "members", None)
    if members is not None:
        return tuple(int(patch_feature_size(m, crop)) for m in members)
    param = next(model.parameters())
    with torch.inference_mode():
        x = torch.zeros(1, 3, crop, crop, device=param.device, dtype=param.dtype)
        return int(model.backbone.forward_features(x).shape[-1])


def dense_logits(model: nn.Module, x: torch.Tensor, k: int | tuple[int, ...]) -> torch.Tensor:
    """Logits at every patch position of a normalised tile batch, at the backbone's stride.

    Args:
        model: A dense-capable Classifier in eval mode.
        x: (N, 3, H, W) normalised tiles.
        k: Feature-map side of one patch (``patch_feature_size``); its global average pool
            becomes a k x k sliding average, and the linear head a 1x1 convolution.

    Returns:
        (N, H', W') logits; entry (i, j) is the logit of the patch whose top-left corner is at
        ``(i * stride, j * stride)`` in the tile. An ensemble's members are mapped one by one
        and combined as its forward pass combines them.
    """
    members = getattr(model, "members", None)
    if members is not None:
        ks = k if isinstance(k, tuple) else (k,) * len(members)
        return model.combine(
            [
                dense_logits(m, model.member_input(i, x), ks[i]) / model.temperature[i]
                for i, m in enumerate(members)
            ]
        )
    feats = model.backbone.forward_features(x)
    if k > 1:
        feats = F.avg_pool2d(feats, k, stride=1)
    linear = model.head[-1]  # the dropout before it is the identity in eval mode
    weight = linear.weight.view(1, -1, 1, 1).to(feats.dtype)
    return F.conv2d(feats, weight, linear.bias.to(feats.dtype)).squeeze(1)
