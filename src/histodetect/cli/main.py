"""The `histodetect` command line: one program, a subcommand per job, help from docstrings."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from histodetect import __version__
from histodetect.errors import HistodetectError

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``func`` as subcommand ``name``; its docstring becomes the help text."""

    def wrap(func: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (func, configure)
        return func

    return wrap


def _say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- synth


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="folder to create (Kaggle layout)")
    p.add_argument("--n", type=int, default=2000, help="training patches (default 2000)")
    p.add_argument("--n-test", type=int, default=0, help="unlabelled test patches (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


@command("synth", _synth_args)
def cmd_synth(args: argparse.Namespace) -> int:
    """Generate a SYNTHETIC PCam-like data set in the Kaggle layout.

    H&E-coloured tissue with stroma and lymphocytes; label 1 means tumour-like cells inside the
    centre 32x32 px, and some label-0 patches carry tumour-like cells only outside the centre.
    Deterministic per seed. Synthetic data say nothing about real-world performance.
    """
    from histodetect.data.synth import generate

    summary = generate(args.out, n=args.n, seed=args.seed, n_test=args.n_test, progress=True)
    _say(
        f"SYNTHETIC data: {summary['n_train']} train patches ({summary['positives']} positive) "
        f"and {summary['n_test']} test patches written to {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------- pack


def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="Kaggle folder or PCam .h5 folder")
    p.add_argument("--out", required=True, type=Path, help="store folder to create or resume")
    p.add_argument("--skip-bad", action="store_true", help="pack the rest, list bad patches")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs)")
    p.add_argument("--chunk-size", type=int, default=1024, help="patches per resumable chunk")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="valid share (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("pack", _pack_args)
def cmd_pack(args: argparse.Namespace) -> int:
    """Decode every patch once into a memory-mapped, checksummed uint8 store.

    Validates every file (corrupt, truncated, wrong size, non-RGB, bad label, duplicate id,
    missing file, file without a csv row) and fails listing them, or with --skip-bad packs the
    rest and writes bad_patches.csv. Interrupted? Run the same command again: finished chunks
    are kept. Training then reads random batches at memory speed.
    """
    from histodetect.data.pack import pack

    result = pack(
        args.data,
        args.out,
        skip_bad=args.skip_bad,
        workers=args.workers,
        chunk_rows=args.chunk_size,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        progress=not args.quiet,
    )
    if result.decoded_this_run == 0:
        _say(f"{result.store} already holds these {result.patches} packed patches; nothing to do.")
        return 0
    resumed = f", {result.chunks_resumed} chunk(s) resumed" if result.chunks_resumed else ""
    _say(
        f"packed {result.patches} patches into {result.store} "
        f"({result.decoded_this_run} decoded in {result.seconds:.1f} s, {result.rate:.0f}/s"
        f"{resumed}; {result.skipped} skipped)" + (" [SYNTHETIC DATA]" if result.synthetic else "")
    )
    return 0


# ----------------------------------------------------------------------------- explore


def _explore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="Kaggle folder, PCam folder or packed store")
    p.add_argument("--out", required=True, type=Path, help="folder for figures and summary")
    p.add_argument("--max-images", type=int, default=20000, help="patches sampled for statistics")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


@command("explore", _explore_args)
def cmd_explore(args: argparse.Namespace) -> int:
    """Explore a data set: class balance, sample grids, colour statistics, duplicates.

    Writes PNG figures, colour_stats.csv, summary.json and a summary in Markdown and HTML.
    """
    from histodetect.data.explore import explore

    summary = explore(args.data, args.out, max_images=args.max_images, seed=args.seed)
    tag = " [SYNTHETIC DATA]" if summary.get("synthetic") else ""
    _say(f"exploration of {args.data} written to {args.out} (open summary.html){tag}")
    return 0


# ----------------------------------------------------------------------------- train


