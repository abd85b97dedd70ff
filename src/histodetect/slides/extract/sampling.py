"""Patches of one slide: tissue candidates, centre-rule labels, seeded sampling and reading."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodetect import CENTRE, PATCH_SIZE
from histodetect.errors import HistodetectError
from histodetect.slides import DEFAULT_MIN_TISSUE
from histodetect.slides.annotations.readers import read_annotation
from histodetect.slides.tissue import tissue_cells
from histodetect.slides.wsi.readers import SlideReader, open_slide
from histodetect.slides.wsi.resolution import (
    PCAM_MPP,
    choose_resolution,
    working_reader,
)

# A negative cell is drawn with weight HARD_FLOOR + P(tumour) from an earlier run's map: one
# the model called tumour with P = 1 is 11 times as likely to be taken as one it called 0.
HARD_FLOOR = 0.1


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of `histodetect extract`; they are part of a slide's resume key.

    Attributes:
        per_slide: Patches wanted per slide.
        positive_fraction: Share of them that should be positive (when the slide has enough).
        seed: Sampling seed; each slide's draw depends only on it and the slide's name.
        positions: ``"grid"`` (windows centred on the cells) or ``"random"`` (centres jittered
            uniformly within the cell).
        stride: Candidate cell side in px at the model resolution (32: the centre box).
        target_mpp: The model resolution in µm/px.
        slide_mpp: Level-0 µm/px replacing what the files say.
        min_tissue: Tissue share of a candidate's 96 px window to keep it (as `slide`).
        hard_negatives: Output folder of `histodetect slide`: negatives are drawn weighted
            towards cells its maps called tumour.
    """

    per_slide: int = 1000
    positive_fraction: float = 0.5
    seed: int = 0
    positions: str = "grid"
    stride: int = 32
    target_mpp: float = PCAM_MPP
    slide_mpp: float | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    hard_negatives: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.per_slide >= 1, f"--per-slide must be at least 1, got {self.per_slide}."),
            (
                0.0 <= self.positive_fraction <= 1.0,
                f"--positive-fraction must be between 0 and 1, got {self.positive_fraction}.",
            ),
            (self.positions in ("grid", "random"), "--positions must be grid or random."),
            (1 <= self.stride <= PATCH_SIZE, f"--stride must be 1 to 96, got {self.stride}."),
            (self.target_mpp > 0, f"--mpp must be a positive µm/px, got {self.target_mpp}."),
            (
                self.slide_mpp is None or self.slide_mpp > 0,
                f"--slide-mpp must be a positive µm/px, got {self.slide_mpp}.",
            ),
            (
                0.0 <= self.min_tissue <= 1.0,
                f"--min-tissue must be between 0 and 1, got {self.min_tissue}.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise HistodetectError(message)
        maps = Path(self.hard_negatives) if self.hard_negatives else None
        if maps is not None and (maps / "model.json").exists():
            raise HistodetectError(
                f"--hard-negatives {maps}: is a run folder; map the slides with it first "
                f"(histodetect slide {maps} SLIDE... --out MAPS) and pass MAPS."
            )
        if maps is not None and not maps.is_dir():
            raise HistodetectError(f"--hard-negatives {maps}: no such folder of slide maps.")


@dataclass
class SlidePatches:
    """The patches drawn from one slide, with level-0 top-left corners and labels."""

    images: np.ndarray
    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray
    side: float  # level-0 px per patch side
    candidates: int = 0  # tissue windows considered
    positives_available: int = 0
    blurred: int = 0  # drawn windows left out because they are out of focus
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)


