"""Training commands: ``train``, ``lr-find`` and ``models`` (the backbones ``--arch`` takes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from histodetect.cli.registry import command, say


def _model_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by train and lr-find."""
    p.add_argument("--data", required=True, type=Path, help="Kaggle folder, PCam folder or store")
    p.add_argument("--config", type=Path, help="YAML file overriding the defaults")
    p.add_argument(
        "--arch",
        help="smallcnn (default), densecnn (padding-free, dense slide maps), smallfcn, a timm name",
    )
    p.add_argument("--pretrained", action="store_true", help="timm's ImageNet weights (online)")
    p.add_argument("--weights", help="local backbone state dict (.safetensors/.pth), offline")
    p.add_argument("--augment", help="augmentation recipe: none, light, default, heavy or stain")
    p.add_argument(
        "--stain-norm",
        choices=["none", "reinhard", "macenko"],
        help="normalise every patch's stain onto a target fitted from the training patches",
    )
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
    _schedule_args(p)
    p.add_argument("--num-nodes", type=int, default=1, help="machines (multi-node DDP)")
    p.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ...")


def _schedule_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by train and cv: how long and how each run trains."""
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--freeze-epochs", type=int, help="train only the head for N epochs first")
    p.add_argument("--loss", choices=["bce", "focal"])
    p.add_argument("--class-weights", choices=["none", "auto"])
    p.add_argument("--precision", help="auto, 32-true, bf16-mixed or 16-mixed")


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
    "stain_norm": ("data", "stain_norm"),
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

    The run folder holds config.yaml, environment.json, data.json, per-step/epoch metrics (CSV,
    and TensorBoard with the tensorboard extra), curves.png, best/last checkpoints,
    model.safetensors and model.json. A bad --config setting stops at once, naming it.
    """
    # The config first: a bad setting fails in a second, before torch loads or data is read.
    cfg = None if args.resume else _load_run_config(args)
    from histodetect.training.run import train

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
        print_train_result(result)
    return 0


def print_train_result(result) -> None:
    """Print a finished training's validation AUC and accuracy and where its run folder is."""
    tag = "  [SYNTHETIC DATA: says nothing about real slides]" if result.synthetic else ""
    say(
        f"\nvalidation ROC AUC {result.val_auc:.4f}, accuracy {result.val_acc:.4f} "
        f"on {result.n_valid} held-out patches ({result.n_train} trained on, "
        f"{result.images_per_s:.0f} img/s){tag}\nrun folder: {result.run}"
    )


def _cv_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--out", required=True, type=Path, help="cross-validation folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--groups", type=Path, help="id,group csv of slide ids (Kaggle data)")
    p.add_argument(
        "--holdout-tta",
        type=int,
        nargs="+",
        default=[1, 8],
        choices=[1, 2, 4, 8],
        help="TTA views at which held-out patches score the ensemble (default 1 8)",
    )
    _schedule_args(p)


@command("cv", _cv_args)
def cmd_cv(args: argparse.Namespace) -> int:
    """K-fold cross-validation: K runs, out-of-fold predictions and a fold ensemble.

    Folds are stratified and keep whole slides together when slide ids exist (a PCam meta csv,
    a store with slides, or --groups). Writes OUT/fold_<k>/ (normal run folders), oof.csv,
    cv_metrics.json and OUT/ensemble/, which every command accepts as a run. The data's
    validation split is held out of every fold and scores the ensemble against each fold.
    Rerun the same command after an interruption: finished folds are kept, the interrupted
    one resumes from its last checkpoint.
    """
    cfg = _load_run_config(args)  # before the heavy imports: bad settings fail at once
    from histodetect.training.cv import cross_validate

    result = cross_validate(
        args.data,
        args.out,
        cfg,
        args.folds,
        args.groups,
        tuple(args.holdout_tta),
        accelerator=args.accelerator,
        devices=_devices(args),
    )
    say(result.summary())
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
    cfg = _load_run_config(args)  # before the heavy imports: bad settings fail at once
    from histodetect.training.lr_find import lr_find

    found = lr_find(args.data, args.out, cfg, args.accelerator, _devices(args), args.steps)
    tag = " [SYNTHETIC DATA]" if found["synthetic"] else ""
    if found["suggested_lr"] is None:
        say(f"no clear suggestion (the loss never fell steadily): read {found['plot']}{tag}")
    else:
        say(f"suggested learning rate: {found['suggested_lr']:.2e} (plot: {found['plot']}){tag}")
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every timm backbone name, not a selection")


@command("models", _models_args)
def cmd_models(args: argparse.Namespace) -> int:
    """List backbones for --arch: our small CPU model and recommended timm backbones."""
    from histodetect.models.classifier import OWN_MODELS, RECOMMENDED

    if args.all:
        import timm

        say("\n".join([*OWN_MODELS, *timm.list_models()]))
        return 0
    width = max(map(len, RECOMMENDED))
    for name, text in RECOMMENDED.items():
        say(f"{name:<{width}}  {text}")
    say("\nAny other timm model name works too (histodetect models --all lists them).")
    return 0
