"""Score `histodetect slide` maps against annotations the Camelyon16 way: FROC, AUC, Dice."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.slides.annotations.readers import find_annotation, read_annotation, slide_stem
from histodetect.slides.annotations.shapes import Annotation, annotation_raster
from histodetect.slides.evaluation import froc as lesion_froc
from histodetect.slides.evaluation.results import (
    LesionResult,
    SlideEvalResult,
    SlideResult,
    jsonable,
)
from histodetect.slides.maps.folders import SlideMap, find_slide_maps, load_slide_map

DETECTIONS_DIR = "detections"  # one <slide>.csv each: a folder the challenge's script can take


@dataclass(frozen=True)
class EvalOptions:
    """Settings of the scoring; the defaults are the Camelyon16 challenge's."""

    nms_radius_um: float = lesion_froc.NMS_RADIUS_UM
    floor: float = lesion_froc.DETECTION_FLOOR
    default_mpp: float = lesion_froc.CAMELYON16_MPP  # when summary.json has no level-0 mpp
    pixel_um: float = lesion_froc.EVAL_PIXEL_UM
    grow_um: float = lesion_froc.GROW_UM
    itc_axis_um: float = lesion_froc.ITC_AXIS_UM
    fp_rates: tuple[float, ...] = lesion_froc.FP_RATES
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        lengths = ("nms_radius_um", "default_mpp", "pixel_um", "grow_um", "itc_axis_um")
        for name in lengths:
            if not getattr(self, name) > 0:
                raise HistodetectError(f"{name} must be positive, got {getattr(self, name)}.")


# ----------------------------------------------------------------------------- metrics


def overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    """(Dice, IoU) of two bool grids; (None, None) when both are empty (nothing to compare)."""
    inter, union = int((pred & truth).sum()), int((pred | truth).sum())
    if not union:
        return None, None
    return 2 * inter / (int(pred.sum()) + int(truth.sum())), inter / union


def annotation_cells(annotation: Annotation | None, smap: SlideMap) -> np.ndarray:
    """The map's cells whose centre lies in the annotated tumour (exclusions cut out)."""
    if annotation is None:
        return np.zeros(smap.prob.shape, bool)
    return annotation_raster(annotation, smap.prob.shape, smap.cell)


def read_reference(path: str | Path) -> dict[str, bool]:
    """Slide truth from a Camelyon16-style reference CSV: ``slide,Tumor|Normal,...``, no header.

    Returns:
        ``{slide stem (lower case): is tumour}``.

    Raises:
        HistodetectError: for an unreadable file or a row whose second field is neither.
    """
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise HistodetectError(f"{path}: cannot read the reference ({exc}).") from None
    truth = {}
    for n, row in enumerate(rows, start=1):
        if not row or not row[0].strip():
            continue
        label = row[1].strip().lower() if len(row) > 1 else ""
        if label not in ("tumor", "tumour", "normal"):
            if n == 1:
                continue  # a header line
            raise HistodetectError(
                f"{path}: line {n} is {','.join(row)!r}; each line must be "
                "'slide,Tumor|Normal,...' (the Camelyon16 reference.csv format)."
            )
        truth[slide_stem(row[0].strip()).lower()] = label != "normal"
    if not truth:
        raise HistodetectError(f"{path}: no 'slide,Tumor|Normal' rows.")
    return truth


def slide_auc(
    truth: list[bool], scores: list[float], *, n_boot: int = 1000, seed: int = 0
) -> dict | None:
    """Slide-level ROC AUC with a bootstrap 95% interval (None with one class).

    The interval is :func:`histodetect.inference.bootstrap.auc_interval`: tumour and normal
    slides resampled separately, BCa (few slides).
    """
    from sklearn.metrics import roc_auc_score

    from histodetect.inference.bootstrap import auc_interval

    y, p = np.asarray(truth, np.int64), np.asarray(scores, np.float64)
    if len(np.unique(y)) < 2:
        return None
    return {
        "auc": float(roc_auc_score(y, p)),
        "ci95": list(auc_interval(y, p, n_resamples=n_boot, seed=seed)),
        "n_tumour": int(y.sum()),
        "n_normal": int(len(y) - y.sum()),
        "n_boot": n_boot,
    }