def _model_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by train and lr-find."""
    p.add_argument("--data", required=True, type=Path, help="Kaggle folder, PCam folder or store")
    p.add_argument("--config", type=Path, help="YAML file overriding the defaults")
    p.add_argument(
        "--arch", help="smallcnn, smallfcn (padding-free) or any timm model name (e.g. resnet18)"
    )
    p.add_argument("--pretrained", action="store_true", help="timm's ImageNet weights (online)")
    p.add_argument("--weights", help="local backbone state dict (.safetensors/.pth), offline")
    p.add_argument("--augment", help="augmentation recipe: none, light, default or heavy")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--limit-train", type=int, help="train on a stratified subset of this size")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    p.add_argument("--devices", default="auto", help="devices per node, or auto")


def _train_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--freeze-epochs", type=int, help="train only the head for N epochs first")
    p.add_argument("--loss", choices=["bce", "focal"])
    p.add_argument("--class-weights", choices=["none", "auto"])
    p.add_argument("--precision", help="auto, 32-true, bf16-mixed or 16-mixed")
    p.add_argument("--num-nodes", type=int, default=1, help="machines (multi-node DDP)")
    p.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ...")


OVERRIDES = {
    "arch": ("model", "arch"),
    "weights": ("model", "weights"),
    "batch_size": ("data", "batch_size"),
    "limit_train": ("data", "limit_train"),
    "lr": ("train", "lr"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "max_minutes": ("train", "max_minutes"),
    "freeze_epochs": ("train", "freeze_epochs"),
    "loss": ("train", "loss"),
    "class_weights": ("train", "class_weights"),
    "precision": ("train", "precision"),
}


def _load_run_config(args: argparse.Namespace):
    """Defaults ← --config YAML ← command-line flags (only those given)."""
    from histodetect.config import load_config, to_dict

    out: dict = {"seed": args.seed} if args.seed is not None else {}
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.pretrained:
        out.setdefault("model", {})["pretrained"] = True
    if args.augment:
        from histodetect.training.augment import recipe

        out["augment"] = to_dict(recipe(args.augment))
    return load_config(args.config, out)


def _devices(args: argparse.Namespace) -> int | str:
    return int(args.devices) if str(args.devices).isdigit() else args.devices


@command("train", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    """Train a tumour-patch classifier; everything lands in the run folder.

    The run folder holds config.yaml, environment.json, data.json, per-step/epoch metrics (CSV
    and TensorBoard), curves.png, best/last checkpoints, model.safetensors and model.json.
    """
    from histodetect.training.run import train

    cfg = None if args.resume else _load_run_config(args)
    result = train(
        args.data,
        args.out,
        cfg,
        accelerator=args.accelerator,
        devices=_devices(args),
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        resume=args.resume,
    )
    if result.val_auc == result.val_auc:  # NaN on DDP ranks other than 0
        _print_result(result)
    return 0


def _print_result(result) -> None:
    tag = "  [SYNTHETIC DATA: says nothing about real slides]" if result.synthetic else ""
    _say(
        f"\nvalidation ROC AUC {result.val_auc:.4f}, accuracy {result.val_acc:.4f} "
        f"on {result.n_valid} held-out patches ({result.n_train} trained on, "
        f"{result.images_per_s:.0f} img/s){tag}\nrun folder: {result.run}"
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument("--data", required=True, type=Path, help="Kaggle folder, PCam folder or store")
    p.add_argument("--split", default="valid", help="valid (default) or test")
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="store the temperature fitted on valid in the run (used by predict)",
    )


@command("evaluate", _evaluate_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a run: AUC and more with 95% bootstrap intervals, thresholds, ROC/PR, calibration.

    Writes metrics_<split>.json and evaluation_<split>.png into the run folder. Thresholds
    (Youden, 95% sensitivity) and the temperature are chosen on the validation split.
    """
    from histodetect.inference.evaluate import evaluate

    ev = evaluate(args.run, args.data, args.split, args.tta, args.bootstrap, args.calibrate)
    _say(ev.summary())
    _say(
        f"written: {args.run / f'metrics_{args.split}.json'}, "
        f"{args.run / f'evaluation_{args.split}.png'}"
    )
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="run folder(s); several = an ensemble")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="Kaggle root (uses test/), a folder of patch files, or a packed store",
    )
    p.add_argument("--out", required=True, type=Path, help="CSV to write (id,label)")
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per run")
    p.add_argument("--split", help="for a packed store: which split (default: test, else all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="predict the rest; unreadable patches get --fallback and are listed",
    )
    p.add_argument("--fallback", type=float, default=0.5, help="probability for bad patches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


@command("predict", _predict_args)
def cmd_predict(args: argparse.Namespace) -> int:
    """Predict P(tumour) for every patch and write a Kaggle submission (id,label).

    Rows follow sample_submission.csv when DATA has one (else sorted ids), exactly one per id.
    Several runs are averaged (optionally weighted). The CSV is written atomically.
    """
    from histodetect.errors import BadInputError, describe_problems
    from histodetect.files import write_problems_csv
    from histodetect.inference.predictor import (
        Predictor,
        list_patches,
        predict_patches,
        write_submission,
    )

    patches = list_patches(args.data, args.split)
    if patches.problems and not args.skip_bad:
        raise BadInputError(
            f"{args.data}: the test files and sample_submission.csv disagree "
            f"({len(patches.problems)} problem(s)); fix them or pass --skip-bad:\n"
            + describe_problems(list(patches.problems)),
            list(patches.problems),
        )
    predictors = [Predictor.from_run(run, args.device) for run in args.runs]
    probs, bad = predict_patches(
        predictors, patches, args.tta, args.weights, args.batch_size, args.skip_bad, args.fallback
    )
    write_submission(args.out, patches.ids, probs)
    problems = list(patches.problems) + bad
    if problems:
        listing = args.out.with_name(args.out.stem + ".problems.csv")
        write_problems_csv(listing, problems)
        _say(
            f"{len(problems)} problem(s) listed in {listing}; unreadable patches got "
            f"probability {args.fallback}"
        )
    synthetic = any(p.meta.get("synthetic") for p in predictors)
    _say(
        f"wrote {len(patches.ids)} predictions to {args.out} (TTA x{args.tta}, "
        f"{len(predictors)} model(s))" + (" [model trained on SYNTHETIC DATA]" if synthetic else "")
    )
    return 0


# ----------------------------------------------------------------------------- explain


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=Path, help="Kaggle folder, PCam folder or store: galleries")
    what.add_argument("--image", type=Path, help="one patch file (.tif/.png/.jpg): one figure")
    p.add_argument(
        "--out", required=True, type=Path, help="folder (with --data) or PNG file (with --image)"
    )
    p.add_argument("--split", default="valid", help="valid (default) or test")
    p.add_argument("--n", type=int, default=16, help="patches per gallery (default 16)")
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")


