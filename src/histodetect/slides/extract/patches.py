"""`histodetect extract`: PCam-style training patches from annotated slides, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.files import write_atomic, write_problems_csv
from histodetect.slides.annotations.readers import find_annotation
from histodetect.slides.extract.outputs import (
    assemble_kaggle,
    assemble_store,
    assembled_digest,
    extracted_source,
    parts_digest,
    write_part,
)
from histodetect.slides.extract.sampling import ExtractOptions, extract_slide
from histodetect.slides.maps.batch import (
    append_manifest,
    distributed_rank,
    output_names,
    read_manifest,
    shard,
)

WORK = ".extract"  # inside OUT: settings, per-slide parts, manifests
SETTINGS = "settings.json"
PROBLEMS = "extract_problems.csv"
FORMATS = ("store", "kaggle")
DEFAULT_EXTRACT = ExtractOptions()  # frozen: one shared instance is safe


@dataclass
class ExtractResult:
    """What one rank of `histodetect extract` did, and the output when it was assembled."""

    out: Path
    format: str
    rank: int
    world: int
    assigned: list[Path]
    done: list[dict] = field(default_factory=list)  # slides extracted by this run
    skipped: list[Path] = field(default_factory=list)  # finished by an earlier run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason), all ranks
    assembled: bool = False
    patches: int = 0  # in the assembled output
    positives: int = 0
    synthetic: bool = False
    seconds: float = 0.0
    stale_parts: int = 0  # parts of other settings removed after assembly
    stale_bytes: int = 0

    @property
    def extracted(self) -> int:
        """Patches this run drew from slides."""
        return sum(r["patches"] for r in self.done)

    @property
    def rate(self) -> float:
        """Patches drawn per second of this run (slides, labels, reading and writing)."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def job_key(slide: Path, annotation: Path | None, opts: ExtractOptions) -> str:
    """What a slide's part was made from: the slide file, its annotation and the settings."""

    def identity(path: Path | None) -> list:
        if path is None:
            return [None]
        try:
            st = path.stat()
            return [str(path.resolve()), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(path), None, None]

    blob = json.dumps([identity(slide), identity(annotation), asdict(opts)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _extract_one(slide: Path, annotation: Path | None, name: str, opts, part: Path) -> dict:
    """Extract one slide into its part file; a record for the manifest (in a worker, too)."""
    t0 = time.perf_counter()
    try:
        got = extract_slide(slide, annotation, name, opts)
    except Exception as exc:  # one bad slide or annotation must not stop the others
        reason = str(exc) if isinstance(exc, HistodetectError) else f"{type(exc).__name__}: {exc}"
        if str(slide) not in reason and (annotation is None or str(annotation) not in reason):
            reason = f"{slide}: {reason}"  # every reason names its file
        return {"status": "failed", "error": reason}
    write_part(part, name, got)
    return {
        "status": "done",
        "patches": len(got.labels),
        "positives": int(got.labels.sum()),
        "candidates": got.candidates,
        "positives_available": got.positives_available,
        "blurred": got.blurred,
        "synthetic": got.synthetic,
        "annotation": str(annotation) if annotation else None,
        "notes": got.notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _prepare(out: Path, fmt: str) -> Path:
    """The work folder in ``out``; ``out`` must be new, empty or an extraction of ``fmt``."""
    if fmt not in FORMATS:
        raise HistodetectError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    work = out / WORK
    if (work / SETTINGS).exists():
        saved = json.loads((work / SETTINGS).read_text())["format"]
        if saved != fmt:
            raise HistodetectError(
                f"{out}: holds an extraction in the {saved} format; pass --format {saved} or "
                "choose another --out."
            )
        return work
    if out.exists() and any(out.iterdir()):
        raise HistodetectError(f"{out}: exists and is not an extraction folder; choose --out.")
    (work / "parts").mkdir(parents=True, exist_ok=True)
    write_atomic(work / SETTINGS, json.dumps({"format": fmt}).encode())
    return work


def extract_patches(
    slides: list[Path],
    annotations: str | Path | None,
    out: str | Path,
    opts: ExtractOptions = DEFAULT_EXTRACT,
    *,
    fmt: str = "store",
    workers: int = 1,
    valid_fraction: float = 0.1,
    rank: int | None = None,
    world: int | None = None,
    redo: bool = False,
    progress: bool = True,
    on_slide: Callable[[Path, dict], None] | None = None,
) -> ExtractResult:
    """Extract labelled patches from slides into a packed store or a Kaggle-layout folder.

    Each slide's annotation is found in ``annotations`` by name (``find_annotation``); its
    patches are drawn by ``extract_slide`` and written as a part in ``OUT/.extract/parts/``,
    then recorded in ``OUT/.extract/manifest-rank<R>.jsonl``. A rerun skips slides whose
    part was made from the same files and settings, so a killed run loses at most the slides
    in progress. Ranks of torchrun/SLURM take their share of the slides; whichever finds every
    slide finished assembles the output: a store whose train/valid split is grouped by slide
    (with level-0 coordinates per patch), or ``train/<id>.tif`` + ``train_labels.csv`` +
    ``meta.csv`` (``id,slide,x,y,label``). Slides that fail are listed in
    ``OUT/extract_problems.csv``; the others go on.

    Args:
        slides: Slide files.
        annotations: Folder of annotation files (None: every slide gives negatives only).
        out: The output folder (DATA for `histodetect train`).
        opts: Sampling settings.
        fmt: ``"store"`` or ``"kaggle"``.
        workers: Slides extracted in parallel (processes).
        valid_fraction: Validation share of the store's slide-grouped split.
        rank, world: This process's share (default: from the environment).
        redo: Extract every slide again.
        progress: Show a progress bar over slides.
        on_slide: Called with each slide this run extracted or failed, and its record.

    Raises:
        HistodetectError: for bad options or ``out``, and when nothing could be extracted.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if annotations is not None and not Path(annotations).is_dir():
        raise HistodetectError(f"{annotations}: no such annotations folder.")
    work = _prepare(out, fmt)
    if rank is None or world is None:
        rank, world = distributed_rank()
    names = output_names(slides)
    jobs = {s: _job(s, annotations, opts, names[s], work) for s in slides}
    mine = shard(slides, rank, world)
    finished = {} if redo else read_manifest(work)
    result = ExtractResult(out, fmt, rank, world, mine)
    todo = []
    for s in mine:
        rec = finished.get(jobs[s]["key"])
        if rec and rec["status"] == "done" and Path(jobs[s]["part"]).exists():
            result.skipped.append(s)
        else:
            todo.append(s)

    def record(slide: Path, rec: dict) -> None:
        rec = {**jobs[slide], "slide": str(slide), "rank": rank, **rec}
        append_manifest(work, rank, rec)
        if rec["status"] == "done":
            result.done.append(rec)
        if on_slide:
            on_slide(slide, rec)

    _run(todo, jobs, opts, workers, progress, record)
    _finish(result, slides, jobs, work, valid_fraction, opts.seed)
    result.seconds = time.perf_counter() - t0
    return result


def _job(slide: Path, annotations, opts: ExtractOptions, name: str, work: Path) -> dict:
    annotation = find_annotation(annotations, slide) if annotations is not None else None
    key = job_key(slide, annotation, opts)
    return {
        "key": key,
        "name": name,
        "annotation": str(annotation) if annotation else None,
        # Named by key too: a run with other settings never overwrites (or reuses) this part.
        "part": str(work / "parts" / f"{name}-{key}.npz"),
    }


def _run(todo, jobs, opts, workers: int, progress: bool, record) -> None:
    """Extract ``todo`` here (one worker) or in a process pool, recording each as it ends."""
    from tqdm.auto import tqdm

    def args(s: Path) -> tuple:
        ann = jobs[s]["annotation"]
        return s, Path(ann) if ann else None, jobs[s]["name"], opts, Path(jobs[s]["part"])

    bar = tqdm(total=len(todo), unit="slide", desc="extract", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for s in todo:
            record(s, _extract_one(*args(s)))
            bar.update()
    else:
        with ProcessPoolExecutor(min(workers, len(todo))) as pool:
            futures = {pool.submit(_extract_one, *args(s)): s for s in todo}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
                bar.update()
    bar.close()


def _finish(result: ExtractResult, slides, jobs, work: Path, valid_fraction: float, seed: int):
    """Assemble the output when every slide (of every rank) is finished, and list failures."""
    records = read_manifest(work)
    status = {s: records.get(jobs[s]["key"], {}).get("status") for s in slides}
    result.failed = [
        (str(s), records[jobs[s]["key"]]["error"]) for s in slides if status[s] == "failed"
    ]
    if result.failed:
        write_problems_csv(result.out / PROBLEMS, result.failed)
    else:
        (result.out / PROBLEMS).unlink(missing_ok=True)
    if any(v is None for v in status.values()):
        return  # other ranks still at work: the last to finish assembles
    done = {jobs[s]["key"]: Path(jobs[s]["part"]) for s in slides if status[s] == "done"}
    done = {k: p for k, p in done.items() if records[k]["patches"] > 0}
    if not done:
        raise HistodetectError(
            f"nothing could be extracted from {len(slides)} slide(s)"
            + (
                ":\n" + "\n".join(f"  - {why}" for _, why in result.failed)
                if result.failed
                else " (no tissue found)."
            )
        )
    result.patches = sum(records[k]["patches"] for k in done)
    result.positives = sum(records[k]["positives"] for k in done)
    result.synthetic = any(records[k].get("synthetic") for k in done)
    digest = parts_digest(list(done), result.format, valid_fraction, seed)
    with _assembly_lock(work, result.world) as mine:
        if not mine:
            return  # another rank is assembling
        result.assembled = True
        if not (assembled_digest(work) == digest and _output_exists(result.out, result.format)):
            parts = sorted(done.items(), key=lambda kv: kv[1].name)  # stable order: by slide
            if result.format == "store":
                source = extracted_source(result.out, [p for _, p in parts], valid_fraction, seed)
                assemble_store(result.out, work, source, digest)
            else:
                assemble_kaggle(result.out, work, dict(parts), digest)
        _remove_stale_parts(result, work, {Path(job["part"]).name for job in jobs.values()})


def _remove_stale_parts(result: ExtractResult, work: Path, current: set[str]) -> None:
    """Delete the parts that other slides or settings left in ``work``, counting their bytes.

    Parts are named by slide and settings key, so a rerun with other settings writes new ones;
    once the output is assembled from this run's parts the old ones only take disk.
    """
    for part in (work / "parts").glob("*.npz"):
        if part.name not in current:
            result.stale_bytes += part.stat().st_size
            result.stale_parts += 1
            part.unlink()


def _output_exists(out: Path, fmt: str) -> bool:
    return (out / ("store.json" if fmt == "store" else "train_labels.csv")).exists()


@contextmanager
def _assembly_lock(work: Path, world: int) -> Iterator[bool]:
    """Whether this rank may assemble: it created the lock file. A lone rank first clears a
    lock a killed run left behind."""
    path = work / "assemble.lock"
    if world == 1:
        path.unlink(missing_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        yield False
        return
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
