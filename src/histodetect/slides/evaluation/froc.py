"""Camelyon16 lesion-level scoring: detections by NMS, evaluation lesions, hits and the FROC."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.shapes import Annotation, annotation_raster
from histodetect.slides.maps.regions import longest_diameter

CAMELYON16_MPP = 0.243  # µm per level-0 pixel of the Camelyon16 scanners
EVAL_PIXEL_UM = CAMELYON16_MPP * 32  # the challenge scores on its masks' level 5
GROW_UM = 37.5  # half of 75 µm (~5 tumour cells): lesions closer than 75 µm are one
ITC_AXIS_UM = 275.0  # 200 µm + the 75 µm of growth: shorter regions are isolated tumour cells
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per slide of the challenge
NMS_RADIUS_UM = 200.0  # about the ITC size (NCRF used 12 px at level 6, ~190 µm)
DETECTION_FLOOR = 0.1  # lower only adds points at higher FP rates; the rest is unchanged


# ----------------------------------------------------------------------------- detections


@dataclass(frozen=True)
class Detection:
    """One suspected lesion: a local maximum of a probability map, at its cell's centre."""

    confidence: float
    x: int  # level-0 px
    y: int


def find_detections(
    prob: np.ndarray,
    cell: float,
    *,
    mpp: float,
    radius_um: float = NMS_RADIUS_UM,
    floor: float = DETECTION_FLOOR,
    tissue: np.ndarray | None = None,
) -> list[Detection]:
    """Local maxima of a probability map by greedy non-maximum suppression.

    Cells at or above ``floor`` are taken from the most probable down (ties: top row, then
    left column first); each taken cell suppresses the cells whose centres lie within
    ``radius_um`` of its centre. Greedy suppression, unlike "equal to the maximum filter",
    gives one detection per plateau. The detections at or above any confidence do not
    depend on ``floor`` (below it), so a lower floor only extends the FROC curve.

    Args:
        prob: (rows, cols) P(tumour) per cell.
        cell: Level-0 px per cell side; cell (r, c) has its centre at ((c + 0.5) * cell,
            (r + 0.5) * cell), rounded to whole pixels as the challenge's CSV needs.
        mpp: µm per level-0 px.
        radius_um: Suppression radius.
        floor: Smallest confidence reported.
        tissue: Cells that were analysed (others are never detections).

    Returns:
        Detections, most confident first; confidences rounded to 6 decimals, as written.
    """
    p = np.asarray(prob, np.float64)
    if tissue is not None:
        p = np.where(tissue, p, -np.inf)
    rows, cols = np.nonzero(p >= floor)
    order = np.lexsort((cols, rows, -p[rows, cols]))
    r = radius_um / (cell * mpp)  # in cells
    k = math.floor(r)
    dy, dx = np.mgrid[-k : k + 1, -k : k + 1]
    disk = dy**2 + dx**2 <= r * r
    suppressed = np.zeros(p.shape, bool)
    out = []
    for i in order.tolist():
        rr, cc = int(rows[i]), int(cols[i])
        if suppressed[rr, cc]:
            continue
        out.append(
            Detection(
                round(float(p[rr, cc]), 6), round((cc + 0.5) * cell), round((rr + 0.5) * cell)
            )
        )
        r0, c0 = max(rr - k, 0), max(cc - k, 0)
        r1, c1 = min(rr + k + 1, p.shape[0]), min(cc + k + 1, p.shape[1])
        suppressed[r0:r1, c0:c1] |= disk[r0 - rr + k : r1 - rr + k, c0 - cc + k : c1 - cc + k]
    return out


def detections_csv_bytes(detections: list[Detection]) -> bytes:
    """The challenge's submission file: ``confidence,X,Y`` rows, no header (its script parses
    every line as numbers, X and Y with ``int()``, so coordinates are whole level-0 px)."""
    return "".join(f"{d.confidence!r},{d.x},{d.y}\n" for d in detections).encode()


