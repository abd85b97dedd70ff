"""A slide's output files: probability maps, overlay, GeoJSON, CSV and summary.json."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from histodetect import __version__
from histodetect.files import write_atomic
from histodetect.inference.predictor import Predictor
from histodetect.slides.maps.mapping import Analysis
from histodetect.slides.maps.render import png_bytes, render_overlay
from histodetect.slides.wsi.readers import SlideReader

OUTPUTS = {
    "prob_npy": "prob.npy",
    "prob_png": "prob.png",
    "prob_tiff": "prob.tif",
    "tissue_png": "tissue.png",
    "overlay_png": "overlay.png",
    "geojson": "regions.geojson",
    "regions_csv": "regions.csv",
    "summary": "summary.json",
}


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
                    "name": f"tumour region {r['id']}"
                    + (" (OUT OF SCOPE)" if r.get("out_of_scope") else ""),
                    # A region mostly unlike the training data is not called tumour outright.
                    "classification": {"name": "Tumor (out of scope)", "color": [128, 128, 128]}
                    if r.get("out_of_scope")
                    else {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                    "measurements": {
                        "max_prob": r["max_prob"],
                        "mean_prob": r["mean_prob"],
                        "area_px": r["area_px"],
                        **(
                            {"out_of_scope_share": r["out_of_scope_share"]}
                            if r.get("out_of_scope_share") is not None
                            else {}
                        ),
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


def prob_tiff_bytes(prob: np.ndarray, cell_um: float | None, slide: str) -> bytes:
    """The probability map as a tiled 8-bit TIFF whose resolution tags give the cell size.

    One pixel per map cell, value ``round(255 x P(tumour))`` (0 also where no tissue was
    predicted; ``tissue.png`` tells the two apart). 8-bit rather than float because viewers'
    overlays (ASAP's likelihood maps, QuPath's display ranges) expect 0-255; ``prob.npy``
    keeps the exact floats. TIFF's resolution unit is the inch or the centimetre, so the
    tags hold pixels per centimetre: 10,000 / ``cell_um``, which OpenSlide, ASAP, QuPath and
    Fiji read back as µm per pixel. The map's (0, 0) corner is the slide's level-0 (0, 0).

    Args:
        prob: (rows, cols) P(tumour) per cell.
        cell_um: µm per map cell (stride x analysed µm/px); None when the slide's
            resolution is unknown, and then no resolution is written.
        slide: The slide's file name, for the description.
    """
    import tifffile

    size = f"{cell_um:.6g} um" if cell_um else "unknown size"
    name = slide.encode("ascii", "backslashreplace").decode()  # TIFF text is 7-bit ASCII
    description = (
        f"histodetect P(tumour) map of {name}: pixel = round(255 x P(tumour)), 0 also off "
        f"tissue; one pixel per map cell of {size}; origin at the slide's level-0 (0, 0)"
    )
    resolution = {}
    if cell_um:
        per_cm = 1e4 / cell_um
        resolution = {
            "resolution": (per_cm, per_cm),
            "resolutionunit": tifffile.RESUNIT.CENTIMETER,
        }
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8),
        photometric="minisblack",
        tile=(256, 256),
        compression="zlib",
        description=description,
        metadata=None,  # no tifffile JSON in place of the description
        **resolution,
    )
    return buf.getvalue()


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
            "out_of_scope_share",
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
                num(r.get("out_of_scope_share"), ".4f"),
            ]
        )
    return buf.getvalue().encode()


def synthetic_tags(reader: SlideReader, predictor: Predictor) -> list[str]:
    """What is SYNTHETIC about a slide's map: the slide, the model, both or nothing."""
    synthetic_model = bool(predictor.meta.get("synthetic"))
    return [
        text
        for text, on in (
            ("SYNTHETIC slide", reader.synthetic),
            ("model trained on SYNTHETIC data", synthetic_model),
        )
        if on
    ]


