"""Camelyon16-style scores of `histodetect slide` maps on SYNTHETIC slides with planted tumours.

Usage: python benchmarks/slide_eval_synthetic.py [--run RUN | --untrained] [--minutes M] [--n N]
       [--work DIR]

Writes six SYNTHETIC pyramidal TIFF slides at 0.972 µm/px: three with planted tumours of
several sizes (from isolated tumour cells, 80 µm across, to a 580 µm lesion) and three
normal, with the planted truth as annotation files (`write_truth_annotations`: ASAP XML and
QuPath GeoJSON). Trains the default model briefly on synthetic patches (`histodetect synth`
then `histodetect train --max-minutes M`), unless --run gives a run folder (or --untrained
exports an untrained one: a check of the plumbing, its figures are chance). Then maps the
slides with `histodetect slide` and scores them with `histodetect slide-eval`, all as a user
runs them, and prints the FROC score, the sensitivity at each FP rate, the slide AUC with its
bootstrap interval, the mean Dice, and each lesion's size and best score.

About 4 minutes on 2 CPU cores with the defaults. Synthetic slides and a synthetic model say
nothing about real tissue: every line says SYNTHETIC.
Results: benchmarks/results/slide_eval_synthetic.txt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import cli, save_results, train_cli, untrained_run

from histodetect.slides.synthetic.slide import write_synthetic_slide, write_truth_annotations

W, H = 1536, 1152  # level 0 at PCam's 0.972 µm/px: 48 x 36 cells of 32 px, ~1,100 of tissue
TISSUE = [(768.0, 576.0, 700.0, 520.0)]
# Tumour ellipses (cx, cy, rx, ry) in level-0 px (~µm). Grown by 37.5 µm for scoring, those
# under 275 µm across are isolated tumour cells (ITCs): neither lesions nor false positives.
SLIDES = {
    "tumour_large": [(700.0, 560.0, 300.0, 240.0)],  # 580 x 470 µm
    "tumour_medium": [(520.0, 450.0, 150.0, 120.0), (1100.0, 750.0, 40.0, 40.0)],  # + an ITC
    "tumour_small": [(500.0, 700.0, 110.0, 110.0), (1050.0, 450.0, 200.0, 160.0)],
    "normal_a": [],
    "normal_b": [],
    "normal_c": [],
}


def make_run(args: argparse.Namespace, work: Path, env: dict) -> tuple[Path, str]:
    """(run folder, a line saying what model it is)."""
    if args.run:
        return args.run, f"model: the run {args.run}"
    if args.untrained:
        run = untrained_run(work / "run", synthetic=True)
        return run, "model: the default architecture, untrained (figures are chance)"
    cli("synth", "--out", work / "patches", "--n", str(args.n), "--seed", "1", env=env)
    train_cli(work / "patches", work / "run", "--max-minutes", str(args.minutes), env=env)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    return work / "run", (
        f"model: default ({json.loads((work / 'run' / 'model.json').read_text())['arch']}) "
        f"trained {metrics['seconds'] / 60:.1f} min on {args.n} synthetic patches, "
        f"{metrics['optimizer_steps']} steps; validation AUC {metrics['valid']['auc']:.3f}"
    )


def write_slides(work: Path) -> tuple[list[Path], Path]:
    """The slides and their annotation folder."""
    paths, ann = [], work / "annotations"
    (work / "slides").mkdir(parents=True, exist_ok=True)
    for seed, (name, tumours) in enumerate(SLIDES.items()):
        path = work / "slides" / f"{name}.tif"
        truth = write_synthetic_slide(path, W, H, TISSUE, tumours, seed=seed)
        write_truth_annotations(truth, ann)
        paths.append(path)
    return paths, ann


def figures(doc: dict, timing: dict[str, float], model: str) -> list[str]:
    """The printed lines, every one marked SYNTHETIC."""
    froc, auc = doc["froc"], doc["slide_auc"]
    n_tumour = sum(bool(s) for s in SLIDES.values())
    lines = [
        f"{len(SLIDES)} slides of {W}x{H} px at 0.972 um/px ({n_tumour} with planted tumours, "
        f"{len(SLIDES) - n_tumour} normal); {model}",
        f"FROC score {froc['score']:.3f} ({froc['n_lesions']} lesions, {froc['n_slides']} slides)",
        *(
            f"  sensitivity at {rate:>4s} FP/slide: {sens:.3f}"
            for rate, sens in froc["sensitivity_at"].items()
        ),
        f"slide AUC {auc['auc']:.3f}, 95% bootstrap CI {auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f}"
        f" ({auc['n_tumour']} tumour, {auc['n_normal']} normal slides; {auc['n_boot']} resamples)",
        f"mean Dice {doc['mean_dice']:.3f}, IoU {doc['mean_iou']:.3f} (tumour slides, at the map's"
        " cells)",
    ]
    for s in doc["slides"]:
        dice = "-" if s["dice"] is None else f"{s['dice']:.3f}"
        lines.append(
            f"  {s['name']:14s} score {s['score']:.3f}, lesions found "
            f"{s['lesions_detected']}/{s['n_lesions']}, ITCs {s['n_itc']}, "
            f"FPs {s['false_positives']}, Dice {dice}"
        )
    for les in doc["lesions"]:
        best = "-" if les["best_score"] is None else f"{les['best_score']:.3f}"
        kind = "ITC   " if les["itc"] else "lesion"
        lines.append(
            f"  {kind} on {les['slide']:14s} {les['major_axis_um']:4.0f} um (grown), "
            f"{'found' if les['detected'] else 'missed'}, best score {best}"
        )
    lines.append(
        "seconds: " + ", ".join(f"{step} {seconds:.0f}" for step, seconds in timing.items())
    )
    return [f"SYNTHETIC {line}" for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--run", type=Path, help="an existing run folder instead of training")
    model.add_argument("--untrained", action="store_true", help="an untrained default model")
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget (default 2)")
    parser.add_argument("--n", type=int, default=3000, help="synthetic training patches")
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        # The synthetic patches are packed into a cache: keep it out of the user's.
        env = {**os.environ, "HISTODETECT_CACHE": str(work / "cache")}
        timing = {}
        t0 = time.perf_counter()
        run, model_line = make_run(args, work, env)
        timing["model"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slides, ann = write_slides(work)
        timing["write slides"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cli("slide", run, *slides, "--out", work / "maps", "--quiet", "--redo", env=env)
        timing["histodetect slide"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cli("slide-eval", work / "maps", "--annotations", ann, env=env)
        timing["histodetect slide-eval"] = time.perf_counter() - t0
        doc = json.loads((work / "maps" / "slide-eval.json").read_text())
    save_results("slide_eval_synthetic", figures(doc, timing, model_line))


if __name__ == "__main__":
    main()
