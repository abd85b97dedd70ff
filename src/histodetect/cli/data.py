"""Data commands: ``synth``, ``pack``, ``explore`` and ``augment-preview``."""

from __future__ import annotations

import argparse
from pathlib import Path

from histodetect.cli.registry import command, say


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
    from histodetect.data.synth_kaggle import generate

    summary = generate(args.out, n=args.n, seed=args.seed, n_test=args.n_test, progress=True)
    say(
        f"SYNTHETIC data: {summary['n_train']} train patches ({summary['positives']} positive) "
        f"and {summary['n_test']} test patches written to {args.out}"
    )
    return 0


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
        say(f"{result.store} already holds these {result.patches} packed patches; nothing to do.")
        return 0
    resumed = f", {result.chunks_resumed} chunk(s) resumed" if result.chunks_resumed else ""
    say(
        f"packed {result.patches} patches into {result.store} "
        f"({result.decoded_this_run} decoded in {result.seconds:.1f} s, {result.rate:.0f}/s"
        f"{resumed}; {result.skipped} skipped)" + (" [SYNTHETIC DATA]" if result.synthetic else "")
    )
    return 0


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
    say(f"exploration of {args.data} written to {args.out} (open summary.html){tag}")
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
    say(f"augmentation preview written to {args.out}")
    return 0
