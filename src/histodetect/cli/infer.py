"""Commands on a trained run: ``evaluate``, ``predict``, ``explain``, ``export`` and ``report``."""

from __future__ import annotations

import argparse
from pathlib import Path

from histodetect.cli.registry import command, say
from histodetect.errors import HistodetectError


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", type=Path, nargs="+", help="run or ensemble folder; several runs = an ensemble"
    )
    p.add_argument("--data", required=True, type=Path, help="Kaggle folder, PCam folder or store")
    p.add_argument(
        "--split",
        default="valid",
        choices=["valid", "test", "train", "all"],
        help="valid (default), test, train, or all: every labelled patch (external data)",
    )
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per run")
    p.add_argument("--out", type=Path, help="folder for the results (default: the run folder)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="store the temperature fitted on valid in the run (used by predict)",
    )
    p.add_argument(
        "--by",
        metavar="COLUMN",
        help="also score each group of this column (centre, scanner, slide...) of DATA's "
        "meta.csv or --groups, and name the worst group",
    )
    p.add_argument("--groups", type=Path, help="csv with id and the --by column")
    p.add_argument(
        "--mpp",
        type=float,
        help="DATA holds labelled tiles of any size at this many µm/px (train/ + "
        "train_labels.csv): each is resampled and cut into patches, and scored per tile",
    )


def _scope_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument("--data", required=True, type=Path, help="the data the run was trained on")


@command("scope", _scope_args)
def cmd_scope(args: argparse.Namespace) -> int:
    """Fit a run's out-of-scope statistics (training does this itself; for older runs).

    Fitted on the run's own training patches, the threshold set so that 95 % of its validation
    patches are in scope; written to RUN/scope.safetensors.
    """
    from histodetect.data.loaders import labelled_split
    from histodetect.training.run import fit_run_scope

    store, train_idx = labelled_split(args.run, args.data, "train")
    _, valid_idx = labelled_split(args.run, args.data, "valid")
    stats = fit_run_scope(args.run, store, train_idx, valid_idx)
    say(
        f"wrote {args.run / 'scope.safetensors'}: threshold {float(stats['threshold'][0]):.3f} "
        f"(95 % of {len(valid_idx)} validation patches in scope)"
    )
    return 0


@command("evaluate", _evaluate_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a run or ensemble: AUC and more with 95% bootstrap intervals, thresholds, curves.

    Writes metrics_<split>.json and evaluation_<split>.png into the run folder (or --out).
    --split all scores every labelled patch of DATA, e.g. an external set. Several runs are
    scored as their ensemble (the mean of their probabilities, weighted as predict does).
    Thresholds (Youden, 95% sensitivity) and the temperature are chosen on the run's own
    validation data (a cv ensemble's out-of-fold predictions), never on the data scored.
    """
    from histodetect.inference.evaluate import evaluate

    if args.mpp is not None:
        return _evaluate_tiles(args)
    ev = evaluate(
        args.runs,
        args.data,
        args.split,
        args.tta,
        args.bootstrap,
        args.calibrate,
        args.weights,
        args.out,
        args.by,
        args.groups,
    )
    out = args.out or args.runs[0]
    say(ev.summary())
    say(f"written: {out / f'metrics_{args.split}.json'}, {out / f'evaluation_{args.split}.png'}")
    return 0


def _evaluate_tiles(args: argparse.Namespace) -> int:
    """``evaluate --mpp``: labelled tiles of another resolution, scored per tile."""
    from histodetect.inference.tile_eval import SPLIT, evaluate_tiles

    if args.by or args.calibrate or args.split != "valid":
        raise HistodetectError(
            "--mpp scores tiles as external data, per tile: --by, --calibrate and --split do "
            "not apply."
        )
    ev = evaluate_tiles(
        args.runs, args.data, args.mpp, args.tta, args.bootstrap, args.weights, args.out
    )
    out = args.out or args.runs[0]
    say(ev.summary())
    say(f"written: {out / f'metrics_{SPLIT}.json'}, {out / f'evaluation_{SPLIT}.png'}")
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
    p.add_argument(
        "--mpp",
        type=float,
        help="DATA is a folder of tiles of any size at this many µm/px (224 px at 0.5 is common):"
        " each is resampled to the model's 0.972 µm/px and cut into 96 px patches",
    )
    p.add_argument(
        "--details",
        type=Path,
        help="also write id,probability,scope_score,in_scope per patch to this CSV (the "
        "submission stays id,label)",
    )
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
    import numpy as np

    from histodetect.errors import BadInputError, describe_problems
    from histodetect.files import write_problems_csv
    from histodetect.inference.predictor import (
        Predictor,
        list_patches,
        predict_patches,
        write_submission,
    )

    patches = list_patches(args.data, args.split, args.mpp)
    if patches.problems and not args.skip_bad:
        what = (
            "has tiles that give no patch"
            if args.mpp
            else "the test files and sample_submission.csv disagree"
        )
        raise BadInputError(
            f"{args.data}: {what} ({len(patches.problems)} problem(s)); fix them or pass "
            "--skip-bad:\n" + describe_problems(list(patches.problems)),
            list(patches.problems),
        )
    predictor = Predictor.from_runs(args.runs, args.weights, args.device)
    threshold = predictor.scope_threshold
    scores = None
    if args.details and threshold is not None:
        scores = np.full(len(patches.ids), np.nan)  # filled in the probabilities' pass
    probs, bad = predict_patches(
        predictor,
        patches,
        args.tta,
        args.batch_size,
        args.skip_bad,
        args.fallback,
        scores_out=scores,
    )
    write_submission(args.out, patches.ids, probs)
    if args.details:
        from histodetect.inference.scope import write_details

        say(write_details(args.details, patches.ids, probs, scores, threshold))
    problems = list(patches.problems) + bad
    if problems:
        listing = args.out.with_name(args.out.stem + ".problems.csv")
        write_problems_csv(listing, problems)
        say(
            f"{len(problems)} problem(s) listed in {listing}; unreadable patches got "
            f"probability {args.fallback}"
        )
    synthetic = predictor.meta.get("synthetic")
    tag = " [model trained on SYNTHETIC DATA]" if synthetic else ""
    say(
        f"wrote {len(patches.ids)} predictions to {args.out} (TTA x{args.tta}, "
        f"{predictor.meta.get('arch')}){tag}"
    )
    return 0


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=Path, help="Kaggle folder, PCam folder or store: galleries")
    what.add_argument("--image", type=Path, help="one patch file (.tif/.png/.jpg): one figure")
    p.add_argument(
        "--out", required=True, type=Path, help="folder (with --data) or PNG file (with --image)"
    )
    p.add_argument(
        "--split",
        default="valid",
        choices=["valid", "test", "train", "all"],
        help="valid (default); test for a cv ensemble (the patches held out of all folds)",
    )
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
        say(f"P(tumour) = {prob:.4f} for {args.image}; figure written to {args.out}")
        return 0
    from histodetect.inference.explain import explain_run

    summary = explain_run(args.run, args.data, args.out, args.split, args.n, args.tta)
    tag = " [SYNTHETIC DATA]" if summary["synthetic"] else ""
    say(
        f"{summary['misclassified']} of {summary['n_patches']} {args.split} patches "
        f"misclassified at threshold {summary['threshold']:.2f}{tag}\nwritten: "
        f"{args.out / 'top_losses.png'}, {args.out / 'uncertain.png'}, {args.out / 'explain.json'}"
    )
    return 0


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

    say(f"report written to {build_report(args.run, args.data)}")
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
    say(f"wrote {path} (max |ONNX - PyTorch| = {diff:.1e} on random patches)")
    return 0
