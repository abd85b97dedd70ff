"""Tiles of other sizes and resolutions, resampled to the model's and cut into patches."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from histodetect import PATCH_SIZE, PCAM_MPP
from histodetect.data.patchio import PatchDecodeError, decode_image
from histodetect.errors import HistodetectError


def resample(image: np.ndarray, mpp: float, target_mpp: float = PCAM_MPP) -> np.ndarray:
    """``image`` at ``mpp`` µm/px resampled to ``target_mpp`` (Lanczos, antialiased)."""
    from PIL import Image

    scale = mpp / target_mpp
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def cut_patches(image: np.ndarray, stem: str) -> list[tuple[str, np.ndarray]]:
    """The centred grid of whole 96 px patches in ``image``, named ``stem`` when there is one,
    else ``stem_ROW_COL``.

    Raises:
        PatchDecodeError: the image is smaller than one patch.
    """
    h, w = image.shape[:2]
    rows, cols = h // PATCH_SIZE, w // PATCH_SIZE
    if not rows or not cols:
        raise PatchDecodeError(f"{w}x{h} px at the model's resolution: smaller than one patch")
    top, left = (h - rows * PATCH_SIZE) // 2, (w - cols * PATCH_SIZE) // 2
    out = []
    for r in range(rows):
        for c in range(cols):
            y, x = top + r * PATCH_SIZE, left + c * PATCH_SIZE
            name = stem if rows * cols == 1 else f"{stem}_{r}_{c}"
            out.append((name, np.ascontiguousarray(image[y : y + PATCH_SIZE, x : x + PATCH_SIZE])))
    return out


class TilePatches(NamedTuple):
    """Patches cut from tiles: their ids and pixels, the index of the tile (in the files given)
    each came from, and the files that could not be used with why."""

    ids: list[str]
    images: np.ndarray
    tiles: np.ndarray
    problems: list[tuple[str, str]]


def tile_patches(files: list[Path], mpp: float, target_mpp: float = PCAM_MPP) -> TilePatches:
    """Every tile file at ``mpp`` µm/px as patches at the model's resolution.

    Tiles may differ in size: each gives as many patches as fit, in file order.

    Raises:
        HistodetectError: ``mpp`` is not a positive number.
    """
    if not mpp > 0:
        raise HistodetectError(f"--mpp must be a positive number of µm per pixel, got {mpp}.")
    ids: list[str] = []
    patches: list[np.ndarray] = []
    tiles: list[int] = []
    problems: list[tuple[str, str]] = []
    for k, path in enumerate(files):
        try:
            image = resample(decode_image(path), mpp, target_mpp)
            cut = cut_patches(image, path.stem)
        except PatchDecodeError as exc:
            problems.append((str(path), f"{exc} (tile read at {mpp} µm/px)"))
            continue
        ids += [name for name, _ in cut]
        patches += [patch for _, patch in cut]
        tiles += [k] * len(cut)
    empty = np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    images = np.stack(patches) if patches else empty
    return TilePatches(ids, images, np.asarray(tiles, np.int64), problems)
