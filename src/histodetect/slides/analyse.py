"""Whole-slide tumour maps: read a slide, mask tissue, predict every cell, outline regions."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from histodetect import PATCH_SIZE, __version__
from histodetect.data.transforms import dihedral
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.models.dense import dense_logits, patch_feature_size

# PCam's patches come from Camelyon16 scanned at 0.243 µm/px and downsampled 4x (10x).
PCAM_MPP = 0.972
MPP_TOLERANCE = 0.10  # a level within 10% of the target is used as it is, without resampling
# Resolution tags outside this range are software defaults (72 dpi = 352.8 µm/px), not a scan.
PLAUSIBLE_MPP = (0.05, 50.0)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
TILE_CELLS = 32  # cells per inference tile side: 1088 px at stride 32, ~150 MB peak in dense mode
THUMB_CELL_PX = 4  # thumbnail pixels per cell side: fine enough for tissue fractions per cell
MAX_THUMB_SIDE = 8192
OVERLAY_SIDE = 2048  # longest side of overlay.png
DEFAULT_MIN_TISSUE = 0.25


# ----------------------------------------------------------------------------- public interface


@dataclass(frozen=True)
class RegionMap:
    """A tumour probability map on a grid of stride x stride cells, and its tumour regions.

    Cell (r, c) covers input pixels ``[r * stride, (r + 1) * stride)`` x
    ``[c * stride, (c + 1) * stride)``; its probability is the model's P(tumour in the centre
    32x32) for the 96x96 patch centred on that cell (at stride 32 the centre box is the cell).

    Attributes:
        prob: (rows, cols) float32 P(tumour) per cell; 0 where there is no tissue.
        tissue: (rows, cols) bool, the cells that were sent to the model.
        stride: Pixels per cell side in the input image.
        regions: Connected groups of tissue cells with ``prob >= threshold``, most suspicious
            first, each ``{"id", "area_px", "area_mm2" (None when mpp is unknown),
            "max_prob", "mean_prob", "polygon": [[x, y], ...], "holes": [[[x, y], ...], ...],
            "longest_diameter_px", "longest_diameter_mm"}``; polygons are closed rings of
            cell corners in input-image pixels, clipped to the image.
        threshold: The probability at or above which cells form regions.
        mode: ``"dense"`` (one convolutional pass per tile) or ``"patch"`` (one per patch).
    """

    prob: np.ndarray
    tissue: np.ndarray
    stride: int
    regions: list[dict]
    threshold: float = 0.5
    mode: str = "patch"


def map_image(
    predictor: Predictor,
    image: np.ndarray,
    *,
    stride: int = 32,
    tta: int = 1,
    threshold: float | None = None,
    mpp: float | None = None,
    mode: str = "auto",
) -> RegionMap:
    """Tumour map of an in-memory uint8 RGB image (H, W, 3), H and W >= 96.

    Tissue is detected on the image itself; background cells are not sent to the model. This
    is the same code path as ``histodetect slide`` with the image as a one-level slide.

    Args:
        predictor: A loaded run (``Predictor.from_run``).
        image: (H, W, 3) uint8 RGB pixels, at about the model's training resolution
            (PCam: 0.97 µm/px).
        stride: Cell size in pixels (32 = one cell per labelled centre box).
        tta: 1, 2, 4 or 8 dihedral views averaged.
        threshold: Region threshold; default the run's threshold (``model.json``).
        mpp: µm per pixel of ``image``, for region areas in mm² (None: areas not given).
        mode: ``"auto"`` (dense when the model allows it), ``"dense"`` or ``"patch"``.

    Returns:
        The ``RegionMap``.

    Raises:
        HistodetectError: for a wrong shape or dtype, an image smaller than one patch, or
            ``mode="dense"`` with a model or stride that cannot do it.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise HistodetectError(
            f"map_image needs a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}."
        )
    reader = ArrayReader(image, mpp=mpp)
    res = choose_resolution(reader, level=0)
    analysis = analyse(
        predictor,
        reader,
        res,
        stride=stride,
        tta=tta,
        threshold=threshold,
        mode=mode,
        progress=False,
    )
    return analysis.region_map


def overlay_png(image: np.ndarray, region_map: RegionMap) -> bytes:
    """PNG bytes: the heatmap blended over the image, regions outlined.

    Args:
        image: The (H, W, 3) uint8 image given to ``map_image``.
        region_map: Its ``RegionMap``.
    """
    image = np.asarray(image)
    rings = [[r["polygon"], *r.get("holes", [])] for r in region_map.regions]
    picture = render_overlay(image, region_map.prob, region_map.tissue, region_map.stride, rings)
    return png_bytes(picture)


# ----------------------------------------------------------------------------- slide readers


