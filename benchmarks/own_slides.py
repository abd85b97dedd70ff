"""Train on your own slides, on SYNTHETIC ones: extract -> train -> slide -> slide-eval.

Usage: python benchmarks/own_slides.py [--minutes M] [--per-slide N] [--work DIR]

Writes twelve SYNTHETIC pyramidal TIFF slides at 0.486 µm/px (a 20x-like level 0; level 1 is
PCam's 0.972 µm/px) with planted tumours of several sizes and their annotations (QuPath
GeoJSON, as a lab would export them): eight to learn from (six with tumour, two normal) and
four held out (two with tumour, two normal). Then, as a user runs them: `histodetect extract`
on the eight (timed, with one and with two worker processes), `histodetect train` of the
default model for M minutes on the extracted patches, `histodetect slide` and `histodetect
slide-eval` on the four held-out slides. Prints extraction patches/s, the validation AUC, the
FROC score and the slide AUC.

About 8 minutes on 2 CPU cores with the defaults. Synthetic slides say nothing about real
tissue: every line says SYNTHETIC.
Results: benchmarks/results/own_slides.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cli, save_results

from histodetect.slides.synthetic.slide import write_synthetic_slide, write_truth_annotations

W, H, MPP = 2048, 1536, 0.486  # level 0; level 1 (1024 x 768) is at 0.972 µm/px
TISSUE = [(1024.0, 768.0, 940.0, 700.0)]
N_LEARN, N_HELD = 8, 4


def plant(rng: np.random.Generator, tumour: bool) -> list[tuple[float, float, float, float]]:
    """One or two tumour ellipses inside the tissue, 150-700 µm across; none for normal."""
    if not tumour:
        return []
    out = []
    for _ in range(rng.integers(1, 3)):
        r = rng.uniform(150, 700)  # level-0 px at 0.486 µm/px: 145 to 680 µm across
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
        cx, cy = 1024 + dist * 940 * np.cos(angle), 768 + dist * 700 * np.sin(angle)
        out.append((cx, cy, r, r * rng.uniform(0.7, 1.0)))
    return out


def write_slides(work: Path) -> tuple[list[Path], list[Path], Path, int]:
    """Learning slides, held-out slides, their annotation folder and the lesions planted."""
    rng = np.random.default_rng(13)
    ann, learn, held, lesions = work / "annotations", [], [], 0
    (work / "slides").mkdir(parents=True, exist_ok=True)
    for i in range(N_LEARN + N_HELD):
        # Six of eight learning slides and two of four held-out ones carry tumour.
        tumour = (i % 4 != 3) if i < N_LEARN else (i - N_LEARN) < 2
        kind = "tumour" if tumour else "normal"
        name = f"{'learn' if i < N_LEARN else 'held'}_{i:02d}_{kind}"
        tumours = plant(rng, tumour)
        lesions += len(tumours) if i >= N_LEARN else 0
        path = work / "slides" / f"{name}.tif"
        truth = write_synthetic_slide(
            path, W, H, TISSUE, tumours, mpp=MPP, downsamples=(1, 2, 8, 32), seed=i
        )
        write_truth_annotations(truth, ann)
        (ann / f"{name}.xml").unlink()  # a QuPath lab: GeoJSON only
        (learn if i < N_LEARN else held).append(path)
    return learn, held, ann, lesions


def extract(learn: list[Path], ann: Path, out: Path, per_slide: int, workers: int, env) -> dict:
    """`histodetect extract` timed as a user runs it; its patches and patches/s."""
    load = os.getloadavg()[0]  # other work on the machine slows the worker processes
    t0 = time.perf_counter()
    text = cli(
        "extract", *learn, "--annotations", ann, "--out", out, "--per-slide", str(per_slide),
        "--workers", str(workers), "--quiet", env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "store.json").read_text())
    n = manifest["patches"]
    # The command's own rate: from its start, not the interpreter's (imports take seconds).
    inner = float(re.search(r"drawn at (\d+) patches/s", text).group(1))
    return {"patches": n, "seconds": seconds, "rate": n / seconds, "inner": inner,
            "counts": manifest["counts"], "load": load}  # fmt: skip


def figures(runs: dict, metrics: dict, doc: dict, minutes: float, lesions: int, timing) -> list:
    """The printed lines, every one marked SYNTHETIC."""
    first = runs[1]
    pos = sum(int(c.get("1", 0)) for c in first["counts"].values())
    froc, auc = doc["froc"], doc["slide_auc"]
    lines = [
        f"{N_LEARN + N_HELD} slides of {W}x{H} px at {MPP} um/px (level 1 at 0.972): "
        f"{N_LEARN} to learn from (6 tumour, 2 normal), {N_HELD} held out (2 tumour, "
        f"{lesions} planted tumours; 2 normal); annotations as QuPath GeoJSON",
        f"extract: {first['patches']} patches ({pos} positive) from {N_LEARN} slides; split "
        f"by slide: {first['counts']}",
        *(
            f"  extraction with {w} worker(s): {r['inner']:.0f} patches/s (slides opened, "
            f"tissue found, labelled, read, stored); {r['rate']:.0f} patches/s counting the "
            f"interpreter's start ({r['seconds']:.1f} s; load average {r['load']:.1f} "
            f"on {os.cpu_count()} CPUs)"
            for w, r in runs.items()
        ),
        f"train: default ({metrics.get('arch', 'densecnn')}) {minutes:g} min on the extracted "
        f"patches, {metrics['optimizer_steps']} steps; validation AUC "
        f"{metrics['valid']['auc']:.3f} (held-out slides of the learning set)",
        f"held-out slides: FROC score {froc['score']:.3f} ({froc['n_lesions']} lesions, "
        f"{froc['n_slides']} slides)",
        *(
            f"  sensitivity at {rate:>4s} FP/slide: {sens:.3f}"
            for rate, sens in froc["sensitivity_at"].items()
        ),
        f"held-out slides: slide AUC {auc['auc']:.3f}, 95% bootstrap CI {auc['ci95'][0]:.3f}-"
        f"{auc['ci95'][1]:.3f} ({auc['n_tumour']} tumour, {auc['n_normal']} normal)",
    ]
    for s in doc["slides"]:
        dice = "-" if s["dice"] is None else f"{s['dice']:.3f}"
        lines.append(
            f"  {s['name']:16s} score {s['score']:.3f}, lesions found "
            f"{s['lesions_detected']}/{s['n_lesions']}, FPs {s['false_positives']}, Dice {dice}"
        )
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))
    return [f"SYNTHETIC {line}" for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget (default 4)")
    parser.add_argument("--per-slide", type=int, default=400, help="patches per slide")
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        env = {**os.environ, "HISTODETECT_CACHE": str(work / "cache")}
        timing = {}
        t0 = time.perf_counter()
        learn, held, ann, lesions = write_slides(work)
        timing["write slides"] = time.perf_counter() - t0
        runs = {w: extract(learn, ann, work / f"data-{w}", args.per_slide, w, env) for w in (1, 2)}
        timing["extract (1 and 2 workers)"] = sum(r["seconds"] for r in runs.values())
        t0 = time.perf_counter()
        run = work / "run"
        cli("train", "--data", work / "data-1", "--out", run, "--max-minutes",
            str(args.minutes), env=env)  # fmt: skip
        timing["train"] = time.perf_counter() - t0
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["arch"] = json.loads((run / "model.json").read_text())["arch"]
        t0 = time.perf_counter()
        cli("slide", run, *held, "--out", work / "maps", "--quiet", env=env)
        cli("slide-eval", work / "maps", "--annotations", ann, env=env)
        timing["slide + slide-eval"] = time.perf_counter() - t0
        doc = json.loads((work / "maps" / "slide-eval.json").read_text())
    save_results("own_slides", figures(runs, metrics, doc, args.minutes, lesions, timing))


if __name__ == "__main__":
    main()
