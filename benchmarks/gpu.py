"""GPU speed of the one-GPU recipe: raw steps, end-to-end `train`, inference and memory per model.

Usage: python benchmarks/gpu.py [--config configs/gpu_efficientnet_b0.yaml] [--steps 60]
       [--base 20000] [--rows 220025] [--models smallcnn,efficientnet_b0,resnet50]
       [--work DIR] [--out benchmarks/results/gpu.txt] [--smoke]

Data: a SYNTHETIC Kaggle-layout set as large as the real one (220,025 labelled patches):
``--base`` patches are rendered by ``histodetect.data.synth_kaggle`` (in parallel) and repeated
(hard links under new ids) up to ``--rows``, then packed by the real ``pack``. Speed does not
depend on the pixels; scores on this data mean nothing.

Per model, side by side in one run, all with the recipe of ``--config`` (batch size,
augmentation, EMA, precision) and only the architecture swapped (timm backbones with
``pretrained=False``: offline, and the speed is the same):

- raw training: forward + backward + AdamW step on batches already on the GPU, (a) on
  ready-normalised tensors (the model alone) and (b) from uint8 patches through the module's
  own on-device augmentation and normalisation (``on_after_batch_transfer``);
- end-to-end training: the real ``histodetect.training.run.train`` on the store for a fixed
  number of steps (loading, augmentation, EMA, logging, checkpoints; its own images/s meter,
  warm-up batches and validation excluded);
- inference: the bare forward pass (at the recipe's precision and in fp32), and the real
  ``predict`` path from the store (``predict_patches``, TTA 1 and 8) with the exported run;
- peak GPU memory (``torch.cuda.max_memory_allocated``) of (b) and of the ``train`` call;
- the projected time of one epoch over the training split, and of the recipe's epochs.

Without a GPU it says so and exits 0; ``--smoke`` runs the same code on the CPU with tiny
sizes in fp32, so tests exercise it (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "gpu_efficientnet_b0.yaml"
MODELS = ("smallcnn", "efficientnet_b0", "resnet50")
KAGGLE_ROWS = 220_025  # labelled patches in Kaggle's train_labels.csv
THROUGHPUT_WARMUP = 3  # batches the train() images/s meter leaves out (callbacks.Throughput)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is, and where it runs."""

    rows: int  # rows of the tiled store
    base: int  # distinct synthetic patches rendered
    steps: int  # timed training steps (raw and end-to-end)
    warmup: int  # untimed raw steps first
    batch: int  # training batch size
    infer: int  # patches for the inference figures
    device: str  # "cuda" or "cpu"
    precision: str  # Lightning precision: "bf16-mixed", "16-mixed" or "32-true"


@dataclass
class Result:
    """Every figure measured for one model (NaN where not measured)."""

    arch: str
    params_m: float = float("nan")
    raw_model: float = float("nan")
    raw_augment: float = float("nan")
    raw_peak_gb: float = float("nan")
    e2e: float = float("nan")
    e2e_peak_gb: float = float("nan")
    e2e_wall_s: float = float("nan")
    infer_raw: float = float("nan")
    infer_raw_fp32: float = float("nan")
    predict_tta1: float = float("nan")
    predict_tta8: float = float("nan")
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def _render_part(args: tuple[Path, int, int]) -> Path:
    """Render one part of the base set (a worker's share): ``n`` patches from ``seed``."""
    from histodetect.data.synth_kaggle import generate

    folder, n, seed = args
    generate(folder, n=n, seed=seed)
    return folder