# ----------------------------------------------------------------------------- one slide


@dataclass
class _ScoredSlide:
    """One slide's share of the evaluation, kept until every slide is pooled.

    The map itself is not kept: prob arrays of many large slides would not fit together.
    """

    slide: SlideResult
    lesions: list[LesionResult]
    hits: lesion_froc.SlideHits
    stem: str  # lower case, to match reference rows
    synthetic: bool
    annotated: bool  # has annotated tumour: its Dice/IoU enter the means


def _level0_mpp(smap: SlideMap, options: EvalOptions, notes: list[str]) -> float:
    """The map's level-0 µm/px, else the one `slide` assumed, else the default (both noted)."""
    if smap.mpp is not None:
        return smap.mpp
    if smap.mpp_assumed is not None:
        notes.append(
            f"level-0 resolution not in the slide file: {smap.mpp_assumed:.4g} µm/px assumed, "
            "as `slide` analysed it (pass --slide-mpp to `slide` if that is wrong)."
        )
        return smap.mpp_assumed
    notes.append(f"level-0 resolution unknown: {options.default_mpp} µm/px assumed.")
    return options.default_mpp


def _slide_truth(
    stem: str,
    has_tumour: bool,
    has_annotation: bool,
    reference: dict[str, bool] | None,
    notes: list[str],
) -> tuple[bool | None, bool]:
    """(truth for the slide AUC, whether the slide enters the FROC).

    The truth is the annotation's unless a reference is given (None: not in it). A tumour
    slide without an annotation has no lesions to find, so it cannot be scored for them.
    """
    tumour: bool | None = has_tumour
    if reference is not None:
        tumour = reference.get(stem.lower())
        if tumour is None:
            notes.append("not in the reference: left out of the slide AUC.")
        elif tumour != has_tumour:
            notes.append(
                f"the reference says {'tumour' if tumour else 'normal'} but the "
                f"annotation {'has' if has_tumour else 'has no'} tumour."
            )
    in_froc = not (tumour and not has_annotation)
    if not in_froc:
        notes.append("tumour slide without annotation: left out of the FROC.")
    return tumour, in_froc


def _detections(
    smap: SlideMap, mpp: float, options: EvalOptions, detections_dir: Path
) -> list[lesion_froc.Detection]:
    """The map's local maxima (NMS), also written as ``<slide>.csv`` in the challenge's
    format so that its official script can score them too."""
    dets = lesion_froc.find_detections(
        smap.prob,
        smap.cell,
        mpp=mpp,
        radius_um=options.nms_radius_um,
        floor=options.floor,
        tissue=smap.tissue,
    )
    write_atomic(detections_dir / f"{smap.name}.csv", lesion_froc.detections_csv_bytes(dets))
    return dets


def _lesion_results(
    name: str,
    lmap: lesion_froc.LesionMap,
    dets: list[lesion_froc.Detection],
    hit: lesion_froc.SlideHits,
) -> list[LesionResult]:
    """The lesion table of a slide: every lesion, ITCs too, with its best hit if any.

    ``hit.best`` leaves ITCs out (they do not count for the FROC); the table shows them.
    """
    best_any: dict[int, float] = {}
    for det, lab in zip(dets, hit.labels, strict=True):
        if lab:
            best_any[lab] = max(best_any.get(lab, -1.0), det.confidence)
    return [
        LesionResult(
            slide=name,
            **asdict(les),
            detected=les.label in best_any,
            best_score=best_any.get(les.label),
        )
        for les in lmap.lesions
    ]


def _outside_note(ann: Annotation, smap: SlideMap, path: Path) -> list[str]:
    """A note when the annotation reaches past the slide: a wrong level, scale or slide."""
    bounds = ann.bounds()
    if bounds is None or smap.size is None:
        return []
    width, height = smap.size
    x0, y0, x1, y1 = bounds
    if x0 < -0.01 * width or y0 < -0.01 * height or x1 > 1.01 * width or y1 > 1.01 * height:
        return [
            f"{path.name} reaches past the slide ({width}x{height} level-0 px): tumour outside "
            f"it is not scored; is it the right slide and in level-0 pixels?"
        ]
    return []