@command("explain", _explain_args)
def cmd_explain(args: argparse.Namespace) -> int:
    """Show where the model sees tumour: Grad-CAM of its worst and least certain patches.

    With --data: predicts a split, picks the top losses (most confident mistakes) and the
    patches closest to the threshold, and writes top_losses.png, uncertain.png and
    explain.json into --out. With --image: one patch and its Grad-CAM overlay as one PNG.
    """
    if args.image is not None:
        from histodetect.inference.explain import explain_image

        prob = explain_image(args.run, args.image, args.out)
        _say(f"P(tumour) = {prob:.4f} for {args.image}; figure written to {args.out}")
        return 0
    from histodetect.inference.explain import explain_run

    summary = explain_run(args.run, args.data, args.out, args.split, args.n, args.tta)
    tag = " [SYNTHETIC DATA]" if summary["synthetic"] else ""
    _say(
        f"{summary['misclassified']} of {summary['n_patches']} {args.split} patches "
        f"misclassified at threshold {summary['threshold']:.2f}{tag}\nwritten: "
        f"{args.out / 'top_losses.png'}, {args.out / 'uncertain.png'}, {args.out / 'explain.json'}"
    )
    return 0


# ----------------------------------------------------------------------------- report


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument(
        "--data", type=Path, help="the run's data: evaluate and explain first where not done yet"
    )