def read_detections_csv(path: str | Path) -> list[Detection]:
    """Detections from a ``confidence,X,Y`` file (a header line is skipped).

    Raises:
        HistodetectError: naming the file and line that is not three numbers.
    """
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = [s.strip() for s in line.split(",")]
        if not line.strip():
            continue
        try:
            conf, x, y = float(parts[0]), float(parts[1]), float(parts[2])
        except (ValueError, IndexError):
            if n == 1:
                continue  # a header
            raise HistodetectError(
                f"{path}: line {n} is {line!r}, not 'confidence,X,Y' numbers."
            ) from None
        out.append(Detection(conf, int(x), int(y)))
    return out


# ----------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class Lesion:
    """One evaluation region: annotated tumour grown by 37.5 µm, holes filled, 8-connected.

    Attributes:
        label: Its number in the lesion map (1, 2, ...).
        itc: Isolated tumour cells (major axis under 275 µm): not a lesion to find, and hits
            on it are neither true nor false positives.
        major_axis_um: Major axis of the grown region's moment ellipse (scikit-image's
            ``axis_major_length``, as the challenge measures it).
        longest_diameter_um: Longest distance across the annotated tumour pixels inside it.
        area_um2: Annotated tumour area inside it (exclusions cut out).
        x, y: Centroid of that tumour, level-0 px.
    """

    label: int
    itc: bool
    major_axis_um: float
    longest_diameter_um: float
    area_um2: float
    x: float
    y: float


@dataclass(frozen=True, eq=False)
class LesionMap:
    """The labelled evaluation regions of one slide, on a window of the evaluation grid."""

    labels: np.ndarray  # int32 (rows, cols); 0 = no lesion
    origin: tuple[int, int]  # (col, row) of labels[0, 0] on the evaluation grid
    scale: float  # level-0 px per evaluation pixel
    lesions: tuple[Lesion, ...] = ()

    @property
    def n_lesions(self) -> int:
        """Lesions to be found (ITCs left out)."""
        return sum(not les.itc for les in self.lesions)

    def label_at(self, x: float, y: float) -> int:
        """The lesion label under a level-0 point (the challenge floors X/scale, Y/scale)."""
        c = math.floor(x / self.scale) - self.origin[0]
        r = math.floor(y / self.scale) - self.origin[1]
        if 0 <= r < self.labels.shape[0] and 0 <= c < self.labels.shape[1]:
            return int(self.labels[r, c])
        return 0


def _feret(rows: np.ndarray, cols: np.ndarray) -> float:
    """Longest distance across pixels (r, c) given in row-major order, corner to corner, in
    pixels. Only each row's end pixels can be on the convex hull, so only their corners go
    to Qhull: a macro-metastasis of a million pixels costs a few thousand points."""
    if not len(rows):
        return 0.0
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]  # first pixel of each row
    ends = np.r_[starts[1:], len(rows)] - 1
    r, c0, c1 = rows[starts], cols[starts], cols[ends] + 1
    pts = np.concatenate([np.c_[r, c0], np.c_[r, c1], np.c_[r + 1, c0], np.c_[r + 1, c1]])
    return longest_diameter(pts.astype(np.float64))


