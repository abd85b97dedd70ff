"""Tumour maps: thumbnail, tissue, cells and regions of a slide or an in-memory image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.slides import DEFAULT_MIN_TISSUE
from histodetect.slides.maps.cells import TILE_CELLS, InferenceStats, predict_cells, resolve_mode
from histodetect.slides.maps.regions import cell_regions, measure_regions
from histodetect.slides.maps.render import png_bytes, render_overlay
from histodetect.slides.tissue import tissue_cells
from histodetect.slides.wsi.readers import ArrayReader, SlideReader
from histodetect.slides.wsi.resolution import (
    Resolution,
    choose_resolution,
    working_reader,
)


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
        out_of_scope: (rows, cols) bool, cells whose patch is unlike the training data; None
            without scope statistics or in dense mode (no per-patch features).
    """

    prob: np.ndarray
    tissue: np.ndarray
    stride: int
    regions: list[dict]
    threshold: float = 0.5
    mode: str = "patch"
    out_of_scope: np.ndarray | None = None

    @property
    def out_of_scope_share(self) -> float | None:
        """The share of tissue cells out of scope (None without scores)."""
        if self.out_of_scope is None:
            return None
        return float((self.out_of_scope & self.tissue).sum() / max(self.tissue.sum(), 1))


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
    picture = render_overlay(
        image,
        region_map.prob,
        region_map.tissue,
        region_map.stride,
        rings,
        out_of_scope=region_map.out_of_scope,
    )
    return png_bytes(picture)


@dataclass
class Analysis:
    """Everything one map computed: the RegionMap in working pixels plus slide context."""

    region_map: RegionMap
    resolution: Resolution
    thumbnail: np.ndarray
    thumb_px: float  # working px per thumbnail px
    stats: InferenceStats
    regions_level0: list[dict] = field(default_factory=list)

    @property
    def out_of_scope(self) -> np.ndarray | None:
        """Cells whose patch is out of scope (None without statistics or in dense mode)."""
        return self.region_map.out_of_scope


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
    tissue, thumb, t = tissue_cells(reader, res, stride, min_tissue)
    scope = None
    if predictor.scope_threshold is not None and mode == "patch":
        scope = np.full(tissue.shape, np.nan, np.float32)
    prob, tissue, stats = predict_cells(
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
        scope=scope,
    )
    # One set of outlines in cell units, measured in working pixels and at level 0.
    shapes = cell_regions(prob, tissue, threshold)
    regions = measure_regions(shapes, stride, bounds=(w, h), mpp=res.mpp)
    # NaN (cells not analysed) compares as in scope.
    flagged = None if scope is None else scope > predictor.scope_threshold
    _scope_of_regions(shapes, flagged, regions)
    region_map = RegionMap(prob, tissue, stride, regions, threshold, mode, flagged)
    analysis = Analysis(region_map, res, thumb, t, stats)
    if res.scale == 1.0:
        analysis.regions_level0 = regions
    else:
        level0 = (w * res.scale, h * res.scale)
        analysis.regions_level0 = measure_regions(
            shapes, stride * res.scale, bounds=level0, mpp=reader.mpp
        )
        _scope_of_regions(shapes, flagged, analysis.regions_level0)
    return analysis


def _scope_of_regions(shapes, flagged: np.ndarray | None, regions: list[dict]) -> None:
    """Each region's share of out-of-scope cells (None without scores), and the flag when it
    is at least half out of scope: such a region is not to be read as tumour."""
    import shapely

    for shape, region in zip(shapes, regions, strict=True):
        share = None
        if flagged is not None:
            x0, y0, x1, y1 = (int(v) for v in shape.shape.bounds)
            rr, cc = np.mgrid[y0:y1, x0:x1]
            inside = shapely.contains_xy(shape.shape, cc + 0.5, rr + 0.5)
            cells = flagged[rr[inside], cc[inside]]
            share = float(cells.mean()) if cells.size else None
        region["out_of_scope_share"] = share
        region["out_of_scope"] = share is not None and share >= 0.5
