"""Shared by the slide tests: a small SYNTHETIC tissue layout and run folders made without
training (an exported model is enough wherever only the plumbing is under test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histodetect.config import RunConfig, merge, to_dict
from histodetect.slides.synthetic.slide import render_region
from histodetect.training.module import PatchModule
from histodetect.training.run_folder import export_model

# Tissue and tumour ellipses (cx, cy, rx, ry) in level-0 px of the synthetic test slides.
TISSUE = [(620.0, 560.0, 560.0, 440.0)]
TUMOURS = [(520.0, 520.0, 220.0, 180.0)]


def export_run(path: Path, arch: str, spread: bool = True) -> Path:
    """A run folder with an untrained ``arch``; with ``spread`` its outputs on synthetic
    tissue are rescaled to logits of about N(0, 2^2), so maps vary from cell to cell."""
    from histodetect.data.transforms import to_model_input

    path.mkdir(parents=True, exist_ok=True)
    cfg = merge(RunConfig(), {"model": {"arch": arch}})
    torch.manual_seed(0)
    module = PatchModule(to_dict(cfg))
    model = module.model.eval()
    if spread:
        # Patches of synthetic tissue at both texture scales used below (levels 0 and 1).
        views = [render_region(96, 192, 96 * 8, 96 * 4, d, TISSUE, TUMOURS) for d in (1, 2)]
        patches = np.concatenate(
            [v.reshape(4, 96, 8, 96, 3).swapaxes(1, 2).reshape(32, 96, 96, 3) for v in views]
        )
        x = to_model_input(torch.from_numpy(patches), cfg.data.mean, cfg.data.std)
        with torch.no_grad():
            # Batch-norm statistics of these patches keep activations in range, as training would.
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = None
            model.train()(x)
            model.eval()
            logits = model(x)
            head = model.head[-1]
            head.weight.mul_(2.0 / logits.std())
            head.bias.sub_(logits.mean() * 2.0 / logits.std())
    export_model(module, path, {"synthetic": True})
    return path


@pytest.fixture(scope="module")
def fcn_run(tmp_path_factory) -> Path:
    """An untrained, spread ``smallfcn`` run: mapped densely, its maps vary cell to cell."""
    return export_run(tmp_path_factory.mktemp("runs") / "fcn", "smallfcn")