def write_maps(
    out: Path,
    slide: str,
    analysis: Analysis,
    base: np.ndarray,
    t_overlay: float,
    tags: list[str],
) -> None:
    """Write every output but the summary into the folder ``out`` (created when missing).

    Args:
        out: The slide's output folder.
        slide: The slide's file name, for the overlay's caption and the GeoJSON.
        analysis: The slide's map.
        base: The overlay's picture of the slide, ``t_overlay`` working px per pixel.
        t_overlay: Working px per ``base`` pixel.
        tags: ``synthetic_tags`` of the slide and model.
    """
    rm = analysis.region_map
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, rm.prob)
    write_atomic(out / OUTPUTS["prob_npy"], buf.getvalue())
    write_atomic(
        out / OUTPUTS["prob_png"],
        png_bytes(np.round(rm.prob * 65535).astype(np.uint16)),
    )
    mpp = analysis.resolution.mpp
    cell_um = rm.stride * mpp if mpp else None
    write_atomic(out / OUTPUTS["prob_tiff"], prob_tiff_bytes(rm.prob, cell_um, slide))
    write_atomic(out / OUTPUTS["tissue_png"], png_bytes(rm.tissue.astype(np.uint8) * 255))
    caption = f"{slide}: regions >= {rm.threshold:.2f} outlined" + (
        f"  [{'; '.join(tags)}]" if tags else ""
    )
    rings = [[r["polygon"], *r["holes"]] for r in rm.regions]
    if analysis.out_of_scope is not None:
        caption += "; grey: out of scope"
    picture = render_overlay(
        base,
        rm.prob,
        rm.tissue,
        rm.stride / t_overlay,
        rings,
        caption,
        ring_scale=1 / t_overlay,
        out_of_scope=analysis.out_of_scope,
    )
    write_atomic(out / OUTPUTS["overlay_png"], png_bytes(picture))
    regions = analysis.regions_level0
    write_atomic(out / OUTPUTS["geojson"], geojson_bytes(regions, slide, tags))
    write_atomic(out / OUTPUTS["regions_csv"], regions_csv_bytes(regions))


def slide_summary(
    path: Path,
    out: Path,
    reader: SlideReader,
    predictor: Predictor,
    analysis: Analysis,
    tta: int,
    tags: list[str],
    t0: float,
) -> dict:
    """The contents of ``summary.json``: the slide, the model, the settings and the findings.

    ``t0`` is when the slide's work began (``time.perf_counter()``).
    """
    res, rm = analysis.resolution, analysis.region_map
    regions = analysis.regions_level0
    scope = out_of_scope(predictor, analysis)
    largest = max(regions, key=lambda r: r["area_px"], default=None)
    tissue_n = int(rm.tissue.sum())
    cell_mm2 = (rm.stride * res.mpp / 1000) ** 2 if res.mpp else None
    return {
        "slide": str(path),
        "synthetic": bool(tags),
        "warning": _warning(tags, scope),
        "out_of_scope": scope,
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
            "synthetic": bool(predictor.meta.get("synthetic")),
            "crop": predictor.crop,
        },
        "mode": rm.mode,
        "tta": tta,
        "stride_px": rm.stride,
        "grid": list(rm.prob.shape),
        "threshold": rm.threshold,
        "tissue_cells": tissue_n,
        "tissue_area_mm2": tissue_n * cell_mm2 if cell_mm2 else None,
        "patches_predicted": analysis.stats.patches,
        "tiles_read": analysis.stats.tiles,
        "tiles_skipped": analysis.stats.tiles_skipped,
        "out_of_focus_cells": analysis.stats.out_of_focus,
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


def out_of_scope(predictor: Predictor, analysis: Analysis) -> dict:
    """The share of analysed tissue cells out of scope, or why it is unavailable."""
    if analysis.out_of_scope is None:
        why = (
            "the run has no scope statistics"
            if predictor.scope_threshold is None
            else "dense mode has no per-patch features (use --mode patch)"
        )
        return {"unavailable": why}
    # Every analysed cell has a score in patch mode: the tissue cells are those analysed.
    share = analysis.region_map.out_of_scope_share
    return {
        "threshold": predictor.scope_threshold,
        "cells": int(analysis.region_map.tissue.sum()),
        "share": share,
        "mostly_out_of_scope": share > 0.5,
    }


def _warning(tags: list[str], scope: dict) -> str | None:
    """The summary's warning: synthetic inputs, and a slide mostly unlike the training data."""
    parts = [f"{'; '.join(tags)}: says nothing about real slides"] if tags else []
    if scope.get("mostly_out_of_scope"):
        parts.append(
            f"{scope['share']:.0%} of the tissue is OUT OF SCOPE (unlike the lymph-node training "
            "data: other tissue, stain or scanner); the tumour map is not to be trusted"
        )
    return "; ".join(parts) or None


def write_summary(out: Path, summary: dict) -> None:
    """Write ``summary.json``, last: its presence marks the slide as finished."""
    write_atomic(out / OUTPUTS["summary"], json.dumps(summary, indent=2).encode())
