"""Slide readers: pixels of any pyramid level through OpenSlide, tifffile or Pillow."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError

# Resolution tags outside this range are software defaults (72 dpi = 352.8 µm/px), not a scan.
PLAUSIBLE_MPP = (0.05, 50.0)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


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
