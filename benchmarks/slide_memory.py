"""Peak memory of `histodetect slide` on a 20,000 x 20,000 px SYNTHETIC slide.

Usage: python benchmarks/slide_memory.py [--size PX] [--mode dense|patch|auto] [--keep DIR]

Writes a SYNTHETIC 3-level pyramidal TIFF (level 0 at 0.972 µm/px, so all 20,000 x 20,000 px
are analysed; tissue sections with planted tumour regions), then runs the command as a user
would, in a child process, and reports the child's peak resident memory (ru_maxrss).
Target: peak RSS < 3 GiB. Results: benchmarks/results/slide_memory.txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save_results, untrained_run

from histodetect.models.dense import DENSE_ARCH
from histodetect.slides.synthetic.slide import write_synthetic_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--mode", default="dense", choices=["dense", "patch", "auto"])
    parser.add_argument("--keep", type=Path, help="folder to keep the slide and outputs in")
    args = parser.parse_args()
    n = args.size
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = untrained_run(work / "run", DENSE_ARCH, synthetic=True)
        slide = work / f"synthetic-{n}.tif"
        # Two sections covering about a quarter of the glass, as on many real slides.
        tissue = [
            (0.30 * n, 0.35 * n, 0.20 * n, 0.22 * n),
            (0.70 * n, 0.62 * n, 0.16 * n, 0.25 * n),
        ]
        tumours = [
            (0.28 * n, 0.30 * n, 0.05 * n, 0.04 * n),
            (0.72 * n, 0.70 * n, 0.03 * n, 0.05 * n),
        ]
        t0 = time.perf_counter()
        if not slide.exists():
            write_synthetic_slide(
                slide, n, n, tissue, tumours, downsamples=(1, 4, 16), compression=None
            )
        made = time.perf_counter() - t0
        gib = slide.stat().st_size / 2**30  # the temporary folder is gone when lines are made
        t0 = time.perf_counter()
        out = work / "maps"
        command = [
            sys.executable, "-m", "histodetect.cli", "slide", str(run), str(slide),
            "--out", str(out), "--mode", args.mode, "--quiet", "--redo",
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode:
            sys.exit(f"histodetect slide failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / slide.stem / "summary.json").read_text())
    lines = [
        f"SYNTHETIC {n}x{n} px slide ({gib:.2f} GiB uncompressed TIFF, "
        f"written in {made:.0f} s), analysed at level {summary['level']} "
        f"({summary['analysed_mpp']} um/px), mode {summary['mode']}",
        f"{summary['patches_predicted']} tissue patches of {summary['grid'][0]}x"
        f"{summary['grid'][1]} cells, {summary['tiles_read']} tiles read, "
        f"{summary['tiles_skipped']} skipped, {summary['n_regions']} regions; "
        f"command took {seconds:.0f} s ({summary['patches_per_s']} patches/s)",
        f"peak RSS of `histodetect slide`: {peak_kib / 2**20:.2f} GiB   (target < 3 GiB)",
    ]
    save_results("slide_memory", lines)


if __name__ == "__main__":
    main()
