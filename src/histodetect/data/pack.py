"""`histodetect pack`: decode every patch once into a checksummed, resumable packed store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from histodetect import PATCH_SIZE, __version__
from histodetect.data.source import Source
from histodetect.data.sources import open_source
from histodetect.data.store import FORMAT, IMAGES, INDEX, MANIFEST, VERSION, index_bytes
from histodetect.errors import BadInputError, HistodetectError, describe_problems
from histodetect.files import write_atomic, write_problems_csv

PLAN = "pack-plan.json"
LOG = "pack-progress.jsonl"
PARTIAL = "images.npy.partial"
BAD_LIST = "bad_patches.csv"


@dataclass(frozen=True)
class PackResult:
    """What a pack did: sizes, what was skipped and how much work this run actually did."""

    store: str
    patches: int
    skipped: int
    decoded_this_run: int
    chunks_resumed: int
    seconds: float
    synthetic: bool

    @property
    def rate(self) -> float:
        """Patches decoded per second in this run."""
        return self.decoded_this_run / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Plan:
    """What a pack writes: the source, its index arrays, their fingerprint and the chunking."""

    source: Source
    arrays: dict[str, np.ndarray]
    fingerprint: str
    rows: int
    chunk_rows: int

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def span(self, k: int) -> tuple[int, int, int]:
        """Chunk ``k`` and its rows [start, stop)."""
        return k, k * self.chunk_rows, min(self.rows, (k + 1) * self.chunk_rows)


def _plan_arrays(source: Source) -> dict[str, np.ndarray]:
    arrays = {
        "ids": source.ids.astype(str),
        "labels": source.labels.astype(np.int8),
        "splits": source.splits.astype("<U5"),
    }
    if source.slides is not None:
        arrays["slides"] = source.slides.astype(str)
    if source.coords is not None:  # level-0 (x, y) per patch: patches from slides
        arrays["coords"] = np.asarray(source.coords, np.int64).reshape(-1, 2)
    return arrays


# Worker state lives in module globals so the (large) source is pickled once per process.
_WORKER: dict = {}


def _init_worker(source: Source, partial: str) -> None:
    _WORKER["source"] = source
    _WORKER["images"] = np.load(partial, mmap_mode="r+")
    # Lets tests interrupt a pack mid-way on any machine, however fast it decodes.
    _WORKER["delay"] = float(os.environ.get("HISTODETECT_PACK_DELAY", 0))


def _pack_chunk(k: int, start: int, stop: int) -> tuple[int, str, list[tuple[int, str, str]]]:
    """Decode rows [start, stop) into the partial array; return its hash and bad rows."""
    source: Source = _WORKER["source"]
    images: np.ndarray = _WORKER["images"]
    if _WORKER.get("delay"):
        time.sleep(_WORKER["delay"])
    block, bad = source.read_checked(range(start, stop))
    images[start:stop] = block
    images.flush()  # on disk before the chunk is recorded as done
    where_to_row = {source.where(i): i for i in range(start, stop)} if bad else {}
    bad_rows = [(where_to_row[where], where, why) for where, why in bad]
    return k, hashlib.sha256(block.data).hexdigest(), bad_rows


def _read_log(path: Path) -> dict[int, dict]:
    """Committed chunks from the progress log; a torn last line (kill -9) is ignored."""
    done: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["chunk"]] = rec
    return done


def _fingerprint_in(out: Path) -> str | None:
    """The data fingerprint of the (possibly unfinished) pack in ``out``, if any."""
    for name in (MANIFEST, PLAN):
        try:
            return json.loads((out / name).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def pack(
    data: str | Path,
    out: str | Path,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
    chunk_rows: int = 1024,
    valid_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    replace_stale: bool = False,
) -> PackResult:
    """Pack DATA into a store at ``out``; re-running after an interrupt resumes.

    Args:
        data: a Kaggle folder or PCam folder (see :func:`histodetect.sources.open_source`).
        out: the store folder to create (or resume).
        skip_bad: leave bad patches out and list them in ``bad_patches.csv`` instead of failing.
        workers: decoding processes (default: one per CPU).
        chunk_rows: patches per committed chunk (the unit of resume and of checksums).
        valid_fraction: validation share when the source defines no split.
        seed: seed of that split.
        progress: show a progress bar.
        replace_stale: delete whatever ``out`` holds when it was packed from other data (for
            cache folders that histodetect owns; never for a user's --out).

    Raises:
        BadInputError: listing every unreadable patch (unless ``skip_bad``).
        HistodetectError: when ``out`` holds something else.
    """
    t0 = time.perf_counter()
    source = open_source(data, skip_bad=skip_bad, valid_fraction=valid_fraction, seed=seed)
    if source.kind == "store":
        raise HistodetectError(f"{data}: is already a packed store; nothing to pack.")
    return pack_source(
        source,
        out,
        skip_bad=skip_bad,
        workers=workers,
        chunk_rows=chunk_rows,
        progress=progress,
        replace_stale=replace_stale,
        started=t0,
    )


def pack_source(
    source: Source,
    out: str | Path,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
    chunk_rows: int = 1024,
    progress: bool = True,
    replace_stale: bool = False,
    started: float | None = None,
) -> PackResult:
    """Pack an opened ``Source`` (ids, labels, splits, slides, coords) into a store at ``out``.

    What :func:`pack` does once it has opened DATA; also used for sources that are not a
    folder layout (patches extracted from slides). Resumable in the same way.

    Args:
        source: The patches; it must be picklable when ``workers`` > 1.
        out, skip_bad, workers, chunk_rows, progress, replace_stale: As for :func:`pack`.
        started: ``time.perf_counter()`` when the work began (default: now).
    """
    t0 = time.perf_counter() if started is None else started
    out = Path(out)
    plan = _make_plan(source, chunk_rows)
    if replace_stale and out.exists() and _fingerprint_in(out) not in (None, plan.fingerprint):
        shutil.rmtree(out)
    if (out / MANIFEST).exists():
        return _already_packed(out, plan)
    _start_or_resume(out, plan)
    # A chunk that had bad patches is redone: the user may have fixed the files since.
    committed = {k: rec for k, rec in _read_log(out / LOG).items() if not rec["bad"]}
    results, decoded = _decode_chunks(out, plan, committed, workers, progress)
    bad_rows = _bad_rows(results, source.path, skip_bad)
    manifest = _write_store(out, plan, results, bad_rows)
    result = PackResult(
        str(out),
        manifest["patches"],
        manifest["skipped"],
        decoded,
        len(committed),
        time.perf_counter() - t0,
        plan.source.synthetic,
    )
    (out / "pack-summary.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _make_plan(source: Source, chunk_rows: int) -> _Plan:
    """Fingerprint what ``source`` would pack into (ids, labels, splits, where from)."""
    arrays = _plan_arrays(source)
    fingerprint = hashlib.sha256(
        index_bytes(arrays) + f"{source.kind}:{Path(source.path).resolve()}".encode()
    ).hexdigest()
    return _Plan(source, arrays, fingerprint, len(source), chunk_rows)


def _already_packed(out: Path, plan: _Plan) -> PackResult:
    """The result of a finished pack of the same data in ``out``; an error for other data."""
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("fingerprint") == plan.fingerprint:
        return PackResult(
            str(out),
            manifest["patches"],
            manifest["skipped"],
            0,
            plan.chunks,
            0.0,
            plan.source.synthetic,
        )
    raise HistodetectError(f"{out}: already holds a different packed store; choose --out.")


def _start_or_resume(out: Path, plan: _Plan) -> None:
    """Check an unfinished pack in ``out`` is of the same data, or start one: plan + array."""
    plan_path, partial = out / PLAN, out / PARTIAL
    if plan_path.exists():
        saved = json.loads(plan_path.read_text())
        if saved["fingerprint"] != plan.fingerprint or saved["chunk_rows"] != plan.chunk_rows:
            raise HistodetectError(
                f"{out}: holds an unfinished pack of different data (or chunk size); remove the "
                "folder or choose another --out."
            )
        if not partial.exists() and (out / IMAGES).exists():
            os.replace(out / IMAGES, partial)  # interrupted between the final renames
        return
    if out.exists() and any(out.iterdir()):
        raise HistodetectError(f"{out}: exists and is not empty; choose a new --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    n = plan.rows
    np.lib.format.open_memmap(
        partial, mode="w+", dtype=np.uint8, shape=(n, PATCH_SIZE, PATCH_SIZE, 3)
    ).flush()
    write_atomic(
        plan_path,
        json.dumps(
            {"fingerprint": plan.fingerprint, "chunk_rows": plan.chunk_rows, "rows": n}
        ).encode(),
    )


def _decode_chunks(
    out: Path, plan: _Plan, committed: dict[int, dict], workers: int | None, progress: bool
) -> tuple[dict[int, dict], int]:
    """Decode every chunk not yet ``committed``, logging each as it finishes.

    Returns the log records of all chunks and how many patches this run decoded.
    """
    n, chunk_rows = plan.rows, plan.chunk_rows
    todo = [k for k in range(plan.chunks) if k not in committed]
    results: dict[int, dict] = dict(committed)
    decoded = 0
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))

    from tqdm.auto import tqdm

    bar = tqdm(
        total=n,
        initial=n - sum(min(chunk_rows, n - k * chunk_rows) for k in todo),
        unit="patch",
        desc="pack",
        disable=not progress,
        smoothing=0.1,
    )
    with open(out / LOG, "a") as log:

        def commit(k: int, digest: str, bad: list) -> None:
            nonlocal decoded
            rec = {"chunk": k, "sha256": digest, "bad": bad}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            os.fsync(log.fileno())
            results[k] = rec
            size = min(chunk_rows, n - k * chunk_rows)
            decoded += size
            bar.update(size)

        spans = [plan.span(k) for k in todo]
        _run_chunks(plan.source, out / PARTIAL, spans, workers, commit)
    bar.close()
    return results, decoded


def _run_chunks(
    source: Source,
    partial: Path,
    spans: list[tuple[int, int, int]],
    workers: int,
    commit: Callable[[int, str, list], None],
) -> None:
    """Decode ``spans`` here (one worker) or in a process pool, committing each as it ends."""
    if workers == 1:
        _init_worker(source, str(partial))
        for span in spans:
            commit(*_pack_chunk(*span))
        _WORKER.clear()
        return
    with ProcessPoolExecutor(
        workers, initializer=_init_worker, initargs=(source, str(partial))
    ) as pool:
        pending = {pool.submit(_pack_chunk, *span) for span in spans[: workers * 4]}
        queued = workers * 4
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                commit(*fut.result())
                if queued < len(spans):
                    pending.add(pool.submit(_pack_chunk, *spans[queued]))
                    queued += 1


def _bad_rows(
    results: dict[int, dict], data: str | Path, skip_bad: bool
) -> list[tuple[int, str, str]]:
    """Every bad patch as (row, where, why), sorted; fails listing them unless ``skip_bad``."""
    bad_rows = sorted(
        (row, where, why) for rec in results.values() for row, where, why in rec["bad"]
    )
    problems = [(where, why) for _, where, why in bad_rows]
    if problems and not skip_bad:
        raise BadInputError(
            f"{data}: {len(problems)} patch(es) cannot be decoded; fix them and re-run (finished "
            "work is kept), or pass --skip-bad to pack the rest:\n" + describe_problems(problems),
            problems,
        )
    return bad_rows


def _write_store(
    out: Path, plan: _Plan, results: dict[int, dict], bad_rows: list[tuple[int, str, str]]
) -> dict:
    """Finish the store: index, bad-patch list, images in place, manifest; drop log and plan.

    Returns the manifest.
    """
    source, n = plan.source, plan.rows
    problems = [(where, why) for _, where, why in bad_rows]
    keep = np.ones(n, bool)
    keep[[row for row, _, _ in bad_rows]] = False
    index = {k: v[keep] for k, v in plan.arrays.items()}
    index["rows"] = np.flatnonzero(keep).astype(np.int64)
    blob = index_bytes(index)
    write_atomic(out / INDEX, blob)
    all_problems = list(source.problems) + problems
    if all_problems:
        write_problems_csv(out / BAD_LIST, all_problems)
    kept_source = Source(source.kind, source.path, index["ids"], index["labels"], index["splits"])
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "synthetic": source.synthetic,
        "source": {"kind": source.kind, "path": str(Path(source.path).resolve())},
        "fingerprint": plan.fingerprint,
        "rows": n,
        "patches": int(keep.sum()),
        "skipped": len(all_problems),
        "counts": kept_source.counts(),
        "has_slides": source.slides is not None,
        "has_coords": "coords" in index,
        "checksums": {
            "algorithm": "sha256",
            "chunk_rows": plan.chunk_rows,
            "chunks": [results[k]["sha256"] for k in range(plan.chunks)],
            "index": hashlib.sha256(blob).hexdigest(),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "histodetect": __version__,
    }
    os.replace(out / PARTIAL, out / IMAGES)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    (out / LOG).unlink(missing_ok=True)
    (out / PLAN).unlink(missing_ok=True)
    return manifest
