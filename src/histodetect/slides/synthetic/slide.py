"""SYNTHETIC pyramidal TIFF slides with tumour regions planted at known places (for tests)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from histodetect import CENTRE, PATCH_SIZE

DESCRIPTION = "histodetect SYNTHETIC slide: generated, not a scan; says nothing about real tissue"
_TUMOUR_TILE = CENTRE[1] - CENTRE[0]  # 32: tumour texture is a mosaic of labelled centre boxes
_BANK = 48  # patches rendered per texture bank


@functools.cache
def _banks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal tissue (whole label-0 patches) and tumour (centre boxes of label-1 patches).

    Tumour regions are tiled from the 32 px centre boxes, which the generator guarantees to
    hold tumour nuclei, so that every cell of a planted region is a positive patch centre.
    """
    from histodetect.data.synth import render_patch

    rng = np.random.default_rng([seed, 7])
    normal = np.stack([render_patch(rng, 0)[0] for _ in range(_BANK)])
    lo, hi = CENTRE
    tumour = np.stack([render_patch(rng, 1)[0][lo:hi, lo:hi] for _ in range(_BANK)])
    return normal, tumour


@functools.cache
def _banks_at(seed: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texture banks and a glass-noise tile averaged down by ``d`` (a pyramid level)."""
    normal, tumour = _banks(seed)

    def down(x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        return x.reshape(n, h // d, d, w // d, d, c).mean((2, 4)).round().astype(np.uint8)

    noise = np.random.default_rng([seed, 8]).normal(0, 2.0, (1, 256, 256, 3))
    glass = np.clip(noise + np.array([243, 241, 246]), 0, 255).astype(np.uint8)
    return down(normal), down(tumour), down(glass)[0]


def _hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A cheap deterministic integer hash of tile coordinates (which bank patch goes where)."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (seed * 83492791)
    return (h ^ (h >> 13)) & 0x7FFFFFFF


def _inside(ellipses: list[tuple[float, float, float, float]], x: np.ndarray, y: np.ndarray):
    """Boolean (len(y), len(x)) grid: points inside any of the (cx, cy, rx, ry) ellipses."""
    out = np.zeros((len(y), len(x)), bool)
    for cx, cy, rx, ry in ellipses:
        out |= ((x[None, :] - cx) / rx) ** 2 + ((y[:, None] - cy) / ry) ** 2 <= 1.0
    return out


def render_region(
    x0: int,
    y0: int,
    w: int,
    h: int,
    d: int,
    tissue: list[tuple[float, float, float, float]],
    tumours: list[tuple[float, float, float, float]],
    seed: int = 0,
) -> np.ndarray:
    """(h, w, 3) pixels at downsample ``d`` from level-px (x0, y0): glass, tissue, tumour."""
    normal, tumour, glass = _banks_at(seed, d)
    xs = x0 + np.arange(w)  # level pixels
    ys = y0 + np.arange(h)
    cx, cy = (xs + 0.5) * d, (ys + 0.5) * d  # their centres in level-0 px
    out = glass[ys[:, None] % glass.shape[0], xs[None, :] % glass.shape[1]]
    in_tissue = _inside(tissue, cx, cy)
    if in_tissue.any():
        n = normal.shape[1]
        pick = _hash(ys[:, None] // n, xs[None, :] // n, seed) % len(normal)
        tex = normal[pick, ys[:, None] % n, xs[None, :] % n]
        out = np.where(in_tissue[..., None], tex, out)
        in_tumour = _inside(tumours, cx, cy) & in_tissue
        if in_tumour.any():
            m = tumour.shape[1]
            pick = _hash(ys[:, None] // m, xs[None, :] // m, seed + 1) % len(tumour)
            tex = tumour[pick, ys[:, None] % m, xs[None, :] % m]
            out = np.where(in_tumour[..., None], tex, out)
    return np.ascontiguousarray(out, dtype=np.uint8)


def write_pyramid(
    path: str | Path,
    levels: Iterable[np.ndarray | Iterator[np.ndarray]],
    size: tuple[int, int],
    mpp: float,
    downsamples: tuple[int, ...],
    tile: int = 256,
    compression: str | None = "zlib",
    description: str | None = None,
) -> None:
    """A tiled pyramidal TIFF as scanners write them: one page per level, resolution tags.

    Each page is a separate image (OpenSlide's generic-TIFF layout), so OpenSlide and tifffile
    both read it. ``levels`` holds, per downsample, the level's pixels: an array, or its tiles
    in row-major order (streamed, so memory stays at one tile).
    """
    import tifffile

    width, height = size
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(str(path), bigtiff=width * height * 3 > 2**31) as tw:
        for i, (d, level) in enumerate(zip(downsamples, levels, strict=True)):
            shape = None if isinstance(level, np.ndarray) else (height // d, width // d, 3)
            tw.write(
                level,
                shape=shape,
                dtype=None if shape is None else np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(res / d, res / d),
                resolutionunit="CENTIMETER",
                description=description if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    tissue: list[tuple[float, float, float, float]],
    tumours: list[tuple[float, float, float, float]],
    *,
    mpp: float = 0.972,
    downsamples: tuple[int, ...] = (1, 4, 16),
    tile: int = 256,
    compression: str | None = "zlib",
    seed: int = 0,
) -> dict:
    """Write a SYNTHETIC tiled pyramidal TIFF, streamed tile by tile (bounded memory).

    Glass, tissue ellipses textured with synthetic label-0 patches, and tumour ellipses
    (inside the tissue) textured with the centre boxes of label-1 patches. Each level is a
    separate page (OpenSlide's generic-TIFF layout) with resolution tags, so OpenSlide and
    tifffile both read it; the description says SYNTHETIC.

    Args:
        path: File to write.
        width, height: Level-0 size in pixels.
        tissue, tumours: Ellipses ``(cx, cy, rx, ry)`` in level-0 pixels.
        mpp: µm per level-0 pixel.
        downsamples: Pyramid levels; each must divide 32 (texture tiles stay whole).
        tile: TIFF tile side.
        compression: tifffile compression (None, "zlib"...).
        seed: Texture seed.

    Returns:
        The ground truth: size, mpp, downsamples, tissue and tumour ellipses.
    """
    for d in downsamples:
        if _TUMOUR_TILE % d or PATCH_SIZE % d:
            raise ValueError(f"downsample {d} must divide {_TUMOUR_TILE}")

    def tiles(d: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                yield render_region(tx, ty, tile, tile, d, tissue, tumours, seed)

    levels = (tiles(d, width // d, height // d) for d in downsamples)
    write_pyramid(path, levels, (width, height), mpp, downsamples, tile, compression, DESCRIPTION)
    return {
        "synthetic": True,
        "path": str(path),
        "size": (width, height),
        "mpp": mpp,
        "downsamples": list(downsamples),
        "tissue": [list(map(float, e)) for e in tissue],
        "tumours": [list(map(float, e)) for e in tumours],
    }


def truth_cells(
    ellipses: list[tuple[float, float, float, float]], grid: tuple[int, int], cell: float
) -> np.ndarray:
    """Cells (of ``cell`` level-0 px) whose centre lies inside any of the ellipses."""
    rows, cols = grid
    return _inside(ellipses, (np.arange(cols) + 0.5) * cell, (np.arange(rows) + 0.5) * cell)


def write_truth_annotations(
    truth: dict, folder: str | Path, name: str | None = None, *, vertices: int = 256
) -> dict[str, Path]:
    """The planted tumours of a SYNTHETIC slide as the annotation files a lab would have.

    Each tumour ellipse, clipped to the tissue ellipses (``render_region`` plants tumour only
    on tissue), becomes a polygon of ``vertices`` points on the ellipse, in level-0 px:
    ``<name>.xml`` (ASAP, group ``_0``, as Camelyon16) and ``<name>.geojson`` (QuPath class
    ``Tumor``). A slide without tumours gets files without outlines: a normal slide.

    Args:
        truth: What ``write_synthetic_slide`` returned.
        folder: Where to write (created when missing).
        name: File stem; by default the slide's.
        vertices: Points per ellipse; 256 stay within 0.013 px of a 170 px ellipse, so a
            cell centre is inside the polygon exactly when ``truth_cells`` says it is inside.

    Returns:
        ``{"asap": path, "geojson": path}``.
    """
    import shapely

    from histodetect.files import write_atomic
    from histodetect.slides.annotations.writers import asap_xml_bytes, qupath_geojson_bytes

    def ellipse(cx: float, cy: float, rx: float, ry: float):
        t = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
        return shapely.Polygon(np.c_[cx + rx * np.cos(t), cy + ry * np.sin(t)])

    tissue = shapely.union_all([ellipse(*e) for e in truth["tissue"]])
    tumours = [ellipse(*e).intersection(tissue) for e in truth["tumours"]]
    tumours = [t for t in tumours if not t.is_empty]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or Path(truth["path"]).stem
    paths = {"asap": folder / f"{name}.xml", "geojson": folder / f"{name}.geojson"}
    write_atomic(paths["asap"], asap_xml_bytes(tumours, name="planted tumour"))
    write_atomic(paths["geojson"], qupath_geojson_bytes(tumours, name="planted tumour"))
    return paths
