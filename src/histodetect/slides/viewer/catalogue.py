"""The slides a viewer can show: the output folders of ``histodetect slide`` under given roots.

Every file the viewer reads is named here, never by a request: a slide is addressed by an id
from the catalogue, an output file by a name from a fixed list, and each path is resolved and
checked to lie under its root (symbolic links included) before it is opened.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.readers import find_annotation, read_annotation
from histodetect.slides.maps.folders import SUMMARY

log = logging.getLogger("histodetect.viewer")

# The outputs of a slide folder the page links to, by the name a request may use.
OUTPUT_FILES = {
    "regions.geojson": "application/geo+json",
    "regions.csv": "text/csv",
    "summary.json": "application/json",
    "overlay.png": "image/png",
    "prob.png": "image/png",
    "prob.tif": "image/tiff",
    "tissue.png": "image/png",
}
DETECTIONS_DIR = "detections"  # slide-eval's: MAPS/detections/<slide folder>.csv


@dataclass
class SlideEntry:
    """One slide folder: its id in URLs, where it is, and its ``summary.json``."""

    id: str
    folder: Path  # resolved
    root: Path  # resolved root it was found under
    summary: dict
    mtime: float

    @property
    def name(self) -> str:
        """The slide file's name (the folder's when the summary lacks it)."""
        slide = self.summary.get("slide")
        return Path(str(slide)).name if slide else self.folder.name

    @property
    def size(self) -> tuple[int, int] | None:
        """Level-0 (width, height) as the summary records it."""
        size = self.summary.get("level0_size_px")
        return (int(size[0]), int(size[1])) if size else None


def _under(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def out_of_scope_share(summary: dict) -> float | None:
    """The share of tissue cells out of the model's scope, as `slide` records it (None: unknown,
    e.g. a run without scope statistics or a dense map)."""
    scope = summary.get("out_of_scope")
    share = scope.get("share") if isinstance(scope, dict) else None
    return None if share is None else float(share)


class Catalogue:
    """The slide folders under the given roots, re-read when their summaries change.

    Args:
        roots: Output folders of `histodetect slide` (or single slide folders).
        slide_dirs: Folders to look for a slide file by name when the path its summary
            records does not exist (maps moved to another machine).
        annotations: Folder of annotations, matched by slide name as `slide-eval` does.

    Raises:
        HistodetectError: when a root is missing or holds no slide folder.
    """

    def __init__(
        self,
        roots: list[str | Path],
        slide_dirs: list[str | Path] = (),
        annotations: str | Path | None = None,
    ) -> None:
        if not roots:
            raise HistodetectError("no slide map folders given.")
        self.roots: list[Path] = []
        for root in roots:
            path = Path(root)
            if not path.is_dir():
                raise HistodetectError(f"{root}: no such folder of slide maps.")
            self.roots.append(path.resolve())
        for d in slide_dirs:
            if not Path(d).is_dir():
                raise HistodetectError(f"{d}: no such slide folder (--slide-dir).")
        self.slide_dirs = [Path(d).resolve() for d in slide_dirs]
        if annotations is not None and not Path(annotations).is_dir():
            raise HistodetectError(f"{annotations}: no such annotations folder.")
        self.annotations = Path(annotations).resolve() if annotations is not None else None
        self._entries: dict[str, SlideEntry] = {}
        self._lock = threading.Lock()
        self.refresh()
        if not self._entries:
            raise HistodetectError(
                f"{', '.join(map(str, roots))}: no slide maps here (no */{SUMMARY}); make "
                "them with `histodetect slide RUN SLIDE --out DIR` and pass DIR."
            )

    def _folders(self) -> list[tuple[Path, Path]]:
        found = []
        for root in self.roots:
            if (root / SUMMARY).is_file():
                found.append((root, root))
            else:
                found.extend((root, p.parent) for p in sorted(root.glob(f"*/{SUMMARY}")))
        return found

    def refresh(self) -> list[SlideEntry]:
        """Rescan the roots; only summaries whose file changed are read again."""
        with self._lock:
            old = {e.folder: e for e in self._entries.values()}
            entries: dict[str, SlideEntry] = {}
            for root, folder in self._folders():
                folder = folder.resolve()
                if not _under(folder, root):  # a linked folder pointing elsewhere
                    log.warning("%s: links outside %s; not shown", folder, root)
                    continue
                try:
                    mtime = (folder / SUMMARY).stat().st_mtime
                except OSError:
                    continue
                entry = old.get(folder)
                if entry is None or entry.mtime != mtime:
                    summary = self._read_summary(folder)
                    if summary is None:
                        continue
                    entry = SlideEntry("", folder, root, summary, mtime)
                # Ids: the folder name, numbered when two roots hold the same name.
                base, n = folder.name, 1
                sid = base
                while sid in entries:
                    n += 1
                    sid = f"{base}~{n}"
                entry.id = sid
                entries[sid] = entry
            self._entries = entries
            return list(entries.values())

    @staticmethod
    def _read_summary(folder: Path) -> dict | None:
        try:
            summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot be read (%s); slide not shown", folder / SUMMARY, exc)
            return None
        return summary

    def entries(self) -> list[SlideEntry]:
        """Every slide folder, as of the last ``refresh``."""
        return list(self._entries.values())

    def get(self, slide_id: str) -> SlideEntry | None:
        """The entry of ``slide_id``, or None: ids are looked up, never used as paths."""
        return self._entries.get(slide_id)

    def slide_path(self, entry: SlideEntry) -> Path:
        """The slide file a folder's map was made from.

        The path the summary records, then (when relative) that path from the working
        folder and from the root's parent, then the file's name in each ``slide_dirs``.

        Raises:
            HistodetectError: saying where it was looked for.
        """
        recorded = entry.summary.get("slide")
        if not recorded:
            raise HistodetectError(f"{entry.folder / SUMMARY}: does not name its slide file.")
        path = Path(str(recorded))
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, entry.root.parent / path]
        candidates += [d / path.name for d in self.slide_dirs]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        hint = "" if self.slide_dirs else "; pass the folder holding it with --slide-dir"
        raise HistodetectError(f"slide file {recorded} not found{hint}.")

    def output_file(self, entry: SlideEntry, name: str) -> Path | None:
        """One of the folder's ``OUTPUT_FILES`` by name, or None (not listed or not there)."""
        if name not in OUTPUT_FILES:
            return None
        path = entry.folder / name
        if not path.is_file() or not _under(path, entry.root):
            return None
        return path

    def listing(self, entry: SlideEntry) -> dict:
        """One row of the slide list: name, score, regions, tissue area, out-of-scope share."""
        s = entry.summary
        return {
            "id": entry.id,
            "name": entry.name,
            "folder": entry.folder.name,
            "score": s.get("score"),
            "n_regions": s.get("n_regions"),
            "tissue_area_mm2": s.get("tissue_area_mm2"),
            "tumour_area_mm2": s.get("tumour_area_mm2"),
            "out_of_scope_share": out_of_scope_share(s),
            "synthetic": bool(s.get("synthetic")),
            "warning": s.get("warning"),
            "size": list(entry.size) if entry.size else None,
            "has_thumbnail": (entry.folder / "overlay.png").is_file(),
        }

    def regions(self, entry: SlideEntry) -> list[dict]:
        """The tumour regions (``regions.geojson``), most probable first, with their boxes.

        Raises:
            HistodetectError: for a file that is not the GeoJSON `slide` writes.
        """
        path = self.output_file(entry, "regions.geojson")
        if path is None:
            return []
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            rows = [_region_row(i, f) for i, f in enumerate(doc.get("features", []), 1)]
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise HistodetectError(f"{path}: not readable as slide regions ({exc}).") from None
        return sorted(rows, key=lambda r: (-(r["max_prob"] or 0), -(r["area_px"] or 0)))

    def annotation(self, entry: SlideEntry) -> dict | None:
        """The slide's ground truth as outlines in level-0 px, or None without one.

        Found and read as `slide-eval` does (``find_annotation``, ``read_annotation``).

        Raises:
            HistodetectError: for a malformed annotation file, naming it.
        """
        if self.annotations is None:
            return None
        path = find_annotation(self.annotations, entry.summary.get("slide") or entry.name)
        if path is None or not _under(path, self.annotations):
            return None
        ann = read_annotation(path, slide_size=entry.size)
        tolerance = 0.5 * ann.mask_downsample if ann.format == "mask" else 0.0
        return {
            "file": path.name,
            "format": ann.format,
            "tumour": _rings(ann.lesions, tolerance),
            "exclusions": _rings(ann.exclusions, tolerance),
            "dots": [[float(x), float(y)] for x, y in ann.dots],
            "notes": list(ann.notes),
        }

    def detections(self, entry: SlideEntry) -> list[dict] | None:
        """`slide-eval`'s detections of the slide (confidence, level-0 x, y), or None.

        Read from ``ROOT/detections/<folder>.csv``, where `slide-eval MAPS` writes them.

        Raises:
            HistodetectError: for a malformed file, naming it and the line.
        """
        from histodetect.slides.evaluation.froc import read_detections_csv

        if entry.folder.parent != entry.root:
            return None
        path = entry.root / DETECTIONS_DIR / f"{entry.folder.name}.csv"
        if not path.is_file() or not _under(path, entry.root):
            return None
        return [{"confidence": d.confidence, "x": d.x, "y": d.y} for d in read_detections_csv(path)]


