"""The one predictor: load a run folder and turn uint8 patches into tumour probabilities."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histodetect.data.stain import stain_normaliser
from histodetect.data.transforms import (
    centre_crop,
    dihedral,
    normalise,
    to_model_input,
    to_unit_float,
)
from histodetect.errors import HistodetectError
from histodetect.models.classifier import Classifier, build_model

MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"
TTA_CHOICES = (1, 2, 4, 8)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A trained classifier plus its normalisation, ready for batched (TTA) inference."""

    def __init__(self, model: Classifier, meta: dict, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.meta = meta
        self.channels_last = bool(meta.get("channels_last", True))
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.threshold = float(meta.get("threshold", 0.5))
        self.crop = int(meta.get("crop", 96))
        self.temperature = float(meta.get("temperature", 1.0))
        self.stain = stain_normaliser(meta).to(self.device)
        self.scope: dict | None = None  # out-of-scope statistics (``from_run`` loads them)
        self.members: list[Predictor] = []  # an ensemble's member runs (their scope statistics)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC patches (on the device) → the model's input: stain-normalised when the
        run was trained so, centre-cropped to the run's crop and normalised."""
        mean, std, crop = self.meta["mean"], self.meta["std"], self.crop
        if self.stain.method == "none":
            return to_model_input(batch, mean, std, self.channels_last, crop)
        # The whole patch is normalised, as in training, and then cropped.
        x = centre_crop(self.stain(to_unit_float(batch)), crop)
        return normalise(x, mean, std, self.channels_last)

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto") -> Predictor:
        """Load a run folder, or an ensemble folder (``model.json`` naming member runs).

        Weights are read from ``model.safetensors`` only: never a pickle.
        """
        run = Path(run)
        meta = read_model_meta(run)
        if "members" in meta:
            members = [(run / m).resolve() for m in meta["members"]]
            return cls.ensemble(members, meta.get("weights"), device, meta)
        from histodetect.inference.scope import load_scope

        predictor = cls(_load_classifier(run, meta), meta, device)
        predictor.scope = load_scope(run)
        return predictor

    @classmethod
    def from_runs(
        cls, runs: list[str | Path], weights: list[float] | None = None, device: str = "auto"
    ) -> Predictor:
        """One run (or ensemble folder), or several runs as their (weighted) ensemble."""
        if len(runs) == 1 and not weights:
            return cls.from_run(runs[0], device)
        return cls.ensemble([Path(r) for r in runs], weights, device)

    @classmethod
    def ensemble(
        cls,
        runs: list[Path],
        weights: list[float] | None = None,
        device: str = "auto",
        meta: dict | None = None,
    ) -> Predictor:
        """Several runs as one predictor: the weighted mean of their probabilities.

        Args:
            runs: member run folders (an ensemble folder may itself be a member).
            weights: one non-negative weight per run (default equal); normalised to sum 1.
            device: where to run.
            meta: an ensemble folder's ``model.json`` (its threshold and temperature), if any.
        """
        from histodetect.models.ensemble import EnsembleModel

        w = np.asarray(weights if weights else [1.0] * len(runs), dtype=np.float64)
        if len(w) != len(runs) or (w < 0).any() or w.sum() == 0:
            raise HistodetectError("--weights needs one non-negative weight per run, not all zero.")
        loaded = [cls.from_run(r, "cpu") for r in runs]
        crops = {p.crop for p in loaded}
        if len(crops) > 1:
            raise HistodetectError(
                f"ensemble members see different centre crops ({sorted(crops)} px); ensemble "
                "runs trained with the same data.crop."
            )
        methods = {p.stain.method for p in loaded}
        if len(methods) > 1:
            raise HistodetectError(
                f"ensemble members use different stain normalisations ({sorted(methods)}); "
                "ensemble runs trained with the same data.stain_norm."
            )
        model = EnsembleModel(
            [p.model for p in loaded],
            (w / w.sum()).tolist(),
            [(p.meta["mean"], p.meta["std"]) for p in loaded],
            (loaded[0].meta["mean"], loaded[0].meta["std"]),
            [p.temperature for p in loaded],
        )
        predictor = cls(model, ensemble_meta(runs, loaded, w / w.sum(), meta or {}), device)
        for member in loaded:  # their models are the ensemble's, now on its device
            member.device = predictor.device
            member.stain = member.stain.to(predictor.device)
        predictor.members = loaded
        return predictor

    def weight_files(self) -> list[Path]:
        """The safetensors files behind this predictor (one per member of an ensemble)."""
        return [Path(f) for f in self.meta.get("weight_files", [])]

    def predict_proba(
        self, images: np.ndarray | torch.Tensor, tta: int = 1, batch_size: int = 256
    ) -> np.ndarray:
        """P(tumour in the centre 32x32) for uint8 NHWC patches.

        Args:
            images: (N, 96, 96, 3) uint8 array or tensor.
            tta: 1, 2, 4 or 8 dihedral views averaged (as probabilities).
            batch_size: patches per forward pass.
        """
        return self._predict(images, tta, batch_size)

    @torch.inference_mode()
    def _predict(self, images, tta: int, batch_size: int, capture=None) -> np.ndarray:
        """``predict_proba``; with a ``StageCapture``, its descriptors of the first view too."""
        if tta not in TTA_CHOICES:
            raise HistodetectError(f"--tta must be one of {TTA_CHOICES}, got {tta}.")
        images = torch.as_tensor(images)
        out = np.empty(len(images), np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device, non_blocking=True)
            x = self.prepare(batch)
            probs = torch.zeros(len(batch), device=self.device)
            for k in range(tta):
                probs += torch.sigmoid(self.model(dihedral(x, k)).float())
                if capture is not None and k == 0:  # the untransformed view, as fitted
                    capture.collect(batch)
            out[start : start + len(batch)] = (probs / tta).cpu().numpy()
        if self.temperature != 1.0:  # calibrated by `evaluate --calibrate`
            from histodetect.inference.calibration import apply_temperature

            out = apply_temperature(out, self.temperature).astype(np.float32)
        return out

    def predict_and_score(
        self, images: np.ndarray, tta: int = 1, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict_proba`` and ``scope_scores`` of the same patches (scores None without
        statistics): what every answer per patch gives together.

        A run's scores come from the same forward pass as its probabilities (hooks on its
        first stages); an ensemble's members score in passes of their own.
        """
        if self.scope is None:
            return self.predict_proba(images, tta, batch_size), self.scope_scores(images)
        from histodetect.inference.scope import StageCapture, score_descriptors, uses_texture

        with StageCapture(self.model, uses_texture(self.scope)) as capture:
            probs = self._predict(images, tta, batch_size, capture)
        return probs, score_descriptors(capture.descriptors(), self.scope)

    def scope_scores(
        self, images: np.ndarray, texture: dict[str, np.ndarray] | None = None
    ) -> np.ndarray | None:
        """Out-of-scope score of each uint8 patch, None when the run has no statistics.

        An ensemble's score is the mean of its members' scores, each less its own threshold
        (members' scores live in their own feature spaces): the ensemble flags a patch when its
        members, on average, place it beyond their thresholds. None if any member lacks them.
        ``texture``: the patches' texture sets, when already computed.
        """
        if self.scope_threshold is None:
            return None
        from histodetect.inference.scope import scope_scores, texture_sets, uses_texture

        if self.members:
            if texture is None and any(uses_texture(m.scope) for m in self.members):
                texture = texture_sets(images, self.device)  # model-free: once for all
            margins = [m.scope_scores(images, texture) - m.scope_threshold for m in self.members]
            return np.mean(margins, axis=0)
        return scope_scores(self, images, self.scope, texture)

    @property
    def scope_threshold(self) -> float | None:
        """Scores above this are out of scope (None: no statistics; 0 for an ensemble)."""
        if self.members:
            return None if any(m.scope_threshold is None for m in self.members) else 0.0
        return None if self.scope is None else float(self.scope["threshold"][0])


def read_model_meta(run: Path) -> dict:
    """``RUN/model.json``, with a clear error when the folder is not a finished run."""
    try:
        meta = json.loads((run / MODEL_META).read_text())
    except FileNotFoundError:
        raise HistodetectError(
            f"{run}: no {MODEL_META}; not a finished training run or ensemble folder."
        ) from None
    except (OSError, ValueError) as exc:
        raise HistodetectError(f"{run / MODEL_META}: unreadable ({exc}).") from None
    return meta


def model_files(run: Path) -> list[Path]:
    """The files a run's predictions depend on: ``model.json`` and the weights, for an ensemble
    those of every member too (what a cache of its outputs must watch)."""
    run = Path(run)
    files = [run / MODEL_META, run / MODEL_FILE]
    try:
        members = json.loads((run / MODEL_META).read_text()).get("members", [])
    except (OSError, ValueError):
        return files
    return files + [f for m in members for f in model_files((run / m).resolve())]


def _load_classifier(run: Path, meta: dict) -> Classifier:
    """The run's classifier from ``model.safetensors``; records the file in ``meta``."""
    from safetensors.torch import load_file

    weights = run / MODEL_FILE
    if not weights.exists():
        raise HistodetectError(f"{run}: no {MODEL_FILE}; the run did not finish exporting.")
    model = build_model(meta["arch"], dropout=meta.get("dropout", 0.0))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise HistodetectError(f"{weights}: does not match {meta['arch']} ({exc}).") from None
    meta["weight_files"] = [str(weights)]
    return model


def ensemble_meta(
    runs: list[Path], loaded: list[Predictor], weights: np.ndarray, own: dict
) -> dict:
    """What an ensemble predictor knows of itself: members, weights, input and threshold.

    The threshold is the ensemble folder's own (``cv`` writes the runs' 0.5), else the members'
    thresholds averaged with the weights. ``validation`` (from ``cv``) names the out-of-fold
    predictions on which ``evaluate`` chooses its other thresholds.
    """
    archs = sorted({str(p.meta.get("arch")) for p in loaded})
    first = loaded[0].meta
    meta = {
        "format": "histodetect-ensemble",
        "arch": f"ensemble of {len(loaded)} ({', '.join(archs)})",
        "member_runs": [str(r) for r in runs],
        "member_weights": [float(x) for x in weights],
        "mean": first["mean"],
        "std": first["std"],
        "crop": loaded[0].crop,
        "channels_last": all(p.channels_last for p in loaded),
        "input_size": first.get("input_size", 96),
        "threshold": float(sum(w * p.threshold for w, p in zip(weights, loaded, strict=True))),
        "synthetic": any(bool(p.meta.get("synthetic")) for p in loaded),
        # One method (checked); members of a cross-validation fitted near-equal targets on
        # their own folds, and the first member's stands for all.
        "stain_norm": first.get("stain_norm"),
        "weight_files": [f for p in loaded for f in p.meta["weight_files"]],
    }
    meta.update({k: own[k] for k in ("threshold", "temperature", "validation") if k in own})
    return meta


@dataclass(frozen=True)
class PatchList:
    """Patches to predict: ids with files (streamed) or rows of a packed store."""

    ids: list[str]
    files: list[Path] | None = None
    store: object | None = None
    rows: np.ndarray | None = None
    images: np.ndarray | None = None  # patches cut from resampled tiles (``--mpp``)
    problems: tuple[tuple[str, str], ...] = ()


def list_patches(data: str | Path, split: str | None = None, mpp: float | None = None) -> PatchList:
    """Resolve DATA for prediction.

    A Kaggle root predicts ``test/`` in ``sample_submission.csv`` order (missing or extra files
    are problems); any folder of ``<id>.tif/.png/.jpg`` predicts every file sorted by id; a packed
    store predicts its ``split`` (default: its test split if it has one, else everything). With
    ``mpp``, the folder holds tiles of any size at ``mpp`` µm/px: each is resampled to the
    model's resolution and cut into as many patches as fit (unusable tiles are problems).
    """
    from histodetect.data.patchio import PATCH_SUFFIXES

    data = Path(data)
    if not data.exists():
        raise HistodetectError(f"{data}: no such file or folder.")
    if (data / "store.json").exists():
        from histodetect.data.store import open_store

        store = open_store(data)
        if split is None:
            split = "test" if (store.splits == "test").any() else None
        rows = np.arange(len(store)) if split is None else np.flatnonzero(store.splits == split)
        return PatchList([str(store.ids[i]) for i in rows], store=store, rows=rows)
    folder = data / "test" if (data / "test").is_dir() else data
    files = {
        f.stem: f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in PATCH_SUFFIXES
    }
    submission = data / "sample_submission.csv"
    problems: list[tuple[str, str]] = []
    if folder != data and submission.exists():
        import csv

        with open(submission, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if not rows or [h.strip().lower() for h in rows[0][:2]] != ["id", "label"]:
            raise HistodetectError(f"{submission}: the first line must be 'id,label'.")
        order = [r[0].strip() for r in rows[1:] if r and r[0].strip()]
        wanted = set(order)
        problems += [
            (str(folder / f"{i}.tif"), "in sample_submission.csv, no file")
            for i in order
            if i not in files
        ]
        problems += [
            (str(files[i]), "file not in sample_submission.csv")
            for i in sorted(files)
            if i not in wanted
        ]
        ids = order
    else:
        ids = sorted(files)
    if not ids:
        raise HistodetectError(f"{folder}: holds no patch files (.tif, .png, .jpg).")
    if mpp is not None:
        from histodetect.data.tiles import tile_patches

        cut = tile_patches([files[i] for i in ids if i in files], mpp)
        return PatchList(cut.ids, images=cut.images, problems=tuple(problems + cut.problems))
    paths = [files.get(i, folder / f"{i}.tif") for i in ids]
    return PatchList(ids, files=paths, problems=tuple(problems))


def predict_patches(
    predictor: Predictor,
    patches: PatchList,
    tta: int = 1,
    batch_size: int = 256,
    skip_bad: bool = False,
    fallback: float = 0.5,
    progress: bool = True,
    scores_out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Probability of every patch (an ensemble predictor averages its members).

    Files are decoded a batch ahead in worker threads while the models run, so memory holds a
    few batches, not the data set. Returns the probabilities and the list of unreadable patches,
    which get ``fallback`` when ``skip_bad`` (otherwise the first one stops the job).
    ``scores_out`` (one float per patch), when given for a predictor with scope statistics, is
    filled with the out-of-scope scores in the same pass (NaN for unreadable patches).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    n = len(patches.ids)
    out = np.empty(n, np.float32)
    bad: list[tuple[str, str]] = []
    starts = list(range(0, n, batch_size))

    def load(start: int):
        stop = min(start + batch_size, n)
        if patches.store is not None:
            return patches.store.read(patches.rows[start:stop]), []
        if patches.images is not None:
            return patches.images[start:stop], []
        from histodetect.data.patchio import decode_batch

        return decode_batch(patches.files[start:stop])

    bar = tqdm(total=n, unit="patch", desc="predict", disable=not progress)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, s) for s in starts[:2]]
        for k, start in enumerate(starts):
            images, bad_rows = pending.pop(0).result()
            if k + 2 < len(starts):
                pending.append(pool.submit(load, starts[k + 2]))
            for row, why in bad_rows:
                where = str(patches.files[start + row])
                if not skip_bad:
                    hint = " (tiles of other sizes: --mpp)" if why.startswith("wrong size") else ""
                    raise HistodetectError(
                        f"{where}: {why}{hint}. Fix or remove it, or pass --skip-bad to predict "
                        f"the rest (unreadable patches then get probability {fallback})."
                    )
                bad.append((where, why))
            if scores_out is None:
                probs = predictor.predict_proba(images, tta, batch_size)
            else:
                probs, scores = predictor.predict_and_score(images, tta, batch_size)
                scores_out[start : start + len(images)] = scores
            for row, _ in bad_rows:
                probs[row] = fallback
                if scores_out is not None:
                    scores_out[start + row] = np.nan
            out[start : start + len(images)] = probs
            bar.update(len(images))
    bar.close()
    return out, bad


def write_submission(path: str | Path, ids: list[str], probs: np.ndarray) -> None:
    """Write ``id,label`` rows atomically (a crash never leaves half a submission)."""
    import io

    from histodetect.files import write_atomic

    buf = io.StringIO()
    buf.write("id,label\n")
    for pid, p in zip(ids, probs, strict=True):
        buf.write(f"{pid},{float(p):.6f}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue().encode())
