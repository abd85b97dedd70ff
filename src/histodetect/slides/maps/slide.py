"""One slide: open it, choose the resolution, map it and write its outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.slides import DEFAULT_MIN_TISSUE
from histodetect.slides.maps.mapping import analyse
from histodetect.slides.maps.outputs import slide_summary, synthetic_tags, write_maps, write_summary
from histodetect.slides.maps.render import OVERLAY_SIDE
from histodetect.slides.wsi.readers import open_slide
from histodetect.slides.wsi.resolution import PCAM_MPP, choose_resolution, read_thumbnail


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

    def __post_init__(self) -> None:
        for name in ("target_mpp", "slide_mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                flag = "--mpp" if name == "target_mpp" else "--slide-mpp"
                raise HistodetectError(f"{flag} must be a positive µm/px, got {value}.")


def analyse_slide(
    predictor: Predictor,
    path: str | Path,
    out: str | Path,
    opts: SlideOptions = SlideOptions(),
    progress: bool = True,
) -> dict:
    """Map one slide and write every output into the folder ``out`` (atomically, file by file).

    Outputs: ``prob.npy`` (float32 cells), ``prob.png`` (16-bit: P x 65535), ``prob.tif``
    (tiled, 8-bit: P x 255, resolution tags = the cell size), ``tissue.png``,
    ``overlay.png`` (heatmap on the thumbnail), ``regions.geojson`` (QuPath annotations in
    level-0 pixels), ``regions.csv`` and ``summary.json``, written last.

    Returns:
        The summary (as in ``summary.json``).

    Raises:
        HistodetectError: naming the file, when it cannot be opened or read, or is too small.
    """
    path, out = Path(path), Path(out)
    t0 = time.perf_counter()
    reader = open_slide(path, opts.slide_mpp)
    try:
        res = choose_resolution(reader, opts.target_mpp, opts.level)
        # Thumbnail → tissue → cells → regions: the one path for images and slides.
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
    tags = synthetic_tags(reader, predictor)
    write_maps(out, path.name, analysis, base, t_overlay, tags)
    summary = slide_summary(path, out, reader, predictor, analysis, opts.tta, tags, t0)
    if reader.mpp is None:
        # The file records no resolution, so the level was analysed as if it were at the
        # model's µm/px: slide-eval sizes lesions with that same assumption, not a default.
        summary["level0_mpp_assumed"] = opts.target_mpp / res.scale
    write_summary(out, summary)
    return summary
