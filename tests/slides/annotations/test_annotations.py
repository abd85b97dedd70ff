"""Annotation readers: ASAP XML, QuPath GeoJSON, mask images; real Camelyon16 files; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, box

from histodetect.errors import HistodetectError
from histodetect.slides.annotations.readers import (
    find_annotation,
    read_annotation,
    read_asap_xml,
    read_geojson,
    slide_stem,
)
from histodetect.slides.annotations.shapes import annotation_raster, rasterise
from histodetect.slides.annotations.writers import asap_xml_bytes, qupath_geojson_bytes
from histodetect.slides.evaluation.froc import lesion_map

CAMELYON16 = Path(__file__).resolve().parents[3].parent / "shared" / "annotations" / "camelyon16"


def _camelyon(name: str) -> Path:
    path = CAMELYON16 / name
    if not path.is_file():
        pytest.skip(f"real Camelyon16 annotations not found at {CAMELYON16} (only in CI/dev)")
    return path


def _asap(path: Path, items: list[tuple[str, str, list]], groups: str = "") -> Path:
    """A hand-made ASAP file: (type, group, [(x, y), ...]) per annotation."""
    body = []
    for i, (kind, group, pts) in enumerate(items):
        coords = "".join(
            f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(pts)
        )
        body.append(
            f'<Annotation Name="A{i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(body)
        + f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    )
    return path


def _square(x: float, y: float, side: float) -> list[tuple[float, float]]:
    return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]


def _one_paragraph(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    text = str(exc.value)
    assert str(path) in text and "\n" not in text, text
    for word in words:
        assert word in text, text


# ----------------------------------------------------------------------------- real files


def test_camelyon16_test_046_reads_as_four_spline_lesions():
    path = _camelyon("test_046.xml")
    assert path.read_text().count('Type="Spline"') == 4
    ann = read_annotation(path)
    assert ann.format == "asap-xml" and ann.n_tumour == 4 and ann.n_exclusions == 0
    assert len(ann.lesions) == 4 and len(ann.tumour.geoms) == 4 and not ann.ignored
    assert ann.tumour.is_valid and ann.has_tumour
    # Splines are polygons through their control points: the first outline's 22 vertices.
    assert len(ann.lesions[0].exterior.coords) == 22 + 1
    # Evaluation lesions at 0.243 µm/px: two are lesions, two are isolated tumour cells.
    lesions = lesion_map(ann, mpp=0.243).lesions
    assert [les.itc for les in lesions].count(False) == 2 and len(lesions) == 4


def test_camelyon16_tumor_110_reads_21_tumour_polygons_and_18_exclusions():
    ann = read_annotation(_camelyon("tumor_110.xml"))
    assert ann.n_tumour == 21 and ann.n_exclusions == 18 and not ann.ignored
    assert len(ann.lesions) == 21 and len(ann.exclusions) == 18
    drawn = shapely.union_all(ann.lesions)
    # The exclusions are cut out: tumour = outlines - exclusions, and none of it is excluded.
    assert ann.tumour.area == pytest.approx(
        drawn.difference(shapely.union_all(ann.exclusions)).area
    )
    assert ann.tumour.area < drawn.area * 0.99
    for hole in ann.exclusions:
        assert not ann.tumour.contains(hole.representative_point())
    assert ann.tumour.is_valid
    # Level-0 pixels of a ~100k px wide Camelyon16 slide.
    x0, y0, x1, y1 = ann.bounds()
    assert 10_000 < x0 < x1 < 70_000 and 5_000 < y0 < y1 < 70_000
    assert lesion_map(ann, mpp=0.243).n_lesions == 5  # 21 outlines, merged within 75 µm


def test_find_annotation_matches_the_real_files_by_slide_stem():
    _camelyon("tumor_110.xml")
    assert find_annotation(CAMELYON16, "Tumor_110.tif").name == "tumor_110.xml"
    assert find_annotation(CAMELYON16, "/slides/test_046.tif").name == "test_046.xml"
    assert find_annotation(CAMELYON16, "normal_001.tif") is None


# ----------------------------------------------------------------------------- ASAP XML


def test_asap_shapes_groups_and_exclusions(tmp_path):
    path = _asap(
        tmp_path / "s.xml",
        [
            ("Polygon", "_0", _square(0, 0, 100)),
            ("Polygon", "_2", _square(25, 25, 50)),  # cut out of the first
            ("Spline", "Tumor", _square(200, 0, 10)),
            ("Rectangle", "tumour", _square(300, 0, 20)),
            ("Rectangle", "_1", [(400, 0), (430, 10)]),  # two corners
            ("Dot", "_0", [(500, 500)]),
            ("PointSet", "_1", [(510, 500), (520, 500)]),
            ("Polygon", "Other", _square(600, 600, 10)),
            ("Polygon", "metas", _square(700, 0, 10)),  # group nested in Tumor
            ("Measurement", "_0", [(0, 0), (5, 5)]),
            ("Polygon", "EXCLUSION", _square(300, 0, 10)),  # upper case, cuts the rectangle
        ],
        groups='<Group Name="metas" PartOfGroup="Tumor" Color="#000"><Attributes /></Group>',
    )
    ann = read_asap_xml(path)
    assert ann.n_tumour == 5 and ann.n_exclusions == 2
    expected = 100**2 - 50**2 + 10**2 + (20**2 - 10**2) + 30 * 10 + 10**2
    assert ann.area_px == pytest.approx(expected)
    assert ann.dots == ((500.0, 500.0), (510.0, 500.0), (520.0, 500.0))
    assert ann.ignored == {"annotation(s) in group 'Other'": 1, "Measurement annotation(s)": 1}
    assert any("Other" in note and "ignored" in note for note in ann.notes)
    assert not ann.tumour.contains(shapely.Point(50, 50))  # the hole
    assert ann.tumour.contains(shapely.Point(10, 10))


def test_asap_vertex_order_comma_decimals_and_self_intersections(tmp_path):
    # Vertices listed out of order are sorted by their Order attribute (as ASAP does).
    xml = (
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0">'
        '<Coordinates><Coordinate Order="2" X="10,5" Y="10" /><Coordinate Order="0" X="0" Y="0"/>'
        '<Coordinate Order="1" X="10,5" Y="0" /><Coordinate Order="3" X="0" Y="10" />'
        "</Coordinates></Annotation>"
        # A figure-eight: make_valid keeps both lobes (buffer(0) would drop one).
        '<Annotation Name="b" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="120" Y="120"/>'
        '<Coordinate Order="2" X="120" Y="100"/><Coordinate Order="3" X="100" Y="120"/>'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    path = tmp_path / "order.xml"
    path.write_text(xml)
    ann = read_asap_xml(path)
    assert ann.lesions[0].area == pytest.approx(105.0)
    assert ann.lesions[1].is_valid and ann.lesions[1].area == pytest.approx(200.0)
    assert len(ann.tumour.geoms) == 3


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<ASAP_Annotations><Annotations><Annotation", ["not well-formed XML"]),
        ("<svg><rect/></svg>", ["not an ASAP annotation file", "<svg>"]),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="x" Type="Polygon" '
            'PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="1" Y="1"/>'
            '<Coordinate Order="1" X="5" Y="1"/></Coordinates></Annotation></Annotations>'
            "</ASAP_Annotations>",
            ['annotation "x"', "2 distinct point(s)", "at least 3"],
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="y" Type="Spline" '
            'PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="1" Y="abc"/>'
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>",
            ['annotation "y"', "'abc' is not a number"],
        ),
    ],
)
def test_malformed_asap_files_get_one_paragraph_naming_the_file(tmp_path, text, words):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(HistodetectError) as exc:
        read_annotation(path)
    _one_paragraph(exc, path, *words)


# ----------------------------------------------------------------------------- GeoJSON


def _feature(geometry: dict, cls=None, **props) -> dict:
    if cls is not None:
        props["classification"] = cls
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _poly(*rings) -> dict:
    return {"type": "Polygon", "coordinates": [[list(p) for p in [*r, r[0]]] for r in rings]}


def test_geojson_classes_holes_and_exclusions(tmp_path):
    features = [
        _feature(_poly(_square(0, 0, 100), _square(10, 10, 20)), {"name": "Tumor"}),
        _feature(_poly(_square(200, 0, 10)), {"name": "tumour", "color": [1, 2, 3]}),
        _feature(_poly(_square(300, 0, 10)), {"name": "Metastasis"}),
        _feature(_poly(_square(400, 0, 10)), {"name": "Tumor: Positive"}),
        _feature(_poly(_square(500, 0, 10)), {"color": [200, 0, 0]}),  # Tumor red, no name
        _feature(_poly(_square(600, 0, 10)), {"name": "Other", "colorRGB": -3670016}),
        _feature(_poly(_square(50, 50, 20)), {"name": "Ignore*"}),  # cut out
        _feature(_poly(_square(700, 0, 10)), {"name": "Stroma"}),
        _feature(_poly(_square(800, 0, 10))),  # unclassified
        _feature(_poly(_square(900, 0, 10)), {"name": "Tumor"}, objectType="detection"),
        _feature({"type": "Point", "coordinates": [5, 500]}, {"name": "Tumor"}),
        _feature(
            {
                "type": "MultiPolygon",
                "coordinates": [_poly(_square(0, 300, 10))["coordinates"]],
            },
            "Tumor",  # classification as a plain string
        ),
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, {"name": "Tumor"}),
    ]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    ann = read_geojson(path)
    assert ann.format == "geojson" and ann.n_tumour == 6 and ann.n_exclusions == 1
    assert ann.area_px == pytest.approx(100**2 - 20**2 - 20**2 + 5 * 10**2)
    assert ann.dots == ((5.0, 500.0),)
    assert ann.ignored == {
        "feature(s) of class 'Other'": 1,
        "feature(s) of class 'Stroma'": 1,
        "unclassified feature(s)": 1,
        "detection object(s)": 1,
        "line annotation(s)": 1,
    }
    assert not ann.tumour.contains(shapely.Point(20, 20))  # the polygon's own hole
    assert not ann.tumour.contains(shapely.Point(60, 60))  # the Ignore* area


def test_geojson_feature_list_single_feature_and_bom(tmp_path):
    one = _feature(_poly(_square(0, 0, 10)), {"name": "Tumor"})
    (tmp_path / "list.json").write_text(json.dumps([one, one]))
    (tmp_path / "one.geojson").write_text("\ufeff" + json.dumps(one))
    assert read_annotation(tmp_path / "list.json").n_tumour == 2
    assert read_annotation(tmp_path / "one.geojson").area_px == pytest.approx(100)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("{not json", ["not valid JSON", "line 1"]),
        (json.dumps({"type": "Polygon", "coordinates": []}), ["unknown JSON shape (Polygon)"]),
        (json.dumps({"type": "FeatureCollection", "features": {}}), ['"features" is not a list']),
        (json.dumps([{"type": "Feature"}, 3]), ["item 1 is not a GeoJSON Feature"]),
        (
            json.dumps([_feature(_poly([(0, 0), ("x", 1), (1, 1)]), {"name": "Tumor"})]),
            ["feature 0", "'x' is not a number"],
        ),
        (
            json.dumps([_feature(_poly([(0, 0), (1, 1)]), {"name": "Tumor"}, name="r1")]),
            ['feature 0 ("r1")', "at least 3"],
        ),
        (
            json.dumps([_feature({"type": "Circle", "coordinates": [0, 0]}, {"name": "Tumor"})]),
            ["unknown geometry type 'Circle'"],
        ),
    ],
)
def test_malformed_geojson_gets_one_paragraph_naming_the_file(tmp_path, doc, words):
    path = tmp_path / "bad.geojson"
    path.write_text(doc)
    with pytest.raises(HistodetectError) as exc:
        read_annotation(path)
    _one_paragraph(exc, path, *words)


# ----------------------------------------------------------------------------- masks


def _mask(h: int = 40, w: int = 60) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[5:15, 10:30] = 255  # a 10 x 20 block
    m[20:30, 40:50] = 255
    m[24:26, 44:46] = 0  # with a hole
    m[30, 50] = 255  # touching the block only diagonally: one 8-connected component
    return m


def test_png_mask_scaled_by_the_slide_size_and_vectorised_exactly(tmp_path):
    path = tmp_path / "tumor_001_Mask.png"
    Image.fromarray(_mask()).save(path)
    ann = read_annotation(path, slide_size=(240, 160))  # level 0 is 4x the mask
    assert ann.format == "mask" and ann.mask_downsample == 4.0 and ann.n_tumour == 2
    pixels = int((_mask() > 0).sum())
    assert ann.area_px == pytest.approx(pixels * 16)
    # The polygons are the pixels themselves: drawn back on the mask's grid they are the mask.
    assert np.array_equal(rasterise(ann.tumour, (40, 60), 4.0), _mask() > 0)
    assert not ann.tumour.contains(shapely.Point(45 * 4, 25 * 4))  # the hole
    # Without a scale the mask is the slide's level 0, and says so.
    plain = read_annotation(path)
    assert plain.mask_downsample == 1.0 and any("level 0" in n for n in plain.notes)
    assert read_annotation(path, downsample=2.0).mask_downsample == 2.0


def test_pyramidal_tiff_mask_reads_the_finest_level_that_fits(tmp_path):
    path = tmp_path / "tumor_002_Mask.tif"
    big = np.kron(_mask(), np.ones((8, 8), np.uint8))  # 320 x 480
    with tifffile.TiffWriter(path) as tw:
        for d in (1, 2, 8):
            tw.write(big[::d, ::d], tile=(16, 16), subfiletype=0 if d == 1 else 1)
    whole = read_annotation(path, slide_size=(480, 320))
    assert whole.mask.shape == (320, 480) and whole.mask_downsample == 1.0
    assert whole.area_px == pytest.approx(int((big > 0).sum()))
    from histodetect.slides.annotations.masks import read_mask_image

    level = read_mask_image(path, slide_size=(960, 640), max_pixels=50_000)
    assert level.mask.shape == (160, 240) and level.mask_downsample == 4.0
    assert level.area_px == pytest.approx(whole.area_px * 4)
    sampled = annotation_raster(level, (40, 60), 16.0)
    assert np.array_equal(sampled, _mask() > 0)


def test_empty_and_unreadable_masks(tmp_path):
    empty = tmp_path / "normal_Mask.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty)
    ann = read_annotation(empty)
    assert not ann.has_tumour and ann.n_tumour == 0 and ann.tumour.is_empty
    for name, data in [("zero_Mask.tif", b""), ("junk_Mask.png", b"not an image at all")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HistodetectError) as exc:
            read_annotation(tmp_path / name)
        _one_paragraph(exc, tmp_path / name, "cannot be read as a mask image")
    with pytest.raises(HistodetectError) as exc:
        read_annotation(empty, slide_size=(100, 30))
    _one_paragraph(exc, empty, "not the same shape")


# ----------------------------------------------------------------------------- any file


def test_read_annotation_sniffs_content_and_rejects_unknown_files(tmp_path):
    xml = _asap(tmp_path / "a.xml", [("Polygon", "_0", _square(0, 0, 10))])
    (tmp_path / "a.txt").write_text(xml.read_text())
    assert read_annotation(tmp_path / "a.txt").format == "asap-xml"
    (tmp_path / "b.dat").write_text(json.dumps([]))
    assert read_annotation(tmp_path / "b.dat").format == "geojson"
    (tmp_path / "c.dat").write_text("hello")
    with pytest.raises(HistodetectError) as exc:
        read_annotation(tmp_path / "c.dat")
    _one_paragraph(exc, tmp_path / "c.dat", "not a known annotation format")
    with pytest.raises(HistodetectError) as exc:
        read_annotation(tmp_path / "missing.xml")
    _one_paragraph(exc, tmp_path / "missing.xml", "no such annotation file")


def test_find_annotation_by_stem_with_format_preference(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["tumor_110.tif", "tumor_11.xml", "sub/Tumor_110.geojson", "tumor_110_Mask.tif"]:
        (tmp_path / name).write_bytes(b"x")
    # The slide itself (tumor_110.tif) is never taken for a mask; GeoJSON beats masks.
    assert find_annotation(tmp_path, "tumor_110.tif") == tmp_path / "sub" / "Tumor_110.geojson"
    (tmp_path / "TUMOR_110.xml").write_bytes(b"x")
    assert find_annotation(tmp_path, "tumor_110") == tmp_path / "TUMOR_110.xml"
    (tmp_path / "TUMOR_110.xml").unlink()
    (tmp_path / "sub" / "Tumor_110.geojson").unlink()
    assert find_annotation(tmp_path, "Tumor_110.svs") == tmp_path / "tumor_110_Mask.tif"
    assert find_annotation(tmp_path, "tumor_1") is None
    assert slide_stem("/a/b/test_001.tif") == "test_001" and slide_stem("slide.v2") == "slide.v2"


# ----------------------------------------------------------------------------- writers


def test_written_asap_and_geojson_read_back_the_same_tumour(tmp_path):
    ring = Polygon(_square(0, 0, 100), [_square(20, 20, 30)])
    tumours = [ring, MultiPolygon([box(200, 0, 250, 40), box(300, 0, 310, 10)])]
    exclusions = [box(90, 90, 100, 100)]
    (tmp_path / "s.xml").write_bytes(asap_xml_bytes(tumours, exclusions, [(500.5, 7.25)]))
    (tmp_path / "s.geojson").write_bytes(qupath_geojson_bytes(tumours, exclusions, [(500.5, 7.25)]))
    xml, geo = read_annotation(tmp_path / "s.xml"), read_annotation(tmp_path / "s.geojson")
    expected = 100**2 - 30**2 - 10**2 + 50 * 40 + 10**2
    assert xml.area_px == pytest.approx(expected) and geo.area_px == pytest.approx(expected)
    assert xml.tumour.symmetric_difference(geo.tumour).area == pytest.approx(0, abs=1e-6)
    assert xml.n_tumour == 3 and xml.n_exclusions == 2  # the hole became an exclusion
    assert geo.n_tumour == 3 and geo.n_exclusions == 1  # the hole stayed a hole
    assert xml.dots == geo.dots == ((500.5, 7.25),)


def test_geojson_features_of_other_classes_are_skipped_unread(tmp_path):
    """A QuPath export full of cell detections: their shapes are never parsed, so a
    degenerate one cannot fail the file."""
    bad = _feature({"type": "Circle", "coordinates": [0, 0]}, {"name": "Stroma"})
    cell = {**_feature(_poly([(0, 0), (1, 1)]), {"name": "Tumor"}), "id": "c"}
    cell["properties"] = {**cell["properties"], "objectType": "detection"}
    tumour = _feature(_poly(_square(0, 0, 10)), {"name": "Tumor"})
    (tmp_path / "export.geojson").write_text(json.dumps([bad, cell, tumour]))
    ann = read_annotation(tmp_path / "export.geojson")
    assert ann.n_tumour == 1 and ann.area_px == pytest.approx(100)
    assert ann.ignored == {"feature(s) of class 'Stroma'": 1, "detection object(s)": 1}
