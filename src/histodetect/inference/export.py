"""`histodetect export`: the whole predictor (preprocessing included) as a verified ONNX file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor


class _Probability(nn.Module):
    """uint8 NHWC patches → P(tumour): the predictor's exact path, TTA aside."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.model = predictor.model
        self.prepare = predictor.prepare

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(self.prepare(patches)))


def export_onnx(
    run: str | Path, out: str | Path | None = None, opset: int = 17, tolerance: float = 1e-4
) -> tuple[Path, float]:
    """Export RUN's model to ONNX (dynamic batch) and check it against PyTorch.

    The graph takes ``patches``: uint8 (N, 96, 96, 3) and returns ``probability``: float (N,),
    so users need no preprocessing code of their own. Returns the path and the largest
    difference from PyTorch on random patches (an error above ``tolerance``).
    """
    import onnxruntime as ort

    run = Path(run)
    predictor = Predictor.from_run(run, "cpu")
    if predictor.stain.method == "macenko":
        # Reinhard's L*a*b* statistics trace into the graph; Macenko's eigenvectors do not.
        raise HistodetectError(
            f"{run}: Macenko stain normalisation needs an eigen-decomposition, which ONNX lacks; "
            "this run cannot be exported whole (a Reinhard-normalised run can)."
        )
    if predictor.temperature != 1.0:
        warnings.warn("the exported graph leaves out the calibration temperature", stacklevel=2)
    wrapper = _Probability(predictor).eval()
    out = Path(out) if out else run / "model.onnx"
    tmp = out.with_name(f".{out.name}.tmp")
    example = torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python constants in normalise()
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=["patches"],
            output_names=["probability"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"patches": {0: "batch"}, "probability": {0: "batch"}},
        )
    # A batch size other than the traced one proves the batch axis really is dynamic.
    patches = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(["probability"], {"patches": patches})[0]
    with torch.inference_mode():
        want = wrapper(torch.from_numpy(patches)).numpy()
    diff = float(np.abs(got - want).max())
    if diff > tolerance:
        tmp.unlink(missing_ok=True)
        raise HistodetectError(
            f"{run}: the ONNX export differs from PyTorch by {diff:.2e} (> {tolerance}); not kept."
        )
    os.replace(tmp, out)
    return out, diff