def _score_slide(
    smap: SlideMap,
    annotations_dir: str | Path | None,
    reference: dict[str, bool] | None,
    detections_dir: Path,
    options: EvalOptions,
) -> _ScoredSlide:
    """Score one slide map: truth, detections (written as CSV), lesions, hits, Dice/IoU.

    Args:
        smap: The slide's map (``load_slide_map``).
        annotations_dir: Where its annotation is looked up by stem (None: none).
        reference: ``read_reference``'s truth, or None to follow the annotation.
        detections_dir: Where ``<slide>.csv`` goes, in the challenge's format.
        options: Scoring settings.
    """
    notes: list[str] = []
    mpp = _level0_mpp(smap, options, notes)
    path = find_annotation(annotations_dir, smap.stem) if annotations_dir else None
    ann = read_annotation(path, slide_size=smap.size) if path else None
    if ann is not None:
        notes.extend(ann.notes)
        notes.extend(_outside_note(ann, smap, path))
    has_tumour = ann is not None and ann.has_tumour
    tumour, in_froc = _slide_truth(smap.stem, has_tumour, ann is not None, reference, notes)
    dets = _detections(smap, mpp, options, detections_dir)
    lmap = lesion_froc.lesion_map(
        ann,
        mpp=mpp,
        slide_size=smap.size,
        pixel_um=options.pixel_um,
        grow_um=options.grow_um,
        itc_axis_um=options.itc_axis_um,
    )
    hit = lesion_froc.score_detections(dets, lmap)
    pred = smap.tissue & (smap.prob >= smap.threshold)
    dice, iou = overlap(pred, annotation_cells(ann, smap))
    slide = SlideResult(
        name=smap.name,
        tumour=tumour,
        score=smap.score,
        annotation=str(path) if path else None,
        n_detections=len(dets),
        n_lesions=lmap.n_lesions,
        lesions_detected=len(hit.best),
        n_itc=sum(les.itc for les in lmap.lesions),
        false_positives=len(hit.fp),
        dice=dice,
        iou=iou,
        in_froc=in_froc,
        notes=notes,
    )
    lesions = _lesion_results(smap.name, lmap, dets, hit)
    return _ScoredSlide(slide, lesions, hit, smap.stem.lower(), smap.synthetic, has_tumour)


# ----------------------------------------------------------------------------- all slides


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _missing_from_maps(reference: dict[str, bool] | None, scored: list[_ScoredSlide]) -> list[str]:
    """A note naming the reference's slides that have no map (they cannot be scored)."""
    if reference is None:
        return []
    missing = sorted(set(reference) - {s.stem for s in scored})
    if not missing:
        return []
    return [f"{len(missing)} reference slide(s) have no map: {', '.join(missing[:10])}"]


def _remove_stale_detections(detections_dir: Path, scored: list[_ScoredSlide]) -> None:
    """Delete CSVs of slides scored by an earlier run but not this one: the challenge's
    script takes every .csv of the folder, so it would score them too."""
    names = {f"{s.slide.name}.csv" for s in scored}
    for stale in detections_dir.glob("*.csv"):
        if stale.name not in names:
            stale.unlink()


def _pool(scored: list[_ScoredSlide], options: EvalOptions) -> SlideEvalResult:
    """The figures over all slides: FROC of those in it, slide AUC, mean Dice/IoU."""
    slides = [s.slide for s in scored]
    curve = lesion_froc.froc([s.hits for s in scored if s.slide.in_froc], options.fp_rates)
    judged = [s for s in slides if s.tumour is not None]  # the reference may leave some out
    # A normal slide's Dice is 0 (anything flagged) or undefined: it would measure false
    # alarms, not overlap, so only slides with annotated tumour enter the means.
    annotated = [s.slide for s in scored if s.annotated]
    return SlideEvalResult(
        slides=slides,
        lesions=[les for s in scored for les in s.lesions],
        froc=curve,
        auc=slide_auc(
            [s.tumour for s in judged],
            [s.score for s in judged],
            n_boot=options.n_boot,
            seed=options.seed,
        ),
        mean_dice=_mean([s.dice for s in annotated]),
        mean_iou=_mean([s.iou for s in annotated]),
        settings=asdict(options),
        synthetic=any(s.synthetic for s in scored),
    )


