"""Deep Zoom tiles of a slide and of its stored maps, and the byte-bounded cache they share.

The slide's tiles come from OpenSlide's ``DeepZoomGenerator``: over OpenSlide itself for the
formats it reads, over the project's ``SlideReader`` (tifffile, Pillow) for the rest, so one
piece of code decides the Deep Zoom geometry of every slide. Map tiles use the same generator's
geometry on a blank slide of the same level-0 size, so each map pixel lands on the slide pixel
it describes at every zoom: the browser places both pyramids in the same world rectangle.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.slides.maps.folders import SlideMap
from histodetect.slides.wsi.readers import SlideReader, open_slide

TILE_SIZE = 254  # + 2 px of overlap = 256, the size OpenSlide's own examples use
OVERLAP = 1
JPEG_QUALITY = 80
# The probability colours: matplotlib's jet, as overlay.png, so the two pictures agree.
COLOUR_MAP = "jet"
# Alpha of a tissue cell of probability p: 0.25 + 0.5 p (as overlay.png); glass stays clear.
ALPHA_BASE, ALPHA_SLOPE = 0.25, 0.5
TISSUE_RGBA = (0, 170, 170, 96)  # the tissue mask: a light teal wash over analysed cells
READER_CACHE_BYTES = 32 << 20  # decoded TIFF segments kept per open slide (tifffile backend)
# Deep Zoom levels this small, and more than 2x coarser than the nearest pyramid level, are
# cut from one picture of the level made once per open slide (at most ~6 MB of RGB): read tile
# by tile, each would decode the whole slide again (a one-level slide such as CMU-1).
SMALL_LEVEL_PIXELS = 1 << 21


class TileNotFound(HistodetectError):
    """A tile address outside the pyramid (the route answers 404)."""


class TileCache:
    """A thread-safe least-recently-used cache of encoded tiles, bounded in bytes.

    Args:
        max_bytes: Total size of the values kept; the oldest are dropped beyond it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """The cached value of ``key``, or ``make()``'s, which is then kept.

        Two threads missing the same key may both make it; tiles are deterministic, so the
        only cost is the duplicated work, and no lock is held while a tile is made.
        """
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return value
            self.misses += 1
        value = make()
        if len(value) > self.max_bytes:
            return value
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
        return value

    def clear(self) -> None:
        """Drop everything (the benchmark's cold start)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0


class _ReaderSlide:
    """A ``SlideReader`` seen as the OpenSlide object ``DeepZoomGenerator`` reads from."""

    def __init__(self, reader: SlideReader) -> None:
        self.reader = reader
        self.dimensions = reader.dims[0]
        self.level_count = len(reader.dims)
        self.level_dimensions = tuple(reader.dims)
        self.level_downsamples = tuple(reader.downsamples)
        self.properties: dict[str, str] = {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        # OpenSlide's rule: the most downsampled level that is still at least as fine.
        fine = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(fine, key=lambda i: self.level_downsamples[i], default=0)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        from PIL import Image

        ds = self.level_downsamples[level]
        x, y = (math.floor(v / ds) for v in location)
        rgb = self.reader.read(level, x, y, *size)
        return Image.fromarray(rgb).convert("RGBA")

    def close(self) -> None:
        self.reader.close()


class _BlankSlide:
    """A one-level slide of a given size without pixels: the Deep Zoom geometry of a map."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.dimensions = tuple(size)
        self.level_count = 1
        self.level_dimensions = (tuple(size),)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {}

    def get_best_level_for_downsample(self, _downsample: float) -> int:
        return 0


def _generator(osr):
    from openslide.deepzoom import DeepZoomGenerator

    return DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)


def _check_address(dz, level: int, col: int, row: int) -> None:
    if not 0 <= level < dz.level_count:
        raise TileNotFound(f"no Deep Zoom level {level} (0 to {dz.level_count - 1})")
    cols, rows = dz.level_tiles[level]
    if not (0 <= col < cols and 0 <= row < rows):
        raise TileNotFound(f"no tile {col}_{row} at level {level} ({cols}x{rows} tiles)")


