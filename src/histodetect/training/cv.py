"""`histodetect cv`: K-fold cross-validation, out-of-fold predictions and the fold ensemble."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histodetect.config import RunConfig, merge, save_config, to_dict
from histodetect.data.folds import ALL_FOLDS, run_rows, store_groups
from histodetect.data.loaders import ensure_store
from histodetect.data.store import Store
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.bootstrap import auc_interval
from histodetect.inference.predictor import MODEL_META, Predictor
from histodetect.inference.validation import OOF_FILE
from histodetect.training.run import train

PLAN = "cv.json"
ENSEMBLE = "ensemble"
METRICS = "cv_metrics.json"


@dataclass(frozen=True)
class CVResult:
    """What a cross-validation measured, as written to ``cv_metrics.json``."""

    out: str
    grouping: str
    folds: list[dict]
    oof_auc: float
    oof_interval: tuple[float, float]
    mean_auc: float
    std_auc: float
    holdout: list[dict] = field(default_factory=list)
    synthetic: bool = False

    def summary(self) -> str:
        """A few lines for the terminal: each fold, OOF with its interval, the holdout table."""
        tag = "  [SYNTHETIC DATA]" if self.synthetic else ""
        lines = [f"{len(self.folds)}-fold cross-validation, folds {self.grouping}{tag}"]
        lines += [
            f"  fold {f['fold']}: AUC {f['auc']:.4f} on {f['n_valid']} patches, "
            f"{f['optimizer_steps']} steps"
            for f in self.folds
        ]
        lo, hi = self.oof_interval
        lines.append(f"  fold AUC mean ± std: {self.mean_auc:.4f} ± {self.std_auc:.4f}")
        lines.append(f"  out-of-fold AUC: {self.oof_auc:.4f} (95% CI {lo:.4f}-{hi:.4f})")
        for h in self.holdout:
            best = max(h["folds"], key=h["folds"].get)
            lines.append(
                f"  held-out {h['n']} patches, TTA x{h['tta']}: ensemble AUC {h['ensemble']:.4f}"
                f", best single fold ({best}) {h['folds'][best]:.4f}"
            )
        lines.append(f"  ensemble folder: {Path(self.out) / ENSEMBLE}")
        return "\n".join(lines)


def cross_validate(
    data: str | Path,
    out: str | Path,
    cfg: RunConfig | None = None,
    folds: int = 5,
    groups: str | Path | None = None,
    holdout_tta: tuple[int, ...] = (1, 8),
    progress: bool = True,
    accelerator: str = "auto",
    devices: int | str = "auto",
) -> CVResult:
    """Train one normal run per fold, then write ``oof.csv``, the metrics and the ensemble.

    The store's ``train`` rows are cut into ``folds`` stratified folds, whole slides kept
    together when slide ids exist (the data's own, or ``groups``, an ``id,group`` csv); its
    ``valid`` and ``test`` rows are held out of every fold and score the ensemble against each
    single fold. Rerunning the same command resumes: finished folds are kept and an
    interrupted fold continues from its last checkpoint.

    Args:
        data: Kaggle folder, PCam folder or packed store.
        out: the cross-validation folder (``fold_<k>/`` run folders, ``ensemble/``).
        cfg: the training configuration every fold uses.
        folds: number of folds K (at least 2).
        groups: optional ``id,group`` csv of slide ids for data without its own.
        holdout_tta: TTA settings at which the held-out rows are scored.
        progress: show progress bars.
        accelerator: Lightning accelerator.
        devices: devices per node.
    """
    out = Path(out)
    cfg = cfg or RunConfig()
    store = ensure_store(
        data, progress=progress, valid_fraction=cfg.data.valid_fraction, seed=cfg.data.split_seed
    )
    # The groups file is kept by absolute path: fold runs re-read it from wherever they are used.
    groups_path = str(Path(groups).resolve()) if groups else None
    cfg = merge(cfg, {"data": {"folds": folds, "groups": groups_path}})
    store_groups(store, groups)  # a groups file missing some ids fails now, not in fold 3
    grouping = _grouping(store, groups)
    _check_plan(out, cfg, store)
    for k in range(folds):
        fold_cfg = merge(cfg, {"data": {"fold": k}})
        _run_fold(store, out / f"fold_{k}", fold_cfg, progress, accelerator, devices)
    oof = _out_of_fold(out, store, cfg)
    _write_oof(out / OOF_FILE, store, oof)
    _write_ensemble(out, cfg, store)
    result = _summarise(out, store, cfg, oof, grouping, holdout_tta)
    write_atomic(out / METRICS, json.dumps(asdict(result), indent=2).encode())
    return result


def _grouping(store: Store, groups: str | Path | None) -> str:
    """How folds keep patches of one slide together, in words."""
    if store.slides is not None:
        return "grouped by slide (the data's slide ids)"
    if groups:
        return f"grouped by the groups in {groups}"
    return "stratified by label only: no slide ids, so one slide's patches may span folds"


def _check_plan(out: Path, cfg: RunConfig, store: Store) -> None:
    """Record the settings on the first run; a rerun must use the same ones to resume."""
    plan = {"config": to_dict(cfg), "data": store.manifest["fingerprint"], "store": str(store.path)}
    path = out / PLAN
    if path.exists():
        before = json.loads(path.read_text())
        if before["config"] != plan["config"] or before["data"] != plan["data"]:
            raise HistodetectError(
                f"{out}: holds a cross-validation with other settings or data; rerun it with "
                "the same command to resume, or choose a new --out."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(plan, indent=2).encode())


def _run_fold(
    store: Store,
    run: Path,
    cfg: RunConfig,
    progress: bool,
    accelerator: str,
    devices: int | str,
) -> None:
    """Train fold ``run`` unless it is finished; an interrupted one resumes from its checkpoint."""
    if (run / "metrics.json").exists():
        return
    if (run / MODEL_META).exists():
        # Killed between the export and the final scores: export again from the last checkpoint
        # (training itself is over, so resuming runs no further step).
        (run / MODEL_META).unlink()
    resume = (run / "checkpoints" / "last.ckpt").exists()
    if not resume and (run / "config.yaml").exists():
        shutil.rmtree(run)  # killed before its first checkpoint: nothing to keep, start it over
    train(
        store.path,
        run,
        None if resume else cfg,
        progress=progress,
        accelerator=accelerator,
        devices=devices,
        resume=resume,
    )


def _out_of_fold(out: Path, store: Store, cfg: RunConfig) -> dict[str, np.ndarray]:
    """Each fold's model on the rows it never trained on: rows, fold numbers, probabilities."""
    rows, fold_of, probs = [], [], []
    for k in range(cfg.data.folds):
        valid = run_rows(store, merge(cfg, {"data": {"fold": k}}).data, "valid")
        predictor = Predictor.from_run(out / f"fold_{k}")
        rows.append(valid)
        fold_of.append(np.full(len(valid), k))
        probs.append(predictor.predict_proba(store.read(valid)))
    order = np.argsort(np.concatenate(rows), kind="stable")
    return {
        "rows": np.concatenate(rows)[order],
        "fold": np.concatenate(fold_of)[order],
        "probability": np.concatenate(probs)[order],
    }


def _write_oof(path: Path, store: Store, oof: dict[str, np.ndarray]) -> None:
    """``oof.csv``: id, label, fold and out-of-fold probability of every fold patch."""
    buf = io.StringIO()
    buf.write("id,label,fold,probability\n")
    for row, fold, p in zip(oof["rows"], oof["fold"], oof["probability"], strict=True):
        buf.write(f"{store.ids[row]},{int(store.labels[row])},{int(fold)},{float(p):.6f}\n")
    write_atomic(path, buf.getvalue().encode())


def _write_ensemble(out: Path, cfg: RunConfig, store: Store) -> None:
    """``ensemble/``: a folder every command accepts as a run, naming the fold runs.

    Its threshold is the runs' 0.5; ``evaluate`` chooses others on the out-of-fold predictions.
    """
    folder = out / ENSEMBLE
    folder.mkdir(exist_ok=True)
    k = cfg.data.folds
    meta = {
        "format": "histodetect-ensemble",
        "version": 1,
        "members": [f"../fold_{i}" for i in range(k)],
        "weights": [1.0] * k,
        "threshold": 0.5,
        "validation": f"../{OOF_FILE}",
        "arch": f"ensemble of {k} folds ({cfg.model.arch})",
        "synthetic": store.synthetic,
    }
    save_config(merge(cfg, {"data": {"fold": ALL_FOLDS}}), folder / "config.yaml")
    for name in ("data.json", "environment.json"):
        write_atomic(folder / name, (out / "fold_0" / name).read_bytes())
    write_atomic(folder / MODEL_META, json.dumps(meta, indent=2).encode())


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _summarise(
    out: Path,
    store: Store,
    cfg: RunConfig,
    oof: dict[str, np.ndarray],
    grouping: str,
    holdout_tta: tuple[int, ...],
) -> CVResult:
    """Fold AUCs, their mean ± std, OOF AUC with a bootstrap interval, and the holdout table."""
    y = store.labels[oof["rows"]].astype(np.int64)
    p = oof["probability"]
    folds = []
    for k in range(cfg.data.folds):
        mine = oof["fold"] == k
        steps = json.loads((out / f"fold_{k}" / "metrics.json").read_text())["optimizer_steps"]
        folds.append(
            {
                "fold": k,
                "auc": _auc(y[mine], p[mine]),
                "n_valid": int(mine.sum()),
                "optimizer_steps": int(steps),
                "run": str(out / f"fold_{k}"),
            }
        )
    aucs = np.array([f["auc"] for f in folds])
    ci = auc_interval(y, p, n_resamples=1000)
    return CVResult(
        out=str(out),
        grouping=grouping,
        folds=folds,
        oof_auc=_auc(y, p),
        oof_interval=ci,
        mean_auc=float(aucs.mean()),
        std_auc=float(aucs.std(ddof=1)),
        holdout=_holdout(out, store, cfg, holdout_tta),
        synthetic=store.synthetic,
    )


def _holdout(out: Path, store: Store, cfg: RunConfig, ttas: tuple[int, ...]) -> list[dict]:
    """AUC of every fold and of their ensemble on the rows held out of all folds."""
    rows = run_rows(store, cfg.data, "test")
    rows = rows[store.labels[rows] >= 0]
    y = store.labels[rows].astype(np.int64)
    if len(np.unique(y)) < 2:
        return []
    images = store.read(rows)
    members = [Predictor.from_run(out / f"fold_{k}") for k in range(cfg.data.folds)]
    table = []
    for tta in ttas:
        probs = [m.predict_proba(images, tta=tta) for m in members]
        table.append(
            {
                "tta": tta,
                "n": len(rows),
                "ensemble": _auc(y, np.mean(probs, axis=0)),
                "folds": {f"fold_{k}": _auc(y, q) for k, q in enumerate(probs)},
            }
        )
    return table