def _region_row(index: int, feature: dict) -> dict:
    rings = feature["geometry"]["coordinates"]
    outer = rings[0]
    xs = [float(p[0]) for p in outer]
    ys = [float(p[1]) for p in outer]
    m = feature.get("properties", {}).get("measurements", {})
    name = feature.get("properties", {}).get("name", "")
    rid = name.rsplit(" ", 1)[-1] if name.startswith("tumour region ") else str(index)
    return {
        "id": rid,
        "max_prob": m.get("max_prob"),
        "mean_prob": m.get("mean_prob"),
        "area_px": m.get("area_px"),
        "area_mm2": m.get("area_mm2"),
        "longest_diameter_mm": m.get("longest_diameter_mm"),
        "box": [min(xs), min(ys), max(xs), max(ys)],
        "rings": [[[float(x), float(y)] for x, y, *_ in ring] for ring in rings],
    }


def _rings(geometries, tolerance: float) -> list[list[list[list[float]]]]:
    """Shapely (Multi)Polygons as polygons of rings of [x, y] (the page's SVG paths)."""
    out = []
    for geom in geometries:
        if tolerance > 0:
            geom = geom.simplify(tolerance, preserve_topology=True)
        parts = getattr(geom, "geoms", [geom])
        for poly in parts:
            if poly.is_empty or not hasattr(poly, "exterior"):
                continue
            rings = [poly.exterior, *poly.interiors]
            out.append([[[float(x), float(y)] for x, y, *_ in r.coords] for r in rings])
    return out
