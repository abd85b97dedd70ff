"""Robustness to another lab's stain or scanner: held-out AUC, clean and under fixed shifts.

Usage: python benchmarks/shift.py [DATA] [--minutes 20] [--arm NAME ...] [--run NAME=RUN ...]
       [--valid-fraction 0.3] [--seed S] [--ood DIR] [--work DIR]

DATA defaults to ../shared/pcam-sample (REAL patches); its seeded 30 % validation split is held
out. Each arm is `histodetect train` with the default recipe and one change, trained one after
another with all threads and the same time budget (issue 14's protocol):
  default   the default recipe;
  stain     --augment stain (H&E amounts +-40 %, colour casts, stronger colour jitter and blur);
  reinhard  --stain-norm reinhard;  macenko  --stain-norm macenko;
  reinhard+stain  both --stain-norm reinhard and --augment stain;
  reinhard+robust  --stain-norm reinhard with more blur and JPEG (shift_robust.yaml).
``--run NAME=RUN`` evaluates an already trained run instead of training that arm. Every arm's
held-out patches are then judged clean and under each shift below (fixed parameters, the same
pixels for every arm), and the printout gives each AUC, its drop from clean, the worst drop, and
the paired bootstrap interval of every arm's clean AUC minus the default's, and each run's
out-of-scope AUROC (held-out patches vs the REAL other-organ tiles of --ood, as
benchmarks/scope.py). A rerun with the same ``--work`` skips finished runs and resumes an
interrupted one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SAMPLE, train_cli
from PIL import Image, ImageFilter
from quality import auc, paired_difference
from scope import auroc, other_organ_patches

from histodetect.data.loaders import split_indices_of
from histodetect.data.pack import pack
from histodetect.data.store import open_store
from histodetect.inference.predictor import Predictor

ARMS = {
    "default": (),
    "stain": ("--augment", "stain"),
    "reinhard": ("--stain-norm", "reinhard"),
    "macenko": ("--stain-norm", "macenko"),
    "reinhard+stain": ("--stain-norm", "reinhard", "--augment", "stain"),
    "reinhard+robust": (
        "--stain-norm",
        "reinhard",
        "--config",
        str(Path(__file__).with_name("shift_robust.yaml")),
    ),
}

# Ruifrok & Johnston optical-density vectors of haematoxylin, eosin and DAB (rows).
_HED = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)


def _od(images: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(images.astype(np.float64), 1.0) / 255.0)


def _rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(np.round(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def hed_scale(images: np.ndarray, factor: float) -> np.ndarray:
    """Haematoxylin and eosin amounts both times ``factor`` (a stronger or weaker protocol)."""
    stains = _od(images) @ np.linalg.inv(_HED)
    stains[..., :2] *= factor
    return _rgb(stains @ _HED)


def optical_density(images: np.ndarray, factor: float) -> np.ndarray:
    """Every pixel's optical density times ``factor``: a paler (< 1) or darker (> 1) slide."""
    return _rgb(_od(images) * factor)