def lesion_map(
    annotation: Annotation | None,
    *,
    mpp: float,
    slide_size: tuple[int, int] | None = None,
    pixel_um: float = EVAL_PIXEL_UM,
    grow_um: float = GROW_UM,
    itc_axis_um: float = ITC_AXIS_UM,
) -> LesionMap:
    """The Camelyon16 evaluation lesions of an annotation.

    The tumour (exclusions cut out; dots and outlines too small for a pixel keep one pixel)
    is drawn on a grid of ``pixel_um`` pixels (the challenge's mask level 5: 7.776 µm),
    grown to the pixels closer than ``grow_um`` to it (Euclidean distance transform, as the
    challenge), its holes filled, and labelled with 8-connectivity; a region whose major
    axis is under ``itc_axis_um`` is an ITC. Only a window around the annotation is drawn,
    so memory follows the tumour's extent, not the slide's.

    Args:
        annotation: The slide's annotation; None (or no tumour) gives no lesions.
        mpp: µm per level-0 px of the slide.
        slide_size: Level-0 (width, height); the window is clipped to it.
        pixel_um, grow_um, itc_axis_um: The challenge's constants, for experiments.
    """
    from scipy import ndimage
    from skimage.measure import label, regionprops

    scale = pixel_um / mpp
    bounds = annotation.bounds() if annotation is not None else None
    if bounds is None:
        return LesionMap(np.zeros((0, 0), np.int32), (0, 0), scale)
    grow_px = grow_um / pixel_um
    margin = math.ceil(grow_px) + 2
    c0, r0 = math.floor(bounds[0] / scale) - margin, math.floor(bounds[1] / scale) - margin
    c1, r1 = math.ceil(bounds[2] / scale) + margin, math.ceil(bounds[3] / scale) + margin
    c0, r0 = max(c0, 0), max(r0, 0)
    if slide_size is not None:
        c1 = min(c1, math.ceil(slide_size[0] / scale))
        r1 = min(r1, math.ceil(slide_size[1] / scale))
    shape = (max(r1 - r0, 0), max(c1 - c0, 0))
    tumour = annotation_raster(annotation, shape, scale, (c0, r0), dots=True)
    if not tumour.any():
        return LesionMap(np.zeros(shape, np.int32), (c0, r0), scale)
    grown = ndimage.distance_transform_edt(~tumour) < grow_px
    labels = label(ndimage.binary_fill_holes(grown), connectivity=2).astype(np.int32)
    lesions = []
    for region in regionprops(labels):
        sl = region.slice
        rr, cc = np.nonzero(tumour[sl] & region.image)
        rr, cc = rr + sl[0].start, cc + sl[1].start
        axis = float(region.axis_major_length) * pixel_um
        lesions.append(
            Lesion(
                label=int(region.label),
                itc=axis < itc_axis_um,
                major_axis_um=axis,
                longest_diameter_um=_feret(rr, cc) * pixel_um,
                area_um2=float(len(rr)) * pixel_um**2,
                x=float((cc.mean() + c0 + 0.5) * scale),
                y=float((rr.mean() + r0 + 0.5) * scale),
            )
        )
    return LesionMap(labels, (c0, r0), scale, tuple(lesions))


# ----------------------------------------------------------------------------- scoring


@dataclass
class SlideHits:
    """How one slide's detections fell on its lesions.

    Attributes:
        fp: Confidences of the false positives.
        best: Per lesion label (ITCs left out) hit at least once: its highest confidence.
        kinds: Per detection: ``"lesion"``, ``"itc"`` or ``"fp"``.
        labels: Per detection: the lesion label under it (0 for none).
        n_lesions: Lesions to be found on the slide.
    """

    fp: list[float] = field(default_factory=list)
    best: dict[int, float] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    n_lesions: int = 0


def score_detections(detections: list[Detection], lesions: LesionMap) -> SlideHits:
    """Hits by the challenge's rules: a detection inside a lesion is a true positive (the
    lesion keeps its highest confidence; further hits on it are not false positives), one on
    an ITC is ignored, any other (every one on a normal slide) is a false positive."""
    itc = {les.label for les in lesions.lesions if les.itc}
    hits = SlideHits(n_lesions=lesions.n_lesions)
    for det in detections:
        lab = lesions.label_at(det.x, det.y)
        hits.labels.append(lab)
        if lab == 0:
            hits.kinds.append("fp")
            hits.fp.append(det.confidence)
        elif lab in itc:
            hits.kinds.append("itc")
        else:
            hits.kinds.append("lesion")
            hits.best[lab] = max(hits.best.get(lab, -np.inf), det.confidence)
    return hits


