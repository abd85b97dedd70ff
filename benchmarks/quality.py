"""Quality on real patches: the default recipe vs baselines and other models, as users train.

Usage: python benchmarks/quality.py [DATA] [--minutes 20] [--arch A --arch B ...]
       [--valid-fraction 0.3] [--seed S] [--work DIR]

DATA defaults to ../shared/pcam-sample (6,259 real Kaggle patches); its seeded validation split
(30 % by default: 1,878 patches, enough to separate about 0.005 of AUC with a paired interval)
is held out from every model. Printed:
  1. colour-histogram logistic regression (per-channel histograms of the patch and its centre);
  2. a plain 4-block CNN, flips/90-degree rotations only, Adam at a constant rate, no tricks,
     trained for the same time budget;
  3. `histodetect train` with the default CPU recipe, given the same budget (--max-minutes: the
     one-cycle schedule follows the clock, so the run ends annealed however fast the machine
     is), evaluated without and with 8-view test-time augmentation.
Target: the default recipe reaches validation ROC AUC >= 0.95 within 20 minutes on two CPU cores
and beats both baselines.

With several ``--arch``, step 3 runs once per architecture with the same recipe and budget,
one after another, each with all the machine's threads (as a user runs `train`), and prints
each one's validation AUC and training images/s, then the paired bootstrap interval of every
AUC difference (same patches, so it is tighter than either interval), with and without TTA.
Each run's held-out probabilities are saved in the work folder (``probs-ARCH.npz``), so further
pairs or seeds can be compared later. ``--parallel`` trains them side by side instead (one
thread each, for the budget times the number of runs); that is not how users train, and a
model that gains more from a second thread is penalised, so choices use the sequential mode.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SAMPLE, train_cli
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from histodetect.config import RunConfig
from histodetect.data.loaders import split_indices_of
from histodetect.data.pack import pack
from histodetect.data.store import Store, open_store
from histodetect.data.transforms import dihedral, to_model_input
from histodetect.inference.predictor import Predictor

DEFAULT = SAMPLE


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.as_tensor(probs), torch.as_tensor(labels).long()))


def colour_features(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Per-channel intensity histograms of the whole patch and of its centre 32x32."""
    feats = []
    for region in (images, images[:, 32:64, 32:64]):
        flat = region.reshape(len(images), -1, 3)
        for c in range(3):
            counts = np.stack(
                [np.bincount(v // (256 // bins), minlength=bins) for v in flat[..., c]]
            )
            feats.append(counts / flat.shape[1])
    return np.concatenate(feats, axis=1)


def colour_baseline(store: Store, train: np.ndarray, valid: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    model.fit(colour_features(store.read(train)), store.labels[train])
    return auc(model.predict_proba(colour_features(store.read(valid)))[:, 1], store.labels[valid])


def plain_cnn() -> nn.Module:
    """Four conv-BN-ReLU-pool blocks (32-64-128-256) at full resolution, then a linear layer."""
    layers, c_in = [], 3
    for c in (32, 64, 128, 256):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 1))


def plain_baseline(store: Store, train: np.ndarray, valid: np.ndarray, minutes: float) -> tuple:
    """The no-tricks CNN, trained until the time budget runs out; returns (AUC, epochs)."""
    torch.manual_seed(0)
    model = plain_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mean, std = RunConfig().data.mean, RunConfig().data.std
    rng = np.random.default_rng(0)
    deadline = time.perf_counter() + minutes * 60
    epochs = 0.0
    while time.perf_counter() < deadline:
        order = rng.permutation(train)
        for start in range(0, len(order), 128):
            if time.perf_counter() >= deadline:
                break
            idx = order[start : start + 128]
            x = to_model_input(torch.from_numpy(store.read(idx)), mean, std, False)
            x = dihedral(x, int(rng.integers(8)))  # one random flip/rotation per batch
            y = torch.from_numpy(store.labels[idx].astype(np.float32))
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epochs += len(idx) / len(train)
    model.eval()
    with torch.inference_mode():
        x = to_model_input(torch.from_numpy(store.read(valid)), mean, std, False)
        probs = torch.cat(
            [torch.sigmoid(model(x[i : i + 256])).squeeze(1) for i in range(0, len(x), 256)]
        ).numpy()
    return auc(probs, store.labels[valid]), epochs


def recipe_runs(store: Store, store_path: Path, valid: np.ndarray, tmp: Path, args) -> list:
    """Step 3 for every ``--arch``: one after another, or with ``--parallel`` all at once."""
    archs = args.arch or [RunConfig().model.arch]
    extra = ("--config", str(args.config)) if args.config else ()

    def flags(arch: str, minutes: float) -> tuple[str, ...]:
        # The time budget drives the one-cycle schedule; half a minute is left for start-up,
        # the final validation and the export, so the whole command fits in the budget.
        budget = str(minutes - 0.5)
        seed = ("--seed", str(args.seed))
        return ("--arch", arch, "--epochs", "1000", "--max-minutes", budget, *seed, *extra)

    if not args.parallel:
        results = []
        for arch in archs:
            t0 = time.perf_counter()
            run = tmp / f"run-{arch}"
            if not (run / "model.json").exists():  # a rerun with the same --work resumes
                train_cli(store_path, run, *flags(arch, args.minutes))
            minutes = (time.perf_counter() - t0) / 60
            results.append(recipe_result(store, valid, tmp / f"run-{arch}", arch, minutes))
        return results
    # Side by side: each run gets an equal share of the cores for len(archs) times the budget,
    # so each has the machine time of a sequential run and any other load hits all alike.
    threads = max(1, (os.cpu_count() or 2) // len(archs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    running = [
        train_cli(
            store_path,
            tmp / f"run-{arch}",
            *flags(arch, args.minutes * len(archs)),
            wait=False,
            env=env,
        )
        for arch in archs
    ]
    for process in running:
        if process.wait():
            raise SystemExit(f"training failed: {process.args}")
    minutes = (time.perf_counter() - t0) / 60
    print(f"(side by side: {len(archs)} runs, {threads} thread(s) each, {minutes:.1f} min)")
    return [recipe_result(store, valid, tmp / f"run-{a}", a, minutes) for a in archs]


def recipe_result(store: Store, valid: np.ndarray, run: Path, arch: str, minutes: float) -> dict:
    """Validation AUC (logged, and with TTA x8) and training speed of one recipe run."""
    metrics = json.loads((run / "metrics.json").read_text())
    predictor = Predictor.from_run(run)
    images = store.read(valid)
    probs = predictor.predict_proba(images)
    probs_tta = predictor.predict_proba(images, tta=8)
    tta = auc(probs_tta, store.labels[valid])
    np.savez(run.parent / f"probs-{arch}.npz", probs=probs, tta=probs_tta, y=store.labels[valid])
    result = {
        "arch": arch,
        "auc": metrics["valid"]["auc"],
        "tta": tta,
        "probs": probs,
        "probs_tta": probs_tta,
        "images_per_s": metrics["train_images_per_s"],
    }
    print(
        f"[3] histodetect default recipe ({arch}, {metrics['epochs_run']} epochs, "
        f"{result['images_per_s']:.0f} train images/s, {minutes:.1f} min wall): AUC "
        f"{result['auc']:.4f} (this pass {auc(probs, store.labels[valid]):.4f}), with TTA x8 "
        f"{tta:.4f}; run folder {run}",
        flush=True,
    )
    return result


def paired_difference(
    y: np.ndarray, p: np.ndarray, q: np.ndarray, n_boot: int = 2000
) -> tuple[float, float]:
    """95 % percentile interval of AUC(p) - AUC(q), resampling the same patches for both."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            diffs.append(roc_auc_score(y[idx], p[idx]) - roc_auc_score(y[idx], q[idx]))
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--minutes", type=float, default=20.0, help="budget per CNN")
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain CNN")
    parser.add_argument("--config", type=Path, help="YAML overrides, to try a recipe change")
    parser.add_argument(
        "--arch", action="append", help="architecture(s) for step 3 (default: the default)"
    )
    parser.add_argument(
        "--parallel", action="store_true", help="train the --arch runs side by side (fairer)"
    )
    parser.add_argument("--valid-fraction", type=float, default=0.3, help="held-out share")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--work", type=Path, help="work folder (rerun to resume; default: new)")
    args = parser.parse_args()
    tmp = args.work or Path(tempfile.mkdtemp(prefix="hd-quality-"))
    tmp.mkdir(parents=True, exist_ok=True)
    store_path = args.data if (args.data / "store.json").exists() else tmp / "store"
    if store_path != args.data and not (store_path / "store.json").exists():
        pack(args.data, store_path, progress=False, valid_fraction=args.valid_fraction)
    store = open_store(store_path)
    train, valid = split_indices_of(store, "train"), split_indices_of(store, "valid")
    print(
        f"data: {args.data} ({len(train)} train / {len(valid)} valid patches), work folder {tmp}, "
        f"seed {args.seed}, {args.minutes:g} min per model, torch threads {torch.get_num_threads()}"
        + (" SYNTHETIC" if store.synthetic else ""),
        flush=True,
    )

    t0 = time.perf_counter()
    colour = colour_baseline(store, train, valid)
    print(
        f"[1] colour-histogram logistic regression: AUC {colour:.4f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    recipes = recipe_runs(store, store_path, valid, tmp, args)
    ours, tta = recipes[0]["auc"], recipes[0]["tta"]

    plain = float("nan")
    if not args.skip_plain:
        t0 = time.perf_counter()
        plain, plain_epochs = plain_baseline(store, train, valid, args.minutes)
        print(
            f"[2] plain 4-block CNN, flips/rotations only ({plain_epochs:.1f} epochs, "
            f"{(time.perf_counter() - t0) / 60:.1f} min): AUC {plain:.4f}",
            flush=True,
        )

    print("\nsummary (validation ROC AUC, same held-out split):")
    print(f"  colour-histogram LR     {colour:.4f}")
    print(f"  plain 4-block CNN       {plain:.4f}")
    beats = "n/a (plain CNN skipped)" if plain != plain else ours > colour and ours > plain
    print(
        f"  histodetect {recipes[0]['arch']:<11s} {ours:.4f}  (TTA x8: {tta:.4f}; target >= 0.95, "
        f"beats both: {beats})"
    )
    y = store.labels[valid]
    for i, first in enumerate(recipes):
        for other in recipes[i + 1 :]:
            print(f"  {first['arch']} - {other['arch']}:", end="")
            for key, what in (("probs", "TTA x1"), ("probs_tta", "TTA x8")):
                low, high = paired_difference(y, first[key], other[key])
                diff = auc(first[key], y) - auc(other[key], y)  # the pass the interval resamples
                print(f"  {what} {diff:+.4f} [{low:+.4f}, {high:+.4f}]", end="")
            print(
                f"  (paired bootstrap 95%); train images/s {first['images_per_s']:.0f} vs "
                f"{other['images_per_s']:.0f}"
            )


if __name__ == "__main__":
    main()
