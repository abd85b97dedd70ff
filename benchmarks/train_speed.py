"""Training speed: raw model steps vs end-to-end `histodetect train`, side by side in one run.

Usage: python benchmarks/train_speed.py [DATA] [--steps 40] [--batch-size 128]

Raw: forward + backward + optimiser step of the default model on ready-made random tensors.
End-to-end: `histodetect train` (the real command) on a packed store with the default
augmentation; images/s by the wall clock over its training batches (loading, augmentation,
logging, progress bar included; warm-up batches and validation excluded). Raw is measured
before and after the end-to-end run and averaged, so drift on a shared machine hits both.
Target: end-to-end >= 0.85 x raw.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import SAMPLE, train_cli

from histodetect.config import RunConfig, to_dict
from histodetect.data.pack import pack
from histodetect.training.module import PatchModule

DEFAULT = SAMPLE


def raw_rate(batch_size: int, steps: int, warmup: int = 10) -> float:
    """Images/s of bare training steps of the default model on random normalised tensors."""
    module = PatchModule(to_dict(RunConfig())).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    size = RunConfig().data.crop  # the model's input after the centre crop
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,)).float()
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = module.loss(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def end_to_end_rate(store: Path, run: Path, batch_size: int, steps: int) -> tuple[float, float]:
    """(images/s over training batches, whole-command wall seconds) of `histodetect train`."""
    t0 = time.perf_counter()
    train_cli(
        store,
        run,
        "--max-steps",
        str(steps + 3),
        "--epochs",
        "1000",
        "--batch-size",
        str(batch_size),
        "--accelerator",
        "cpu",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics["train_images_per_s"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if (args.data / "store.json").exists():
            store = args.data
        elif args.data.exists():
            store = Path(tmp) / "store"
            pack(args.data, store, progress=False)
        else:
            from histodetect.data.synth_kaggle import generate

            print(f"{args.data} not found: using SYNTHETIC data")
            generate(Path(tmp) / "synth", n=3000)
            store = Path(tmp) / "store"
            pack(Path(tmp) / "synth", store, progress=False)
        before = raw_rate(args.batch_size, args.steps)
        e2e, wall = end_to_end_rate(store, Path(tmp) / "run", args.batch_size, args.steps)
        after = raw_rate(args.batch_size, args.steps)
    raw = (before + after) / 2
    print(
        f"model: {RunConfig().model.arch}, batch {args.batch_size}, {args.steps} timed steps, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"raw forward+backward+step:   {raw:8.1f} images/s  (before {before:.1f}, after "
        f"{after:.1f})"
    )
    print(f"end-to-end histodetect train: {e2e:8.1f} images/s  (whole command {wall:.0f} s)")
    print(f"ratio end-to-end / raw:       {e2e / raw:8.2f}     (target >= 0.85)")


if __name__ == "__main__":
    main()
