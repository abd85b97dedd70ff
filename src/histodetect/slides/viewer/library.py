"""The viewer's state: the catalogue, the open slides and maps, and the tile cache.

Memory stays bounded however many slides are browsed: at most ``max_open`` slides and maps
are kept open (least recently used closed first), OpenSlide's decoded tiles share one cache,
and encoded tiles another, each of a fixed size in bytes.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.slides.maps.folders import load_slide_map
from histodetect.slides.viewer.catalogue import Catalogue, SlideEntry
from histodetect.slides.viewer.tiles import MapTiles, SlideTiles, TileCache, legend

log = logging.getLogger("histodetect.viewer")

DEFAULT_TILE_CACHE_MB = 64
DEFAULT_OPENSLIDE_CACHE_MB = 64
DEFAULT_MAX_OPEN = 8
THUMBNAIL_SIDE = 240


class _Opened:
    """A least-recently-used set of open objects (slides, maps), at most ``limit`` of them.

    An evicted slide is not closed here: a tile request may still be reading it on another
    thread. Dropping the reference is enough; OpenSlide and tifffile close the file when the
    last one goes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: opening a slide must not stall other tiles
        with self._lock:
            if key in self._items:  # another thread opened it meanwhile: keep theirs
                return self._items[key]
            self._items[key] = value
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class SlideLibrary:
    """Everything the viewer serves: listings, slide details, tiles, thumbnails.

    Args:
        catalogue: The slide folders.
        tile_cache_mb: Encoded tiles kept (MB).
        openslide_cache_mb: OpenSlide's decoded slide tiles kept, shared by all slides (MB).
        max_open: Slides (and maps) kept open at once.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        tile_cache_mb: float = DEFAULT_TILE_CACHE_MB,
        openslide_cache_mb: float = DEFAULT_OPENSLIDE_CACHE_MB,
        max_open: int = DEFAULT_MAX_OPEN,
    ) -> None:
        import openslide

        self.catalogue = catalogue
        self.cache = TileCache(int(tile_cache_mb * (1 << 20)))
        self._openslide_cache = openslide.OpenSlideCache(int(openslide_cache_mb * (1 << 20)))
        self._slides = _Opened(max_open)
        self._maps = _Opened(max_open)
        self._logged: set[str] = set()  # each problem goes to the log once

    def stats(self) -> dict:
        """What is held now: open slides and maps, cached tiles and their bytes, hits."""
        return {
            "open_slides": len(self._slides),
            "open_maps": len(self._maps),
            "cached_tiles": len(self.cache),
            "cached_bytes": self.cache.nbytes,
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }

    # ----------------------------------------------------------------- lookups

    def entry(self, slide_id: str) -> SlideEntry | None:
        """The catalogue entry of ``slide_id`` (None for an unknown id)."""
        return self.catalogue.get(slide_id)

    def _key(self, entry: SlideEntry) -> tuple[str, float]:
        # The summary's time: a slide mapped again gets new tiles, not the cached old ones.
        return (str(entry.folder), entry.mtime)

    def slide_tiles(self, entry: SlideEntry) -> SlideTiles:
        """The open slide of ``entry``.

        Tried again on every call, so a slide file copied in later is found.

        Raises:
            HistodetectError: when the slide file is missing or cannot be read (logged once).
        """
        try:
            path = self.catalogue.slide_path(entry)
            return self._slides.get(
                self._key(entry), lambda: SlideTiles(path, self._openslide_cache)
            )
        except HistodetectError as exc:
            message = f"{entry.id}: {exc}"
            self.log_once(message)
            raise HistodetectError(message) from None

    def log_once(self, message: str) -> None:
        """Warn in the server log, once per distinct message (tiles repeat their failures)."""
        if message not in self._logged:
            self._logged.add(message)
            log.warning("slide viewer: %s", message)

    def map_tiles(self, entry: SlideEntry) -> MapTiles:
        """The stored map of ``entry`` as tiles.

        Raises:
            HistodetectError: for a map that cannot be read or has no level-0 size.
        """
        size = entry.size
        if size is None:
            raise HistodetectError(
                f"{entry.id}: summary.json has no level0_size_px, so the map cannot be placed."
            )
        return self._maps.get(
            self._key(entry), lambda: MapTiles(load_slide_map(entry.folder), size)
        )

    # ----------------------------------------------------------------- answers

    def listing(self) -> list[dict]:
        """Every slide's row (``Catalogue.listing``), rescanning the folders first."""
        self.catalogue.refresh()
        return [self.catalogue.listing(e) for e in self.catalogue.entries()]

    def detail(self, entry: SlideEntry) -> dict:
        """What the viewer page needs for one slide: tile sources, scale, regions, layers.

        A slide file that is missing or unreadable is reported in ``problem`` (the maps are
        still shown); so are regions, annotations or detections that cannot be read.
        """
        s = entry.summary
        problems: list[str] = []
        slide = None
        try:
            slide = self.slide_tiles(entry).info()
        except HistodetectError as exc:
            problems.append(str(exc))
        layers = None
        try:
            maps = self.map_tiles(entry)
            layers = maps.info()
            if slide is not None and (slide["width"], slide["height"]) != maps.size:
                problems.append(
                    f"{entry.id}: the slide file is {slide['width']}x{slide['height']} px but "
                    f"its map was made for {maps.size[0]}x{maps.size[1]} px: not the same slide."
                )
                slide = None
        except HistodetectError as exc:
            problems.append(str(exc))
            self.log_once(problems[-1])
        regions, annotation, detections = [], None, None
        for what, read in (
            ("regions", self.catalogue.regions),
            ("annotation", self.catalogue.annotation),
            ("detections", self.catalogue.detections),
        ):
            try:
                value = read(entry)
            except HistodetectError as exc:
                problems.append(f"{entry.id}: {what}: {exc}")
                self.log_once(problems[-1])
                continue
            if what == "regions":
                regions = value
            elif what == "annotation":
                annotation = value
            else:
                detections = value
        files = [
            name
            for name in (
                "regions.geojson",
                "regions.csv",
                "summary.json",
                "overlay.png",
                "prob.tif",
            )
            if self.catalogue.output_file(entry, name) is not None
        ]
        return {
            **self.catalogue.listing(entry),
            "mpp": s.get("level0_mpp"),
            "threshold": s.get("threshold"),
            "cell_px": (s.get("stride_px") or 0)
            * s.get("level_downsample", 1.0)
            * s.get("resample_factor", 1.0),
            "slide": slide,
            "layers": layers,
            "legend": legend(),
            "regions": regions,
            "annotation": annotation,
            "detections": detections,
            "files": files,
            "problems": problems,
        }

    def slide_tile(self, entry: SlideEntry, level: int, col: int, row: int) -> bytes:
        """A JPEG tile of the slide (cached)."""
        tiles = self.slide_tiles(entry)
        key = (self._key(entry), "slide", level, col, row)
        return self.cache.get_or_make(key, lambda: tiles.tile(level, col, row))

    def map_tile(self, entry: SlideEntry, layer: str, level: int, col: int, row: int) -> bytes:
        """A PNG tile of the probability map or tissue mask (cached)."""
        maps = self.map_tiles(entry)
        key = (self._key(entry), layer, level, col, row)
        return self.cache.get_or_make(key, lambda: maps.tile(layer, level, col, row))

    def thumbnail(self, entry: SlideEntry) -> bytes | None:
        """A small JPEG of the slide's ``overlay.png`` for the list, or None without one."""
        path = self.catalogue.output_file(entry, "overlay.png")
        if path is None:
            return None

        def make() -> bytes:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=85)
            except OSError as exc:
                raise HistodetectError(f"{entry.id}: overlay.png cannot be read ({exc}).") from None
            return buf.getvalue()

        return self.cache.get_or_make((self._key(entry), "thumbnail"), make)

    def output_file(self, entry: SlideEntry, name: str) -> Path | None:
        """An output file of the slide's folder by its listed name (``OUTPUT_FILES``)."""
        return self.catalogue.output_file(entry, name)
