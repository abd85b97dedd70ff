"""The self-describing run folder: config, data, environment, model export, checks and curves."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
from pathlib import Path

import lightning as L
import numpy as np
import torch

from histodetect import PATCH_SIZE, __version__
from histodetect.config import RunConfig, save_config
from histodetect.data.store import Store
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.predictor import MODEL_FILE, MODEL_META
from histodetect.training.module import PatchModule

# Lightning's CSV log of a run: per-step and per-epoch metrics.
METRICS_CSV = Path("logs") / "metrics.csv"


def environment() -> dict:
    """Versions and hardware, saved in every run folder."""
    import lightning
    import timm

    env = {
        "histodetect": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return env


def data_description(store: Store) -> dict:
    """The data a run saw: store, source, counts, fingerprint and whether it is synthetic."""
    m = store.manifest
    return {
        "store": str(store.path),
        "source": m["source"],
        "fingerprint": m["fingerprint"],
        "counts": m["counts"],
        "synthetic": store.synthetic,
    }


def prepare_run_folder(
    run: Path, cfg: RunConfig, data_info: dict, data: str | Path, resume: bool, primary: bool
) -> None:
    """Start a new run folder (config, data), or check a resumed one saw the same data.

    Only the ``primary`` process writes: DDP workers re-run the same command. Every run (and
    every resume) records its environment.
    """
    if resume:
        before = json.loads((run / "data.json").read_text())["fingerprint"]
        if before != data_info["fingerprint"]:
            raise HistodetectError(f"{run}: was trained on other data than {data}; cannot resume.")
    elif primary:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        write_atomic(run / "data.json", json.dumps(data_info, indent=2).encode())
    if primary:
        write_atomic(run / "environment.json", json.dumps(environment(), indent=2).encode())


def export_model(module: PatchModule, run: Path, extra: dict) -> None:
    """Write ``model.safetensors`` + ``model.json``: all a predictor needs, no pickle."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
    tmp = run / f".{MODEL_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, run / MODEL_FILE)
    cfg = module.cfg
    meta = {
        "format": "histodetect-model",
        "version": 1,
        "arch": cfg.model.arch,
        "dropout": cfg.model.dropout,
        "channels_last": cfg.model.channels_last,
        "input_size": PATCH_SIZE,
        "crop": cfg.data.crop,
        "input": "uint8 RGB, HWC; scaled to 0..1, centre crop, then normalised with mean/std",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "threshold": 0.5,
        "stain_norm": module.stain.describe() or None,
        "histodetect": __version__,
        **extra,
    }
    write_atomic(run / MODEL_META, json.dumps(meta, indent=2).encode())


def record_rank_weights(trainer: L.Trainer, module: PatchModule, run: Path) -> None:
    """Under DDP, every rank records a hash of its final weights; rank 0 checks they agree.

    Parameters are compared; BatchNorm running statistics are per-rank by design (DDP
    broadcasts rank 0's before each forward pass), so they are left out.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder = run / "ddp"
    folder.mkdir(exist_ok=True)
    write_atomic(folder / f"rank{trainer.global_rank}.sha256", digest.hexdigest().encode())
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        hashes = {p.stem: p.read_text() for p in sorted(folder.glob("rank*.sha256"))}
        same = len(set(hashes.values())) == 1
        report = {"world_size": trainer.world_size, "identical": same, "hashes": hashes}
        write_atomic(folder / "check.json", json.dumps(report, indent=2).encode())
        if not same:
            raise HistodetectError(f"DDP ranks ended with different weights: {hashes}")


def metrics_before(run: Path, step: int) -> list[dict]:
    """The rows of ``logs/metrics.csv`` logged before optimiser step ``step`` (for a resume).

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts, so a resumed
    run keeps these rows here and puts them back with :func:`restore_metrics`.
    """
    path = run / METRICS_CSV
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if int(float(row.get("step") or 0)) < step]


def restore_metrics(run: Path, earlier: list[dict]) -> None:
    """Put the rows logged before a resume back in front of those logged after it."""
    path = run / METRICS_CSV
    if not earlier or not path.is_file():
        return
    with open(path, newline="") as fh:
        later = list(csv.DictReader(fh))
    keys = sorted(set().union(*earlier, *later))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(earlier + later)
    write_atomic(path, out.getvalue().encode())


def plot_curves(metrics_csv: Path, out: Path, title: str) -> None:
    """Loss, accuracy and AUC per epoch, and per-step training loss, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def series(key: str, by: str = "epoch") -> tuple[list[float], list[float]]:
        pts = [(float(r[by]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(13, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [
        ("loss", [("train_loss_epoch", "train"), ("val_loss", "valid")]),
        ("accuracy", [("train_acc", "train"), ("val_acc", "valid")]),
        ("ROC AUC", [("val_auc", "valid")]),
    ]
    for ax, (name, keys) in zip(axes, panels, strict=False):
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot([x + 1 for x in xs], ys, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if ax.lines:  # a run stopped before its first epoch ended has nothing to label
            ax.legend()
        ax.grid(alpha=0.3)
    xs, ys = series("train_loss_step", "step")
    axes[3].plot(xs, ys, lw=0.8)
    axes[3].set_title("training loss per step")
    axes[3].set_xlabel("step")
    axes[3].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def write_curves(run: Path, arch: str, store: Store) -> None:
    """``curves.png`` from the run's CSV log, titled with the model and data (and SYNTHETIC)."""
    csv_path = run / METRICS_CSV
    if csv_path.exists():
        title = f"{arch} on {Path(store.manifest['source']['path']).name}"
        if store.synthetic:
            title += " (SYNTHETIC DATA)"
        plot_curves(csv_path, run / "curves.png", title)
