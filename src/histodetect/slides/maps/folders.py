"""Read the per-slide output folders of `histodetect slide` (maps, tissue, summary)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.readers import slide_stem

SUMMARY = "summary.json"


@dataclass(frozen=True, eq=False)
class SlideMap:
    """One slide's output folder of `histodetect slide`, as the scoring needs it.

    Attributes:
        name: The folder's name (the slide's stem, with a hash where stems collide).
        stem: The slide file's stem, to match annotations and reference rows.
        prob: (rows, cols) P(tumour) per cell (``prob.npy``).
        tissue: (rows, cols) the cells analysed (``tissue.png``).
        cell: Level-0 px per cell side (stride x level downsample x resampling); cell
            (r, c) covers level-0 x in [c * cell, (c + 1) * cell), likewise y with r.
        size: Level-0 (width, height), when known.
        mpp: µm per level-0 px, when known.
        mpp_assumed: The level-0 µm/px `slide` assumed when the file recorded none (it
            analysed the slide as if at the model's resolution), else None.
        threshold: The run's region threshold used by the map.
        score: The slide score (highest cell probability on tissue).
        synthetic: Whether the slide or the model was SYNTHETIC.
    """

    name: str
    stem: str
    folder: Path
    prob: np.ndarray
    tissue: np.ndarray
    cell: float
    size: tuple[int, int] | None
    mpp: float | None
    threshold: float
    score: float
    synthetic: bool = False
    mpp_assumed: float | None = None


def find_slide_maps(maps_dir: str | Path) -> list[Path]:
    """The slide folders under ``maps_dir`` (those with a summary.json), or itself if it is one.

    Raises:
        HistodetectError: when there is none.
    """
    maps_dir = Path(maps_dir)
    if (maps_dir / SUMMARY).is_file():
        return [maps_dir]
    found = sorted(p.parent for p in maps_dir.glob(f"*/{SUMMARY}"))
    if not found:
        raise HistodetectError(
            f"{maps_dir}: no slide maps here (no */{SUMMARY}); make them with "
            "`histodetect slide RUN SLIDE --out DIR` and pass DIR."
        )
    return found


def load_slide_map(folder: str | Path) -> SlideMap:
    """Read one slide folder: ``summary.json``, ``prob.npy`` (else ``prob.png``), ``tissue.png``.

    Raises:
        HistodetectError: naming the file that is missing, damaged or inconsistent.
    """
    from PIL import Image

    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise HistodetectError(f"{folder / SUMMARY}: cannot be read ({exc}).") from None
    try:
        if (folder / "prob.npy").is_file():
            prob = np.load(folder / "prob.npy", allow_pickle=False).astype(np.float32)
        else:  # 16-bit PNG: P x 65535
            prob = np.asarray(Image.open(folder / "prob.png"), np.float32) / 65535.0
        tissue_png = folder / "tissue.png"
        tissue = np.asarray(Image.open(tissue_png)) > 0 if tissue_png.is_file() else prob > 0
    except (OSError, ValueError) as exc:
        raise HistodetectError(f"{folder}: the probability map cannot be read ({exc}).") from None
    if prob.ndim != 2 or tissue.shape != prob.shape:
        raise HistodetectError(
            f"{folder}: prob.npy {prob.shape} and tissue.png {tissue.shape} are not one 2-D grid."
        )
    stride = summary.get("stride_px")
    if stride is None:
        raise HistodetectError(f"{folder / SUMMARY}: no stride_px: cannot place the cells.")
    cell = stride * summary.get("level_downsample", 1.0) * summary.get("resample_factor", 1.0)
    size = summary.get("level0_size_px")
    slide = summary.get("slide")
    return SlideMap(
        name=folder.name,
        stem=slide_stem(slide) if slide else folder.name,
        folder=folder,
        prob=prob,
        tissue=tissue,
        cell=float(cell),
        size=(int(size[0]), int(size[1])) if size else None,
        mpp=summary.get("level0_mpp"),
        threshold=float(summary.get("threshold", 0.5)),
        score=float(summary.get("score", prob[tissue].max() if tissue.any() else 0.0)),
        synthetic=bool(summary.get("synthetic")),
        mpp_assumed=summary.get("level0_mpp_assumed"),
    )
