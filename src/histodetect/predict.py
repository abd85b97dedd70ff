"""The one predictor: load a run folder and turn uint8 patches into tumour probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from histodetect.augment import dihedral
from histodetect.data import to_model_input
from histodetect.errors import HistodetectError
from histodetect.models import Classifier, build_model

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

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto") -> Predictor:
        """Load ``RUN/model.json`` + ``RUN/model.safetensors`` (safetensors only: no pickle)."""
        run = Path(run)
        try:
            meta = json.loads((run / MODEL_META).read_text())
        except FileNotFoundError:
            raise HistodetectError(
                f"{run}: no {MODEL_META}; not a finished training run folder."
            ) from None
        from safetensors.torch import load_file

        weights = run / MODEL_FILE
        if not weights.exists():
            raise HistodetectError(f"{run}: no {MODEL_FILE}; the run did not finish exporting.")
        model = build_model(meta["arch"], dropout=meta.get("dropout", 0.0))
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise HistodetectError(f"{weights}: does not match {meta['arch']} ({exc}).") from None
        return cls(model, meta, device)

    @torch.inference_mode()
    def predict_proba(
        self, images: np.ndarray | torch.Tensor, tta: int = 1, batch_size: int = 256
    ) -> np.ndarray:
        """P(tumour in the centre 32x32) for uint8 NHWC patches.

        Args:
            images: (N, 96, 96, 3) uint8 array or tensor.
            tta: 1, 2, 4 or 8 dihedral views averaged (as probabilities).
            batch_size: patches per forward pass.
        """
        if tta not in TTA_CHOICES:
            raise HistodetectError(f"--tta must be one of {TTA_CHOICES}, got {tta}.")
        images = torch.as_tensor(images)
        out = np.empty(len(images), np.float32)
        mean, std = self.meta["mean"], self.meta["std"]
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device, non_blocking=True)
            x = to_model_input(batch, mean, std, self.channels_last)
            probs = torch.zeros(len(batch), device=self.device)
            for k in range(tta):
                probs += torch.sigmoid(self.model(dihedral(x, k)).float())
            out[start : start + len(batch)] = (probs / tta).cpu().numpy()
        return out
