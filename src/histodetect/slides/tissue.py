"""Tissue detection: keep every piece of stained tissue, skip glass, ink, dust, borders and blur."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import measure, morphology

from histodetect import PATCH_SIZE
from histodetect.slides.wsi.readers import SlideReader
from histodetect.slides.wsi.resolution import PCAM_MPP, Resolution, read_thumbnail

THUMB_CELL_PX = 4  # thumbnail pixels per cell side: fine enough for tissue fractions per cell
MAX_THUMB_SIDE = 8192
# Optical density (natural log, Euclidean over RGB) that sets tissue apart from the glass
# colour; at least this much, more when the glass itself is noisy. Pale eosin lies at ~0.15.
MIN_OD_STEP = 0.05
# A 32 px block is sharp when its mean |Laplacian| is at least this share of its grey-level
# std. The sharpest block of a real patch lies above 0.31 for 99.8 % of the Kaggle sample
# (median 2.2); a Gaussian blur of sigma 3 px brings every one under 0.2, sigma 4 under 0.12.
MIN_FOCUS = 0.25
MIN_FOCUS_CONTRAST = 4.0  # grey-level std below which a block is too flat to judge focus
FAT_HOLE_UM = 250.0  # glass-like holes inside tissue up to this diameter are fat or lumen
MIN_PIECE_UM2 = 1500.0  # unstained pieces smaller than this (~40 µm square) are dust or dirt
MIN_STAIN_SATURATION = 0.08  # a piece this saturated somewhere is stained: kept, however small


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of 8-bit RGB, in [0, 1]."""
    hi = rgb.max(axis=-1).astype(np.float32)
    return (hi - rgb.min(axis=-1)) / np.maximum(hi, 1.0)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-ln((I + 1) / 257)`` of 8-bit RGB (0 for white)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 257.0)


