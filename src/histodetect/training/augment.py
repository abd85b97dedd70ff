"""Configurable per-sample augmentation of whole float batches (NCHW), on their own device."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from kornia.geometry.transform import crop_and_resize
from torch import nn

from histodetect import CENTRE, PATCH_SIZE
from histodetect.config import PROBABILITIES, AugmentConfig
from histodetect.data.transforms import centre_crop, dihedral
from histodetect.errors import HistodetectError

_NONE = replace(AugmentConfig(), **dict.fromkeys(PROBABILITIES, 0.0))

RECIPES: dict[str, AugmentConfig] = {
    "none": _NONE,
    "light": replace(_NONE, flip=0.5, rot90=1.0),
    # Cheap on a CPU: hue, PCA, motion blur and JPEG cost the most per image, so they are off.
    "default": AugmentConfig(),
    "heavy": AugmentConfig(
        crop=0.4,
        crop_min=72,
        affine=0.4,
        shift=0.06,
        scale=(0.85, 1.15),
        rotate=45.0,
        stain=0.8,
        stain_sigma=0.15,
        stain_bias=0.1,
        color=0.8,
        brightness=0.15,
        contrast=0.2,
        saturation=0.2,
        hue=0.03,
        cast=0.3,
        cast_strength=0.15,
        pca=0.5,
        pca_std=0.2,
        blur=0.2,
        blur_sigma=1.2,
        motion_blur=0.1,
        motion_blur_kernel=5,
        noise=0.25,
        noise_std=0.04,
        jpeg=0.25,
        jpeg_quality=50.0,
    ),
    # The default's cheap ops with the stain and colour changes of another lab or scanner:
    # each H&E stain's amount +-40 %, per-channel casts (white balance, an old slide's
    # yellowing) and stronger brightness/contrast/saturation and blur.
    "stain": replace(
        AugmentConfig(),
        stain=0.8,
        stain_sigma=0.4,
        stain_bias=0.1,
        color=0.8,
        brightness=0.2,
        contrast=0.2,
        saturation=0.25,
        cast=0.5,
        cast_strength=0.2,
        blur=0.2,
        blur_sigma=1.2,
    ),
}


def recipe(name: str) -> AugmentConfig:
    """The named augmentation recipe; an unknown name is a clear error."""
    if name not in RECIPES:
        raise HistodetectError(
            f"unknown augmentation recipe {name!r}; choose one of {', '.join(RECIPES)}."
        )
    return RECIPES[name]


# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB (rows).
_RGB_FROM_HED = torch.tensor([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
# Keeps log() finite on black pixels; small enough that a round trip changes nothing visible.
_OD_EPS = 1e-6


def _view_table() -> torch.Tensor:
    """(4, 4) table: which ``dihedral`` view equals flip code f (bit 0 h, bit 1 v) then q turns."""
    # The 8 views of a 2x2 image with distinct pixels are all different, so it names them.
    probe = torch.arange(4).view(2, 2)
    views = [dihedral(probe, k) for k in range(8)]
    table = torch.zeros(4, 4, dtype=torch.long)
    for f in range(4):
        for q in range(4):
            turned = torch.rot90(dihedral(probe, f), q, (-2, -1))
            table[f, q] = next(k for k, v in enumerate(views) if torch.equal(v, turned))
    return table


def _on_some(x: torch.Tensor, p: float, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``op`` to a random subset of samples, each chosen with probability ``p``."""
    if p >= 1:
        return op(x)
    # Running the op only on the chosen rows makes its cost scale with p (kornia's own gate
    # transforms the whole batch and then discards the unchosen rows).
    idx = (torch.rand(x.shape[0], device=x.device) < p).nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, op(x.index_select(0, idx)))


def _uniform(n: int, low: float, high: float, like: torch.Tensor, *shape: int) -> torch.Tensor:
    """(n, *shape) uniform samples in [low, high) on ``like``'s device."""
    u = torch.rand(n, *shape, device=like.device, dtype=like.dtype)
    return low + (high - low) * u


_GEOMETRIC = frozenset({"dihedral", "crop", "affine"})