@dataclass(frozen=True, eq=False)
class Froc:
    """The FROC curve over all slides and the sensitivities at the challenge's FP rates.

    Attributes:
        fps: Average false positives per slide at each threshold, ascending, from 0.
        sensitivity: Share of lesions hit at each threshold.
        thresholds: The confidence of each point (``inf`` for the origin).
        rates: The FP rates read off.
        at_rates: Sensitivity at each rate (linear between curve points, the last
            sensitivity beyond the curve's end: ``numpy.interp``, as the challenge).
        score: Their mean: the challenge's FROC score.
        n_slides, n_lesions: Slides and lesions (ITCs left out) counted.
    """

    fps: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    rates: tuple[float, ...]
    at_rates: tuple[float, ...]
    score: float
    n_slides: int
    n_lesions: int

    def to_dict(self) -> dict:
        """JSON-ready: the points and the read-off sensitivities."""
        return {
            "score": self.score,
            "sensitivity_at": {f"{r:g}": s for r, s in zip(self.rates, self.at_rates, strict=True)},
            "n_slides": self.n_slides,
            "n_lesions": self.n_lesions,
            "curve": {
                "fps_per_slide": self.fps.tolist(),
                "sensitivity": self.sensitivity.tolist(),
                "threshold": [None if math.isinf(t) else t for t in self.thresholds.tolist()],
            },
        }


def sensitivity_at(fps: np.ndarray, sensitivity: np.ndarray, rates) -> list[float]:
    """Sensitivity at each FP rate on a curve with non-decreasing ``fps``.

    Between the last point at or below the rate and the next one, linearly; beyond the end,
    the last sensitivity. Written out because ``numpy.interp`` (the challenge's call) leaves
    repeated x values undefined; this is what it does with them.
    """
    out = []
    for x in rates:
        j = int(np.searchsorted(fps, x, side="right")) - 1
        if j < 0:
            out.append(float(sensitivity[0]))
        elif j >= len(fps) - 1:
            out.append(float(sensitivity[-1]))
        else:
            t = (x - fps[j]) / (fps[j + 1] - fps[j])
            out.append(float(sensitivity[j] + t * (sensitivity[j + 1] - sensitivity[j])))
    return out


def froc(slides: list[SlideHits], rates: tuple[float, ...] = FP_RATES) -> Froc | None:
    """The FROC over slides (None without slides or lesions).

    Each distinct confidence (of a false positive or a lesion's best hit) is a threshold:
    FPs per slide = false positives at or above it / slides; sensitivity = lesions whose
    best hit is at or above it / lesions. Unlike the challenge's script, the lowest
    confidence is not dropped (it skips the smallest value, meant to be the 0 of unhit
    lesions, and so loses a real point when every lesion was hit).
    """
    n_slides, n_lesions = len(slides), sum(s.n_lesions for s in slides)
    if not n_slides or not n_lesions:
        return None
    fp = np.sort(np.asarray([c for s in slides for c in s.fp], np.float64))
    tp = np.sort(np.asarray([c for s in slides for c in s.best.values()], np.float64))
    thresholds = np.unique(np.r_[fp, tp])[::-1]
    n_fp = len(fp) - np.searchsorted(fp, thresholds, side="left")
    n_tp = len(tp) - np.searchsorted(tp, thresholds, side="left")
    fps = np.r_[0.0, n_fp / n_slides]
    sens = np.r_[0.0, n_tp / n_lesions]
    at = sensitivity_at(fps, sens, rates)
    return Froc(
        fps=fps,
        sensitivity=sens,
        thresholds=np.r_[np.inf, thresholds],
        rates=tuple(float(r) for r in rates),
        at_rates=tuple(at),
        score=float(np.mean(at)),
        n_slides=n_slides,
        n_lesions=n_lesions,
    )