def centre_labels(tumour, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """PCam's centre rule: 1 when a patch's centre box holds tumour, for patches at level-0
    top-left corners ``(x, y)`` of ``side`` px.

    The centre box is the middle third of the patch (the 32x32 px of a 96 px patch). It holds
    tumour when it overlaps ``tumour`` (exclusions already cut out) with positive area: a box
    that only touches the outline, or lies wholly inside an excluded hole, is negative; a box
    overlapping by a sliver is positive.

    Args:
        tumour: A shapely geometry in level-0 px (``Annotation.tumour``).
        x, y: Top-left corners of the patches in level-0 px.
        side: Patch side in level-0 px.

    Returns:
        int8 array of 0/1.
    """
    import shapely

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    labels = np.zeros(len(x), np.int8)
    if tumour is None or tumour.is_empty or not len(x):
        return labels
    lo, hi = side * CENTRE[0] / PATCH_SIZE, side * CENTRE[1] / PATCH_SIZE
    boxes = shapely.box(x + lo, y + lo, x + hi, y + hi)
    shapely.prepare(tumour)
    hit = np.flatnonzero(shapely.intersects(tumour, boxes))  # touching counts here...
    if len(hit):
        # ...so the overlap's area decides: zero for a shared edge or corner.
        labels[hit] = shapely.area(shapely.intersection(boxes[hit], tumour)) > 0
    return labels


def _candidates(
    tissue: np.ndarray, opts: ExtractOptions, rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (working px) of the candidate windows, inside the working image."""
    rows, cols = np.nonzero(tissue)
    s = opts.stride
    base = s // 2 - PATCH_SIZE // 2  # a window centred on its cell, as the maps' cells
    wx, wy = cols * s + base, rows * s + base
    if opts.positions == "random":
        wx = wx + rng.integers(-(s // 2), s - s // 2, len(wx))
        wy = wy + rng.integers(-(s // 2), s - s // 2, len(wy))
    # Windows reaching past the image edge would be padded with white: keep them inside.
    wx = np.clip(wx, 0, size[0] - PATCH_SIZE)
    wy = np.clip(wy, 0, size[1] - PATCH_SIZE)
    # Cells at the edge can clip to the same window: one patch (and one id) each.
    _, first = np.unique(np.c_[wx, wy], axis=0, return_index=True)
    keep = np.sort(first)
    return wx[keep].astype(np.int64), wy[keep].astype(np.int64)


def _hard_weights(maps: Path, name: str, x0: np.ndarray, y0: np.ndarray, side: float, notes):
    """Draw weights of negatives from the slide's earlier map (``HARD_FLOOR`` + P(tumour))."""
    from histodetect.slides.maps.folders import load_slide_map

    folder = maps / name
    if not (folder / "summary.json").is_file():
        notes.append(f"no map of this slide in {maps}: negatives drawn uniformly.")
        return None
    sm = load_slide_map(folder)
    rows = np.clip(((y0 + side / 2) / sm.cell).astype(np.int64), 0, sm.prob.shape[0] - 1)
    cols = np.clip(((x0 + side / 2) / sm.cell).astype(np.int64), 0, sm.prob.shape[1] - 1)
    return HARD_FLOOR + sm.prob[rows, cols].astype(np.float64)


def _order(n: int, rng: np.random.Generator, weights=None) -> np.ndarray:
    """A seeded draw without replacement of all ``n`` indices: the first are taken, the rest
    stand by for windows found out of focus. Weighted draws favour heavy indices."""
    if weights is None:
        return rng.permutation(n)
    # Efraimidis-Spirakis: sorting by u^(1/w) is a weighted draw without replacement.
    keys = np.log(rng.random(n)) / weights
    return np.argsort(-keys, kind="stable")


def _read_focused(read, wx, wy, order: np.ndarray, quota: int) -> tuple[list, list, int]:
    """Read windows in ``order`` until ``quota`` are in focus; (indices, pixels, blurred)."""
    from histodetect.slides.tissue import in_focus

    kept, pixels, blurred, at = [], [], 0, 0
    while len(kept) < quota and at < len(order):
        batch = order[at : at + quota - len(kept)]
        at += len(batch)
        for i in sorted(batch, key=lambda k: (wy[k], wx[k])):  # nearby reads share tiles
            patch = read(int(wx[i]), int(wy[i]), PATCH_SIZE, PATCH_SIZE)
            if in_focus(patch, (1, 1), PATCH_SIZE)[0, 0]:
                kept.append(i)
                pixels.append(patch)
            else:
                blurred += 1
    return kept, pixels, blurred


def extract_slide(
    path: str | Path, annotation: str | Path | None, name: str, opts: ExtractOptions
) -> SlidePatches:
    """Draw labelled 96 px patches at the model resolution from one slide's tissue.

    Candidates are the cells (``opts.stride`` px at ``opts.target_mpp``) whose window holds
    tissue, labelled by :func:`centre_labels`; ``round(per_slide * positive_fraction)``
    positives and the rest negatives are drawn (all there are, when fewer), seeded by
    ``opts.seed`` and ``name``. Windows out of focus are replaced by others.

    Args:
        path: The slide file.
        annotation: Its annotation file (ASAP XML, GeoJSON, mask), or None: negatives only.
        name: The slide's id in the output (seeds its draw, finds its hard-negative map).
        opts: The settings.

    Raises:
        HistodetectError: naming the slide or annotation file that cannot be used.
    """
    reader = open_slide(path, opts.slide_mpp)
    try:
        res = choose_resolution(reader, opts.target_mpp)
        if min(res.size) < PATCH_SIZE:
            raise HistodetectError(
                f"{path}: {res.size[0]}x{res.size[1]} px at the model resolution, smaller "
                "than one patch."
            )
        notes = [res.note] if res.note else []
        tumour = _tumour(annotation, reader, notes)
        rng = np.random.default_rng([opts.seed, zlib.crc32(name.encode())])
        tissue, _, _ = tissue_cells(reader, res, opts.stride, opts.min_tissue)
        wx, wy = _candidates(tissue, opts, rng, res.size)
        side = PATCH_SIZE * res.scale
        # Level-0 corners are rounded to whole pixels; labels are computed from them, so a
        # label is exact for the coordinates stored with the patch.
        x0 = np.round(wx * res.scale).astype(np.int64)
        y0 = np.round(wy * res.scale).astype(np.int64)
        labels = centre_labels(tumour, x0, y0, side)
        weights = None
        if opts.hard_negatives:
            weights = _hard_weights(Path(opts.hard_negatives), name, x0, y0, side, notes)
        read = working_reader(reader, res)
        picked, pixels, blurred = _draw(
            read, wx, wy, labels, weights, opts, rng, notes, tumour is not None
        )
        if not len(wx):
            notes.append("no tissue found: nothing extracted.")
        return SlidePatches(
            images=np.stack(pixels) if pixels else np.zeros((0, 96, 96, 3), np.uint8),
            x=x0[picked],
            y=y0[picked],
            labels=labels[picked],
            side=side,
            candidates=len(wx),
            positives_available=int(labels.sum()),
            blurred=blurred,
            synthetic=reader.synthetic,
            notes=notes,
        )
    finally:
        reader.close()


def _tumour(annotation: str | Path | None, reader: SlideReader, notes: list[str]):
    """The annotation's tumour geometry (exclusions cut out), or None for a slide without."""
    if annotation is None:
        notes.append("no annotation found: negatives only (make sure the slide is normal).")
        return None
    ann = read_annotation(annotation, slide_size=reader.dims[0])
    notes.extend(ann.notes)
    if ann.dots:
        notes.append(f"{len(ann.dots)} tumour dot(s) ignored: a point has no area to label.")
    return ann.tumour


def _draw(read, wx, wy, labels, weights, opts: ExtractOptions, rng, notes, annotated) -> tuple:
    """Positives and negatives drawn to their quotas and read; (indices, pixels, blurred)."""
    want_pos = round(opts.per_slide * opts.positive_fraction)
    want_neg = opts.per_slide - want_pos
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    neg_weights = weights[neg] if weights is not None else None
    kept_pos, pix_pos, blur_pos = _read_focused(read, wx, wy, pos[_order(len(pos), rng)], want_pos)
    kept_neg, pix_neg, blur_neg = _read_focused(
        read, wx, wy, neg[_order(len(neg), rng, neg_weights)], want_neg
    )
    if want_pos and not len(pos) and annotated:
        notes.append("no tissue window has tumour in its centre box: negatives only.")
    for kind, kept, want in (("positive", kept_pos, want_pos), ("negative", kept_neg, want_neg)):
        if want and 0 < len(kept) < want:
            notes.append(f"{len(kept)} {kind} patch(es) of {want} wanted: all there are.")
    return kept_pos + kept_neg, pix_pos + pix_neg, blur_pos + blur_neg
