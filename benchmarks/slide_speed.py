"""Whole-slide map speed: dense (one pass per tile) vs patch-wise inference on the same region.

Usage: python benchmarks/slide_speed.py [--size PX] [--repeats N]

Both modes run the inference loop of `histodetect slide` (`predict_cells`: tiles read from a
SYNTHETIC pyramidal TIFF with their patch context, stride 32) over every cell of the same
region, so both predict exactly the same patches, with the same padding-free model (`--arch`,
default `densecnn`; untrained with random batch-norm statistics: speed does not depend on the
weights, and the maps vary); alternating, best of N each.
Also checks that the two maps agree to 1e-4. Region sides that are multiples of 1024 px give
whole 32x32-cell tiles.
Target: dense >= 5x patch-wise patches/s. Results: benchmarks/results/slide_speed.txt.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import save_results, untrained_run

from histodetect.inference.predictor import Predictor
from histodetect.models.dense import DENSE_ARCH
from histodetect.slides.maps.cells import predict_cells
from histodetect.slides.synthetic.slide import write_synthetic_slide
from histodetect.slides.wsi.readers import open_slide
from histodetect.slides.wsi.resolution import choose_resolution, working_reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="region side in px (at 0.972)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default=DENSE_ARCH, help="a padding-free architecture")
    args = parser.parse_args()
    size = args.size
    with tempfile.TemporaryDirectory() as tmp:
        run = untrained_run(Path(tmp) / "run", args.arch, synthetic=True)
        predictor = Predictor.from_run(run, "cpu")
        slide = Path(tmp) / "region.tif"
        # Tissue covers the whole region, so both modes predict every cell.
        big = (size / 2, size / 2, size, size)
        write_synthetic_slide(slide, size, size, [big], [(size / 3, size / 3, size / 8, size / 8)])
        reader = open_slide(slide)
        read = working_reader(reader, choose_resolution(reader))
        every = np.ones((size // 32, size // 32), bool)
        best: dict[str, float] = {}
        maps: dict[str, np.ndarray] = {}
        cells = int(every.sum())
        for _ in range(args.repeats):
            for mode in ("patch", "dense"):
                prob, _, stats = predict_cells(read, every, predictor, 32, mode=mode)
                best[mode] = min(best.get(mode, float("inf")), stats.seconds)
                maps[mode] = prob
                print(f"  {mode:5s} {stats.patches} patches: {stats.seconds:6.1f} s")
        reader.close()
    patch_rate, dense_rate = cells / best["patch"], cells / best["dense"]
    diff = float(np.abs(maps["patch"] - maps["dense"]).max())
    lines = [
        f"SYNTHETIC {size}x{size} px region at 0.972 um/px, stride 32: {cells} patches; "
        f"model {args.arch}, torch threads {torch.get_num_threads()}, best of {args.repeats}",
        f"patch-wise: {patch_rate:8.0f} patches/s",
        f"dense:      {dense_rate:8.0f} patches/s",
        f"ratio dense / patch-wise: {dense_rate / patch_rate:6.2f}   (target >= 5)",
        f"max |dense - patch-wise| probability: {diff:.1e}   (target <= 1e-4; the map spans "
        f"{maps['patch'].min():.3f} to {maps['patch'].max():.3f}, std {maps['patch'].std():.3f})",
    ]
    save_results("slide_speed", lines)


if __name__ == "__main__":
    main()
