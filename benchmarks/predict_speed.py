"""Prediction speed: raw model inference vs end-to-end `predict` from a folder of .tif files.

Usage: python benchmarks/predict_speed.py [FOLDER]   (default ../shared/pcam-sample/train)

Raw: the default model's forward passes on ready-made normalised tensors (batch 256, no TTA).
End-to-end: what `histodetect predict` does after start-up: list the files, decode them in
background threads, preprocess, run the same model, write the CSV. Both use one freshly
initialised default model (speed does not depend on its weights), measured in one run.
Target: end-to-end >= 0.8 x raw.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SAMPLE, untrained_run

from histodetect.config import RunConfig
from histodetect.inference.predictor import (
    Predictor,
    list_patches,
    predict_patches,
    write_submission,
)

DEFAULT = SAMPLE / "train"


def raw_rate(predictor: Predictor, n: int, batch: int = 256) -> float:
    crop = predictor.crop
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        predictor.model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(0, n, batch):
            torch.sigmoid(predictor.model(x))
    return (n // batch + (n % batch > 0)) * batch / (time.perf_counter() - t0)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        run = untrained_run(Path(tmp) / "run")
        predictor = Predictor.from_run(run, "cpu")
        t0 = time.perf_counter()
        patches = list_patches(folder)
        probs, _ = predict_patches(predictor, patches, tta=1, progress=False)
        write_submission(Path(tmp) / "sub.csv", patches.ids, probs)
        e2e = len(patches.ids) / (time.perf_counter() - t0)
        raw = raw_rate(predictor, len(patches.ids))
    print(
        f"{len(patches.ids)} files in {folder}; model {RunConfig().model.arch}, "
        f"crop {predictor.crop}, torch threads {torch.get_num_threads()}"
    )
    print(f"raw inference on tensors:  {raw:8.0f} images/s")
    print(f"end-to-end predict (TTA 1): {e2e:8.0f} images/s")
    print(f"ratio end-to-end / raw:     {e2e / raw:8.2f}   (target >= 0.8)")


if __name__ == "__main__":
    main()