def _tile_corner(col: int, row: int) -> tuple[int, int]:
    """The top-left pixel of a tile in its Deep Zoom level, overlap included."""
    return (col * TILE_SIZE - (OVERLAP if col else 0), row * TILE_SIZE - (OVERLAP if row else 0))


def dzi_info(dz, fmt: str) -> dict:
    """What OpenSeadragon needs to build a Deep Zoom tile source (its inline DZI object)."""
    width, height = dz.level_dimensions[-1]
    return {
        "width": int(width),
        "height": int(height),
        "tile_size": TILE_SIZE,
        "overlap": OVERLAP,
        "format": fmt,
        "levels": int(dz.level_count),
    }


class SlideTiles:
    """JPEG Deep Zoom tiles of one slide file, read on demand.

    Args:
        path: The slide file.
        openslide_cache: OpenSlide's decoded-tile cache to share between slides (bounded
            memory however many are open), or None for OpenSlide's own per-slide cache.

    Raises:
        HistodetectError: naming the file, when no reader can open it (``open_slide``).
    """

    def __init__(self, path: str | Path, openslide_cache=None) -> None:
        import openslide

        self.path = Path(path)
        # open_slide tries every reader and decodes a pixel, so a damaged file fails here,
        # with the reason, rather than tile by tile.
        reader = open_slide(self.path)
        self.backend = reader.backend
        if reader.backend == "openslide":
            reader.close()
            osr = openslide.OpenSlide(str(self.path))
            if openslide_cache is not None:
                osr.set_cache(openslide_cache)
        else:
            if hasattr(reader, "CACHE_BYTES"):
                reader.CACHE_BYTES = READER_CACHE_BYTES
            osr = _ReaderSlide(reader)
        self._osr = osr
        self.dz = _generator(osr)
        self.size: tuple[int, int] = tuple(int(v) for v in self.dz.level_dimensions[-1])
        self._small = self._small_levels()
        self._pictures: dict[int, object] = {}  # Deep Zoom level -> PIL image of all of it
        self._picture_lock = threading.Lock()

    def _small_levels(self) -> list[int]:
        """The Deep Zoom levels cut from whole-level pictures (see ``SMALL_LEVEL_PIXELS``)."""
        small = []
        n = self.dz.level_count
        for level, (w, h) in enumerate(self.dz.level_dimensions):
            ds = 2.0 ** (n - 1 - level)
            best = self._osr.get_best_level_for_downsample(ds)
            if w * h <= SMALL_LEVEL_PIXELS and ds / self._osr.level_downsamples[best] > 2:
                small.append(level)
        return small

    def _picture(self, level: int):
        """The whole Deep Zoom ``level`` as one PIL image (small levels only), made once."""
        with self._picture_lock:
            return self._make_picture(level)

    def _make_picture(self, level: int):
        # With the lock held. A level whose next finer one is small too halves that one
        # (``reduce`` rounds sizes up, exactly as Deep Zoom levels do); the others are
        # stitched from their own tiles, so memory holds one tile's source region at a time.
        from PIL import Image

        if level in self._pictures:
            return self._pictures[level]
        if level + 1 in self._small:
            picture = self._make_picture(level + 1).reduce(2)
        else:
            picture = Image.new("RGB", self.dz.level_dimensions[level], "white")
            cols, rows = self.dz.level_tiles[level]
            for row in range(rows):
                for col in range(cols):
                    tile = self.dz.get_tile(level, (col, row))
                    picture.paste(tile, _tile_corner(col, row))
        self._pictures[level] = picture
        return picture

    def info(self) -> dict:
        """The tile source description (``dzi_info``) for JPEG tiles."""
        return dzi_info(self.dz, "jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes:
        """One JPEG tile.

        Raises:
            TileNotFound: for an address outside the pyramid.
            HistodetectError: naming the slide, when its pixels cannot be read.
        """
        _check_address(self.dz, level, col, row)
        try:
            if level in self._small:
                x, y = _tile_corner(col, row)
                w, h = self.dz.get_tile_dimensions(level, (col, row))
                image = self._picture(level).crop((x, y, x + w, y + h))
            else:
                image = self.dz.get_tile(level, (col, row))
        except HistodetectError:
            raise
        except Exception as exc:  # OpenSlide reports damaged tiles with its own error types
            raise HistodetectError(
                f"{self.path.name}: cannot read the pixels of tile {col}_{row} at Deep Zoom "
                f"level {level} ({type(exc).__name__}: {exc or 'no detail'})"
            ) from None
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def close(self) -> None:
        """Release the slide file."""
        self._osr.close()


def colour_table(steps: int = 256):
    """(steps, 4) uint8 RGBA of P(tumour) = i / (steps - 1) on tissue: colour and alpha."""
    from matplotlib import colormaps

    p = np.linspace(0.0, 1.0, steps)
    rgba = np.empty((steps, 4), np.uint8)
    rgba[:, :3] = np.round(colormaps[COLOUR_MAP](p)[:, :3] * 255)
    rgba[:, 3] = np.round((ALPHA_BASE + ALPHA_SLOPE * p) * 255)
    return rgba


def map_colour(p: float) -> tuple[int, int, int, int]:
    """The RGBA a map tile gives a tissue cell of probability ``p``."""
    table = colour_table()
    return tuple(int(v) for v in table[round(float(np.clip(p, 0, 1)) * 255)])


def legend(stops: int = 11) -> list[dict]:
    """Colour stops of the probability map, for the page's legend."""
    table = colour_table()
    return [
        {"p": round(p, 2), "rgba": [int(v) for v in table[round(p * 255)]]}
        for p in np.linspace(0.0, 1.0, stops)
    ]


def _png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # Level 1: map tiles are flat colours, which compress well even at the fastest setting.
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class MapTiles:
    """PNG Deep Zoom tiles (with alpha) of a stored map: probability colours or tissue mask.

    Each tile pixel takes the colour of the map cell under its centre (nearest cell), so
    cells keep sharp edges at full resolution. Cells off tissue are transparent.

    Args:
        smap: The slide's stored map (``load_slide_map``).
        size: Level-0 (width, height) of the slide; the map's pyramid has exactly these
            dimensions, so the browser lays it over the slide's.
    """

    LAYERS = ("map", "tissue")

    def __init__(self, smap: SlideMap, size: tuple[int, int]) -> None:
        self.cell = float(smap.cell)
        self.size = (int(size[0]), int(size[1]))
        rows, cols = smap.prob.shape
        # One transparent row and column past the grid: pixels beyond the map index them.
        index = np.round(np.clip(smap.prob, 0, 1) * 255).astype(np.intp)
        prob_rgba = np.zeros((rows + 1, cols + 1, 4), np.uint8)
        prob_rgba[:rows, :cols] = np.where(smap.tissue[..., None], colour_table()[index], 0)
        tissue_rgba = np.zeros((rows + 1, cols + 1, 4), np.uint8)
        tissue_rgba[:rows, :cols][smap.tissue] = TISSUE_RGBA
        self._rgba = {"map": prob_rgba, "tissue": tissue_rgba}
        self.dz = _generator(_BlankSlide(self.size))

    def info(self) -> dict:
        """The tile source description (``dzi_info``) for PNG tiles."""
        return dzi_info(self.dz, "png")

    def tile(self, layer: str, level: int, col: int, row: int) -> bytes:
        """One PNG tile of ``layer`` ("map" or "tissue").

        Raises:
            TileNotFound: for an unknown layer or an address outside the pyramid.
        """
        if layer not in self._rgba:
            raise TileNotFound(f"no map layer {layer!r} (one of {', '.join(self.LAYERS)})")
        _check_address(self.dz, level, col, row)
        (x0, y0), _, _ = self.dz.get_tile_coordinates(level, (col, row))
        w, h = self.dz.get_tile_dimensions(level, (col, row))
        # Level-0 px per Deep Zoom px: exactly 2^k, as OpenSeadragon lays the levels out.
        step = 2.0 ** (self.dz.level_count - 1 - level)
        rgba = self._rgba[layer]
        rows, cols = rgba.shape[0] - 1, rgba.shape[1] - 1
        xs = np.minimum(((x0 + (np.arange(w) + 0.5) * step) // self.cell).astype(np.intp), cols)
        ys = np.minimum(((y0 + (np.arange(h) + 0.5) * step) // self.cell).astype(np.intp), rows)
        return _png(rgba[ys[:, None], xs[None, :]])
