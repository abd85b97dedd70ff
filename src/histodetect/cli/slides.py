"""Whole-slide commands: ``slide`` (tumour maps of slides) and ``slide-eval`` (their scores)."""

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
    slide gets OUT/<name>/: prob.npy, prob.png (16-bit), tissue.png, overlay.png,
    regions.geojson (QuPath, level-0 px), regions.csv and summary.json. Many slides: every
    rank of torchrun/SLURM (RANK, WORLD_SIZE) takes its share; OUT/manifest-rank*.jsonl
    records finished slides, which a rerun skips.
    """
    from histodetect.slides.batch import list_slides, run_slides
    from histodetect.slides.slide import SlideOptions

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
    from histodetect.slides.evaluation import EvalOptions, evaluate_slides

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
