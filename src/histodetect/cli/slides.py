"""Whole-slide commands: ``slide``, ``slide-eval``, ``slidesynth`` and ``extract``."""

from __future__ import annotations

import argparse
from pathlib import Path

from histodetect.cli.registry import command, say
from histodetect.errors import HistodetectError
from histodetect.slides import DEFAULT_MIN_TISSUE


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
        help="dense: one pass per tile (padding-free models, e.g. densecnn); auto picks it",
    )
    p.add_argument("--threshold", type=float, help="region threshold (default: the run's)")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=DEFAULT_MIN_TISSUE,
        help=f"tissue share of a cell's 96 px window to map it (default {DEFAULT_MIN_TISSUE})",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--redo", action="store_true", help="redo slides the manifest lists as done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("slide", _slide_args)
def cmd_slide(args: argparse.Namespace) -> int:
    """Whole-slide tumour maps: heatmap, overlay, tumour regions (GeoJSON, CSV), summary.

    Reads OpenSlide formats (.svs, .ndpi, .mrxs, tiled .tif ...), plain or pyramidal TIFF and
    PNG/JPEG; analyses the level nearest the model's 0.972 µm/px (resampling when none is
    close); sends only tissue to the model (optical density off the slide's own glass colour on a
    thumbnail, ink, dust and borders rejected, windows out of focus skipped), tile by tile in
    bounded memory; --mode dense computes each tile in one pass (padding-free models). Each
    slide gets OUT/<name>/: prob.npy, prob.png (16-bit), prob.tif (tiled, µm-scaled),
    tissue.png, overlay.png, regions.geojson (QuPath, level-0 px), regions.csv and
    summary.json. Many slides: every rank of torchrun/SLURM (RANK, WORLD_SIZE) takes its
    share; OUT/manifest-rank*.jsonl records finished slides, which a rerun skips.
    """
    from histodetect.slides.maps.batch import list_slides, run_slides
    from histodetect.slides.maps.slide import SlideOptions

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
                say(f"FAILED {error}")
            return
        big = summary["largest_region"]
        size = (
            f", largest {big['longest_diameter_mm']:.2f} mm across"
            if big and big["longest_diameter_mm"] is not None
            else ""
        )
        tag = f"  [{summary['warning']}]" if summary["warning"] else ""
        say(
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
        say(f"{where}{len(result.skipped)} slide(s) already done (listed in the manifest)")
    if result.failed:
        raise HistodetectError(
            f"{where}{len(result.failed)} of {len(result.assigned)} slide(s) failed:\n"
            + "\n".join(f"  - {reason}" for _, reason in result.failed)
        )
    say(f"{where}{len(result.done)} slide(s) mapped into {args.out}")
    return 0


def _slide_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("maps", type=Path, help="output folder of histodetect slide")
    p.add_argument(
        "--annotations",
        required=True,
        type=Path,
        help="folder of annotations matched by slide name: ASAP .xml, QuPath .geojson, *_Mask.tif",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="csv without header: slide,Tumor|Normal,... (Camelyon16 reference.csv); default: "
        "slides with a tumour annotation are tumour, the others normal",
    )
    p.add_argument("--out", type=Path, help="where to write the scores (default: MAPS)")
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=0.243,
        help="level-0 µm/px when a map does not record it (default 0.243, Camelyon16's)",
    )