@command("report", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    """Write RUN/report.html: one offline page with data, curves, metrics, figures and Grad-CAM.

    Everything is embedded (no network, no JavaScript): send the single file to a reviewer.
    With --data, a run not yet evaluated is evaluated on its validation split, and one without
    RUN/explain/ gets its Grad-CAM galleries first.
    """
    from histodetect.reports.html import build_report

    _say(f"report written to {build_report(args.run, args.data)}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--out", type=Path, help="file to write (default RUN/model.onnx)")
    p.add_argument("--opset", type=int, default=17)


@command("export", _export_args)
def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's model to ONNX (uint8 patches in, probabilities out, dynamic batch).

    The file is checked against PyTorch with onnxruntime before it is kept.
    """
    from histodetect.inference.export import export_onnx

    path, diff = export_onnx(args.run, args.out, args.opset)
    _say(f"wrote {path} (max |ONNX - PyTorch| = {diff:.1e} on random patches)")
    return 0


def _lr_find_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--out", type=Path, default=Path("lr_find.png"), help="plot to write")
    p.add_argument("--steps", type=int, default=100, help="batches in the sweep (default 100)")


@command("lr-find", _lr_find_args)
def cmd_lr_find(args: argparse.Namespace) -> int:
    """Find a good learning rate: sweep it over a few batches and plot the loss.

    The suggested rate (steepest descent of the smoothed loss) is printed and marked on the plot;
    pass it to `histodetect train --lr`.
    """
    from histodetect.training.run import lr_find

    found = lr_find(
        args.data, args.out, _load_run_config(args), args.accelerator, _devices(args), args.steps
    )
    tag = " [SYNTHETIC DATA]" if found["synthetic"] else ""
    if found["suggested_lr"] is None:
        _say(f"no clear suggestion (the loss never fell steadily): read {found['plot']}{tag}")
    else:
        _say(f"suggested learning rate: {found['suggested_lr']:.2e} (plot: {found['plot']}){tag}")
    return 0


def _preview_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="Kaggle folder, PCam folder or packed store")
    p.add_argument("--out", type=Path, default=Path("augment_preview.png"), help="PNG to write")
    p.add_argument("--recipe", default="default", help="none, light, default or heavy")
    p.add_argument("--config", type=Path, help="YAML whose 'augment' section is the recipe")
    p.add_argument("--n", type=int, default=6, help="patches (rows) to show")
    p.add_argument("--seed", type=int, default=0)


@command("augment-preview", _preview_args)
def cmd_augment_preview(args: argparse.Namespace) -> int:
    """Show what an augmentation recipe does: each row a patch, then augmented versions."""
    import numpy as np

    from histodetect.config import load_config
    from histodetect.data.sources import open_source
    from histodetect.training.augment import preview, recipe

    augment = load_config(args.config).augment if args.config else recipe(args.recipe)
    source = open_source(args.data)
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(source), size=min(args.n, len(source)), replace=False))
    preview(source.read(idx), augment, args.out, seed=args.seed)
    _say(f"augmentation preview written to {args.out}")
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every timm backbone name, not a selection")


@command("models", _models_args)
def cmd_models(args: argparse.Namespace) -> int:
    """List backbones for --arch: our small CPU model and recommended timm backbones."""
    from histodetect.models.classifier import OWN_MODELS, RECOMMENDED

    if args.all:
        import timm

        _say("\n".join([*OWN_MODELS, *timm.list_models()]))
        return 0
    width = max(map(len, RECOMMENDED))
    for name, text in RECOMMENDED.items():
        _say(f"{name:<{width}}  {text}")
    _say("\nAny other timm model name works too (histodetect models --all lists them).")
    return 0


# ----------------------------------------------------------------------------- serve


def _serve_args(p: argparse.ArgumentParser) -> None:
    # Defaults live in histodetect.service (None = its default), which is not imported here:
    # building the parser must stay cheap for every other command.
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("HISTODETECT_API_KEY"),
        help="require this key in the X-API-Key header of /v1 calls (default: "
        "$HISTODETECT_API_KEY; set one before binding beyond this machine)",
    )
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument("--max-upload-mb", type=float, help="request body limit (default 32)")
    p.add_argument("--max-files", type=int, help="patches per request (default 256)")
    p.add_argument(
        "--max-pixels", type=int, help="largest /v1/region image (default 2048x2048 pixels)"
    )
    p.add_argument("--timeout", type=float, help="seconds per request (default 60)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


@command("serve", _serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run over HTTP: a JSON API (OpenAPI at /openapi.json) and a web page at /.

    POST /v1/predict (patches -> probability and label), /v1/explain (Grad-CAM PNG),
    /v1/region (a larger image -> heat map and regions); GET /v1/model, /healthz.
    Patches larger than 96x96 are centre-cropped, smaller ones rejected. Binds to 127.0.0.1
    unless --host says otherwise; set --api-key before exposing it.
    """
    from histodetect.service.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"histodetect serve: warning: listening on {args.host} without an API key: "
            "anyone who can reach this port can use the model (set --api-key).",
            file=sys.stderr,
        )
    limits = {
        "max_upload_mb": args.max_upload_mb,
        "max_files": args.max_files,
        "max_pixels": args.max_pixels,
        "timeout_s": args.timeout,
    }
    serve(
        args.run,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        api_key=args.api_key,
        tta=args.tta,
        device=args.device,
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0


# ----------------------------------------------------------------------------- slide


def _slide_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument("slides", type=Path, nargs="*", help="slide files (.svs, .tif, .ndpi, .png...)")
    p.add_argument("--list", type=Path, help="text file of slide paths, one a line")
    p.add_argument("--out", required=True, type=Path, help="output folder (one subfolder a slide)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--level", type=int, help="analyse this pyramid level as it is")
    where.add_argument(
        "--mpp", type=float, default=0.972, help="analysis µm/px (default 0.972, PCam's)"
    )
    p.add_argument("--slide-mpp", type=float, help="level-0 µm/px when the file lacks or errs")
    p.add_argument("--stride", type=int, default=32, help="px between map cells (default 32)")
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "dense", "patch"],
        help="dense: one pass per tile (padding-free models, e.g. smallfcn); auto picks it",
    )
    p.add_argument("--threshold", type=float, help="region threshold (default: the run's)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="tissue share to map a cell")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--redo", action="store_true", help="redo slides the manifest lists as done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("slide", _slide_args)
def cmd_slide(args: argparse.Namespace) -> int:
    """Whole-slide tumour maps: heatmap, overlay, tumour regions (GeoJSON, CSV), summary.

    Reads OpenSlide formats (.svs, .ndpi, .mrxs, tiled .tif ...), plain or pyramidal TIFF and
    PNG/JPEG; analyses the level nearest the model's 0.972 µm/px (resampling when none is
    close); sends only tissue (saturation/Otsu on a thumbnail) to the model, tile by tile in
    bounded memory; --mode dense computes each tile in one pass (padding-free models). Each
    slide gets OUT/<name>/: prob.npy, prob.png (16-bit), tissue.png, overlay.png,
    regions.geojson (QuPath, level-0 px), regions.csv and summary.json. Many slides: every
    rank of torchrun/SLURM (RANK, WORLD_SIZE) takes its share; OUT/manifest-rank*.jsonl
    records finished slides, which a rerun skips.
    """
    from histodetect.slides.analyse import SlideOptions, list_slides, run_slides

    slides = list_slides(args.slides, args.list)
    opts = SlideOptions(
        stride=args.stride,
        tta=args.tta,
        threshold=args.threshold,
        mode=args.mode,
        level=args.level,
        target_mpp=args.mpp,
        slide_mpp=args.slide_mpp,
        min_tissue=args.min_tissue,
        batch_size=args.batch_size,
    )

    def report(path: Path, summary: dict | None, error: str | None) -> None:
        if summary is None:
            if len(slides) > 1:  # a lone slide's failure is the command's error message
                _say(f"FAILED {error}")
            return
        big = summary["largest_region"]
        size = (
            f", largest {big['longest_diameter_mm']:.2f} mm across"
            if big and big["longest_diameter_mm"] is not None
            else ""
        )
        tag = f"  [{summary['warning']}]" if summary["warning"] else ""
        _say(
            f"{path}: score {summary['score']:.3f}, {summary['n_regions']} region(s){size}; "
            f"{summary['patches_predicted']} tissue patches ({summary['mode']}) -> "
            f"{Path(summary['outputs']['summary']).parent}{tag}"
        )

    result = run_slides(
        args.run,
        slides,
        args.out,
        opts,
        redo=args.redo,
        device=args.device,
        progress=not args.quiet,
        on_slide=report,
    )
    where = f"rank {result.rank} of {result.world}: " if result.world > 1 else ""
    if result.skipped:
        _say(f"{where}{len(result.skipped)} slide(s) already done (listed in the manifest)")
    if result.failed:
        raise HistodetectError(
            f"{where}{len(result.failed)} of {len(result.assigned)} slide(s) failed:\n"
            + "\n".join(f"  - {reason}" for _, reason in result.failed)
        )
    _say(f"{where}{len(result.done)} slide(s) mapped into {args.out}")
    return 0


# ----------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--n", type=int, default=3000, help="synthetic patches (default 3000)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training")


@command("demo", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on embedded SYNTHETIC data: synth → pack → explore → train → report.

    Needs no download; finishes in a few minutes on two CPU cores and prints where the
    outputs are.
    """
    from histodetect.config import RunConfig, merge
    from histodetect.data.explore import explore
    from histodetect.data.pack import pack
    from histodetect.data.synth import generate
    from histodetect.training.run import train

    t0 = time.perf_counter()
    out: Path = args.out
    data, store = out / "data", out / "store"
    if (data / "train_labels.csv").exists():
        _say(f"[1/4] reusing SYNTHETIC data in {data}")
    else:
        _say(f"[1/4] generating {args.n} SYNTHETIC patches into {data}")
        generate(data, n=args.n, seed=args.seed, progress=True)
    _say(f"[2/4] packing into {store}")
    packed = pack(data, store, progress=True)
    _say(f"      {packed.patches} patches packed")
    _say(f"[3/4] exploring into {out / 'explore'}")
    explore(store, out / "explore")
    run = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    _say(f"[4/4] training smallcnn for {args.epochs} epochs into {run}")
    cfg = merge(RunConfig(), {"seed": args.seed, "train": {"epochs": args.epochs}})
    result = train(store, run, cfg)
    _print_result(result)
    _say(
        f"demo finished in {time.perf_counter() - t0:.0f} s. Outputs:\n"
        f"  data (SYNTHETIC): {data}\n  packed store:     {store}\n"
        f"  exploration:      {out / 'explore' / 'summary.html'}\n"
        f"  run folder:       {run} (curves.png, metrics.json, model.safetensors)"
    )
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="histodetect",
        description="Find metastatic cancer in lymph-node histopathology patches (PCam/Kaggle).",
    )
    parser.add_argument("--version", action="version", version=f"histodetect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, configure) in COMMANDS.items():
        doc = inspect.getdoc(func) or ""
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0].replace("%", "%%") if doc else None,  # argparse %-formats
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one paragraph and exit non-zero."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HistodetectError as exc:
        print(f"histodetect {args.command}: error: {exc}", file=sys.stderr)
        problems = getattr(exc, "problems", None)
        if problems and getattr(args, "out", None) is not None and args.command == "pack":
            report = Path(args.out).with_name(Path(args.out).name + ".problems.json")
            try:
                report.write_text(json.dumps(problems, indent=1))
                print(f"(the full list is in {report})", file=sys.stderr)
            except OSError:
                pass
        return exc.exit_code
    except BrokenPipeError:  # e.g. `histodetect models --all | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return 0
    except KeyboardInterrupt:
        print(f"histodetect {args.command}: interrupted; run it again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
