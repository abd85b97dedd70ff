"""Batched augmentation on the training device, applied to whole float batches (NCHW)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AugmentConfig:
    """Batched on-device augmentation: each op's probability (0 disables it)."""

    flip: float = 0.5
    rot90: float = 1.0


def _per_sample(p: float, x: torch.Tensor) -> torch.Tensor:
    """A (N, 1, 1, 1) boolean mask selecting each sample with probability ``p``."""
    return (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p).expand_as(x)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) of the 8 flips/90-degree rotations of square images (used by TTA too)."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    return x


class BatchAugment(nn.Module):
    """Random per-sample augmentation of a whole batch, on whatever device the batch is on.

    Tissue has no canonical orientation, so the 8 dihedral transforms are label-preserving and
    keep the centre 32x32 box in place.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.cfg.rot90 > 0:
            # A transpose plus the flips below reaches every 90-degree rotation.
            x = torch.where(_per_sample(self.cfg.rot90 / 2, x), x.transpose(-1, -2), x)
        if self.cfg.flip > 0 or self.cfg.rot90 > 0:
            p = max(self.cfg.flip, self.cfg.rot90 / 2)
            x = torch.where(_per_sample(p, x), x.flip(-1), x)
            x = torch.where(_per_sample(p, x), x.flip(-2), x)
        return x