class SlideReader:
    """Pixels of one slide or image at any pyramid level; coordinates are per level."""

    backend = "?"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.dims: list[tuple[int, int]] = []  # (width, height) of every level
        self.downsamples: list[float] = []  # level-0 px per level px
        self.mpp: float | None = None  # µm per level-0 pixel
        self.vendor = ""
        self.synthetic = False

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "image"

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the level's pixels [y, y+h) x [x, x+w); white outside."""
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        width, height = self.dims[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            return np.full((h, w, 3), 255, np.uint8)
        try:
            inner = self._read(level, x0, y0, x1 - x0, y1 - y0)
        except HistodetectError:
            raise
        except Exception as exc:  # every backend has its own error types
            raise HistodetectError(
                f"{self.name}: cannot read pixels at level {level}, x {x0}, y {y0} "
                f"({type(exc).__name__}: {exc or 'no detail'}); damaged, or an encoding "
                "this reader lacks"
            ) from None
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return inner
        out = np.full((h, w, 3), 255, np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inner
        return out

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""


class ArrayReader(SlideReader):
    """An in-memory RGB image as a one-level slide."""

    backend = "array"

    def __init__(self, image: np.ndarray, mpp: float | None = None, path: Path | None = None):
        super().__init__(path)
        self.image = image
        self.dims = [(image.shape[1], image.shape[0])]
        self.downsamples = [1.0]
        self.mpp = mpp

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.image[y : y + h, x : x + w]


def _rgb(array: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA uint8 pixels as RGB; transparent parts become white (no tissue)."""
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.uint16)
        rgb = (array[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    return array[..., :3]


class _OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        super().__init__(path)
        self._slide = openslide.OpenSlide(str(path))
        self.dims = [tuple(d) for d in self._slide.level_dimensions]
        self.downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "") or "openslide"
        try:
            self.mpp = float(props[openslide.PROPERTY_NAME_MPP_X])
        except (KeyError, ValueError):
            self.mpp = None
        self.synthetic = "SYNTHETIC" in props.get("tiff.ImageDescription", "")

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.downsamples[level]
        region = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        return _rgb(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


class _TiffReader(SlideReader):
    """Plain or pyramidal TIFF through tifffile, decoding only the tiles or strips needed."""

    backend = "tifffile"
    CACHE_BYTES = 128 << 20  # decoded segments kept: a few rows of tiles across a wide slide

    def __init__(self, path: Path) -> None:
        import tifffile

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        try:
            series = self._tif.series[0]
        except IndexError:
            raise HistodetectError(f"{path}: a TIFF without any image.") from None
        self._pages = []
        for level in _tiff_levels(self._tif, series):
            page = level.keyframe
            axes = level.axes.replace("S", "")
            if axes != "YX" or page.dtype != np.uint8:
                raise HistodetectError(
                    f"{path}: not an 8-bit RGB or grey image (axes {level.axes}, "
                    f"{page.dtype}); whole-slide maps need brightfield RGB."
                )
            if level.shape[-1] not in (3, 4) and len(level.shape) == 3:
                raise HistodetectError(f"{path}: {level.shape[-1]} samples per pixel, not RGB.")
            self._pages.append(page)
        width0 = self._pages[0].shape[1]
        self.dims = [(p.shape[1], p.shape[0]) for p in self._pages]
        self.downsamples = [width0 / w for w, _ in self.dims]
        page = self._pages[0]
        self.vendor = "tiff"
        self.mpp = _tiff_mpp(page)
        self.synthetic = "SYNTHETIC" in (page.description or "")

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            page = self._pages[level]
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count) if count else None
        seg, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        if seg is None:  # an empty (never written) segment
            seg = np.zeros(shape, np.uint8)
        seg = _rgb(seg.reshape(shape[1:]))
        with self._lock:
            self._cache[key] = seg
            self._cached += seg.nbytes
            while self._cached > self.CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return seg

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if page.planarconfig != 1 or not page.dataoffsets:
            raise HistodetectError(f"{self.path}: separate colour planes are not supported.")
        width = page.shape[1]
        if page.is_tiled:
            th, tw = page.tilelength, page.tilewidth
        else:
            th, tw = (page.rowsperstrip or page.shape[0]), width
        across = -(-width // tw)
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                seg = self._segment(level, ty * across + tx)
                sy0, sx0 = ty * th, tx * tw
                ya, yb = max(y, sy0), min(y + h, sy0 + seg.shape[0])
                xa, xb = max(x, sx0), min(x + w, sx0 + seg.shape[1])
                out[ya - y : yb - y, xa - x : xb - x] = seg[
                    ya - sy0 : yb - sy0, xa - sx0 : xb - sx0
                ]
        return out

    def close(self) -> None:
        self._tif.close()


def _tiff_levels(tif, series) -> list:
    """The pyramid: the first series' levels, plus reduced-resolution pages of the same shape
    ratio that tifffile files as separate series (it groups only levels halving each time)."""
    levels = list(series.levels)
    height, width = levels[0].shape[:2]
    for other in tif.series[1:]:
        page = other.keyframe
        h, w = other.shape[:2]
        smallest = levels[-1].shape[1]
        if page.is_reduced and w < smallest and abs(h / w - height / width) < 0.02 * h / w + 2 / w:
            levels.append(other)
    return levels


def _tiff_mpp(page) -> float | None:
    """µm/px from the resolution tags, else from an Aperio-style 'MPP = x' description."""
    import re

    unit = int(page.resolutionunit)
    xres = page.resolution[0] if page.resolution else 0
    if xres and unit in (2, 3):  # inch, centimetre
        return (25400.0 if unit == 2 else 10000.0) / xres
    found = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    return float(found.group(1)) if found else None


class _ImageReader(ArrayReader):
    backend = "pillow"

    def __init__(self, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            dpi = im.info.get("dpi")
            rgb = _rgb(np.asarray(im.convert("RGBA")))
        mpp = 25400.0 / float(dpi[0]) if dpi and dpi[0] else None
        super().__init__(rgb, mpp=mpp, path=path)
        self.vendor = "image"


def open_slide(path: str | Path, slide_mpp: float | None = None) -> SlideReader:
    """Open a whole-slide image (OpenSlide formats, TIFF) or an ordinary PNG/JPEG image.

    OpenSlide is tried first (.svs, .tif, .ndpi, .mrxs, .scn, .vms, .bif, DICOM...), then
    tifffile for TIFFs OpenSlide does not take; PNG/JPEG/BMP/WebP go through Pillow.

    Args:
        path: The slide file.
        slide_mpp: µm per level-0 pixel, replacing what the file says (or does not say).

    Raises:
        HistodetectError: naming the file and why no reader could open it.
    """
    path = Path(path)
    if not path.is_file():
        raise HistodetectError(f"{path}: no such file.")
    reasons: list[str] = []
    reader: SlideReader | None = None
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            reader = _ImageReader(path)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            reasons.append(f"Pillow: {exc}")
    else:
        for make in (_OpenSlideReader, _TiffReader):
            try:
                reader = make(path)
            except HistodetectError as exc:
                reasons.append(f"{make.backend}: {str(exc).removeprefix(f'{path}: ')}")
                continue
            except Exception as exc:  # openslide and tifffile raise many types
                text = str(exc) or type(exc).__name__
                if make is _TiffReader and "not a TIFF" in text:
                    text = "not a TIFF file"
                reasons.append(f"{make.backend}: {text}")
                continue
            try:
                # Decode one pixel of the smallest level now: a file that opens but whose
                # pixel data is broken fails here, with its name, not halfway through.
                reader.read(len(reader.dims) - 1, 0, 0, 1, 1)
                break
            except HistodetectError as exc:
                reader.close()
                reader = None
                reasons.append(f"{make.backend}: {str(exc).removeprefix(f'{path}: ')}")
    if reader is None:
        raise HistodetectError(
            f"{path}: cannot open this file as a slide or image ({'; '.join(reasons)}). "
            "Supported: OpenSlide formats (.svs, .ndpi, .mrxs, .scn, tiled .tif...), plain or "
            "pyramidal TIFF, PNG and JPEG."
        )
    if slide_mpp is not None:
        reader.mpp = float(slide_mpp)
    elif reader.mpp is not None and not PLAUSIBLE_MPP[0] <= reader.mpp <= PLAUSIBLE_MPP[1]:
        reader.mpp = None  # e.g. 72 dpi written by imaging software: not a microscope scale
    return reader


# ----------------------------------------------------------------------------- resolution


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


# ----------------------------------------------------------------------------- tissue


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Stained tissue in a thumbnail: saturated, H&E-coloured pixels (Otsu on saturation).

    Glass is unsaturated; Otsu finds the cut between glass and stain, clipped to [0.07, 0.2]
    so that a slide with only glass (or only tissue) is not split in two. Haematoxylin and
    eosin both absorb green most, so stained tissue is never green-dominant, and never has a
    fully absorbed channel (saturation ~1): that rejects ink, pen marks, labels and drawings.
    Specks smaller than 3x3 thumbnail pixels are removed.
    """
    from scipy import ndimage

    rgb = rgb.astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = rgb.max(axis=-1)
    sat = (hi - rgb.min(axis=-1)) / np.maximum(hi, 1)
    cut = min(max(otsu_threshold(sat), 0.07), 0.2)
    mask = (sat > cut) & (sat < 0.9) & (g < np.maximum(r, b)) & (hi >= 40)
    return ndimage.binary_opening(mask, np.ones((3, 3), bool))


def tissue_cells(mask: np.ndarray, grid: tuple[int, int], cell_px: float) -> np.ndarray:
    """Fraction of tissue per cell, from a mask with ``cell_px`` mask pixels per cell side."""
    from PIL import Image

    rows, cols = grid
    need_h, need_w = math.ceil(rows * cell_px), math.ceil(cols * cell_px)
    padded = np.zeros((max(need_h, mask.shape[0]), max(need_w, mask.shape[1])), np.float32)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    img = Image.fromarray(padded)  # float32: mode "F"
    small = img.resize(
        (cols, rows), Image.Resampling.BOX, box=(0, 0, cols * cell_px, rows * cell_px)
    )
    return np.asarray(small)


# ----------------------------------------------------------------------------- inference


def resolve_mode(predictor: Predictor, stride: int, mode: str) -> str:
    """``auto`` → ``dense`` when the model is padding-free and the stride fits, else ``patch``."""
    from histodetect.models.dense import DENSE_ARCH, dense_capable

    if mode not in ("auto", "dense", "patch"):
        raise HistodetectError(f"--mode must be auto, dense or patch, got {mode!r}.")
    if mode == "patch":
        return mode
    capable = dense_capable(predictor.model)
    step = getattr(predictor.model.backbone, "dense_stride", 0)
    fits = capable and stride % step == 0
    if mode == "dense" and not fits:
        why = (
            f"the model ({predictor.meta.get('arch')}) has zero padding; train --arch "
            f"{DENSE_ARCH} for dense maps"
            if not capable
            else f"--stride must be a multiple of {step} for dense mode"
        )
        raise HistodetectError(f"dense mode impossible: {why}, or use --mode patch.")
    return "dense" if fits else "patch"


@dataclass
class InferenceStats:
    """What the inference loop did."""

    patches: int = 0
    tiles: int = 0
    tiles_skipped: int = 0
    seconds: float = 0.0


def predict_cells(
    read: Callable[[int, int, int, int], np.ndarray],
    tissue: np.ndarray,
    predictor: Predictor,
    stride: int,
    *,
    tta: int = 1,
    mode: str = "patch",
    batch_size: int = 256,
    tile_cells: int = TILE_CELLS,
    progress: bool = False,
    desc: str = "slide",
) -> tuple[np.ndarray, InferenceStats]:
    """P(tumour) of every tissue cell, streaming tiles of ``tile_cells`` x ``tile_cells`` cells.

    Each tile is read with the 96 px patch context around its cells (the next tiles are read
    in a background thread while the model runs); tiles without tissue are never read. In
    ``patch`` mode the tissue cells' 96 px patches go to ``predictor.predict_proba`` in
    batches; in ``dense`` mode the whole tile goes through the padding-free model once.
    Memory: a couple of tiles and one batch, whatever the slide's size.
    """
    from tqdm.auto import tqdm

    if tta not in (1, 2, 4, 8):
        raise HistodetectError(f"--tta must be one of (1, 2, 4, 8), got {tta}.")
    rows, cols = tissue.shape
    prob = np.zeros((rows, cols), np.float32)
    stats = InferenceStats()
    offset = stride // 2 - PATCH_SIZE // 2  # patch top-left of cell 0: centred on the cell
    tiles = []
    for r0 in range(0, rows, tile_cells):
        for c0 in range(0, cols, tile_cells):
            if tissue[r0 : r0 + tile_cells, c0 : c0 + tile_cells].any():
                tiles.append((r0, c0))
            else:
                stats.tiles_skipped += 1
    stats.tiles = len(tiles)

    def load(tile: tuple[int, int]) -> np.ndarray:
        r0, c0 = tile
        r1, c1 = min(r0 + tile_cells, rows), min(c0 + tile_cells, cols)
        w = (c1 - c0 - 1) * stride + PATCH_SIZE
        h = (r1 - r0 - 1) * stride + PATCH_SIZE
        return read(c0 * stride + offset, r0 * stride + offset, w, h)

    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_pending = 0

    def flush() -> None:
        nonlocal n_pending
        if not pending:
            return
        patches = np.concatenate([p for _, _, p in pending])
        out = predictor.predict_proba(patches, tta, batch_size)
        k = 0
        for rr, cc, p in pending:
            prob[rr, cc] = out[k : k + len(p)]
            k += len(p)
        pending.clear()
        n_pending = 0

    t0 = time.perf_counter()
    bar = tqdm(total=int(tissue.sum()), unit="patch", desc=desc, disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = [pool.submit(load, t) for t in tiles[:2]]
        for i, (r0, c0) in enumerate(tiles):
            pixels = ahead.pop(0).result()
            if i + 2 < len(tiles):
                ahead.append(pool.submit(load, tiles[i + 2]))
            r1, c1 = min(r0 + tile_cells, rows), min(c0 + tile_cells, cols)
            here = tissue[r0:r1, c0:c1]
            rr, cc = np.nonzero(here)
            if mode == "dense":
                from histodetect.slides.analyse import dense_proba

                step = stride // predictor.model.backbone.dense_stride
                out = dense_proba(predictor, pixels, tta, step)
                prob[rr + r0, cc + c0] = out[rr, cc]
            else:
                from numpy.lib.stride_tricks import sliding_window_view

                windows = sliding_window_view(pixels, (PATCH_SIZE, PATCH_SIZE), axis=(0, 1))
                windows = windows[::stride, ::stride]  # (rows, cols, 3, 96, 96) views
                patches = np.ascontiguousarray(windows[rr, cc].transpose(0, 2, 3, 1))
                pending.append((rr + r0, cc + c0, patches))
                n_pending += len(patches)
                if n_pending >= batch_size:
                    flush()
            stats.patches += len(rr)
            bar.update(len(rr))
        flush()
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return prob, stats


# ----------------------------------------------------------------------------- regions


def _trace_rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Outlines of a 4-connected cell mask along cell edges, as closed rings of (x, y) corners.

    Every boundary edge is walked with the cells on its right (clockwise on screen, where y
    grows downwards); at a corner where two cells touch only diagonally the walk turns right,
    which keeps such cells apart as 4-connectivity does. Outer rings have a positive shoelace
    area, holes a negative one. Collinear corners are dropped.
    """
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    nxt: dict[tuple[int, int, int, int], tuple[int, int, int, int]] = {}
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (
        (m[:-2, 1:-1], (0, 0), (1, 0)),  # top edge, walked east
        (m[1:-1, 2:], (1, 0), (1, 1)),  # right edge, walked south
        (m[2:, 1:-1], (1, 1), (0, 1)),  # bottom edge, walked west
        (m[1:-1, :-2], (0, 1), (0, 0)),  # left edge, walked north
    )
    for neighbour, (ax, ay), (bx, by) in sides:
        rr, cc = np.nonzero(inner & ~neighbour)
        for r, c in zip(rr.tolist(), cc.tolist(), strict=True):
            edges.setdefault((c + ax, r + ay), []).append((c + bx, r + by))
    for (x0, y0), ends in list(edges.items()):
        for x1, y1 in ends:
            dx, dy = x1 - x0, y1 - y0
            options = edges[(x1, y1)]
            # Right turn first (heading (dx, dy), right is (-dy, dx) with y down), then ahead.
            for want in ((-dy, dx), (dx, dy), (dy, -dx)):
                end = (x1 + want[0], y1 + want[1])
                if end in options:
                    nxt[(x0, y0, x1, y1)] = (x1, y1, *end)
                    break
    rings = []
    seen: set[tuple[int, int, int, int]] = set()
    for start in nxt:
        if start in seen:
            continue
        ring = []
        edge = start
        while edge not in seen:
            seen.add(edge)
            ring.append(edge)
            edge = nxt[edge]
        points = [(e[0], e[1]) for e in ring]
        corners = [
            p
            for i, p in enumerate(points)
            if (points[i - 1][0] - p[0], points[i - 1][1] - p[1])
            != (p[0] - points[(i + 1) % len(points)][0], p[1] - points[(i + 1) % len(points)][1])
        ]
        rings.append([*corners, corners[0]])
    return rings


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def _longest_diameter(points: np.ndarray) -> float:
    """Largest distance between two outline points (on their convex hull when there are many)."""
    if len(points) > 64:
        from scipy.spatial import ConvexHull, QhullError

        with contextlib.suppress(QhullError):  # collinear points: keep them all
            points = points[ConvexHull(points).vertices]
    d = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max()) if len(points) else 0.0


def find_regions(
    prob: np.ndarray,
    tissue: np.ndarray,
    threshold: float,
    cell: float,
    *,
    bounds: tuple[float, float],
    mpp: float | None = None,
) -> list[dict]:
    """Connected (4-neighbour) tissue cells with ``prob >= threshold``, as region records.

    Args:
        prob: Cell probabilities.
        tissue: Cells that were predicted.
        threshold: Region threshold.
        cell: Output pixels per cell side (stride x level-0 scale for slides).
        bounds: (width, height) in output pixels; outlines are clipped to it.
        mpp: µm per output pixel, for areas in mm² and diameters in mm.

    Returns:
        Regions sorted by max probability (then area), ids from 1; see ``RegionMap``.
    """
    from scipy import ndimage

    labels, _ = ndimage.label(tissue & (prob >= threshold))
    regions = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == k
        rings = []
        for ring in _trace_rings(own):
            pts = np.asarray(ring, np.float64)
            pts[:, 0] = np.minimum((pts[:, 0] + sl[1].start) * cell, bounds[0])
            pts[:, 1] = np.minimum((pts[:, 1] + sl[0].start) * cell, bounds[1])
            rings.append(pts)
        rings.sort(key=_shoelace, reverse=True)  # the outer ring first, holes after
        area = sum(_shoelace(r) for r in rings)
        values = prob[sl][own]
        diameter = _longest_diameter(rings[0][:-1])
        cy, cx = ndimage.center_of_mass(own)
        regions.append(
            {
                "area_px": area,
                "area_mm2": area * mpp**2 / 1e6 if mpp else None,
                "max_prob": float(values.max()),
                "mean_prob": float(values.mean()),
                "cells": int(own.sum()),
                "centroid": [(cx + sl[1].start + 0.5) * cell, (cy + sl[0].start + 0.5) * cell],
                "longest_diameter_px": diameter,
                "longest_diameter_mm": diameter * mpp / 1000 if mpp else None,
                "polygon": rings[0].tolist(),
                "holes": [r.tolist() for r in rings[1:]],
            }
        )
    regions.sort(key=lambda r: (-r["max_prob"], -r["area_px"]))
    for i, region in enumerate(regions, start=1):
        region["id"] = i
    return [{"id": r.pop("id"), **r} for r in regions]


# ----------------------------------------------------------------------------- analysis


@dataclass
class Analysis:
    """Everything one map computed: the RegionMap in working pixels plus slide context."""

    region_map: RegionMap
    resolution: Resolution
    thumbnail: np.ndarray
    thumb_px: float  # working px per thumbnail px
    stats: InferenceStats
    regions_level0: list[dict] = field(default_factory=list)


def analyse(
    predictor: Predictor,
    reader: SlideReader,
    res: Resolution,
    *,
    stride: int = 32,
    tta: int = 1,
    threshold: float | None = None,
    mode: str = "auto",
    min_tissue: float = DEFAULT_MIN_TISSUE,
    batch_size: int = 256,
    tile_cells: int = TILE_CELLS,
    progress: bool = True,
) -> Analysis:
    """Thumbnail → tissue mask → tiled inference → regions: the one path for images and slides.

    Raises:
        HistodetectError: when the analysed image is smaller than one patch, for bad
            options, or when pixels cannot be read.
    """
    if not 1 <= stride <= 4 * PATCH_SIZE:
        raise HistodetectError(f"--stride must be 1 to {4 * PATCH_SIZE} px, got {stride}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise HistodetectError(f"--min-tissue must be between 0 and 1, got {min_tissue}.")
    w, h = res.size
    if w < PATCH_SIZE or h < PATCH_SIZE:
        at = f" at {res.mpp:.3g} µm/px" if res.mpp else ""
        raise HistodetectError(
            f"{reader.name}: the image is {w}x{h} px{at}, smaller than one {PATCH_SIZE}x"
            f"{PATCH_SIZE} patch; there is nothing to map."
        )
    mode = resolve_mode(predictor, stride, mode)
    threshold = predictor.threshold if threshold is None else float(threshold)
    grid = (math.ceil(h / stride), math.ceil(w / stride))
    t = max(stride / THUMB_CELL_PX, max(w, h) / MAX_THUMB_SIDE, 1.0)
    thumb = read_thumbnail(reader, res, t)
    fraction = tissue_cells(tissue_mask(thumb), grid, stride / t)
    tissue = fraction >= max(min_tissue, 1e-6)
    prob, stats = predict_cells(
        working_reader(reader, res),
        tissue,
        predictor,
        stride,
        tta=tta,
        mode=mode,
        batch_size=batch_size,
        tile_cells=tile_cells,
        progress=progress,
        desc=Path(reader.name).name,
    )
    regions = find_regions(prob, tissue, threshold, stride, bounds=(w, h), mpp=res.mpp)
    region_map = RegionMap(prob, tissue, stride, regions, threshold, mode)
    analysis = Analysis(region_map, res, thumb, t, stats)
    if res.scale == 1.0:
        analysis.regions_level0 = regions
    else:
        level0 = (w * res.scale, h * res.scale)
        analysis.regions_level0 = find_regions(
            prob, tissue, threshold, stride * res.scale, bounds=level0, mpp=reader.mpp
        )
    return analysis


# ----------------------------------------------------------------------------- pictures


def png_bytes(image) -> bytes:
    """PNG bytes of a PIL image or an array (uint8 RGB or grey, uint16 grey)."""
    from PIL import Image

    buf = io.BytesIO()
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image))
    image.save(buf, format="PNG")
    return buf.getvalue()


def render_overlay(
    base: np.ndarray,
    prob: np.ndarray,
    tissue: np.ndarray,
    cell: float,
    rings: list[list[list[list[float]]]],
    caption: str = "",
    ring_scale: float = 1.0,
):
    """A PIL image: the heatmap (jet) over ``base`` on tissue cells, regions outlined in cyan.

    Args:
        base: RGB picture (thumbnail or image).
        prob: Cell probabilities.
        tissue: Cells to colour.
        cell: ``base`` pixels per cell side.
        rings: Per region, its rings of (x, y) points.
        caption: Text for the footer (with a colour bar for P(tumour)).
        ring_scale: Multiplies ring coordinates into ``base`` pixels.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    h, w = base.shape[:2]
    rows, cols = prob.shape
    heat = (colormaps["jet"](prob)[..., :3] * 255).astype(np.uint8)
    big = (max(w, math.ceil(cols * cell)), max(h, math.ceil(rows * cell)))
    box = (0, 0, big[0] / cell, big[1] / cell)
    heat_img = np.asarray(Image.fromarray(heat).resize(big, Image.Resampling.NEAREST, box=box))
    alpha = np.where(tissue, 0.25 + 0.5 * prob, 0.0).astype(np.float32)
    alpha_img = Image.fromarray(alpha).resize(big, Image.Resampling.NEAREST, box=box)
    a = np.asarray(alpha_img)[:h, :w, None]
    mixed = base.astype(np.float32) * (1 - a) + heat_img[:h, :w].astype(np.float32) * a
    picture = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(w, h) / 600))
    for region in rings:
        for ring in region:
            pts = [(x * ring_scale, y * ring_scale) for x, y in ring]
            if len(pts) > 1:
                draw.line(pts, fill=(0, 255, 255), width=width, joint="curve")
    if not caption:
        return picture
    # Footer: a colour bar for P(tumour) and the caption, wrapped to the picture's width.
    import textwrap

    lines = textwrap.wrap(caption, max(20, (w - 10) // 6))
    canvas = Image.new("RGB", (w, h + 32 + 12 * len(lines)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    bar_w = min(200, max(w - 10, 40))
    ramp = (colormaps["jet"](np.linspace(0, 1, bar_w))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (5, h + 4))
    draw.text((5, h + 16), "0", fill=(0, 0, 0))
    draw.text((5 + bar_w // 2 - 27, h + 16), "P(tumour)", fill=(0, 0, 0))
    draw.text((bar_w, h + 16), "1", fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((5, h + 30 + 12 * i), line, fill=(0, 0, 0))
    return canvas


# ----------------------------------------------------------------------------- one slide


@dataclass(frozen=True)
class SlideOptions:
    """Settings of `histodetect slide`; they are part of a slide's resume key."""

    stride: int = 32
    tta: int = 1
    threshold: float | None = None
    mode: str = "auto"
    level: int | None = None
    target_mpp: float = PCAM_MPP
    slide_mpp: float | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    batch_size: int = 256


OUTPUTS = {
    "prob_npy": "prob.npy",
    "prob_png": "prob.png",
    "tissue_png": "tissue.png",
    "overlay_png": "overlay.png",
    "geojson": "regions.geojson",
    "regions_csv": "regions.csv",
    "summary": "summary.json",
}


def analyse_slide(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    opts: SlideOptions = SlideOptions(),
    progress: bool = True,
) -> dict:
    """Map one slide and write every output into the folder ``out`` (atomically, file by file).

    Outputs: ``prob.npy`` (float32 cells), ``prob.png`` (16-bit: P x 65535), ``tissue.png``,
    ``overlay.png`` (heatmap on the thumbnail), ``regions.geojson`` (QuPath annotations in
    level-0 pixels), ``regions.csv`` and ``summary.json``, written last.

    Returns:
        The summary (as in ``summary.json``).

    Raises:
        HistodetectError: naming the file, when it cannot be opened or read, or is too small.
    """
    from histodetect.files import write_atomic

    path, out = Path(path), Path(out)
    t0 = time.perf_counter()
    reader = open_slide(path, opts.slide_mpp)
    try:
        res = choose_resolution(reader, opts.target_mpp, opts.level)
        analysis = analyse(
            predictor,
            reader,
            res,
            stride=opts.stride,
            tta=opts.tta,
            threshold=opts.threshold,
            mode=opts.mode,
            min_tissue=opts.min_tissue,
            batch_size=opts.batch_size,
            progress=progress,
        )
        # The overlay gets its own, larger picture than the tissue thumbnail: people read it.
        t_overlay = max(1.0, max(res.size) / OVERLAY_SIDE)
        base = read_thumbnail(reader, res, t_overlay)
    finally:
        reader.close()
    rm = analysis.region_map
    out.mkdir(parents=True, exist_ok=True)
    synthetic_model = bool(predictor.meta.get("synthetic"))
    tags = [
        text
        for text, on in (
            ("SYNTHETIC slide", reader.synthetic),
            ("model trained on SYNTHETIC data", synthetic_model),
        )
        if on
    ]

    buf = io.BytesIO()
    np.save(buf, rm.prob)
    write_atomic(out / OUTPUTS["prob_npy"], buf.getvalue())
    write_atomic(
        out / OUTPUTS["prob_png"],
        png_bytes(np.round(rm.prob * 65535).astype(np.uint16)),
    )
    write_atomic(out / OUTPUTS["tissue_png"], png_bytes(rm.tissue.astype(np.uint8) * 255))
    caption = f"{path.name}: regions >= {rm.threshold:.2f} outlined" + (
        f"  [{'; '.join(tags)}]" if tags else ""
    )
    rings = [[r["polygon"], *r["holes"]] for r in rm.regions]
    picture = render_overlay(
        base, rm.prob, rm.tissue, rm.stride / t_overlay, rings, caption, ring_scale=1 / t_overlay
    )
    write_atomic(out / OUTPUTS["overlay_png"], png_bytes(picture))
    regions = analysis.regions_level0
    write_atomic(out / OUTPUTS["geojson"], geojson_bytes(regions, path.name, tags))
    write_atomic(out / OUTPUTS["regions_csv"], regions_csv_bytes(regions))

    largest = max(regions, key=lambda r: r["area_px"], default=None)
    tissue_n = int(rm.tissue.sum())
    cell_mm2 = (rm.stride * res.mpp / 1000) ** 2 if res.mpp else None
    summary = {
        "slide": str(path),
        "synthetic": bool(tags),
        "warning": f"{'; '.join(tags)}: says nothing about real slides" if tags else None,
        "backend": reader.backend,
        "vendor": reader.vendor,
        "level0_size_px": list(reader.dims[0]),
        "level0_mpp": reader.mpp,
        "level": res.level,
        "level_downsample": reader.downsamples[res.level],
        "resample_factor": res.factor,
        "analysed_mpp": res.mpp,
        "analysed_size_px": list(res.size),
        "note": res.note or None,
        "model": {
            "arch": predictor.meta.get("arch"),
            "synthetic": synthetic_model,
            "crop": predictor.crop,
        },
        "mode": rm.mode,
        "tta": opts.tta,
        "stride_px": rm.stride,
        "grid": list(rm.prob.shape),
        "threshold": rm.threshold,
        "tissue_cells": tissue_n,
        "tissue_area_mm2": tissue_n * cell_mm2 if cell_mm2 else None,
        "patches_predicted": analysis.stats.patches,
        "tiles_read": analysis.stats.tiles,
        "tiles_skipped": analysis.stats.tiles_skipped,
        "score": float(rm.prob[rm.tissue].max()) if tissue_n else 0.0,
        "n_regions": len(regions),
        "tumour_area_mm2": sum(r["area_mm2"] for r in regions) if res.mpp else None,
        "largest_region": None
        if largest is None
        else {
            "id": largest["id"],
            "area_mm2": largest["area_mm2"],
            "longest_diameter_mm": largest["longest_diameter_mm"],
            "longest_diameter_px": largest["longest_diameter_px"],
        },
        "inference_seconds": round(analysis.stats.seconds, 3),
        "patches_per_s": round(analysis.stats.patches / analysis.stats.seconds, 1)
        if analysis.stats.seconds > 0 and analysis.stats.patches
        else None,
        "seconds": round(time.perf_counter() - t0, 3),
        "outputs": {k: str(out / v) for k, v in OUTPUTS.items()},
        "histodetect": __version__,
    }
    write_atomic(out / OUTPUTS["summary"], json.dumps(summary, indent=2).encode())
    return summary


def geojson_bytes(regions: list[dict], slide: str, tags: list[str] | None = None) -> bytes:
    """Regions as a QuPath-compatible GeoJSON FeatureCollection of annotation polygons."""
    import uuid

    features = []
    for r in regions:
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"histodetect/{slide}/{r['id']}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [r["polygon"], *r["holes"]],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": f"tumour region {r['id']}",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                    "measurements": {
                        "max_prob": r["max_prob"],
                        "mean_prob": r["mean_prob"],
                        "area_px": r["area_px"],
                        **({"area_mm2": r["area_mm2"]} if r["area_mm2"] is not None else {}),
                        **(
                            {"longest_diameter_mm": r["longest_diameter_mm"]}
                            if r["longest_diameter_mm"] is not None
                            else {}
                        ),
                    },
                },
            }
        )
    doc = {
        "type": "FeatureCollection",
        "features": features,
        "histodetect": {"slide": slide, "coordinates": "level-0 pixels", "tags": tags or []},
    }
    return json.dumps(doc).encode()


def regions_csv_bytes(regions: list[dict]) -> bytes:
    """One row per region: areas, probabilities, diameter, centroid and box in level-0 px."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "id",
            "area_mm2",
            "area_px",
            "max_prob",
            "mean_prob",
            "longest_diameter_mm",
            "longest_diameter_px",
            "centroid_x",
            "centroid_y",
            "x_min",
            "y_min",
            "x_max",
            "y_max",
        ]
    )
    for r in regions:
        pts = np.asarray(r["polygon"])

        def num(v, fmt):
            return "" if v is None else format(v, fmt)

        writer.writerow(
            [
                r["id"],
                num(r["area_mm2"], ".6f"),
                num(r["area_px"], ".0f"),
                num(r["max_prob"], ".4f"),
                num(r["mean_prob"], ".4f"),
                num(r["longest_diameter_mm"], ".4f"),
                num(r["longest_diameter_px"], ".1f"),
                num(r["centroid"][0], ".1f"),
                num(r["centroid"][1], ".1f"),
                *(format(v, ".1f") for v in (*pts.min(0), *pts.max(0))),
            ]
        )
    return buf.getvalue().encode()


# ----------------------------------------------------------------------------- many slides


MANIFEST_GLOB = "manifest-rank*.jsonl"


def list_slides(items: list[str | Path], list_file: str | Path | None = None) -> list[Path]:
    """Slide paths from arguments and an optional list file (one path a line, # comments).

    Relative paths in the list file are relative to the file; duplicates are dropped.

    Raises:
        HistodetectError: when the list file is missing or nothing is listed.
    """
    paths = [Path(p) for p in items]
    if list_file is not None:
        list_file = Path(list_file)
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise HistodetectError(f"{list_file}: cannot read the slide list ({exc}).") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else list_file.parent / p)
    unique: dict[str, Path] = {}
    for p in paths:
        unique.setdefault(str(p.resolve()), p)
    if not unique:
        raise HistodetectError("no slides given: name slide files or pass --list FILE.")
    return list(unique.values())


def output_names(slides: list[Path]) -> dict[Path, str]:
    """A folder name per slide: its file stem, with a short hash where stems collide."""
    stems: dict[str, int] = {}
    for s in slides:
        stems[s.stem] = stems.get(s.stem, 0) + 1
    return {
        s: s.stem
        if stems[s.stem] == 1
        else f"{s.stem}-{hashlib.sha1(str(s.resolve()).encode()).hexdigest()[:8]}"
        for s in slides
    }


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed's launcher (torchrun) or SLURM; else (0, 1)."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            if not 0 <= rank < world:
                raise HistodetectError(f"{rank_key}={rank} is not within {world_key}={world}.")
            return rank, world
    return 0, 1


def shard(slides: list[Path], rank: int, world: int) -> list[Path]:
    """This rank's slides: biggest files first, dealt round-robin so loads even out."""

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0

    order = sorted(slides, key=lambda p: (-size(p), str(p)))
    return order[rank::world]


def job_key(path: Path, run: Path, opts: SlideOptions) -> str:
    """What a finished slide was made from: the file, the model and the settings."""
    try:
        st = path.stat()
        file_id = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        file_id = [str(path.resolve()), None, None]
    try:
        mt = (run / "model.safetensors").stat()
        model_id = [str(run.resolve()), mt.st_size, mt.st_mtime_ns]
    except OSError:
        model_id = [str(run), None, None]
    blob = json.dumps([file_id, model_id, asdict(opts)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(out: Path) -> dict[str, dict]:
    """Latest record per slide key from every rank's manifest (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for file in sorted(out.glob(MANIFEST_GLOB)):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                records[rec["key"]] = rec
    return records


def _append_manifest(out: Path, rank: int, record: dict) -> None:
    # One file per rank: ranks never write to the same file, so no locking across machines.
    with open(out / f"manifest-rank{rank}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class BatchResult:
    """What one rank did with its share of a slide list."""

    rank: int
    world: int
    assigned: list[Path]
    done: list[dict] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def run_slides(
    run: str | Path,
    slides: list[Path],
    out: str | Path,
    opts: SlideOptions = SlideOptions(),
    *,
    rank: int | None = None,
    world: int | None = None,
    redo: bool = False,
    device: str = "auto",
    progress: bool = True,
    on_slide: Callable[[Path, dict | None, str | None], None] | None = None,
) -> BatchResult:
    """Map this rank's share of ``slides`` into ``out/<name>/``, skipping finished ones.

    Every rank (``RANK``/``WORLD_SIZE`` from torchrun, or SLURM, unless given) takes every
    ``world``-th slide of the list sorted by size, and appends a line per finished or failed
    slide to ``out/manifest-rank<R>.jsonl``. A slide is skipped when a manifest says it was
    done with the same file, model and settings and its ``summary.json`` exists; failed
    slides are retried. One bad slide does not stop the others.
    """
    run, out = Path(run), Path(out)
    if rank is None or world is None:
        rank, world = distributed_rank()
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(slides)
    mine = shard(slides, rank, world)
    result = BatchResult(rank, world, mine)
    finished = {} if redo else read_manifest(out)
    todo = []
    for path in mine:
        key = job_key(path, run, opts)
        rec = finished.get(key)
        if rec and rec.get("status") == "done" and (out / names[path] / "summary.json").exists():
            result.skipped.append(path)
        else:
            todo.append((path, key))
    if not todo:
        return result
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # one GPU per local rank, as torchrun intends
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    predictor = Predictor.from_run(run, device)
    for path, key in todo:
        record = {"key": key, "slide": str(path), "out": names[path], "rank": rank}
        try:
            summary = analyse_slide(predictor, path, out / names[path], opts, progress)
        except HistodetectError as exc:
            reason = str(exc)
            result.failed.append((path, reason))
            _append_manifest(out, rank, {**record, "status": "failed", "error": reason})
            if on_slide:
                on_slide(path, None, reason)
            continue
        result.done.append(summary)
        _append_manifest(
            out,
            rank,
            {
                **record,
                "status": "done",
                "score": summary["score"],
                "n_regions": summary["n_regions"],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        if on_slide:
            on_slide(path, summary, None)
    return result


def manifest_rows(out: Path) -> Iterator[dict]:
    """The manifest's latest record per slide, for listing."""
    yield from read_manifest(Path(out)).values()


def _undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``augment.dihedral(., k)``: its three steps are involutions, undone in reverse."""
    if k & 1:
        y = y.flip(-1)
    if k & 2:
        y = y.flip(-2)
    if k & 4:
        y = y.transpose(-1, -2)
    return y


@torch.inference_mode()
def dense_proba(predictor, tile: np.ndarray, tta: int = 1, step: int = 1) -> np.ndarray:
    """P(tumour) of every patch in a uint8 RGB tile in one convolutional pass per TTA view.

    Equal (to float rounding) to ``predictor.predict_proba`` on the tile's 96 px patches at
    stride ``32 * step``, including the centre crop, dihedral TTA and temperature.

    Args:
        predictor: A ``histodetect.predict.Predictor`` whose model is dense-capable.
        tile: (32 (n - 1) step + 96, ...) uint8 RGB pixels, patch windows at stride 32 step.
        tta: 1, 2, 4 or 8 dihedral views of the whole tile, averaged as probabilities.
        step: Keep every ``step``-th output (cell strides that are multiples of 32).

    Returns:
        (rows, cols) float32 probabilities.
    """
    from histodetect.data.transforms import to_model_input

    margin = (96 - predictor.crop) // 2 if predictor.crop < 96 else 0
    if margin:  # the model sees each patch's centre crop: the tile loses the same border
        tile = tile[margin:-margin, margin:-margin]
    # Readers may hand out read-only arrays; torch wants writable memory.
    x = torch.from_numpy(np.require(tile, requirements=["C", "W"]))[None].to(predictor.device)
    mean, std = predictor.meta["mean"], predictor.meta["std"]
    x = to_model_input(x, mean, std, predictor.channels_last, crop=max(x.shape[1:3]))
    k = getattr(predictor, "_dense_k", None)
    if k is None:
        k = predictor._dense_k = patch_feature_size(predictor.model, predictor.crop)
    probs = None
    for view in range(tta):
        y = torch.sigmoid(dense_logits(predictor.model, dihedral(x, view), k).float())
        y = _undo_dihedral(y, view)
        probs = y if probs is None else probs + y
    out = (probs[0] / tta)[::step, ::step].cpu().numpy()
    if predictor.temperature != 1.0:  # calibrated by `evaluate --calibrate`, as predict_proba
        from histodetect.inference.calibration import apply_temperature

        out = apply_temperature(out, predictor.temperature)
    return out.astype(np.float32)
