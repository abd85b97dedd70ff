"""What `slide-eval` returns: per-slide and per-lesion records, JSON, headline and table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from histodetect.slides.evaluation.froc import Froc, Lesion


def jsonable(value):
    """``value`` with non-finite floats as None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


@dataclass
class SlideResult:
    """One slide's scores (``slide-eval.json`` ``slides``)."""

    name: str
    tumour: bool | None  # the truth used for the AUC (None: not in the reference)
    score: float
    annotation: str | None
    n_detections: int
    n_lesions: int
    lesions_detected: int
    n_itc: int
    false_positives: int
    dice: float | None
    iou: float | None
    in_froc: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LesionResult(Lesion):
    """One evaluation lesion with its slide and best hit (``slide-eval.json`` ``lesions``);
    ITCs are listed, flagged."""

    slide: str = ""
    detected: bool = False
    best_score: float | None = None


@dataclass
class SlideEvalResult:
    """What `slide-eval` found; ``to_dict()`` is ``slide-eval.json``."""

    slides: list[SlideResult]
    lesions: list[LesionResult]
    froc: Froc | None
    auc: dict | None
    mean_dice: float | None
    mean_iou: float | None
    settings: dict
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "warning": "SYNTHETIC slides or model: says nothing about real slides"
            if self.synthetic
            else None,
            "froc": self.froc.to_dict() if self.froc else None,
            "slide_auc": self.auc,
            "mean_dice": self.mean_dice,
            "mean_iou": self.mean_iou,
            "slides": [asdict(s) for s in self.slides],
            "lesions": [asdict(les) for les in self.lesions],
            "settings": self.settings,
            "notes": self.notes,
            "outputs": self.outputs,
        }

    def headline(self) -> list[str]:
        """The figures in a few lines, for the terminal."""
        lines = []
        if self.synthetic:
            lines.append("SYNTHETIC slides or model: these figures say nothing about real slides.")
        if self.froc:
            at = ", ".join(
                f"{s:.3f}@{r:g}" for r, s in zip(self.froc.rates, self.froc.at_rates, strict=True)
            )
            lines.append(
                f"FROC score {self.froc.score:.3f} (sensitivity@FP/slide: {at}; "
                f"{self.froc.n_lesions} lesions, {self.froc.n_slides} slides)"
            )
        else:
            lines.append("FROC: no lesions to find (no annotated tumour outside ITCs).")
        if self.auc:
            ci = self.auc["ci95"]
            ci_text = f", 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
            lines.append(
                f"slide AUC {self.auc['auc']:.3f}{ci_text} ({self.auc['n_tumour']} tumour, "
                f"{self.auc['n_normal']} normal slides)"
            )
        else:
            lines.append("slide AUC: needs tumour and normal slides.")
        if self.mean_dice is not None:
            lines.append(
                f"mean Dice {self.mean_dice:.3f}, IoU {self.mean_iou:.3f} over the annotated slides"
            )
        return lines

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of text cells, one row per slide."""

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        header = ["slide", "truth", "score", "detections", "lesions found", "ITC", "FP", "Dice"]
        header.append("IoU")
        rows = [
            [
                s.name,
                "-" if s.tumour is None else ("tumour" if s.tumour else "normal"),
                f"{s.score:.3f}",
                str(s.n_detections),
                f"{s.lesions_detected}/{s.n_lesions}",
                str(s.n_itc),
                str(s.false_positives),
                num(s.dice),
                num(s.iou),
            ]
            for s in self.slides
        ]
        return header, rows
