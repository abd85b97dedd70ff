"""Stain normalisation of whole patch batches on their device: Reinhard and Macenko.

Both map every patch onto one target appearance fitted from the run's training patches, so a
slide from another lab's stain protocol or scanner reaches the model looking like the data it
was trained on. They run batched (one pass over a batch, no per-patch Python loop) because they
sit in the training and inference data path; ``torchstain`` normalises one image per call and
fails on patches with too little tissue, so it serves here as the reference the tests compare to.
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import nn

from histodetect.errors import HistodetectError

METHODS = ("none", "reinhard", "macenko")
# Macenko et al. (2009): light intensity, background cut-off (optical density) and the angle
# percentile that picks the two stain vectors, as in the paper and torchstain.
_IO = 240.0
_BETA = 0.15
_ALPHA = 0.01
# A patch with fewer tissue pixels than this share keeps its colours: two stain vectors cannot
# be estimated from a blank or nearly blank patch.
_MIN_TISSUE = 0.01


def _od(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) optical density of [0, 1] RGB pixels (with torchstain's +1 on 0..255)."""
    return -torch.log((x * 255.0 + 1.0) / _IO)


def _reinhard_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L*a*b* channel means and standard deviations, each (N, 3, 1, 1)."""
    lab = rgb_to_lab(x)
    return lab.mean((2, 3), keepdim=True), lab.std((2, 3), keepdim=True)


def _macenko_stains(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain matrix (N, 3, 2; haematoxylin first) per image and which images have enough tissue.

    The two stain vectors are the extreme angles (percentiles ``_ALPHA``) of the tissue pixels'
    optical densities projected on the plane of their two main axes.
    """
    p = od.shape[2]
    tissue = (od >= _BETA).all(1)  # (N, P): no channel transparent
    count = tissue.sum(1)
    ok = count >= max(3, int(_MIN_TISSUE * p))
    w = tissue.to(od.dtype)
    mean = (od * w[:, None]).sum(2) / count.clamp_min(1)[:, None]
    centred = (od - mean[:, :, None]) * w[:, None]
    cov = centred @ centred.transpose(1, 2) / (count.clamp_min(2) - 1)[:, None, None]
    cov = cov + torch.eye(3, device=od.device, dtype=od.dtype) * 1e-6  # blank patches
    plane = torch.linalg.eigh(cov)[1][:, :, 1:]  # (N, 3, 2): the two largest axes
    proj = plane.transpose(1, 2) @ od  # (N, 2, P)
    phi = torch.atan2(proj[:, 1], proj[:, 0]).masked_fill(~tissue, float("nan"))
    lo_hi = torch.nanquantile(phi, torch.tensor([_ALPHA, 1 - _ALPHA], device=od.device), dim=1)
    angles = torch.stack([torch.cos(lo_hi), torch.sin(lo_hi)])  # (cos/sin, lo/hi, N)
    v = plane @ angles.permute(2, 0, 1)  # (N, 3, 2): the lo and hi stain vectors
    # Haematoxylin absorbs more red than eosin does: it is the vector with the larger R.
    swap = v[:, 0, 0] < v[:, 0, 1]
    v = torch.where(swap[:, None, None], v.flip(2), v)
    return torch.nan_to_num(v), ok


def _concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """(N, 2, P) least-squares stain amounts of every pixel."""
    return torch.linalg.pinv(stains) @ od


def fit_target(images: np.ndarray, method: str) -> dict:
    """The target appearance of ``method`` fitted on uint8 (N, H, W, 3) training patches.

    Reinhard's target is the average per-patch L*a*b* mean and standard deviation; Macenko's is
    the stain matrix of all the patches' tissue pixels pooled, and their 99th-percentile stain
    amounts. Lists of floats, so the target goes in ``model.json``.

    Raises:
        HistodetectError: an unknown method, or patches without enough tissue to fit Macenko.
    """
    if method not in METHODS[1:]:
        raise HistodetectError(f"stain normalisation {method!r}: choose one of {METHODS}.")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if method == "reinhard":
        mean, std = _reinhard_stats(x)
        return {
            "lab_mean": mean.mean(0).flatten().tolist(),
            "lab_std": std.mean(0).flatten().tolist(),
        }
    od = _od(x).permute(1, 0, 2, 3).reshape(1, 3, -1)  # every patch's pixels as one image
    stains, ok = _macenko_stains(od)
    if not bool(ok[0]):
        raise HistodetectError("cannot fit Macenko stain normalisation: the patches hold no tissue")
    amounts = _concentrations(od, stains)
    top = torch.quantile(amounts[0], 0.99, dim=1)
    return {"stains": stains[0].tolist(), "max_amounts": top.tolist()}


class StainNormaliser(nn.Module):
    """Maps float (N, 3, H, W) [0, 1] RGB batches onto a fitted target appearance.

    ``method="none"`` passes batches through. Patches with almost no tissue pass through
    unchanged under Macenko (there are no stains to measure).
    """

    def __init__(self, method: str = "none", target: dict | None = None) -> None:
        """Args: method: none, reinhard or macenko; target: what ``fit_target`` returned."""
        super().__init__()
        if method not in METHODS:
            raise HistodetectError(f"stain normalisation {method!r}: choose one of {METHODS}.")
        self.method = method
        target = target or {}
        try:
            if method == "reinhard":
                self.register_buffer("lab_mean", torch.tensor(target["lab_mean"]).view(1, 3, 1, 1))
                self.register_buffer("lab_std", torch.tensor(target["lab_std"]).view(1, 3, 1, 1))
            elif method == "macenko":
                self.register_buffer("stains", torch.tensor(target["stains"]).view(1, 3, 2))
                top = torch.tensor(target["max_amounts"]).view(1, 2, 1)
                self.register_buffer("max_amounts", top)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise HistodetectError(
                f"{method} stain normalisation: its stored target is damaged ({exc!r})."
            ) from None

    def describe(self) -> dict:
        """The method and target, as stored in ``model.json`` (empty for none)."""
        if self.method == "reinhard":
            return {
                "method": "reinhard",
                "lab_mean": self.lab_mean.flatten().tolist(),
                "lab_std": self.lab_std.flatten().tolist(),
            }
        if self.method == "macenko":
            return {
                "method": "macenko",
                "stains": self.stains[0].tolist(),
                "max_amounts": self.max_amounts.flatten().tolist(),
            }
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "none":
            return x
        x = x.float()
        if self.method == "reinhard":
            lab = rgb_to_lab(x)
            mean, std = lab.mean((2, 3), keepdim=True), lab.std((2, 3), keepdim=True)
            lab = (lab - mean) / std.clamp_min(1e-3) * self.lab_std + self.lab_mean
            return lab_to_rgb(lab).clamp(0.0, 1.0)
        n, c, h, w = x.shape
        od = _od(x.reshape(n, c, h * w))
        stains, ok = _macenko_stains(od)
        amounts = _concentrations(od, stains)
        top = torch.quantile(amounts, 0.99, dim=2, keepdim=True)
        amounts = amounts * (self.max_amounts / top.clamp_min(1e-6))
        out = (_IO / 255.0) * torch.exp(-(self.stains @ amounts))
        out = out.clamp(0.0, 1.0).reshape(n, c, h, w)
        return torch.where(ok[:, None, None, None], out, x)


def stain_normaliser(meta: dict) -> StainNormaliser:
    """The normaliser a run's ``model.json`` describes (none when it has no ``stain_norm``)."""
    spec = dict(meta.get("stain_norm") or {})
    return StainNormaliser(spec.pop("method", "none"), spec)
