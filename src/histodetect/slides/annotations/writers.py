"""Write tumour outlines as ASAP XML (Camelyon) and QuPath GeoJSON, readable by both tools."""

from __future__ import annotations

import json
from xml.sax.saxutils import quoteattr

from histodetect.slides.annotations.shapes import polygonal

TUMOUR_GROUP, EXCLUSION_GROUP = "_0", "_2"  # Camelyon16's group names
QUPATH_TUMOR = {"name": "Tumor", "color": [200, 0, 0]}
QUPATH_IGNORE = {"name": "Ignore*", "color": [180, 180, 180]}


def _rings(geometries) -> list[tuple[list, list[list]]]:
    """(exterior, holes) point lists of every polygon of ``geometries``, in level-0 px."""
    out = []
    for geom in geometries:
        for poly in polygonal(geom).geoms:
            out.append(
                (
                    [list(p) for p in poly.exterior.coords],
                    [[list(p) for p in ring.coords] for ring in poly.interiors],
                )
            )
    return out


def asap_xml_bytes(tumours, exclusions=(), dots=(), *, name: str = "Annotation") -> bytes:
    """An ASAP annotation file: tumour polygons in group ``_0``, exclusions in ``_2``.

    Holes of tumour polygons become ``_2`` exclusions, as Camelyon16 draws them.

    Args:
        tumours: shapely (Multi)Polygons in level-0 px.
        exclusions: shapely (Multi)Polygons cut out of the tumour.
        dots: (x, y) tumour points, written as ``Dot`` annotations.
        name: Prefix of each annotation's name.
    """
    items: list[tuple[str, str, list]] = []
    cut = []
    for exterior, holes in _rings(tumours):
        items.append(("Polygon", TUMOUR_GROUP, exterior[:-1]))
        cut.extend(holes)
    cut.extend(exterior for exterior, _ in _rings(exclusions))
    items.extend(("Polygon", EXCLUSION_GROUP, ring[:-1]) for ring in cut)
    items.extend(("Dot", TUMOUR_GROUP, [list(p)]) for p in dots)
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, (kind, group, points) in enumerate(items):
        colour = "#F4FA58" if group == TUMOUR_GROUP else "#64FE2E"
        lines.append(
            f"\t\t<Annotation Name={quoteattr(f'{name} {i}')} Type={quoteattr(kind)} "
            f'PartOfGroup="{group}" Color="{colour}">'
        )
        lines.append("\t\t\t<Coordinates>")
        lines.extend(
            f'\t\t\t\t<Coordinate Order="{k}" X="{x:.10g}" Y="{y:.10g}" />'
            for k, (x, y) in enumerate(points)
        )
        lines += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for group, colour in ((TUMOUR_GROUP, "#00aa00"), (EXCLUSION_GROUP, "#aa0000")):
        lines.append(f'\t\t<Group Name="{group}" PartOfGroup="None" Color="{colour}">')
        lines += ["\t\t\t<Attributes />", "\t\t</Group>"]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>", ""]
    return "\n".join(lines).encode()


def qupath_geojson_bytes(tumours, exclusions=(), dots=(), *, name: str = "tumour") -> bytes:
    """A QuPath GeoJSON FeatureCollection: ``Tumor`` polygons (holes kept), ``Ignore*``
    exclusions and ``Tumor`` points, all ``objectType: annotation`` in level-0 px."""

    def feature(geometry: dict, cls: dict, label: str) -> dict:
        props = {"objectType": "annotation", "name": label, "classification": cls}
        return {"type": "Feature", "geometry": geometry, "properties": props}

    features = []
    for i, (exterior, holes) in enumerate(_rings(tumours)):
        geom = {"type": "Polygon", "coordinates": [exterior, *holes]}
        features.append(feature(geom, QUPATH_TUMOR, f"{name} {i + 1}"))
    for i, (exterior, holes) in enumerate(_rings(exclusions)):
        geom = {"type": "Polygon", "coordinates": [exterior, *holes]}
        features.append(feature(geom, QUPATH_IGNORE, f"exclusion {i + 1}"))
    for i, (x, y) in enumerate(dots):
        geom = {"type": "Point", "coordinates": [x, y]}
        features.append(feature(geom, QUPATH_TUMOR, f"{name} point {i + 1}"))
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()
