"""The ``demo`` command: the whole pipeline on SYNTHETIC data, with nothing to download."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from histodetect.cli.registry import command, say
from histodetect.cli.train import print_train_result


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
    from histodetect.data.synth_kaggle import generate
    from histodetect.training.run import train

    t0 = time.perf_counter()
    out: Path = args.out
    data, store = out / "data", out / "store"
    if (data / "train_labels.csv").exists():
        say(f"[1/4] reusing SYNTHETIC data in {data}")
    else:
        say(f"[1/4] generating {args.n} SYNTHETIC patches into {data}")
        generate(data, n=args.n, seed=args.seed, progress=True)
    say(f"[2/4] packing into {store}")
    packed = pack(data, store, progress=True)
    say(f"      {packed.patches} patches packed")
    say(f"[3/4] exploring into {out / 'explore'}")
    explore(store, out / "explore")
    run = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cfg = merge(RunConfig(), {"seed": args.seed, "train": {"epochs": args.epochs}})
    say(f"[4/4] training {cfg.model.arch} for {args.epochs} epochs into {run}")
    result = train(store, run, cfg)
    print_train_result(result)
    say(
        f"demo finished in {time.perf_counter() - t0:.0f} s. Outputs:\n"
        f"  data (SYNTHETIC): {data}\n  packed store:     {store}\n"
        f"  exploration:      {out / 'explore' / 'summary.html'}\n"
        f"  run folder:       {run} (curves.png, metrics.json, model.safetensors)"
    )
    return 0
