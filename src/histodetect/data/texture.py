"""Texture descriptors of uint8 patch batches on their device: LBP histograms and GLCM properties.

The two classic texture statistics of histology (Ojala et al. 2002; Haralick et al. 1973), in
scikit-image's definitions (``local_binary_pattern(..., "uniform")``, ``graycomatrix`` and
``graycoprops``; the tests compare them), but batched in torch: they sit in the out-of-scope
score of every patch a run answers, where a per-patch CPU loop would cost a GPU its speed.
"""

from __future__ import annotations

import math

import torch

# Points and radius of the uniform LBP ring: the finest texture (a second ring of 16 at radius 2
# added nothing to the out-of-scope score on the REAL sample, at twice the cost).
LBP_POINTS, LBP_RADIUS = 8, 1
# Grey levels and pixel distances of the co-occurrence matrices (four angles each).
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


def grey(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) uint8 luminance of (N, H, W, 3) uint8 patches, as PIL's ``convert("L")``."""
    rgb = images.to(torch.int32)  # 255 x 65536 fits
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
    return ((weighted + 0x8000) >> 16).to(torch.uint8)


def _ring_kernels(points: int, radius: int) -> torch.Tensor:
    """(points, 1, 2r+1, 2r+1) float64 kernels reading each ring neighbour bilinearly, at
    scikit-image's ring positions (offsets rounded to 5 decimals)."""
    size = 2 * radius + 1
    kernels = torch.zeros(points, 1, size, size, dtype=torch.float64)
    for p in range(points):
        angle = 2 * math.pi * p / points
        dr, dc = round(-radius * math.sin(angle), 5), round(radius * math.cos(angle), 5)
        r0, c0 = math.floor(dr), math.floor(dc)
        fr, fc = dr - r0, dc - c0
        for r, c, weight in (
            (r0, c0, (1 - fr) * (1 - fc)),
            (r0, c0 + 1, (1 - fr) * fc),
            (r0 + 1, c0, fr * (1 - fc)),
            (r0 + 1, c0 + 1, fr * fc),
        ):
            if weight > 0:
                kernels[p, 0, radius + r, radius + c] += weight
    return kernels


def _uniform_codes(points: int) -> torch.Tensor:
    """(2^points,) the rotation-invariant uniform code of every ring pattern (bit p set when
    neighbour p is at least the centre): its number of set bits when it changes between 0 and
    1 at most twice along the ring (scikit-image counts the changes without wrapping), else
    ``points + 1``."""
    patterns = torch.arange(2**points)
    bits = (patterns[:, None] >> torch.arange(points)) & 1
    changes = (bits[:, 1:] != bits[:, :-1]).sum(1)
    return torch.where(changes <= 2, bits.sum(1), points + 1)


def lbp_histogram(grey_images: torch.Tensor, points: int, radius: int) -> torch.Tensor:
    """(N, points + 2) share of each rotation-invariant uniform LBP code in each image.

    Args:
        grey_images: (N, H, W) uint8.
        points: neighbours on the ring (at most 16).
        radius: ring radius in pixels (neighbours outside the image read 0).
    """
    centre = grey_images.to(torch.float64)[:, None]
    kernels = _ring_kernels(points, radius).to(centre.device)
    # float64, which no device runs in reduced precision (a GPU may run float32 convolutions
    # in TF32). The weights are multiples of 1e-10 and grey levels whole numbers, so a
    # neighbour that differs from the centre differs by 1e-10 or more, and one within 1e-11
    # equals it exactly (a tie, which counts as at least the centre): codes are exact.
    ring = torch.nn.functional.conv2d(centre, kernels, padding=radius)
    pattern = torch.zeros_like(grey_images, dtype=torch.int32)
    for p in range(points):
        pattern |= (ring[:, p] >= centre[:, 0] - 1e-11).to(torch.int32) << p
    codes = _uniform_codes(points).to(pattern.device)[pattern.long()]
    return _histograms(codes.flatten(1), points + 2)


def _histograms(values: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, bins) share of each value in 0..bins-1 in each row of (N, M) integers."""
    n, m = values.shape
    # int64: a batch's offsets reach N x bins, beyond small integer types for large batches.
    offsets = torch.arange(n, device=values.device)[:, None] * bins
    counts = torch.bincount((values.long() + offsets).flatten(), minlength=n * bins)
    return counts.view(n, bins).double() / m


def glcm_properties(grey_images: torch.Tensor) -> torch.Tensor:
    """(N, 4 x distances) contrast, homogeneity, energy and correlation of each image's
    symmetric, normalised co-occurrence matrices, averaged over the four angles.
    """
    levels = GLCM_LEVELS
    q = grey_images.to(torch.int32) * levels // 256
    n, h, w = q.shape
    i, j = torch.meshgrid(
        torch.arange(levels, device=q.device, dtype=torch.float64),
        torch.arange(levels, device=q.device, dtype=torch.float64),
        indexing="ij",
    )
    props = []
    for d in GLCM_DISTANCES:
        per_angle = []
        for angle in GLCM_ANGLES:
            dr, dc = round(math.sin(angle) * d), round(math.cos(angle) * d)
            a = q[:, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
            b = q[:, max(0, dr) : h + min(0, dr), max(0, dc) : w + min(0, dc)]
            m = _histograms((a * levels + b).flatten(1), levels * levels).view(n, levels, levels)
            m = m + m.transpose(1, 2)
            per_angle.append(_haralick(m / m.sum((1, 2), keepdim=True), i, j))
        props.append(torch.stack(per_angle).mean(0))
    return torch.cat(props, 1)


def _haralick(p: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(N, 4) contrast, homogeneity, energy, correlation of normalised (N, L, L) matrices."""
    contrast = (p * (i - j) ** 2).sum((1, 2))
    homogeneity = (p / (1 + (i - j) ** 2)).sum((1, 2))
    energy = (p**2).sum((1, 2)).sqrt()
    mi, mj = (p * i).sum((1, 2)), (p * j).sum((1, 2))
    si = (p * (i - mi[:, None, None]) ** 2).sum((1, 2)).sqrt()
    sj = (p * (j - mj[:, None, None]) ** 2).sum((1, 2)).sqrt()
    cov = (p * (i - mi[:, None, None]) * (j - mj[:, None, None])).sum((1, 2))
    flat = (si < 1e-15) | (sj < 1e-15)  # a uniform image: skimage's correlation is 1
    correlation = torch.where(flat, torch.ones_like(cov), cov / (si * sj).clamp_min(1e-15))
    return torch.stack([contrast, homogeneity, energy, correlation], 1)


def texture_descriptors(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """LBP histograms and GLCM properties of (N, H, W, 3) uint8 patches, float32, by name."""
    g = grey(images)
    lbp = lbp_histogram(g, LBP_POINTS, LBP_RADIUS)
    return {"lbp": lbp.float(), "glcm": glcm_properties(g).float()}