def cast(images: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """Each RGB channel times its gain: a white balance or an old slide's yellowing."""
    return np.clip(np.round(images * np.asarray(gains)), 0, 255).astype(np.uint8)


def _per_image(images: np.ndarray, op) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(im))) for im in images])


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG compression at ``quality``, as a scanner or a web upload does."""

    def one(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return _per_image(images, one)


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of ``radius`` px: slightly out of focus."""
    return _per_image(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


SHIFTS = {
    "H&E +40 %": lambda x: hed_scale(x, 1.4),
    "H&E -40 %": lambda x: hed_scale(x, 0.6),
    "pale (OD x0.7)": lambda x: optical_density(x, 0.7),
    "dark (OD x1.3)": lambda x: optical_density(x, 1.3),
    "blue cast (0.85, 0.92, 1)": lambda x: cast(x, (0.85, 0.92, 1.0)),
    "yellow cast (1, 0.97, 0.8)": lambda x: cast(x, (1.0, 0.97, 0.8)),
    "JPEG quality 60": lambda x: jpeg(x, 60),
    "blur 1 px": lambda x: blur(x, 1.0),
}


def train_arm(store_path: Path, run: Path, arm: str, minutes: float, seed: int) -> None:
    """Train one arm with the time budget, or finish an interrupted run of it."""
    if (run / "model.json").exists():
        return
    if (run / "checkpoints" / "last.ckpt").exists():
        train_cli(store_path, run, "--resume")
        return
    # Half a minute of the budget is left for start-up, final validation and export.
    budget = ("--epochs", "1000", "--max-minutes", str(minutes - 0.5), "--seed", str(seed))
    train_cli(store_path, run, *ARMS[arm], *budget)


def judge(run: Path, images: dict[str, np.ndarray], y: np.ndarray, other: np.ndarray) -> dict:
    """The run's AUC on the clean and every shifted copy, and its out-of-scope AUROC."""
    predictor = Predictor.from_run(run)
    probs = {name: predictor.predict_proba(x) for name, x in images.items() if name != "clean"}
    probs["clean"], inside = predictor.predict_and_score(images["clean"])
    ood = float("nan")
    if inside is not None:
        ood = auroc(inside, predictor.scope_scores(other))
    return {"probs": probs, "auc": {name: auc(p, y) for name, p in probs.items()}, "ood": ood}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=SAMPLE)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per arm")
    parser.add_argument("--arm", action="append", choices=sorted(ARMS), help="arms to train")
    parser.add_argument("--run", action="append", default=[], help="NAME=RUN: evaluate RUN")
    parser.add_argument("--valid-fraction", type=float, default=0.3, help="held-out share")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every arm")
    parser.add_argument("--ood", type=Path, default=SAMPLE.parent / "ood", help="other organs")
    parser.add_argument("--work", type=Path, help="work folder (rerun to resume; default: new)")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.run)
    arms = args.arm or ([] if given else ["default", "stain", "reinhard"])
    work = args.work or Path(tempfile.mkdtemp(prefix="hd-shift-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path = args.data if (args.data / "store.json").exists() else work / "store"
    if not (store_path / "store.json").exists():
        pack(args.data, store_path, progress=False, valid_fraction=args.valid_fraction)
    store = open_store(store_path)
    valid = split_indices_of(store, "valid")
    y = store.labels[valid]
    clean = store.read(valid)
    images = {"clean": clean, **{name: shift(clean) for name, shift in SHIFTS.items()}}
    print(
        f"data: {args.data} ({len(valid)} held-out patches"
        + (", SYNTHETIC" if store.synthetic else ", REAL")
        + f"), work folder {work}, {args.minutes:g} min per trained arm, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    runs = {name: Path(path) for name, path in given.items()}
    for arm in arms:
        t0 = time.perf_counter()
        train_arm(store_path, work / f"run-{arm}", arm, args.minutes, args.seed)
        runs[arm] = work / f"run-{arm}"
        print(f"trained {arm} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)

    other = other_organ_patches(args.ood)[1].images
    results = {name: judge(run, images, y, other) for name, run in runs.items()}
    names = list(results)
    print(f"\n{'ROC AUC (drop from clean)':<28s}" + "".join(f"{n:>17s}" for n in names))
    for shift in images:
        cells = ""
        for n in names:
            a = results[n]["auc"][shift]
            drop = results[n]["auc"]["clean"] - a
            cells += f"{a:>17.4f}" if shift == "clean" else f"{a:>9.4f} ({drop:+.3f})"
        print(f"{shift:<28s}{cells}")
    summary = {}
    for n in names:
        drops = {s: results[n]["auc"]["clean"] - a for s, a in results[n]["auc"].items()}
        worst = max((s for s in drops if s != "clean"), key=drops.get)
        summary[n] = {"clean": results[n]["auc"]["clean"], "worst": worst, "drop": drops[worst]}
        metrics = json.loads((runs[n] / "metrics.json").read_text())
        print(
            f"{n}: clean {summary[n]['clean']:.4f}, worst drop {drops[worst]:.4f} ({worst}), "
            f"trained {metrics.get('epochs_run')} epochs at "
            f"{metrics.get('train_images_per_s', float('nan')):.0f} images/s; "
            f"out-of-scope AUROC {results[n]['ood']:.4f}; run {runs[n]}"
        )
    base = "default" if "default" in results else names[0]
    for n in names:
        if n != base:
            p, q = results[n]["probs"]["clean"], results[base]["probs"]["clean"]
            low, high = paired_difference(y, p, q)
            print(
                f"clean AUC {n} - {base}: {auc(p, y) - auc(q, y):+.4f} [{low:+.4f}, {high:+.4f}] "
                "(paired bootstrap 95 %)"
            )
    ok = [n for n in names if summary[n]["drop"] <= 0.01]
    print(f"arms whose worst drop is <= 0.01: {', '.join(ok) or 'none'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
