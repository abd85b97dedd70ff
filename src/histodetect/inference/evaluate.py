"""`histodetect evaluate`: metrics with bootstrap intervals, thresholds, curves and calibration."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.calibration import fit_temperature

EPS = 1e-7
SCOPE_BINS = 40  # histogram bins of the out-of-scope scores, for the report


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    pred = p >= threshold
    return {
        "tp": int(np.sum(pred & (y == 1))),
        "fp": int(np.sum(pred & (y == 0))),
        "tn": int(np.sum(~pred & (y == 0))),
        "fn": int(np.sum(~pred & (y == 1))),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Every headline metric for labels ``y`` (0/1) and probabilities ``p`` at ``threshold``."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    c = _confusion(y, p, threshold)
    sens, spec = _ratio(c["tp"], c["tp"] + c["fn"]), _ratio(c["tn"], c["tn"] + c["fp"])
    prec = _ratio(c["tp"], c["tp"] + c["fp"])
    q = np.clip(p, EPS, 1 - EPS)
    both = len(np.unique(y)) == 2
    return {
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "average_precision": float(average_precision_score(y, p)) if both else float("nan"),
        "accuracy": (c["tp"] + c["tn"]) / len(y),
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "recall": sens,
        "f1": _ratio(2 * prec * sens, prec + sens),
        "log_loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))),
        "brier": float(np.mean((p - y) ** 2)),
    }


def bootstrap_intervals(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :func:`point_metrics`, resampling patches.

    Resamples with both classes absent are redrawn implicitly by skipping them (rare unless the
    set is tiny). Patches from one slide are correlated, so these intervals are optimistic when
    many patches share a slide.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if y[idx].min() == y[idx].max():
            continue
        for key, value in point_metrics(y[idx], p[idx], threshold).items():
            draws.setdefault(key, []).append(value)
    alpha = (1 - level) / 2
    out = {}
    for key, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]  # e.g. precision when a resample predicts no positives
        out[key] = (
            (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)))
            if len(v)
            else (float("nan"), float("nan"))
        )
    return out


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 on these labels."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (e.g. 0.95 for screening)."""
    positives = np.sort(p[y == 1])[::-1]
    if not len(positives):
        raise HistodetectError("no positive patches: cannot choose a sensitivity threshold.")
    k = int(np.ceil(target * len(positives))) - 1
    return float(positives[min(max(k, 0), len(positives) - 1)])


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Reliability table over equal-width probability bins, and the expected calibration error."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        conf, freq = float(p[mask].mean()), float(y[mask].mean())
        table.append(
            {
                "bin": [float(edges[b]), float(edges[b + 1])],
                "n": int(mask.sum()),
                "mean_probability": conf,
                "fraction_positive": freq,
            }
        )
        ece += mask.mean() * abs(conf - freq)
    return table, float(ece)


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured, as written to ``metrics_<split>.json``."""

    split: str
    n: int
    tta: int
    metrics: dict
    intervals: dict
    thresholds: dict
    confusion: dict
    reliability: list
    ece: float
    temperature: float | None
    synthetic: bool
    thresholds_from: str = "the scored split"
    notes: tuple[str, ...] = ()
    # What was scored (``validation.scored_data``): folder, kind, store, split, count and
    # whether it is the run's own data; empty when not scored from a folder (cv, slide-eval).
    data: dict = field(default_factory=dict)
    # ``evaluate --by COLUMN``: {"by": COLUMN, "rows": [per-group metrics], "worst": group}.
    groups: dict = field(default_factory=dict)
    # Out of scope: {"threshold", "out_of_scope", "n_in_scope", "in_scope": metrics}, or
    # {"unavailable": why} for runs without the statistics.
    scope: dict = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lo, hi = self.intervals["auc"]
        m = self.metrics
        lines = [
            f"{self.split}: {self.n} patches, TTA x{self.tta}"
            + (f" of {self.data['path']}" if self.data.get("path") else "")
            + ("  [SYNTHETIC DATA]" if self.synthetic else ""),
            f"  ROC AUC {m['auc']:.4f} (95% CI {lo:.4f}-{hi:.4f})",
            f"  accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
            f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, "
            f"F1 {m['f1']:.4f} at threshold {self.thresholds['run']:.3f}",
            f"  log-loss {m['log_loss']:.4f}, Brier {m['brier']:.4f}, ECE {self.ece:.4f}",
            f"  thresholds and temperature chosen on {self.thresholds_from}",
            *(f"  note: {n}" for n in self.notes),
        ]
        if self.scope.get("unavailable"):
            lines.append(f"  out of scope: {self.scope['unavailable']}")
        elif self.scope and not self.scope["in_scope"]:
            lines.append("  out of scope: EVERY patch; these metrics are not to be trusted")
        elif self.scope:
            inside = self.scope["in_scope"]
            lines.append(
                f"  out of scope: {self.scope['out_of_scope']:.1%} of patches; on the "
                f"{self.scope['n_in_scope']} in scope: ROC AUC {inside['auc']:.4f}, accuracy "
                f"{inside['accuracy']:.4f} (all: {m['auc']:.4f}, {m['accuracy']:.4f})"
            )
        if self.groups:
            from histodetect.inference.groups import describe_groups

            lines.append(describe_groups(self.groups["by"], self.groups))
        return "\n".join(lines)


def evaluate_probabilities(
    y: np.ndarray,
    p: np.ndarray,
    split: str,
    threshold: float = 0.5,
    tta: int = 1,
    n_boot: int = 1000,
    synthetic: bool = False,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    target_sensitivity: float = 0.95,
    thresholds_from: str = "the scored split",
    choose: bool = True,
    notes: tuple[str, ...] = (),
) -> Evaluation:
    """Metrics, intervals, thresholds and calibration for labels ``y`` and probabilities ``p``.

    ``calibration`` is the (labels, probabilities) of the run's own validation data (named by
    ``thresholds_from``): thresholds and the temperature are chosen there, never on the data
    being scored. Without it they are chosen on ``y``, ``p`` (when they are the validation
    split), or, with ``choose`` False, only the run's own ``threshold`` is reported.
    """
    cy, cp = calibration if calibration is not None else (y, p)
    chosen = {"run": threshold}
    temperature = None
    if choose or calibration is not None:
        chosen["youden"] = youden_threshold(cy, cp)
        chosen[f"sensitivity_{target_sensitivity:g}"] = sensitivity_threshold(
            cy, cp, target_sensitivity
        )
        temperature = fit_temperature(cy, cp)
    table, ece = calibration_bins(y, p)
    return Evaluation(
        split=split,
        n=len(y),
        tta=tta,
        metrics=point_metrics(y, p, threshold),
        intervals=bootstrap_intervals(y, p, threshold, n_boot),
        thresholds=chosen,
        confusion={name: _confusion(y, p, t) for name, t in chosen.items()},
        reliability=table,
        ece=ece,
        temperature=temperature,
        synthetic=synthetic,
        thresholds_from=thresholds_from,
        notes=notes,
    )


def save_evaluation(ev: Evaluation, y: np.ndarray, p: np.ndarray, out: Path, title: str) -> None:
    """Write ``metrics_<split>.json`` and the ``evaluation_<split>.png`` figure into ``out``."""
    write_atomic(out / f"metrics_{ev.split}.json", json.dumps(asdict(ev), indent=2).encode())
    figure = out / f"evaluation_{ev.split}.png"
    plot_evaluation(y, p, ev, figure, title + (" SYNTHETIC DATA" if ev.synthetic else ""))


def plot_evaluation(y: np.ndarray, p: np.ndarray, ev: Evaluation, out: Path, title: str) -> None:
    """ROC, precision-recall, reliability diagram and confusion matrix as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = Figure(figsize=(16, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 4)
    fpr, tpr, _ = roc_curve(y, p)
    lo, hi = ev.intervals["auc"]
    ax[0].plot(fpr, tpr, label=f"AUC {ev.metrics['auc']:.4f} ({lo:.3f}-{hi:.3f})")
    ax[0].plot([0, 1], [0, 1], ls=":", c="grey")
    ax[0].set(title="ROC", xlabel="false positive rate", ylabel="true positive rate")
    prec, rec, _ = precision_recall_curve(y, p)
    ax[1].plot(rec, prec, label=f"AP {ev.metrics['average_precision']:.4f}")
    ax[1].set(title="precision-recall", xlabel="recall", ylabel="precision")
    conf = [b["mean_probability"] for b in ev.reliability]
    freq = [b["fraction_positive"] for b in ev.reliability]
    ax[2].plot([0, 1], [0, 1], ls=":", c="grey")
    ax[2].plot(conf, freq, marker="o", label=f"ECE {ev.ece:.4f}")
    ax[2].set(title="reliability", xlabel="predicted probability", ylabel="fraction tumour")
    c = ev.confusion["run"]
    grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    ax[3].imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax[3].text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if v > grid.max() / 2 else "black",
        )
    ax[3].set(
        title=f"confusion at {ev.thresholds['run']:.2f}",
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["pred 0", "pred 1"],
        yticklabels=["true 0", "true 1"],
    )
    for a in ax[:3]:
        a.legend(loc="lower right" if a is not ax[2] else "upper left")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(out)


