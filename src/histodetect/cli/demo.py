"""The ``demo`` command: the whole pipeline on SYNTHETIC data, with nothing to download."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from histodetect.cli.registry import command, say
from histodetect.cli.train import print_train_result

STEPS = 6


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--n", type=int, default=3000, help="synthetic patches (default 3000)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the evaluation's 95%% CIs (default 1000)",
    )


def _step(k: int, text: str) -> None:
    say(f"[{k}/{STEPS}] {text}")


@command("demo", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on SYNTHETIC data: synth → pack → explore → train → evaluate → report.

    Generates SYNTHETIC patches, packs them, explores them, trains a small CNN, evaluates it on
    the validation split (95% bootstrap intervals) and writes RUN/report.html with Grad-CAM
    galleries. Needs no download; finishes in a few minutes on two CPU cores. The last line
    printed is the absolute path of the report, to open in a browser.
    """
    from histodetect.config import RunConfig, merge
    from histodetect.data.explore import explore
    from histodetect.data.pack import pack
    from histodetect.data.synth_kaggle import generate
    from histodetect.inference.evaluate import evaluate
    from histodetect.reports.html import EXPLAIN_DIR, build_report
    from histodetect.training.run import train

    t0 = time.perf_counter()
    out: Path = args.out
    data, store = out / "data", out / "store"
    if (data / "train_labels.csv").exists():
        _step(1, f"reusing SYNTHETIC data in {data}")
    else:
        _step(1, f"generating {args.n} SYNTHETIC patches into {data}")
        generate(data, n=args.n, seed=args.seed, progress=True)
    _step(2, f"packing into {store}")
    packed = pack(data, store, progress=True)
    say(f"      {packed.patches} patches packed")
    _step(3, f"exploring into {out / 'explore'}")
    explore(store, out / "explore")
    run = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cfg = merge(RunConfig(), {"seed": args.seed, "train": {"epochs": args.epochs}})
    _step(4, f"training {cfg.model.arch} for {args.epochs} epochs into {run}")
    result = train(store, run, cfg)
    print_train_result(result)
    _step(5, f"evaluating on the validation split ({args.bootstrap} bootstrap resamples)")
    # The validation split is the only labelled held-out split of synthetic Kaggle-layout data
    # (its test/ patches are unlabelled); the summary carries the SYNTHETIC tag itself.
    ev = evaluate(run, store, "valid", n_boot=args.bootstrap)
    say(ev.summary())
    _step(6, f"writing the report (with Grad-CAM galleries in {run / EXPLAIN_DIR})")
    # metrics_valid.json now exists, so build_report only adds the explain galleries.
    report = build_report(run, store).resolve()
    say(
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s. Outputs (all SYNTHETIC DATA):\n"
        f"  data (SYNTHETIC): {data}\n  packed store:     {store}\n"
        f"  exploration:      {out / 'explore' / 'summary.html'}\n"
        f"  run folder:       {run} (curves.png, metrics.json, model.safetensors,\n"
        f"                    metrics_valid.json, evaluation_valid.png, {EXPLAIN_DIR}/)\n"
        f"  report:           {report}\n"
    )
    # Last line on purpose: the one thing to do next, easy to find and to copy.
    say(f"open this in a browser: {report}")
    return 0
