"""An ensemble of classifiers as one model: the weighted mean of their probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from histodetect.models.classifier import Classifier

EPS = 1e-7


def logit(p: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)), clipped away from 0 and 1 (written out so ONNX exports it)."""
    p = p.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


class EnsembleModel(nn.Module):
    """Members' probabilities averaged with weights, returned as a logit.

    Callers treat it as one classifier: ``sigmoid(forward(x))`` is the ensemble's probability,
    the mean ``predict`` has always taken over several runs. Input is normalised with the
    ensemble's mean/std; each member gets its own normalisation back through a per-channel
    affine map, and its own calibration temperature, so members need not share either.
    """

    def __init__(
        self,
        members: Sequence[Classifier],
        weights: Sequence[float],
        norms: Sequence[tuple[Sequence[float], Sequence[float]]],
        common: tuple[Sequence[float], Sequence[float]],
        temperatures: Sequence[float],
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor(list(weights), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())
        mean, std = (torch.tensor(list(v), dtype=torch.float32).view(1, 3, 1, 1) for v in common)
        scale, shift = [], []
        for m_mean, m_std in norms:
            mm = torch.tensor(list(m_mean), dtype=torch.float32).view(1, 3, 1, 1)
            ms = torch.tensor(list(m_std), dtype=torch.float32).view(1, 3, 1, 1)
            # x_member = (raw - mm) / ms with raw = x * std + mean.
            scale.append(std / ms)
            shift.append((mean - mm) / ms)
        # Stored (members, 3): buffers of 4 or 5 dims would be re-laid out by channels_last.
        self.register_buffer("scale", torch.stack(scale).view(-1, 3))
        self.register_buffer("shift", torch.stack(shift).view(-1, 3))
        pairs = zip(scale, shift, strict=True)
        self.same_norm = [bool((a == 1).all() and not b.any()) for a, b in pairs]
        self.register_buffer("temperature", torch.tensor(list(temperatures), dtype=torch.float32))

    def member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's normalised input as member ``i`` was trained to see it."""
        if self.same_norm[i]:  # the common case: every member shares the normalisation
            return x
        scale, shift = (t[i].view(1, 3, 1, 1).to(x.dtype) for t in (self.scale, self.shift))
        return x * scale + shift

    def member_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s calibrated tumour logit for ensemble-normalised input ``x``."""
        return self.members[i](self.member_input(i, x)) / self.temperature[i]

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of the members' probabilities, as a logit."""
        probs = sum(w * torch.sigmoid(z.float()) for w, z in zip(self.weights, logits, strict=True))
        return logit(probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([self.member_logits(i, x) for i in range(len(self.members))])