def scope_metrics(predictor, scores: np.ndarray | None, y: np.ndarray, p: np.ndarray) -> dict:
    """The out-of-scope share, the metrics on the in-scope patches (beside all of them) and
    the scores' histogram per class (for the report)."""
    threshold = predictor.scope_threshold
    if scores is None or threshold is None:
        return {
            "unavailable": "the run has no scope statistics (histodetect scope RUN --data DATA "
            "fits them; an ensemble needs them in every member)"
        }
    inside = scores <= threshold
    edges = np.histogram_bin_edges(np.r_[scores, threshold], bins=SCOPE_BINS)
    return {
        "threshold": threshold,
        "out_of_scope": float(1 - inside.mean()),
        "n_in_scope": int(inside.sum()),
        "in_scope": point_metrics(y[inside], p[inside], predictor.threshold)
        if inside.any()
        else {},
        "histogram": {
            "edges": edges.round(4).tolist(),
            "normal": np.histogram(scores[y == 0], edges)[0].tolist(),
            "tumour": np.histogram(scores[y == 1], edges)[0].tolist(),
        },
    }


def _by_group(by, store, idx, data, groups_csv, y, p, ev: Evaluation) -> dict:
    """Per-group metrics for ``--by``: from the table, or the store's slide ids for ``slide``."""
    from histodetect.inference.groups import group_metrics, read_groups

    no_table = groups_csv is None and not (Path(data) / "meta.csv").is_file()
    if by == "slide" and no_table and store.slides is not None:
        groups = np.asarray(store.slides[idx], dtype=object)
    else:
        groups = read_groups(by, [str(store.ids[i]) for i in idx], data, groups_csv)
    return {"by": by, **group_metrics(y, p, groups, ev.thresholds["run"], point_metrics)}