def _write_outputs(result: SlideEvalResult, out: Path, title: str) -> None:
    """``slide-eval.json`` and (when there is a curve) ``froc.png``; fills ``result.outputs``."""
    result.outputs = {
        "json": str(out / "slide-eval.json"),
        "detections": str(out / DETECTIONS_DIR),
    }
    if result.froc is not None:
        from histodetect.slides.evaluation.plot import froc_png

        note = "SYNTHETIC: says nothing about real slides" if result.synthetic else ""
        write_atomic(out / "froc.png", froc_png(result.froc, title, note))
        result.outputs["froc_png"] = str(out / "froc.png")
    doc = jsonable(result.to_dict())
    write_atomic(out / "slide-eval.json", json.dumps(doc, indent=2, allow_nan=False).encode())


def evaluate_slides(
    maps_dir: str | Path,
    annotations_dir: str | Path | None,
    reference: str | Path | None = None,
    out: str | Path | None = None,
    *,
    options: EvalOptions = EvalOptions(),
) -> SlideEvalResult:
    """Score every slide folder of a `histodetect slide` output against annotations.

    Per slide (``_score_slide``): detections (``froc.find_detections`` on ``prob.npy``, cells
    at their level-0 centres), written to ``OUT/detections/<slide>.csv`` in the challenge's
    format; the annotation (``find_annotation`` by the slide's stem) turned into evaluation
    lesions; hits; and Dice/IoU of the map's tumour cells (``prob >= threshold`` on tissue)
    against the annotation drawn on the same cells. Then the FROC over all slides, and the
    slide-level AUC of the ``summary.json`` scores, truth = has annotated tumour, or the
    ``reference``. A slide the reference calls tumour but without an annotation cannot be
    scored for lesions: it is left out of the FROC (noted) and kept for the AUC.

    Args:
        maps_dir: The ``--out`` folder of `histodetect slide` (or one slide's folder).
        annotations_dir: Folder with the annotation files (None: every slide is normal).
        reference: Optional CSV ``slide,Tumor|Normal,...`` (Camelyon16's reference.csv).
        out: Where ``slide-eval.json``, ``froc.png`` and ``detections/`` go (default
            ``maps_dir``); CSVs in ``detections/`` of slides not scored now are removed.
        options: Scoring settings.

    Raises:
        HistodetectError: no maps, or an unreadable map, annotation or reference file.
    """
    maps_dir = Path(maps_dir)
    out = Path(out) if out is not None else maps_dir
    if annotations_dir is not None and not Path(annotations_dir).is_dir():
        # A mistyped folder would make every slide "normal" without a word.
        raise HistodetectError(f"{annotations_dir}: no such annotations folder.")
    truth_ref = read_reference(reference) if reference is not None else None
    folders = find_slide_maps(maps_dir)
    detections_dir = out / DETECTIONS_DIR
    try:
        detections_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HistodetectError(f"{detections_dir}: cannot create it ({exc.strerror}).") from None
    scored = [
        _score_slide(load_slide_map(folder), annotations_dir, truth_ref, detections_dir, options)
        for folder in folders
    ]
    _remove_stale_detections(detections_dir, scored)
    result = _pool(scored, options)
    result.notes = _missing_from_maps(truth_ref, scored)
    result.settings.update(
        maps=str(maps_dir),
        annotations=str(annotations_dir) if annotations_dir else None,
        reference=str(reference) if reference else None,
    )
    _write_outputs(result, out, maps_dir.name)
    return result
