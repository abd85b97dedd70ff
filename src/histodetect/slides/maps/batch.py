"""Many slides: listing, sharding between ranks, resumable runs recorded in manifests."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor, model_files
from histodetect.slides.maps.slide import SlideOptions, analyse_slide

MANIFEST_GLOB = "manifest-rank*.jsonl"
# The settings of a plain `histodetect slide` (frozen: one shared instance is safe).
DEFAULT_OPTIONS = SlideOptions()


def list_slides(items: list[str | Path], list_file: str | Path | None = None) -> list[Path]:
    """Slide paths from arguments and an optional list file (one path a line, # comments).

    Relative paths in the list file are relative to the file; duplicates are dropped.

    Raises:
        HistodetectError: when the list file is missing or nothing is listed.
    """
    paths = [Path(p) for p in items]
    if list_file is not None:
        list_file = Path(list_file)
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise HistodetectError(f"{list_file}: cannot read the slide list ({exc}).") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else list_file.parent / p)
    unique: dict[str, Path] = {}
    for p in paths:
        unique.setdefault(str(p.resolve()), p)
    if not unique:
        raise HistodetectError("no slides given: name slide files or pass --list FILE.")
    return list(unique.values())


def output_names(slides: list[Path]) -> dict[Path, str]:
    """A folder name per slide: its file stem, with a short hash where stems collide."""
    stems: dict[str, int] = {}
    for s in slides:
        stems[s.stem] = stems.get(s.stem, 0) + 1
    return {
        s: s.stem
        if stems[s.stem] == 1
        else f"{s.stem}-{hashlib.sha1(str(s.resolve()).encode()).hexdigest()[:8]}"
        for s in slides
    }


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed's launcher (torchrun) or SLURM; else (0, 1)."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            rank, world = int(os.environ[rank_key]), int(os.environ[world_key])
            if not 0 <= rank < world:
                raise HistodetectError(f"{rank_key}={rank} is not within {world_key}={world}.")
            return rank, world
    return 0, 1


def shard(slides: list[Path], rank: int, world: int) -> list[Path]:
    """This rank's slides: biggest files first, dealt round-robin so loads even out."""

    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0

    order = sorted(slides, key=lambda p: (-size(p), str(p)))
    return order[rank::world]


def job_key(path: Path, run: Path, opts: SlideOptions) -> str:
    """What a finished slide was made from: the file, the model and the settings."""
    try:
        st = path.stat()
        file_id = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        file_id = [str(path.resolve()), None, None]
    model_id: list = [str(run.resolve())]
    for path in model_files(run):  # an ensemble's members too: retraining one redoes the maps
        try:
            mt = path.stat()
            model_id += [mt.st_size, mt.st_mtime_ns]
        except OSError:
            model_id += [None, None]
    blob = json.dumps([file_id, model_id, asdict(opts)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(out: Path) -> dict[str, dict]:
    """Latest record per slide key from every rank's manifest (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for file in sorted(out.glob(MANIFEST_GLOB)):
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                records[rec["key"]] = rec
    return records


def append_manifest(out: Path, rank: int, record: dict) -> None:
    """Add one finished (or failed) job to ``out``'s manifest of this rank, synced to disk."""
    # One file per rank: ranks never write to the same file, so no locking across machines.
    with open(out / f"manifest-rank{rank}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class BatchResult:
    """What one rank did with its share of a slide list."""

    rank: int
    world: int
    assigned: list[Path]
    done: list[dict] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def run_slides(
    run: str | Path,
    slides: list[Path],
    out: str | Path,
    opts: SlideOptions = DEFAULT_OPTIONS,
    *,
    rank: int | None = None,
    world: int | None = None,
    redo: bool = False,
    device: str = "auto",
    progress: bool = True,
    on_slide: Callable[[Path, dict | None, str | None], None] | None = None,
) -> BatchResult:
    """Map this rank's share of ``slides`` into ``out/<name>/``, skipping finished ones.

    Every rank (``RANK``/``WORLD_SIZE`` from torchrun, or SLURM, unless given) takes every
    ``world``-th slide of the list sorted by size, and appends a line per finished or failed
    slide to ``out/manifest-rank<R>.jsonl``. A slide is skipped when a manifest says it was
    done with the same file, model and settings and its ``summary.json`` exists; failed
    slides are retried. One bad slide does not stop the others.
    """
    run, out = Path(run), Path(out)
    if rank is None or world is None:
        rank, world = distributed_rank()
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(slides)
    mine = shard(slides, rank, world)
    todo, skipped = _unfinished(mine, names, run, out, opts, redo)
    result = BatchResult(rank, world, mine, skipped=skipped)
    if not todo:
        return result
    predictor = Predictor.from_run(run, _rank_device(device))
    for path, key in todo:
        record = {"key": key, "slide": str(path), "out": names[path], "rank": rank}
        try:
            summary = analyse_slide(predictor, path, out / names[path], opts, progress)
        except HistodetectError as exc:
            reason = str(exc)
            result.failed.append((path, reason))
            append_manifest(out, rank, {**record, "status": "failed", "error": reason})
            if on_slide:
                on_slide(path, None, reason)
            continue
        result.done.append(summary)
        append_manifest(
            out,
            rank,
            {
                **record,
                "status": "done",
                "score": summary["score"],
                "n_regions": summary["n_regions"],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        if on_slide:
            on_slide(path, summary, None)
    return result


def _unfinished(
    mine: list[Path],
    names: dict[Path, str],
    run: Path,
    out: Path,
    opts: SlideOptions,
    redo: bool,
) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(slide, job key) of every slide still to map, and the finished slides to skip."""
    finished = {} if redo else read_manifest(out)
    todo, skipped = [], []
    for path in mine:
        key = job_key(path, run, opts)
        rec = finished.get(key)
        if rec and rec.get("status") == "done" and (out / names[path] / "summary.json").exists():
            skipped.append(path)
        else:
            todo.append((path, key))
    return todo, skipped


def _rank_device(device: str) -> str:
    """``device``, or under torchrun with ``auto`` the GPU of this local rank."""
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # one GPU per local rank, as torchrun intends
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def manifest_rows(out: Path) -> Iterator[dict]:
    """The manifest's latest record per slide, for listing."""
    yield from read_manifest(Path(out)).values()