def _base_patches(work: Path, base: int, workers: int) -> list[tuple[Path, int]]:
    """Render ``base`` SYNTHETIC patches in ``workers`` processes; return (file, label) pairs."""
    parts = max(1, min(workers, base))
    share = -(-base // parts)
    jobs = [(work / f"base-{k}", min(share, base - k * share), k) for k in range(parts)]
    jobs = [job for job in jobs if job[1] > 0]
    if len(jobs) == 1:
        folders = [_render_part(jobs[0])]
    else:
        with ProcessPoolExecutor(len(jobs)) as pool:
            folders = list(pool.map(_render_part, jobs))
    patches = []
    for folder in folders:
        with open(folder / "train_labels.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                patches.append((folder / "train" / f"{row['id']}.tif", int(row["label"])))
    return patches


def build_store(work: Path, rows: int, base: int, workers: int) -> tuple[Path, str]:
    """A packed store of ``rows`` SYNTHETIC patches, ``base`` of them distinct; reused if there.

    The distinct patches are repeated, as hard links under new Kaggle-style ids, into a
    Kaggle-layout folder marked SYNTHETIC, which the real ``pack`` then packs.

    Returns:
        The store's path and a line describing how it was made.
    """
    from histodetect.data.pack import pack

    store = work / "store"
    if (store / "store.json").exists():
        return store, f"SYNTHETIC store reused from {store}"
    t0 = time.perf_counter()
    patches = _base_patches(work, base, workers)
    tiled = work / "tiled"
    (tiled / "train").mkdir(parents=True, exist_ok=True)
    (tiled / "SYNTHETIC.md").write_text(
        f"# SYNTHETIC data\n\n{rows} patches repeated from {len(patches)} patches rendered by "
        "histodetect.data.synth_kaggle, made by benchmarks/gpu.py for speed measurements. "
        "They say nothing about real slides.\n"
    )
    labels = []
    for r in range(rows):
        source, label = patches[r % len(patches)]
        patch_id = f"{r:040x}"
        target = tiled / "train" / f"{patch_id}.tif"
        if not target.exists():
            os.link(source, target)
        labels.append((patch_id, label))
    with open(tiled / "train_labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("id", "label"))
        writer.writerows(labels)
    rendered = time.perf_counter() - t0
    t1 = time.perf_counter()
    pack(tiled, store, progress=False)
    repeats = rows / len(patches)
    line = (
        f"SYNTHETIC store: {rows:,} rows = {len(patches):,} rendered patches repeated "
        f"~{repeats:.1f}x (render + link {rendered:.0f} s, pack {time.perf_counter() - t1:.0f} s)"
    )
    return store, line


# --------------------------------------------------------------------------- measurements


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _autocast(device: str, precision: str):
    """The autocast context Lightning uses for ``precision`` (none for fp32)."""
    if precision == "bf16-mixed":
        return torch.autocast(device, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device, dtype=torch.float16)
    return nullcontext()


def recipe_config(config: Path, arch: str, sizes: Sizes, max_steps: int = 0):
    """The recipe of ``config`` with ``arch`` swapped in, untrained, at the benchmark's sizes."""
    from histodetect.config import load_config

    overrides = {
        "model": {"arch": arch, "pretrained": False, "weights": None},
        "data": {"batch_size": sizes.batch},
        "train": {"precision": sizes.precision, "max_minutes": 0.0},
    }
    if max_steps:
        # A fixed number of steps, whatever the epoch length.
        overrides["train"].update({"max_steps": max_steps, "epochs": 1000})
    return load_config(config, overrides)


def raw_training(cfg, sizes: Sizes, result: Result) -> None:
    """Images/s of bare AdamW steps: on normalised tensors, then from uint8 via augmentation."""
    from histodetect.config import to_dict
    from histodetect.training.module import PatchModule

    device, n = sizes.device, sizes.batch
    module = PatchModule(to_dict(cfg)).to(device).train()
    result.params_m = sum(p.numel() for p in module.parameters()) / 1e6
    t = cfg.train
    opt = torch.optim.AdamW(module.param_groups(), lr=t.lr, weight_decay=t.weight_decay)
    size = cfg.data.crop
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=fmt)
    images = torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, device=device)
    y = (torch.rand(n, device=device) < 0.4).float()

    def step(inputs: torch.Tensor) -> None:
        with _autocast(device, sizes.precision):
            loss = module.loss(module(inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rate(make_input) -> float:
        for _ in range(sizes.warmup):
            step(make_input())
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(sizes.steps):
            step(make_input())
        _sync(device)
        return sizes.steps * n / (time.perf_counter() - t0)

    result.raw_model = rate(lambda: x)
    _reset_peak(device)
    # The module's own hook: uint8 NHWC -> augmented, normalised NCHW on the device.
    result.raw_augment = rate(lambda: module.on_after_batch_transfer((images, y), 0)[0])
    result.raw_peak_gb = _peak_gb(device)


def end_to_end(store: Path, run: Path, cfg, sizes: Sizes, result: Result) -> None:
    """Images/s of the real ``train`` on the store for ``sizes.steps`` timed steps."""
    from histodetect.training.run import train

    _reset_peak(sizes.device)
    t0 = time.perf_counter()
    out = train(
        store,
        run,
        cfg,
        progress=False,
        accelerator="gpu" if sizes.device == "cuda" else "cpu",
        devices=1,
    )
    result.e2e_wall_s = time.perf_counter() - t0
    result.e2e = out.images_per_s
    result.e2e_peak_gb = _peak_gb(sizes.device)


@torch.inference_mode()
def inference(store_path: Path, run: Path, cfg, sizes: Sizes, result: Result) -> None:
    """Bare forward images/s, and the real ``predict`` path from the store at TTA 1 and 8."""
    from histodetect.data.store import open_store
    from histodetect.inference.predictor import PatchList, Predictor, predict_patches

    device = sizes.device
    predictor = Predictor.from_run(run, device)
    batch = min(256, sizes.infer)  # 256: `histodetect predict`'s default --batch-size
    x = torch.randn(batch, 3, predictor.crop, predictor.crop, device=device)
    if predictor.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n_batches = max(1, sizes.infer // batch)

    def forward_rate(precision: str) -> float:
        with _autocast(device, precision):
            predictor.model(x)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                torch.sigmoid(predictor.model(x).float())
            _sync(device)
        return n_batches * batch / (time.perf_counter() - t0)

    result.infer_raw = forward_rate(sizes.precision)
    result.infer_raw_fp32 = forward_rate("32-true")

    store = open_store(store_path, verify=False)
    rows = np.flatnonzero(store.splits == "valid")[: sizes.infer]
    patches = PatchList([str(store.ids[i]) for i in rows], store=store, rows=rows)
    for tta in (1, 8):
        warm = PatchList(patches.ids[:batch], store=store, rows=rows[:batch])
        predict_patches(predictor, warm, tta=tta, progress=False)
        _sync(device)
        t0 = time.perf_counter()
        predict_patches(predictor, patches, tta=tta, progress=False)
        _sync(device)
        setattr(result, f"predict_tta{tta}", len(rows) / (time.perf_counter() - t0))


def measure(arch: str, config: Path, store: Path, work: Path, sizes: Sizes) -> Result:
    """Every figure for one architecture; a failure is recorded, not raised."""
    result = Result(arch)
    try:
        raw_training(recipe_config(config, arch, sizes), sizes, result)
        cfg = recipe_config(config, arch, sizes, max_steps=sizes.steps + THROUGHPUT_WARMUP)
        run = work / f"run-{arch}"
        end_to_end(store, run, cfg, sizes, result)
        inference(store, run, cfg, sizes, result)
    except Exception as exc:  # one model failing (e.g. out of memory) must not hide the others
        result.notes.append(f"{arch}: failed ({type(exc).__name__}: {exc})")
    _reset_peak(sizes.device)
    return result


# --------------------------------------------------------------------------- report


def _minutes(images: int, rate: float) -> str:
    return f"{images / rate / 60:.1f} min" if rate == rate and rate > 0 else "n/a"


def table(results: list[Result], n_train: int, epochs: int, max_minutes: float) -> list[str]:
    """Metrics as rows, models as columns."""
    fmt_rate = "{:,.0f}".format

    def num(value: float, fmt=fmt_rate) -> str:
        return "n/a" if value != value else fmt(value)

    gb = "{:.2f} GB".format
    rows = [
        ("parameters (millions)", [num(r.params_m, "{:.1f}".format) for r in results]),
        ("raw train, model only (img/s)", [num(r.raw_model) for r in results]),
        ("raw train + on-device aug (img/s)", [num(r.raw_augment) for r in results]),
        ("end-to-end train() (img/s)", [num(r.e2e) for r in results]),
        (
            "end-to-end / raw + aug",
            [num(r.e2e / r.raw_augment, "{:.2f}".format) for r in results],
        ),
        ("inference forward, recipe precision", [num(r.infer_raw) for r in results]),
        ("inference forward, fp32 (img/s)", [num(r.infer_raw_fp32) for r in results]),
        ("predict from store, TTA 1 (img/s)", [num(r.predict_tta1) for r in results]),
        ("predict from store, TTA 8 (img/s)", [num(r.predict_tta8) for r in results]),
        ("peak GPU memory, raw + aug step", [num(r.raw_peak_gb, gb) for r in results]),
        ("peak GPU memory, train() call", [num(r.e2e_peak_gb, gb) for r in results]),
        ("train() call wall time", [num(r.e2e_wall_s, "{:.0f} s".format) for r in results]),
        (f"one epoch ({n_train:,} train patches)", [_minutes(n_train, r.e2e) for r in results]),
        (
            f"{epochs} epochs (recipe; validation excluded)",
            [_minutes(n_train * epochs, r.e2e) for r in results],
        ),
    ]
    width = max(len(name) for name, _ in rows) + 2
    col = max(14, *(len(r.arch) + 2 for r in results))
    lines = ["".ljust(width) + "".join(r.arch.rjust(col) for r in results)]
    lines += [name.ljust(width) + "".join(v.rjust(col) for v in values) for name, values in rows]
    if max_minutes:
        lines.append(f"(the recipe's max_minutes: {max_minutes:g} stops a run there, annealed)")
    return lines


# --------------------------------------------------------------------------- main


def _no_gpu(args: argparse.Namespace) -> None:
    """Say plainly that nothing was measured, and what a GPU run would measure."""
    print(
        "no GPU: torch.cuda.is_available() is False, so nothing was measured"
        + (f" and {args.out} was not written." if args.out else ".")
    )
    print(
        f"On a GPU this builds a SYNTHETIC packed store of {args.rows:,} rows ({args.base:,} "
        "rendered patches, repeated) and measures, for "
        f"{', '.join(args.models)} with the recipe of {_shown(args.config)} at bf16-mixed: raw "
        "training images/s (model alone, and with the on-device augmentation), end-to-end "
        "train() images/s, inference images/s (bare forward and `predict` from the store, "
        "TTA 1 and 8), peak GPU memory, and the projected time of one epoch and of the recipe."
    )
    print("`--smoke` runs the same code on this CPU with tiny sizes (numbers mean nothing).")


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _sizes(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        # 43 training patches: 10 batches of 4, so the 3 + 2 steps of train() stay in epoch 1.
        return Sizes(48, 16, 2, 1, 4, 8, "cpu", "32-true")
    precision = args.precision
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        precision = "16-mixed"  # V100, T4: no bf16
    return Sizes(
        args.rows, args.base, args.steps, 10, args.batch_size, args.infer, "cuda", precision
    )


def _header(args: argparse.Namespace, sizes: Sizes, store_line: str, n_train: int) -> list[str]:
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = (
            f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cudnn.benchmark {torch.backends.cudnn.benchmark}"
        )
    else:
        where = (
            f"SMOKE TEST on the CPU ({torch.get_num_threads()} torch threads): tiny sizes, "
            "fp32; the numbers below mean nothing"
        )
    return [
        "benchmarks/gpu.py: the one-GPU recipe, measured side by side in one run",
        where,
        store_line + f"; {n_train:,} in the training split. SYNTHETIC: speed only.",
        f"recipe: {_shown(args.config)} with the architecture swapped (pretrained=False), "
        f"batch {sizes.batch}, {sizes.precision}",
        f"raw: {sizes.warmup} warm-up + {sizes.steps} timed AdamW steps on random batches "
        "already on the device (no EMA, no loader); end-to-end: the real train() for "
        f"{THROUGHPUT_WARMUP} + {sizes.steps} steps, its own images/s meter",
        f"inference: batch {min(256, sizes.infer)} on {sizes.infer:,} patches; `predict` runs "
        "in fp32 today (Predictor has no autocast)",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the recipe")
    parser.add_argument(
        "--models",
        type=lambda s: tuple(m for m in s.split(",") if m),
        default=MODELS,
        help="comma-separated architectures",
    )
    parser.add_argument("--rows", type=int, default=KAGGLE_ROWS, help="rows of the store")
    parser.add_argument("--base", type=int, default=20_000, help="distinct synthetic patches")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--infer", type=int, default=20_480, help="patches for inference")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--work", type=Path, help="keep the store and runs here (reused)")
    parser.add_argument("--out", type=Path, help="also write the results to this text file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, fp32")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        _no_gpu(args)
        return 0

    from histodetect.config import load_config

    recipe = load_config(args.config)
    if args.batch_size is None:
        args.batch_size = recipe.data.batch_size
    sizes = _sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store, store_line = build_store(work, sizes.rows, sizes.base, os.cpu_count() or 1)
        from histodetect.data.store import open_store

        opened = open_store(store, verify=False)
        if not opened.synthetic:
            raise SystemExit(f"{store}: is not marked SYNTHETIC; refusing to measure on it.")
        n_train = int((opened.splits == "train").sum())
        runs = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
        results = [measure(arch, args.config, store, runs, sizes) for arch in args.models]
        lines = _header(args, sizes, store_line, n_train)
        lines += table(results, n_train, recipe.train.epochs, recipe.train.max_minutes)
        lines += [note for r in results for note in r.notes]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"written to {args.out}")
    return 1 if any(r.notes for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
