"""Read tumour annotations: ASAP XML (Camelyon), QuPath GeoJSON and binary mask images."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from histodetect.slides.annotations.masks import MASK_SUFFIXES, read_mask_image
from histodetect.slides.annotations.shapes import Annotation, assemble, bad_file, make_polygon
from histodetect.slides.wsi.readers import IMAGE_SUFFIXES

# Camelyon16/17 ASAP groups: _0 and _1 are metastases, _2 normal tissue cut out of them.
TUMOUR_NAMES = frozenset(
    {"_0", "_1", "tumor", "tumour", "metastasis", "metastases", "metastatic", "carcinoma"}
)
EXCLUSION_NAMES = frozenset({"_2", "exclusion", "exclusions", "exclude", "excluded"})
QUPATH_TUMOR_RGB = (200, 0, 0)  # QuPath's colour of its built-in "Tumor" class
VECTOR_SUFFIXES = (".xml", ".geojson", ".json")
# Suffixes stripped from a slide's name to find its annotations (``tumor_110.tif``).
SLIDE_SUFFIXES = frozenset(
    {".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif"} | IMAGE_SUFFIXES
)


def role(name: str | None) -> str | None:
    """``"tumour"``, ``"exclusion"`` or None for a group or class name (case-insensitive).

    QuPath's derived classes (``"Tumor: Positive"``) count as their base class; ``Ignore*``
    classes are exclusions, as QuPath uses them.
    """
    if not name:
        return None
    base = str(name).split(":")[0].strip().lower()
    if base in TUMOUR_NAMES:
        return "tumour"
    if base in EXCLUSION_NAMES or base.startswith("ignore"):
        return "exclusion"
    return None


def _number(value, where: str, path: Path) -> float:
    """A finite coordinate; ASAP files saved on comma-decimal locales use ``1234,5``."""
    if isinstance(value, bool) or value is None:
        raise bad_file(path, f"{where}: coordinate {value!r} is not a number.")
    try:
        x = float(value.replace(",", ".") if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise bad_file(path, f"{where}: coordinate {value!r} is not a number.") from None
    if not math.isfinite(x):
        raise bad_file(path, f"{where}: coordinate {value!r} is not finite.")
    return x


def _finish(path: Path, fmt: str, tumours, exclusions, dots, ignored: Counter, notes) -> Annotation:
    if ignored:
        listed = ", ".join(f"{n} {what}" for what, n in sorted(ignored.items()))
        notes.append(f"ignored (neither tumour nor exclusion): {listed}.")
    if not tumours and not dots:
        notes.append("no tumour outline: the slide counts as normal.")
    return Annotation(
        source=path,
        format=fmt,
        tumour=assemble(tumours, exclusions),
        lesions=tuple(tumours),
        exclusions=tuple(exclusions),
        dots=tuple(dots),
        n_tumour=len(tumours),
        n_exclusions=len(exclusions),
        ignored=dict(ignored),
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- ASAP XML


def read_asap_xml(path: str | Path) -> Annotation:
    """Read an ASAP annotation file (the Camelyon16/17 format).

    ``Polygon`` and ``Spline`` annotations are outlines; a spline's control points are taken
    as its polygon's vertices, as the challenge's own ASAP mask conversion does (no
    Catmull-Rom interpolation, so masks and scores match the published ones). A
    ``Rectangle`` is its four corners (or the box of two); ``Dot`` and ``PointSet`` are
    points. Groups ``_0``, ``_1``, ``Tumor`` (any case) are tumour, ``_2`` and ``Exclusion``
    are holes cut out of it; a group nested in one of those (``<AnnotationGroups>``) takes
    its role. Other groups and types are counted in ``ignored`` and named in ``notes``.

    Raises:
        HistodetectError: for a file that is not ASAP XML, a coordinate that is not a number,
            or an outline with fewer than three points.
    """
    from xml.etree import ElementTree

    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise bad_file(path, f"not well-formed XML ({exc}).") from None
    except OSError as exc:
        raise bad_file(path, f"cannot be read ({exc.strerror or exc}).") from None
    items = list(root.iter("Annotation"))
    if root.tag != "ASAP_Annotations" and not items:
        raise bad_file(
            path,
            f"not an ASAP annotation file: the root element is <{root.tag}>, expected "
            "<ASAP_Annotations> holding <Annotation> elements.",
        )
    parents = {g.get("Name"): g.get("PartOfGroup") for g in root.iter("Group")}

    def group_role(group: str | None) -> str | None:
        for _ in range(8):  # groups may nest; a cycle is cut short
            found = role(group)
            if found or group not in parents:
                return found
            group = parents[group]
        return None

    tumours, exclusions, dots, notes = [], [], [], []
    ignored: Counter = Counter()
    for i, item in enumerate(items):
        name = item.get("Name") or f"#{i}"
        kind = (item.get("Type") or "Polygon").strip()
        group = item.get("PartOfGroup") or "None"
        where = f'annotation "{name}" ({kind}, group {group})'
        which = group_role(group)
        coords = []
        for k, c in enumerate(item.iter("Coordinate")):
            x = _number(c.get("X"), f"{where}, point {k}", path)
            y = _number(c.get("Y"), f"{where}, point {k}", path)
            order = c.get("Order")
            coords.append((float(order) if order and order.lstrip("-").isdigit() else k, x, y))
        coords.sort(key=lambda t: t[0])  # ASAP orders vertices by the Order attribute
        pts = [(x, y) for _, x, y in coords]
        low = kind.lower()
        if which is None:
            ignored[f"annotation(s) in group {group!r}"] += 1
        elif low in ("dot", "pointset"):
            if which == "tumour":
                dots.extend(pts)
            else:
                ignored[f"exclusion {kind}(s)"] += 1
        elif low in ("polygon", "spline", "rectangle"):
            if low == "rectangle" and len(pts) == 2:
                (xa, ya), (xb, yb) = pts
                pts = [(xa, ya), (xb, ya), (xb, yb), (xa, yb)]
            geom = make_polygon(pts, where=where, path=path)
            (tumours if which == "tumour" else exclusions).append(geom)
        else:
            ignored[f"{kind} annotation(s)"] += 1
    return _finish(path, "asap-xml", tumours, exclusions, dots, ignored, notes)


# ----------------------------------------------------------------------------- GeoJSON


def _colour(value) -> tuple[int, int, int] | None:
    """QuPath colours: ``[r, g, b]`` (0.3+) or a packed signed ARGB int (``colorRGB``)."""
    if isinstance(value, list | tuple) and len(value) >= 3:
        try:
            return tuple(int(v) for v in value[:3])
        except (TypeError, ValueError):
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        v = value & 0xFFFFFF
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    return None


def _class_of(props: dict) -> tuple[str | None, tuple[int, int, int] | None]:
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls, None
    if isinstance(cls, dict):
        name = cls.get("name")
        if name is None and isinstance(cls.get("names"), list):
            name = ": ".join(str(n) for n in cls["names"])
        return (str(name) if name is not None else None), _colour(
            cls.get("color", cls.get("colorRGB"))
        )
    return None, None


def _features(doc, path: Path) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise bad_file(path, 'a FeatureCollection whose "features" is not a list.')
        return features
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    shape = doc.get("type", "no type") if isinstance(doc, dict) else type(doc).__name__
    raise bad_file(
        path,
        f"unknown JSON shape ({shape}): expected a GeoJSON FeatureCollection, a list of "
        "Features or one Feature, as QuPath exports annotations.",
    )


def _ring(ring, where: str, path: Path) -> list[tuple[float, float]]:
    if not isinstance(ring, list):
        raise bad_file(path, f"{where}: a ring is not a list of [x, y] positions.")
    out = []
    for k, pos in enumerate(ring):
        if not isinstance(pos, list | tuple) or len(pos) < 2:
            raise bad_file(path, f"{where}: position {k} is {pos!r}, not [x, y].")
        out.append((_number(pos[0], where, path), _number(pos[1], where, path)))
    return out


def _geometry(geom, where: str, path: Path, polygons: list, points: list, other: Counter) -> None:
    if not isinstance(geom, dict):
        raise bad_file(path, f"{where}: the geometry is {type(geom).__name__}, not an object.")
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "GeometryCollection":
        for g in geom.get("geometries") or []:
            _geometry(g, where, path, polygons, points, other)
        return
    if kind in ("Polygon", "MultiPolygon"):
        if not isinstance(coords, list):
            raise bad_file(path, f"{where}: {kind} coordinates are not a list.")
        for k, rings in enumerate(coords if kind == "MultiPolygon" else [coords]):
            here = f"{where}, polygon {k}" if kind == "MultiPolygon" else where
            if not isinstance(rings, list) or not rings:
                raise bad_file(path, f"{here}: a polygon without rings.")
            outer, *holes = (_ring(r, here, path) for r in rings)
            polygons.append(make_polygon(outer, holes, where=here, path=path))
    elif kind in ("Point", "MultiPoint"):
        for pos in [coords] if kind == "Point" else coords or []:
            points.extend(_ring([pos], where, path))
    elif kind in ("LineString", "MultiLineString"):
        other["line(s)"] += 1
    else:
        raise bad_file(path, f"{where}: unknown geometry type {kind!r}.")


def read_geojson(path: str | Path) -> Annotation:
    """Read QuPath GeoJSON: a FeatureCollection, a list of Features, or one Feature.

    ``properties.classification.name`` decides (any case; QuPath's derived ``"Tumor:
    Positive"`` counts as ``Tumor``): ``Tumor``/``Tumour``/``Metastasis``/``_0``... are
    tumour, ``Ignore*``/``Exclusion``/``_2`` are cut out of it. A feature without a name whose
    colour is QuPath's Tumor red (200, 0, 0) counts as tumour. Polygon holes are kept.
    Objects whose ``objectType`` is not ``annotation`` (QuPath cells, detections, tiles) and
    unclassified or other classes are counted in ``ignored``.

    Raises:
        HistodetectError: for invalid JSON, an unknown document shape, a non-numeric
            coordinate or a ring with fewer than three points.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise bad_file(path, f"cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError:
        raise bad_file(path, "not a text file, so not GeoJSON.") from None
    except json.JSONDecodeError as exc:
        raise bad_file(path, f"not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    tumours, exclusions, dots, notes = [], [], [], []
    ignored: Counter = Counter()
    for i, feature in enumerate(_features(doc, path)):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise bad_file(path, f"item {i} is not a GeoJSON Feature.")
        props = feature.get("properties") or {}
        name, colour = _class_of(props)
        which = role(name)
        if name is None and colour == QUPATH_TUMOR_RGB:
            which = "tumour"
            notes.append(f"feature {i} has no class name; its Tumor-red colour made it tumour.")
        kind = str(props.get("objectType") or props.get("object_type") or "annotation")
        where = f"feature {i}" + (f' ("{props["name"]}")' if props.get("name") else "")
        polygons, points, other = [], [], Counter()
        if feature.get("geometry") is None:
            ignored["feature(s) without geometry"] += 1
            continue
        # Decide what a feature is before reading its shape: an export with thousands of cell
        # detections is read fast, and a degenerate one cannot fail the file.
        if kind.lower() != "annotation":
            ignored[f"{kind} object(s)"] += 1
            continue
        if which is None:
            ignored[f"feature(s) of class {name!r}" if name else "unclassified feature(s)"] += 1
            continue
        _geometry(feature["geometry"], where, path, polygons, points, other)
        if other:
            ignored["line annotation(s)"] += 1
        elif which == "tumour":
            tumours.extend(polygons)
            dots.extend(points)
        else:
            exclusions.extend(polygons)
    return _finish(path, "geojson", tumours, exclusions, dots, ignored, notes)


# ----------------------------------------------------------------------------- any file


def read_annotation(
    path: str | Path,
    *,
    slide_size: tuple[int, int] | None = None,
    downsample: float | None = None,
) -> Annotation:
    """Read any supported annotation file, by suffix, else by its first bytes.

    ``.xml`` is ASAP, ``.geojson``/``.json`` QuPath GeoJSON, ``.tif``/``.png``... a mask
    (``slide_size``/``downsample`` give its scale, see ``read_mask_image``).

    Raises:
        HistodetectError: for a missing, unknown or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "no such annotation file.")
    suffix = path.suffix.lower()
    if suffix not in (*VECTOR_SUFFIXES, *MASK_SUFFIXES):
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"<"):
            suffix = ".xml"
        elif head[:1] in (b"{", b"["):
            suffix = ".json"
        elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            suffix = ".tif"
        elif head.startswith(b"\x89PNG"):
            suffix = ".png"
        else:
            raise bad_file(
                path,
                "not a known annotation format: expected ASAP XML, QuPath GeoJSON or a "
                "mask image (TIFF, PNG).",
            )
    if suffix == ".xml":
        return read_asap_xml(path)
    if suffix in (".geojson", ".json"):
        return read_geojson(path)
    return read_mask_image(path, slide_size=slide_size, downsample=downsample)


def slide_stem(slide: str | Path) -> str:
    """``tumor_110`` for ``/x/tumor_110.tif`` or ``tumor_110``: a slide suffix is dropped."""
    name = Path(str(slide)).name
    p = Path(name)
    return p.stem if p.suffix.lower() in SLIDE_SUFFIXES else name


def find_annotation(folder: str | Path, slide: str | Path) -> Path | None:
    """The annotation file of a slide in ``folder`` (searched recursively), or None.

    Matched by stem, ignoring case: ``tumor_110.tif`` finds ``tumor_110.xml``,
    ``Tumor_110.xml``, ``tumor_110.geojson``/``.json`` or the mask ``tumor_110_Mask.tif``
    (masks need the ``_mask`` suffix, so a slide file beside its annotations is never taken
    for a mask). Several matches: ASAP XML, then GeoJSON, then masks; then the shallowest.
    """
    folder = Path(folder)
    stem = slide_stem(slide).lower()
    wanted = {stem + s for s in ("_mask", "-mask", ".mask", " mask")}
    best: tuple | None = None
    for p in folder.rglob("*"):
        suffix = p.suffix.lower()
        if suffix in VECTOR_SUFFIXES and p.stem.lower() == stem:
            rank = VECTOR_SUFFIXES.index(suffix)
        elif suffix in MASK_SUFFIXES and p.stem.lower() in wanted:
            rank = len(VECTOR_SUFFIXES)
        else:
            continue
        key = (rank, len(p.relative_to(folder).parts), str(p))
        if p.is_file() and (best is None or key < best[0]):
            best = (key, p)
    return best[1] if best else None