class BatchAugment(nn.Module):
    """Random per-sample augmentation of a whole batch, on whatever device the batch is on.

    Takes float (N, 3, H, W) batches in [0, 1] of square patches and returns the same shape,
    dtype and device, clamped to [0, 1]. In eval mode, or when every probability is 0, the
    input is returned unchanged. Randomness comes from torch's global generators, so
    ``torch.manual_seed`` makes it reproducible.

    Geometric ops keep the labelled centre box in the picture: dihedral views keep it in
    place, crops always contain it, and the affine moves it by a few pixels at most.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        """Build every kornia module the config enables, once.

        Args:
            cfg: Which ops run, how often and how strongly.
        """
        super().__init__()
        self.cfg = cfg
        self.register_buffer("_views", _view_table(), persistent=False)
        self.register_buffer("_rgb_from_hed", _RGB_FROM_HED.clone(), persistent=False)
        self.register_buffer("_hed_from_rgb", torch.linalg.inv(_RGB_FROM_HED), persistent=False)
        c = cfg
        # Each kornia module runs with p=1 on the rows _on_some picked.
        self.kornia = nn.ModuleDict()
        if c.affine > 0:
            self.kornia["affine"] = K.RandomAffine(
                degrees=c.rotate,
                translate=(c.shift, c.shift),
                scale=c.scale,
                padding_mode="reflection",  # mirrored tissue, not black corners
                p=1.0,
            )
        if c.color > 0:
            self.kornia["color"] = K.ColorJitter(
                c.brightness, c.contrast, c.saturation, c.hue, p=1.0
            )
        if c.blur > 0:
            # +-2 sigma holds 95% of the kernel's weight; wider costs time for nothing visible.
            size = 2 * max(1, math.ceil(2 * c.blur_sigma)) + 1
            self.kornia["blur"] = K.RandomGaussianBlur(
                size, (min(0.1, c.blur_sigma), c.blur_sigma), p=1.0
            )
        if c.motion_blur > 0:
            k = c.motion_blur_kernel
            self.kornia["motion_blur"] = K.RandomMotionBlur(
                k if k == 3 else (3, k), angle=180.0, direction=0.5, border_type="reflect", p=1.0
            )
        if c.jpeg > 0:
            self.kornia["jpeg"] = K.RandomJPEG(jpeg_quality=(c.jpeg_quality, 100.0), p=1.0)

        # (op, probability) in order; an op is a kornia module above or a ``_<op>`` method.
        steps = [
            ("dihedral", 1.0 if c.flip > 0 or c.rot90 > 0 else 0.0),  # draws its own choices
            ("crop", c.crop),
            ("affine", c.affine),
            ("stain", c.stain),
            ("color", c.color),
            ("cast", c.cast),
            ("pca", c.pca),
            ("blur", c.blur),
            ("motion_blur", c.motion_blur),
            ("noise", c.noise),
            # Last, as a scanner's compression comes after everything the slide went through.
            ("jpeg", c.jpeg),
        ]
        self._steps = [(name, p) for name, p in steps if p > 0]

    def forward(self, x: torch.Tensor, crop: int | None = None) -> torch.Tensor:
        """Augment a batch.

        Args:
            x: Float (N, 3, H, W) images in [0, 1], square.
            crop: When the model sees only the centre ``crop`` px, the geometric ops run on the
                whole patch (they need its surroundings) and the pixel-wise ones on the centre
                only, which is what survives: the same result for less work.

        Returns:
            The augmented batch, values in [0, 1]: same shape, dtype and device, or the centre
            ``crop`` x ``crop`` when ``crop`` is given.
        """
        if not self.training or not self._steps:
            return x if crop is None else centre_crop(x, crop)
        y = x.float()  # kornia's colour ops want float32, whatever autocast does later
        for name, p in self._steps:
            if name not in _GEOMETRIC and crop is not None:
                y, crop = centre_crop(y, crop), None
            op = self.kornia[name] if name in self.kornia else getattr(self, f"_{name}")
            y = _on_some(y, p, op)
        if crop is not None:
            y = centre_crop(y, crop)
        return y.clamp(0.0, 1.0).to(x.dtype)

    def _dihedral(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample flips and quarter turns, each sample through one ``dihedral`` view."""
        n = x.shape[0]
        flips = (torch.rand(n, 2, device=x.device) < self.cfg.flip).long()
        turns = torch.randint(0, 4, (n,), device=x.device)
        turns = turns * (torch.rand(n, device=x.device) < self.cfg.rot90)
        view = self._views[flips[:, 0] + 2 * flips[:, 1], turns]
        out = x.clone()
        for k in range(1, 8):
            idx = (view == k).nonzero().squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, dihedral(x.index_select(0, idx), k))
        return out

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """Random square crops that contain the whole centre box, resized back to full size."""
        n, _, h, w = x.shape
        side = min(h, w)
        # Sizes are in pixels of a 96-pixel patch; scale them for other patch sizes.
        px = side / PATCH_SIZE
        box_lo, box_hi = CENTRE[0] * px, CENTRE[1] * px
        s = _uniform(n, min(self.cfg.crop_min * px, side), side, x)
        # Corners are pixel centres: a crop of side s starting at o covers o .. o + s - 1,
        # so it holds the box's pixels box_lo .. box_hi - 1 when box_hi - s <= o <= box_lo.
        starts = []
        for size in (w, h):
            low = (box_hi - s).clamp_min(0)
            high = torch.minimum(torch.full_like(s, box_lo), size - s)
            starts.append(low + (high - low) * torch.rand_like(s))
        x0, y0 = starts
        x1, y1 = x0 + s - 1, y0 + s - 1
        boxes = torch.stack(
            [torch.stack(c, dim=1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], dim=1
        )
        return crop_and_resize(x, boxes, (h, w))

    def _stain(self, x: torch.Tensor) -> torch.Tensor:
        """H&E stain jitter: scale and shift each HED stain's optical density per sample."""
        n = x.shape[0]
        alpha = _uniform(n, 1 - self.cfg.stain_sigma, 1 + self.cfg.stain_sigma, x, 3)
        beta = _uniform(n, -self.cfg.stain_bias, self.cfg.stain_bias, x, 3)
        # Per pixel (a row vector): stains = od @ hed_from_rgb, jittered as stains * alpha + beta,
        # back as stains @ rgb_from_hed; folded into one 3x3 matrix and offset per sample, so
        # the image is read once.
        rgb_from_hed, hed_from_rgb = self._rgb_from_hed.to(x), self._hed_from_rgb.to(x)
        mix = hed_from_rgb @ (alpha[:, :, None] * rgb_from_hed)
        offset = beta @ rgb_from_hed
        od = -torch.log(x.clamp_min(_OD_EPS)).flatten(2)
        od = torch.baddbmm(offset[:, :, None], mix.transpose(1, 2), od)
        return torch.exp(-od).clamp_max(1.0).view_as(x)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """A colour cast: every RGB channel scaled by its own factor in ``1 ± cast_strength``."""
        s = self.cfg.cast_strength
        return x * _uniform(x.shape[0], 1 - s, 1 + s, x, 3, 1, 1)

    def _pca(self, x: torch.Tensor) -> torch.Tensor:
        """AlexNet-style lighting noise along each image's own RGB principal components."""
        flat = x.flatten(2)
        centred = flat - flat.mean(2, keepdim=True)
        cov = centred @ centred.transpose(1, 2) / flat.shape[2]
        var, axes = torch.linalg.eigh(cov)
        alpha = torch.randn(x.shape[0], 3, device=x.device) * self.cfg.pca_std
        shift = axes @ (alpha * var.clamp_min(0).sqrt())[:, :, None]
        return x + shift[..., None]

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Additive Gaussian noise with a per-sample standard deviation."""
        # By hand: kornia's RandomGaussianNoise draws the noise on the CPU and copies it to
        # the batch's device, and uses one fixed strength for every sample.
        std = _uniform(x.shape[0], 0.0, self.cfg.noise_std, x, 1, 1, 1)
        return x + torch.randn_like(x) * std


def preview(
    images: np.ndarray, cfg: AugmentConfig, out: Path, n_aug: int = 7, seed: int = 0
) -> None:
    """Write a PNG grid: one row per patch, the original first, then ``n_aug`` augmented views.

    The centre 32x32 box that the label describes is outlined on each original.

    Args:
        images: uint8 (N, 96, 96, 3) RGB patches.
        cfg: The augmentation to show.
        out: Where the PNG goes; written atomically.
        n_aug: How many augmented views per patch.
        seed: Seed for the augmentation (the caller's random state is left alone).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from histodetect.files import write_atomic

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise HistodetectError(
            f"preview wants uint8 (N, H, W, 3) patches, got {images.dtype} {images.shape}."
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    aug = BatchAugment(cfg).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = [x] + [aug(x) for _ in range(n_aug)]

    n, size = len(images), images.shape[1]
    fig = Figure(figsize=(1.2 * (n_aug + 1), 1.2 * n + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, n_aug + 1, squeeze=False)
    lo, hi = (c * size / PATCH_SIZE for c in CENTRE)
    for row in range(n):
        for col, batch in enumerate(views):
            ax = axes[row, col]
            ax.imshow(batch[row].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_axis_off()
            if col == 0:
                ax.add_patch(
                    Rectangle((lo - 0.5, lo - 0.5), hi - lo, hi - lo, fill=False, ec="lime", lw=1)
                )
    axes[0, 0].set_title("original", fontsize=8)
    for col in range(1, n_aug + 1):
        axes[0, col].set_title(f"aug {col}", fontsize=8)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (1.2 * n + 0.3), wspace=0.04, hspace=0.04
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.getvalue())