def runs_and_out(
    runs: str | Path | list[str | Path], out: str | Path | None
) -> tuple[list[Path], Path]:
    """The run folders scored and the (created) results folder: the run's own for one run;
    several runs, scored as an ensemble, need ``out``."""
    runs = [Path(r) for r in (runs if isinstance(runs, list) else [runs])]
    if out is None and len(runs) > 1:
        raise HistodetectError("several runs are scored as an ensemble: pass --out FOLDER.")
    out = Path(out) if out is not None else runs[0]
    out.mkdir(parents=True, exist_ok=True)
    return runs, out


def evaluate(
    runs: str | Path | list[str | Path],
    data: str | Path,
    split: str = "valid",
    tta: int = 1,
    n_boot: int = 1000,
    calibrate: bool = False,
    weights: list[float] | None = None,
    out: str | Path | None = None,
    by: str | None = None,
    groups_csv: str | Path | None = None,
) -> Evaluation:
    """Score a run (or an ensemble) on one split of DATA; writes ``metrics_<split>.json`` + figure.

    Args:
        runs: a run folder, an ensemble folder (from ``cv``), or several runs scored as their
            weighted ensemble (as ``predict`` averages them).
        data: Kaggle folder, PCam folder or store.
        split: ``train``/``valid``/``test`` as the run saw them, or ``all``: every labelled
            patch, e.g. of an external set the run never saw.
        tta: dihedral views averaged.
        n_boot: bootstrap resamples for the intervals.
        calibrate: store the fitted temperature in the (single) run's ``model.json``.
        weights: ensemble weights, one per run.
        out: folder for the metrics and figure (default: the run folder; needed for several).
        by: also score each group of this column (centre, scanner, slide...) of DATA's
            ``meta.csv`` or of ``groups_csv``; ``slide`` falls back to the store's slide ids.
        groups_csv: a csv with ``id`` and the ``by`` column.

    Thresholds and the temperature are chosen on the run's own validation data (the ensemble's
    out-of-fold predictions after ``cv``), never on the data being scored.
    """
    from histodetect.data.loaders import labelled_split
    from histodetect.inference.predictor import MODEL_META, Predictor
    from histodetect.inference.validation import own_validation, scored_data, training_overlap

    runs, out = runs_and_out(runs, out)
    if calibrate and len(runs) > 1:
        raise HistodetectError("--calibrate stores a temperature in one run; pass one run.")
    predictor = Predictor.from_runs(runs, weights)
    store, idx = labelled_split(runs[0], data, split)
    images = store.read(idx)
    p, scores = predictor.predict_and_score(images, tta=tta)
    y = store.labels[idx].astype(np.int64)
    calibration, source = (None, "the validation split scored here")
    if split != "valid":
        calibration, source = own_validation(predictor, runs, store, tta)
    ev = evaluate_probabilities(
        y,
        p,
        split,
        predictor.threshold,
        tta,
        n_boot,
        store.synthetic,
        calibration,
        thresholds_from=source,
        choose=split == "valid",
        notes=training_overlap(runs, store, idx, split),
    )
    ev = replace(ev, data=scored_data(runs, data, store, split, len(y)))
    ev = replace(ev, scope=scope_metrics(predictor, scores, y, p))
    if by:
        ev = replace(ev, groups=_by_group(by, store, idx, data, groups_csv, y, p, ev))
    title = f"{out.name} on {Path(data).name} {split} ({len(y)} patches, TTA x{tta})"
    save_evaluation(ev, y, p, out, title)
    if calibrate:
        if ev.temperature is None:
            raise HistodetectError(f"--calibrate: {ev.thresholds_from}; no temperature fitted.")
        meta = json.loads((runs[0] / MODEL_META).read_text())
        # Fitted on probabilities that already carry the stored temperature: the two compose.
        meta["temperature"] = ev.temperature * predictor.temperature
        write_atomic(runs[0] / MODEL_META, json.dumps(meta, indent=2).encode())
    return ev
