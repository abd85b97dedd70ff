"""Resolution: the pyramid level, and the resampling, that match the model's µm per pixel."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from histodetect import PCAM_MPP
from histodetect.errors import HistodetectError
from histodetect.slides.wsi.readers import SlideReader

MPP_TOLERANCE = 0.10  # a level within 10% of the target is used as it is, without resampling


@dataclass(frozen=True)
class Resolution:
    """Which level is read and how it is resampled to the analysis ('working') resolution."""

    level: int
    factor: float  # level px per working px (1 = the level as it is)
    scale: float  # level-0 px per working px
    mpp: float | None  # µm per working px
    size: tuple[int, int]  # working (width, height)
    note: str = ""


def choose_resolution(
    reader: SlideReader,
    target_mpp: float = PCAM_MPP,
    level: int | None = None,
) -> Resolution:
    """Pick the pyramid level matching the model's training resolution.

    A level within 10% of ``target_mpp`` is used as it is; otherwise the coarsest level finer
    than the target is read and downsampled to it. With ``level`` given, or when the slide's
    resolution is unknown, that level (default 0) is analysed as it is.

    Raises:
        HistodetectError: for a level the slide does not have.
    """
    n = len(reader.dims)
    if level is not None:
        if not 0 <= level < n:
            raise HistodetectError(f"{reader.name}: has levels 0 to {n - 1}, not {level}.")
        return _resolution(reader, level, 1.0, f"level {level} as requested")
    if reader.mpp is None:
        return _resolution(
            reader, 0, 1.0, "resolution unknown: level 0 analysed as it is (pass --slide-mpp)"
        )
    mpps = [reader.mpp * d for d in reader.downsamples]
    close = [i for i, m in enumerate(mpps) if abs(m / target_mpp - 1) <= MPP_TOLERANCE]
    if close:
        best = min(close, key=lambda i: abs(mpps[i] / target_mpp - 1))
        return _resolution(reader, best, 1.0, "")
    finer = [i for i, m in enumerate(mpps) if m < target_mpp]
    if not finer:
        return _resolution(
            reader,
            0,
            1.0,
            f"the slide ({mpps[0]:.3g} µm/px) is coarser than the model's {target_mpp:.3g} "
            "µm/px: level 0 analysed as it is",
        )
    best = max(finer, key=lambda i: mpps[i])
    return _resolution(reader, best, target_mpp / mpps[best], "")


def _resolution(reader: SlideReader, level: int, factor: float, note: str) -> Resolution:
    w, h = reader.dims[level]
    scale = reader.downsamples[level] * factor
    mpp = reader.mpp * scale if reader.mpp is not None else None
    return Resolution(level, factor, scale, mpp, (int(w / factor), int(h / factor)), note)


def _resized(pixels: np.ndarray, size: tuple[int, int], box: tuple[float, ...]) -> np.ndarray:
    """Area-averaged resampling of ``box`` (in ``pixels``) to ``size`` (w, h)."""
    from PIL import Image

    img = Image.fromarray(pixels).resize(size, Image.Resampling.BOX, box=box)
    return np.asarray(img)


def working_reader(reader: SlideReader, res: Resolution) -> Callable[..., np.ndarray]:
    """``read(x, y, w, h)`` in working pixels: the level read and resampled when needed."""
    if res.factor == 1.0:
        return lambda x, y, w, h: reader.read(res.level, x, y, w, h)
    f = res.factor

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        lx, ly = math.floor(x * f), math.floor(y * f)
        lw, lh = math.ceil((x + w) * f) - lx, math.ceil((y + h) * f) - ly
        box = (x * f - lx, y * f - ly, (x + w) * f - lx, (y + h) * f - ly)
        return _resized(reader.read(res.level, lx, ly, lw, lh), (w, h), box)

    return read


def read_thumbnail(reader: SlideReader, res: Resolution, t: float) -> np.ndarray:
    """The working image downsampled by ``t``, read in chunks from the best pyramid level.

    Memory stays at one chunk of the source level plus the thumbnail itself.
    """
    w, h = res.size
    tw, th = math.ceil(w / t), math.ceil(h / t)
    ds0 = t * res.scale  # level-0 px per thumbnail px
    level = max(
        (i for i, d in enumerate(reader.downsamples) if d <= ds0 * 1.001),
        key=lambda i: reader.downsamples[i],
        default=0,
    )
    rel = ds0 / reader.downsamples[level]  # source-level px per thumbnail px
    out = np.empty((th, tw, 3), np.uint8)
    chunk = max(16, int(2048 / rel))  # thumbnail px per chunk: ~2048 source px
    for y in range(0, th, chunk):
        for x in range(0, tw, chunk):
            cw, ch = min(chunk, tw - x), min(chunk, th - y)
            lx, ly = math.floor(x * rel), math.floor(y * rel)
            lw, lh = math.ceil((x + cw) * rel) - lx, math.ceil((y + ch) * rel) - ly
            box = (x * rel - lx, y * rel - ly, (x + cw) * rel - lx, (y + ch) * rel - ly)
            out[y : y + ch, x : x + cw] = _resized(
                reader.read(level, lx, ly, lw, lh), (cw, ch), box
            )
    return out