def glass_density(od: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The glass colour (as optical density) and its noise, from the brightest grey pixels.

    Glass is bright and unsaturated; its colour varies by scanner and slide, so it is
    measured, not assumed. A thumbnail with almost no glass falls back to white.
    """
    candidates = od[(saturation(rgb) < 0.1) & (rgb.max(axis=-1) > 180)]
    if len(candidates) < max(16, od.shape[0] * od.shape[1] // 100):
        return np.zeros(3, np.float32), 0.0
    total = candidates.sum(axis=1)
    glass = candidates[total <= np.median(total)]  # the brighter half: never pale tissue
    centre = np.median(glass, axis=0)
    step = np.sqrt(((glass - centre) ** 2).sum(axis=1))
    return centre, float(1.4826 * np.median(step))


def not_tissue_colours(rgb: np.ndarray) -> np.ndarray:
    """Pixels no H&E stain makes: pen ink (blue, green, black), black borders, dark dust.

    Haematoxylin and eosin both absorb green at least as much as red, so stained tissue has
    red >= green; blue and green inks absorb red. Near-black grey is a scanner border, black
    ink or dirt; stained nuclei that dark are still coloured. A fully absorbed channel
    (saturation >= 0.9) is ink, a label or a drawing: none of the real sample's thumbnails
    has one.
    """
    rgb = rgb.astype(np.int16)
    r, g = rgb[..., 0], rgb[..., 1]
    hi, sat = rgb.max(axis=-1), saturation(rgb)
    ink = g > r + 8
    black = (hi < 60) & (sat < 0.3)
    # A channel that absorbs nothing beside one that absorbs much: stains absorb every
    # channel a little, so this is a drawing or a label, not tissue.
    drawn = (hi >= 253) & (sat > 0.2)
    return ink | black | drawn | (sat >= 0.9)


def tissue_mask(rgb: np.ndarray, px_um: float) -> np.ndarray:
    """Tissue in a thumbnail: pixels whose colour differs from the glass, and not ink or dirt.

    Fat, loose stroma and pale eosin are faint but not glass-coloured, so the test is a step
    in optical density away from the slide's own glass colour (robust to tinted or grey
    backgrounds), not a saturation threshold. Then scikit-image morphology: a closing joins
    broken membranes, unstained pieces under ``MIN_PIECE_UM2`` go (dust, dirt), and
    glass-like holes inside tissue up to ``FAT_HOLE_UM`` across are filled (fat, vessels).

    Args:
        rgb: (H, W, 3) uint8 thumbnail.
        px_um: µm per thumbnail pixel, to size the removed specks and the filled holes.

    Returns:
        (H, W) bool tissue mask.
    """
    od = optical_density(rgb)
    glass, noise = glass_density(od, rgb)
    # Tissue absorbs light: only density above the glass counts (a blank patch brighter
    # than the glass around it holds nothing).
    step = np.sqrt((np.maximum(od - glass, 0.0) ** 2).sum(axis=-1))
    # The fringe of a pen stroke or border mixes ink with glass into a faint tint that no
    # colour rule can tell from pale stain: everything within 2 px of them goes with them.
    foreign = morphology.dilation(not_tissue_colours(rgb), morphology.disk(2))
    mask = (step > max(MIN_OD_STEP, 4.0 * noise)) & ~foreign
    # A fat cell's membranes are thinner than a thumbnail pixel and break into dots and
    # diagonal dashes: closing joins them back into one net before pieces are weighed.
    mask = morphology.closing(mask, morphology.footprint_rectangle((3, 3)))
    mask = _without_debris(mask, rgb, int(MIN_PIECE_UM2 / px_um**2))
    hole_px = int(np.pi / 4 * (FAT_HOLE_UM / px_um) ** 2)
    return morphology.remove_small_holes(mask, max_size=max(hole_px, 1))


def _without_debris(mask: np.ndarray, rgb: np.ndarray, small: int) -> np.ndarray:
    """Remove small pieces that are not stained: dust and dirt. A small stained piece stays:
    a few tumour cells alone on the glass are what a lab must not miss."""
    pieces = measure.label(mask, connectivity=2)
    if pieces.max() == 0:
        return mask
    sizes = np.bincount(pieces.ravel())
    colour = ndimage.maximum(saturation(rgb), pieces, index=np.arange(len(sizes)))
    debris = (sizes <= small) & (np.asarray(colour) < MIN_STAIN_SATURATION)
    debris[0] = False
    return mask & ~debris[pieces]


def _window_centres(n: int, stride: float, scale: float, size: int) -> np.ndarray:
    """Index, in a map ``scale`` times smaller, of the centre of each of ``n`` cells."""
    centres = ((np.arange(n) + 0.5) * stride / scale).astype(np.int64)
    return np.clip(centres, 0, size - 1)


def window_tissue(mask: np.ndarray, grid: tuple[int, int], stride: int, t: float) -> np.ndarray:
    """Share of tissue in each cell's 96 px window (what the model looks at).

    Args:
        mask: Tissue mask of a thumbnail ``t`` times smaller than the analysed image.
        grid: (rows, cols) cells at ``stride`` px.
        stride: Cell side in analysed pixels; each window is the 96 px centred on its cell.
        t: Analysed pixels per thumbnail pixel.

    Returns:
        (rows, cols) float32 tissue share; outside the thumbnail counts as no tissue.
    """
    size = max(1, round(PATCH_SIZE / t))
    share = ndimage.uniform_filter(mask.astype(np.float32), size, mode="constant")
    rows = _window_centres(grid[0], stride, t, mask.shape[0])
    cols = _window_centres(grid[1], stride, t, mask.shape[1])
    return share[np.ix_(rows, cols)]


def in_focus(tile: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """Which cells' 96 px windows of a tile are in focus.

    A window is in focus when any of its nine 32 px blocks is sharp: mean |Laplacian| at
    least ``MIN_FOCUS`` times the block's grey-level std. Blocks, not whole windows, because a
    window at the edge of tissue is mostly smooth glass around a sharp strand. Blocks flatter
    than ``MIN_FOCUS_CONTRAST`` (glass, or blank) are not judged; a window of only such blocks
    counts as in focus, since its content, not its focus, decides whether it is tissue.

    Args:
        tile: uint8 RGB pixels whose windows start at ``(i * stride, j * stride)``.
        grid: (rows, cols) windows.
        stride: Step between windows in pixels.

    Returns:
        (rows, cols) bool.
    """
    grey = tile.astype(np.float32).mean(axis=-1)
    block = PATCH_SIZE // 3
    mean = ndimage.uniform_filter(grey, block, mode="nearest")
    square = ndimage.uniform_filter(grey * grey, block, mode="nearest")
    edges = np.abs(ndimage.laplace(grey, mode="nearest"))
    sharp = ndimage.uniform_filter(edges, block, mode="nearest")
    judged = np.zeros(grid, bool)
    focused = np.zeros(grid, bool)
    for dy in range(3):
        for dx in range(3):
            rows = np.minimum(np.arange(grid[0]) * stride + dy * block + block // 2, len(grey) - 1)
            cols = np.minimum(
                np.arange(grid[1]) * stride + dx * block + block // 2, grey.shape[1] - 1
            )
            at = np.ix_(rows, cols)
            contrast = np.sqrt(np.maximum(square[at] - mean[at] ** 2, 0.0))
            textured = contrast >= MIN_FOCUS_CONTRAST
            judged |= textured
            focused |= textured & (sharp[at] >= MIN_FOCUS * contrast)
    return focused | ~judged


def tissue_cells(
    reader: SlideReader, res: Resolution, stride: int, min_tissue: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Which ``stride`` px cells of the working image have at least ``min_tissue`` tissue in
    their 96 px window: the one decision `slide` maps and `extract` samples from.

    Returns:
        The (rows, cols) bool grid, the thumbnail it was judged on, and the thumbnail's
        downsample ``t`` from the working image.
    """
    w, h = res.size
    grid = (math.ceil(h / stride), math.ceil(w / stride))
    t = max(stride / THUMB_CELL_PX, max(w, h) / MAX_THUMB_SIDE, 1.0)
    thumb = read_thumbnail(reader, res, t)
    # Unknown resolution: the image is taken to be at PCam's (as choose_resolution does).
    mask = tissue_mask(thumb, t * (res.mpp or PCAM_MPP))
    return window_tissue(mask, grid, stride, t) >= max(min_tissue, 1e-6), thumb, t
