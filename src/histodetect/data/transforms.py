"""Tensor transforms of uint8 patch batches on the device: scale, crop, normalise, turn."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1] (contiguous planes, the layout augmentation wants)."""
    # Reorder while still uint8 (4x fewer bytes) so later per-channel arithmetic runs over
    # contiguous planes: with channels innermost it is ~5x slower on a CPU.
    return images.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` px of an NCHW batch (the label is about the centre)."""
    h, w = x.shape[-2:]
    if size >= min(h, w):
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def normalise(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool = True
) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a [0, 1] NCHW batch (a new tensor)."""
    scale = torch.tensor([1 / v for v in std], device=x.device).view(1, 3, 1, 1)
    bias = torch.tensor([-m / v for m, v in zip(mean, std, strict=True)], device=x.device)
    x = (x * scale).add_(bias.view(1, 3, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_model_input(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = True,
    crop: int = 96,
) -> torch.Tensor:
    """uint8 NHWC → centre-cropped, normalised float NCHW, on the tensor's device.

    The inference path: equal to ``normalise(centre_crop(to_unit_float(x)))`` but it crops the
    uint8 pixels first and scales in place, touching the float data twice instead of four times.
    """
    h, w = images.shape[1:3]
    if crop < min(h, w):
        top, left = (h - crop) // 2, (w - crop) // 2
        images = images[:, top : top + crop, left : left + crop]
    x = images.permute(0, 3, 1, 2).contiguous().float()
    scale = torch.tensor([1 / (255.0 * v) for v in std], device=x.device).view(1, 3, 1, 1)
    bias = torch.tensor([-m / v for m, v in zip(mean, std, strict=True)], device=x.device)
    x = x.mul_(scale).add_(bias.view(1, 3, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) of the 8 flips/90-degree rotations of square images (used by TTA too)."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    return x