@command("slide-eval", _slide_eval_args)
def cmd_slide_eval(args: argparse.Namespace) -> int:
    """Score slide maps against annotations the Camelyon16 way: lesion FROC, slide AUC, Dice.

    Detections are the local maxima of each probability map (written per slide as
    OUT/detections/<slide>.csv, confidence,X,Y in level-0 px: the challenge's format). Lesions
    are the annotated tumour grown by 37.5 µm (holes filled, 8-connected); regions under
    275 µm across are isolated tumour cells, neither found nor false positives. Prints the
    FROC score (mean sensitivity at 1/4-8 false positives per slide), slide-level ROC AUC with a
    bootstrap interval, Dice/IoU per slide; writes slide-eval.json and froc.png.
    """
    from histodetect.slides.evaluation.scoring import EvalOptions, evaluate_slides

    if not args.slide_mpp > 0:
        raise HistodetectError(f"--slide-mpp must be a positive µm/px, got {args.slide_mpp}.")
    options = EvalOptions(default_mpp=args.slide_mpp)
    result = evaluate_slides(args.maps, args.annotations, args.reference, args.out, options=options)
    header, rows = result.table()
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        say("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    for line in result.headline():
        say(line)
    say("written: " + ", ".join(result.outputs.values()))
    return 0


def _slidesynth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="folder to create (or update)")
    p.add_argument("--slides", type=int, default=6, help="number of slides (default 6)")
    p.add_argument(
        "--tumour-fraction",
        type=float,
        default=0.5,
        help="share of slides with planted tumours (default 0.5)",
    )
    p.add_argument("--width", type=int, default=2048, help="level-0 width in px (default 2048)")
    p.add_argument("--height", type=int, default=1536, help="level-0 height (default 1536)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


@command("slidesynth", _slidesynth_args)
def cmd_slidesynth(args: argparse.Namespace) -> int:
    """Generate SYNTHETIC whole slides with planted tumours, their annotations and truth.

    Writes OUT/slides/<name>.tif (tiled pyramidal TIFF at 0.972 µm/px, downsamples 1, 4, 16;
    synthetic_00_tumour, synthetic_01_normal...), OUT/annotations/<name>.geojson (the planted
    tumours as QuPath GeoJSON; a normal slide's has no outline), OUT/reference.csv (Camelyon16
    style: slide,Tumor|Normal,size class) and OUT/SYNTHETIC.md, for trying extract -> train ->
    slide -> slide-eval. Deterministic per seed; rerun with the same settings and the slides
    already there are kept. Synthetic slides say nothing about real tissue.
    """
    from histodetect.slides.synthetic.dataset import write_synthetic_set

    records = write_synthetic_set(
        args.out, args.slides, args.tumour_fraction, (args.width, args.height), args.seed
    )
    tumour = [r for r in records if r["tumour"]]
    kept = sum(not r["written"] for r in records)
    say(
        f"SYNTHETIC slides: {len(records)} of {args.width}x{args.height} px, {len(tumour)} with "
        f"planted tumours ({sum(len(r['tumours']) for r in tumour)} in all), "
        f"{len(records) - len(tumour)} normal" + (f"; {kept} already there, kept" if kept else "")
    )
    for label, path in (
        ("slides", args.out / "slides"),
        ("annotations", args.out / "annotations"),
        ("reference", args.out / "reference.csv"),
        ("note", args.out / "SYNTHETIC.md"),
    ):
        say(f"  {label + ':':13s}{path}")
    say(
        "SYNTHETIC: says nothing about real slides. Next: histodetect extract "
        f"{args.out / 'slides'}/*.tif --annotations {args.out / 'annotations'} --out DATA"
    )
    return 0


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", type=Path, nargs="*", help="slide files (.svs, .tif, .ndpi, .png...)")
    p.add_argument("--list", type=Path, help="text file of slide paths, one a line")
    p.add_argument(
        "--annotations",
        type=Path,
        help="folder of annotations matched by slide name: ASAP .xml, QuPath .geojson, "
        "*_Mask.tif; a slide without one (or every slide, without this option) gives "
        "negatives only",
    )
    p.add_argument("--out", required=True, type=Path, help="DATA folder to create (or resume)")
    p.add_argument(
        "--format",
        default="store",
        choices=["store", "kaggle"],
        help="a packed store (default) or train/<id>.tif + train_labels.csv + meta.csv",
    )
    p.add_argument("--per-slide", type=int, default=1000, help="patches per slide (default 1000)")
    p.add_argument(
        "--positive-fraction", type=float, default=0.5, help="share of positives (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling and split seed")
    p.add_argument(
        "--positions",
        default="grid",
        choices=["grid", "random"],
        help="grid: windows centred on the cells; random: centres jittered within the cell",
    )
    p.add_argument("--stride", type=int, default=32, help="candidate cell side in px (default 32)")
    p.add_argument("--mpp", type=float, default=0.972, help="patch µm/px (default 0.972, PCam's)")
    p.add_argument("--slide-mpp", type=float, help="level-0 µm/px when the file lacks or errs")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=DEFAULT_MIN_TISSUE,
        help=f"tissue share of a patch's window (default {DEFAULT_MIN_TISSUE}, as `slide`)",
    )
    p.add_argument(
        "--hard-negatives",
        type=Path,
        metavar="MAPS",
        help="output folder of `histodetect slide`: draw negatives where its maps said tumour",
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.1, help="validation share, by slide (store)"
    )
    p.add_argument("--workers", type=int, default=1, help="slides extracted in parallel")
    p.add_argument("--redo", action="store_true", help="extract slides already done again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("extract", _extract_args)
def cmd_extract(args: argparse.Namespace) -> int:
    """PCam-style training patches from your own annotated slides.

    For each slide, its annotation (matched by name in --annotations) labels 96x96 patches
    at the model resolution (0.972 µm/px, reading a finer level and downsampling as `slide`
    does) drawn from tissue only (the tissue test of `slide`): label 1 when the centre 32x32
    px overlaps tumour (exclusions cut out). --per-slide patches, --positive-fraction of them
    positive, seeded. Writes a packed store (train/valid split by slide, level-0 coordinates
    kept) or, with --format kaggle, train/<id>.tif, train_labels.csv and meta.csv
    (id,slide,x,y,label); `histodetect train --data OUT` then never splits a slide. Resumable:
    rerun after an interrupt and finished slides are kept. Many slides: --workers processes,
    and every rank of torchrun/SLURM takes its share. A bad slide or annotation is reported by
    name (OUT/extract_problems.csv) and the others go on.
    """
    from histodetect.slides.extract.patches import extract_patches
    from histodetect.slides.extract.sampling import ExtractOptions
    from histodetect.slides.maps.batch import list_slides

    slides = list_slides(args.slides, args.list)
    opts = ExtractOptions(
        per_slide=args.per_slide,
        positive_fraction=args.positive_fraction,
        seed=args.seed,
        positions=args.positions,
        stride=args.stride,
        target_mpp=args.mpp,
        slide_mpp=args.slide_mpp,
        min_tissue=args.min_tissue,
        hard_negatives=str(args.hard_negatives.resolve()) if args.hard_negatives else None,
    )

    def report(path: Path, rec: dict) -> None:
        if rec["status"] != "done":
            say(f"FAILED {rec['error']}")
            return
        notes = "".join(f"\n    note: {n}" for n in rec["notes"])
        say(
            f"{path}: {rec['patches']} patches ({rec['positives']} positive) of "
            f"{rec['candidates']} tissue windows ({rec['positives_available']} positive)"
            f"{notes}"
        )

    result = extract_patches(
        slides,
        args.annotations,
        args.out,
        opts,
        fmt=args.format,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        redo=args.redo,
        progress=not args.quiet,
        on_slide=report,
    )
    where = f"rank {result.rank} of {result.world}: " if result.world > 1 else ""
    if result.skipped:
        say(f"{where}{len(result.skipped)} slide(s) already done (kept from an earlier run)")
    if result.failed:
        say(f"{len(result.failed)} slide(s) failed, listed in {args.out / 'extract_problems.csv'}")
    if result.done:
        say(f"{where}{result.extracted} patches drawn at {result.rate:.0f} patches/s")
    if not result.assembled:
        say(f"{where}done; the rank that finishes last assembles {args.out}")
        return 0
    if result.stale_parts:
        say(
            f"removed {result.stale_parts} part(s) left by other slides or settings "
            f"({result.stale_bytes / 1e6:.1f} MB) from {args.out / '.extract' / 'parts'}"
        )
    tag = "  [SYNTHETIC slides: says nothing about real tissue]" if result.synthetic else ""
    say(
        f"{result.patches} patches ({result.positives} positive) in {args.out} "
        f"({'packed store' if args.format == 'store' else 'Kaggle layout + meta.csv'}); "
        f"train with: histodetect train --data {args.out} --out RUN{tag}"
    )
    return 0
