"""The slide viewer over HTTP: page, tiles, API key, refused paths, and bad or missing slides."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histodetect.errors import HistodetectError
from histodetect.service import viewer as viewer_module
from histodetect.service.viewer import OPENSEADRAGON_DIR, create_viewer_app
from tests.conftest import CHROMIUM, CHROMIUM_OFFLINE_FLAGS
from tests.slides.viewer.conftest import make_cmu1_maps, make_synthetic_maps

KEY = "viewer-k3y"
SLIDE = "synthetic_00_tumour"
HAVE_OPENSEADRAGON = (OPENSEADRAGON_DIR / "openseadragon.min.js").is_file()
NEEDS_OPENSEADRAGON = pytest.mark.skipif(
    not HAVE_OPENSEADRAGON, reason="OpenSeadragon not installed: make install (needs npm)"
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    return make_synthetic_maps(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def client(synthetic):
    maps, annotations = synthetic
    with TestClient(create_viewer_app([maps], annotations=annotations)) as c:
        yield c


def _image(response) -> np.ndarray:
    with Image.open(io.BytesIO(response.content)) as im:
        return np.asarray(im)


@NEEDS_OPENSEADRAGON
def test_page_and_openseadragon_come_from_this_server(client):
    page = client.get("/slides")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/vendor/openseadragon/openseadragon.min.js">' in page.text
    assert "http" not in page.text.replace("http://schemas", "")  # nothing from elsewhere
    osd = client.get("/vendor/openseadragon/openseadragon.min.js")
    assert osd.status_code == 200 and "OpenSeadragon" in osd.text
    assert client.get("/vendor/openseadragon/images/home_rest.png").status_code == 200
    for asset in ("/static/viewer.js", "/static/viewer.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/", follow_redirects=False).headers["location"] == "/slides"
    listing = client.get("/v1/slides").json()
    assert listing["openseadragon_problem"] is None
    assert [s["id"] for s in listing["slides"]] == [SLIDE]


def test_without_openseadragon_the_page_and_api_say_how_to_install_it(
    synthetic, tmp_path, monkeypatch
):
    monkeypatch.setattr(viewer_module, "OPENSEADRAGON_DIR", tmp_path / "missing")
    maps, _ = synthetic
    with TestClient(create_viewer_app([maps])) as c:
        script = c.get("/vendor/openseadragon/openseadragon.min.js")
        assert script.status_code == 404 and "make install" in script.json()["detail"]
        assert "make install" in c.get("/v1/slides").json()["openseadragon_problem"]
        assert c.get("/slides").status_code == 200  # the page still opens to say so
    assert "make install" in (Path(viewer_module.WEB_DIR) / "viewer.js").read_text()


def test_slide_tiles_are_jpeg_and_map_tiles_png_with_alpha(client):
    detail = client.get(f"/v1/slides/{SLIDE}").json()
    assert detail["problems"] == []
    slide, layers = detail["slide"], detail["layers"]
    assert (slide["width"], slide["height"]) == (1536, 1024) == (layers["width"], layers["height"])
    top = slide["levels"] - 1
    jpeg = client.get(f"/v1/slides/{SLIDE}/tiles/slide/{top}/2_1.jpeg")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert _image(jpeg).shape == (256, 256, 3)  # 254 + overlap on both inner sides
    png = client.get(f"/v1/slides/{SLIDE}/tiles/map/{top}/2_1.png")
    assert png.headers["content-type"] == "image/png"
    rgba = _image(png)
    assert rgba.shape == (256, 256, 4) and rgba[..., 3].max() > 0
    assert detail["regions"] and detail["annotation"]["tumour"]
    assert detail["mpp"] == pytest.approx(0.972) and detail["cell_px"] == 32
    for bad in (
        f"/v1/slides/{SLIDE}/tiles/slide/{top}/2_1.png",  # the slide is JPEG
        f"/v1/slides/{SLIDE}/tiles/probability/{top}/0_0.png",
        f"/v1/slides/{SLIDE}/tiles/map/{top}/9_9.png",  # past the edge
        f"/v1/slides/{SLIDE}/tiles/map/99/0_0.png",
        f"/v1/slides/{SLIDE}/tiles/map/-1/0_0.png",
        f"/v1/slides/{SLIDE}/tiles/map/{top}/a_b.png",
        "/v1/slides/no-such-slide",
    ):
        response = client.get(bad)
        assert response.status_code == 404, bad
        assert response.json()["detail"], bad
    thumb = client.get(f"/v1/slides/{SLIDE}/thumbnail.jpg")
    assert thumb.status_code == 200 and max(_image(thumb).shape[:2]) <= 240
    geojson = client.get(f"/v1/slides/{SLIDE}/files/regions.geojson")
    assert geojson.status_code == 200 and geojson.json()["type"] == "FeatureCollection"


def test_the_api_key_guards_the_slides_api_but_not_the_page(synthetic):
    maps, _ = synthetic
    urls = [
        "/v1/slides",
        f"/v1/slides/{SLIDE}",
        f"/v1/slides/{SLIDE}/tiles/map/11/0_0.png",
        f"/v1/slides/{SLIDE}/files/summary.json",
        f"/v1/slides/{SLIDE}/thumbnail.jpg",
    ]
    with TestClient(create_viewer_app([maps], api_key=KEY)) as c:
        assert c.get("/slides").status_code == 200
        for url in urls:
            assert c.get(url).status_code == 401, url
            assert c.get(url, headers={"X-API-Key": "wrong"}).status_code == 401, url
            assert c.get(url, headers={"X-API-Key": KEY}).status_code == 200, url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def view_server(synthetic, tmp_path_factory):
    """`histodetect view MAPS` on a free port, with its key in $HISTODETECT_API_KEY."""
    maps, annotations = synthetic
    log = tmp_path_factory.mktemp("log") / "view.log"
    port = _free_port()
    env = {**os.environ, "HISTODETECT_API_KEY": KEY}
    cmd = [sys.executable, "-m", "histodetect.cli", "view", str(maps), "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*cmd, "--annotations", str(annotations)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if _raw_get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written: no client normalises its dots or escapes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("X-API-Key", KEY)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


TRAVERSALS = [
    "/v1/slides/../../secret.txt",
    "/v1/slides/%2e%2e/%2e%2e/secret.txt",
    "/v1/slides/..%2f..%2fsecret.txt",
    "/v1/slides/..",
    "/v1/slides/%2e%2e",
    f"/v1/slides/{SLIDE}/files/../../../secret.txt",
    f"/v1/slides/{SLIDE}/files/..%2f..%2f..%2fsecret.txt",
    f"/v1/slides/{SLIDE}/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    f"/v1/slides/{SLIDE}/files/prob.npy",
    f"/v1/slides/{SLIDE}/tiles/slide/0/..%2f..%2f..%2f..%2fsecret.txt",
    "/v1/slides/%2Fetc%2Fpasswd",
    "/v1/slides//etc/passwd",
    f"/v1/slides/{SLIDE}/files/%2Fetc%2Fpasswd",
    f"/v1/slides/{SLIDE}/files//etc/passwd",
    "/vendor/openseadragon/../../../../../viewer.py",
    "/vendor/openseadragon/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/viewer.py",
    "/vendor/openseadragon/..%2f..%2f..%2f..%2f..%2fviewer.py",
    "/vendor/openseadragon//etc/passwd",
    "/static/../viewer.py",
    "/static/%2e%2e/viewer.py",
    "/static/..%2fviewer.py",
    "/static//etc/passwd",
]


@pytest.mark.slow
def test_path_traversal_is_refused_however_it_is_written(view_server, synthetic):
    port, log = view_server
    maps, _ = synthetic
    (maps.parent / "secret.txt").write_text("the secret")
    for target in TRAVERSALS:
        status, body = _raw_get(port, target)
        assert status in (400, 404), (target, status, body[:200])
        assert b"the secret" not in body and b"root:" not in body, target
        assert b"def create_viewer_app" not in body, target
    # The same server gives the real files, so the refusals above are not a broken server.
    status, body = _raw_get(port, f"/v1/slides/{SLIDE}/files/summary.json")
    assert status == 200 and json.loads(body)["slide"].endswith(f"{SLIDE}.tif")
    assert _raw_get(port, "/static/viewer.js")[0] == 200
    assert "Traceback" not in log.read_text()


def test_a_missing_or_unreadable_slide_is_a_message_on_the_page_and_in_the_log(
    synthetic, tmp_path, caplog
):
    maps, _ = synthetic
    copy = tmp_path / "maps"
    shutil.copytree(maps, copy)
    summary_path = copy / SLIDE / "summary.json"
    summary = json.loads(summary_path.read_text())
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    for slide, message in (
        (tmp_path / "gone" / "moved.svs", "slide file .*moved.svs not found"),
        (bad, "damaged.svs: cannot open this file as a slide"),
    ):
        summary["slide"] = str(slide)
        summary_path.write_text(json.dumps(summary))
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="histodetect"),
            TestClient(create_viewer_app([copy])) as c,
        ):
            detail = c.get(f"/v1/slides/{SLIDE}")
            assert detail.status_code == 200
            body = detail.json()
            assert body["slide"] is None and body["layers"] is not None
            assert any(re.search(message, p) for p in body["problems"]), body["problems"]
            tile = c.get(f"/v1/slides/{SLIDE}/tiles/slide/11/0_0.jpeg")
            assert tile.status_code == 422
            assert re.search(message, tile.json()["detail"])
            # The map is still there to see.
            assert c.get(f"/v1/slides/{SLIDE}/tiles/map/11/0_0.png").status_code == 200
        logged = [r.getMessage() for r in caplog.records]
        assert sum(bool(re.search(message, m)) for m in logged) == 1, logged


def test_serve_with_slides_adds_the_viewer_behind_the_services_key(synthetic, tmp_path):
    from histodetect.service.app import create_app
    from tests.slides.conftest import export_run

    maps, annotations = synthetic
    run = export_run(tmp_path / "run", "smallfcn", spread=False)
    with pytest.raises(HistodetectError, match="no such folder of slide maps"):
        create_app(run, slides=[tmp_path / "typo"], device="cpu")
    app = create_app(run, slides=[maps], annotations=annotations, api_key=KEY, device="cpu")
    with TestClient(app) as c:
        assert c.get("/slides").status_code == 200 and c.get("/").status_code == 200
        assert c.get("/v1/slides").status_code == 401
        listing = c.get("/v1/slides", headers={"X-API-Key": KEY})
        assert [s["id"] for s in listing.json()["slides"]] == [SLIDE]
        tile = c.get(f"/v1/slides/{SLIDE}/tiles/map/11/0_0.png", headers={"X-API-Key": KEY})
        assert tile.status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200


# ----------------------------------------------------------------------------- in a browser


def _start_view(maps: list[Path], annotations: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`histodetect view MAPS... --annotations DIR` on a free port, key in the environment."""
    port = _free_port()
    env = {**os.environ, "HISTODETECT_API_KEY": KEY}
    cmd = [sys.executable, "-m", "histodetect.cli", "view", *map(str, maps)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*cmd, "--annotations", str(annotations), "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"view did not start: {log.read_text()[-2000:]}")
        try:
            if _raw_get(port, "/healthz")[0] == 200:
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)


def _known_cell(folder: Path) -> tuple[float, float, float, float, list[float]]:
    """A high-probability cell whose colour differs from its four neighbours' colours:
    (x, y) of its centre in level-0 px, the cell's side, its P(tumour), and the P of its
    neighbours above, below, left and right."""
    from histodetect.slides.viewer.tiles import colour_table

    summary = json.loads((folder / "summary.json").read_text())
    cell = summary["stride_px"] * summary["level_downsample"] * summary["resample_factor"]
    prob = np.load(folder / "prob.npy")
    tissue = np.asarray(Image.open(folder / "tissue.png")) > 0
    table = colour_table().astype(float)

    def ink(p: float) -> np.ndarray:  # what a cell adds over white glass
        rgba = table[round(p * 255)]
        return rgba[:3] * rgba[3] / 255 + 255 * (1 - rgba[3] / 255)

    best = None
    for r, c in zip(*np.nonzero(tissue[1:-1, 1:-1] & (prob[1:-1, 1:-1] >= 0.8)), strict=True):
        r, c = r + 1, c + 1
        around = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
        if not all(tissue[a] for a in around):
            continue
        gap = min(np.abs(ink(prob[r, c]) - ink(prob[a])).max() for a in around)
        if gap > 60 and (best is None or prob[r, c] > best[0]):
            best = (float(prob[r, c]), r, c, [float(prob[a]) for a in around])
    assert best is not None, "no high-probability cell unlike its neighbours on this map"
    p, r, c, neighbours = best
    return (c + 0.5) * cell, (r + 0.5) * cell, cell, p, neighbours


def _settle(page) -> None:
    """Wait until the view stops moving and every visible layer's tiles are drawn."""
    for _ in range(2):
        page.wait_for_timeout(250)
        page.wait_for_function("window.histodetect.idle()", timeout=60_000)


def _to_page(page, points: list) -> list[list[float]]:
    """Where level-0 [x, y] points are on the page now."""
    return page.evaluate(
        """points => {
            const v = window.histodetect.viewer, item = v.world.getItemAt(0);
            const box = v.element.getBoundingClientRect();
            return points.map(([a, b]) => {
                const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(a, b));
                return [box.left + p.x, box.top + p.y];
            });
        }""",
        points,
    )


def _centre_on(page, x: float, y: float, zoom: float, points: list) -> list[list[float]]:
    """Show level-0 (x, y) at the stage's centre at ``zoom`` screen px per level-0 px;
    returns where each of ``points`` (level-0 [x, y]) is on the page."""
    page.evaluate(
        """([x, y, zoom]) => {
            const v = window.histodetect.viewer, item = v.world.getItemAt(0);
            v.viewport.zoomTo(item.imageToViewportZoom(zoom), null, true);
            v.viewport.panTo(item.imageToViewportCoordinates(x, y), true);
            v.forceRedraw();
        }""",
        [x, y, zoom],
    )
    return _to_page(page, points)


def _pixels(page, at: tuple[float, float]) -> np.ndarray:
    """Mean RGB of the 5x5 screen pixels around ``at``."""
    shot = page.screenshot(
        clip={"x": round(at[0]) - 2, "y": round(at[1]) - 2, "width": 5, "height": 5}
    )
    with Image.open(io.BytesIO(shot)) as im:
        return np.asarray(im.convert("RGB"), float).reshape(-1, 3).mean(0)


def _blend(under: np.ndarray, p: float) -> np.ndarray:
    from histodetect.slides.viewer.tiles import map_colour

    rgba = np.array(map_colour(p), float)
    return under * (1 - rgba[3] / 255) + rgba[:3] * rgba[3] / 255


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: apt install chromium")
@NEEDS_OPENSEADRAGON
def test_browser_shows_cmu1_with_its_map_aligned_at_two_zooms_and_finds_the_top_region(
    synthetic, tmp_path_factory
):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    tmp = tmp_path_factory.mktemp("browser")
    cmu_maps = make_cmu1_maps(tmp)  # the real slide, analysed by `slide`
    folder = cmu_maps / "CMU-1-Small-Region"
    x, y, cell, p, neighbours = _known_cell(folder)
    geojson = json.loads((folder / "regions.geojson").read_text())
    top = max(geojson["features"], key=lambda f: f["properties"]["measurements"]["max_prob"])
    ring = np.array(top["geometry"]["coordinates"][0])
    syn_maps, annotations = synthetic
    server, url = _start_view([cmu_maps, syn_maps], annotations, tmp / "view.log")
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_OFFLINE_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            failed: list[str] = []
            outside: list[str] = []
            tiles: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
            page.on(
                "response",
                lambda r: (
                    (tiles.append(r.url) if "/tiles/" in r.url and r.ok else None)
                    or (r.status >= 400 and failed.append(f"{r.status} {r.url}"))
                ),
            )
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith((url, "blob:", "data:")) else outside.append(r.url)
                ),
            )
            page.goto(url + "/slides")
            # The server wants its key: the page asks, then lists both slides.
            page.wait_for_selector("#key-form:not([hidden])")
            assert failed == [f"401 {url}/v1/slides"] and all("401" in e for e in errors)
            failed.clear()
            errors.clear()
            page.fill("#key-input", KEY)
            page.click("#key-form button")
            page.wait_for_selector("body[data-list=ready]")
            names = page.locator("#slide-table tbody tr td:nth-child(2) a").all_inner_texts()
            assert sorted(names) == ["CMU-1-Small-Region.svs", f"{SLIDE}.tif"]
            page.wait_for_function(
                "[...document.querySelectorAll('img.thumb')].every(i => i.naturalWidth > 0)"
            )

            page.click("text=CMU-1-Small-Region.svs")
            page.wait_for_selector("body[data-viewer=ready]")
            _settle(page)
            assert not page.is_visible("#problems")

            # Full resolution, by the page's own button: one screen px per level-0 px.
            page.click("#full-res")
            _settle(page)
            zoom = page.evaluate(
                "() => { const v = window.histodetect.viewer; return v.world.getItemAt(0)"
                ".viewportToImageZoom(v.viewport.getZoom(true)); }"
            )
            assert zoom == pytest.approx(1.0, rel=0.01)
            page.uncheck("#layer-regions")  # outlines lie on cell edges, where we look below
            shots = {}
            for zoom in (1.0, 0.3):  # full resolution, and 1 screen px per 3.3 slide px
                # The cell's centre; at full resolution also 5 px inside each of its edges and
                # 5 px beyond them, in its neighbours (above, below, left, right).
                probes = [([x, y], p)]
                if zoom == 1.0:
                    half = cell / 2
                    for (dx, dy), q in zip(
                        ((0, -1), (0, 1), (-1, 0), (1, 0)), neighbours, strict=True
                    ):
                        probes.append(([x + dx * (half - 5), y + dy * (half - 5)], p))
                        probes.append(([x + dx * (half + 5), y + dy * (half + 5)], q))
                spots = _centre_on(page, x, y, zoom, [point for point, _ in probes])
                page.uncheck("#layer-map")
                _settle(page)
                under = [_pixels(page, at) for at in spots]
                page.check("#layer-map")
                _settle(page)
                drawn = [_pixels(page, at) for at in spots]
                for (point, q), below, seen in zip(probes, under, drawn, strict=True):
                    # This cell's colour over the slide pixels below it, not another's.
                    error = np.abs(seen - _blend(below, q)).max()
                    assert error < 8, (zoom, point, seen, _blend(below, q))
                    # Inside the cell, unlike any neighbour; beyond its edge, unlike the cell.
                    for other in neighbours if q == p else [p]:
                        assert np.abs(seen - _blend(below, other)).max() > error + 15, (zoom, other)
                shots[zoom] = (under[0], drawn[0])
            page.check("#layer-regions")
            levels = {u.split("/tiles/")[1].split("/")[1] for u in tiles if "/tiles/map/" in u}
            assert "12" in levels and len(levels) >= 2  # full-resolution map tiles and coarser
            assert any("/tiles/slide/12/" in u for u in tiles)

            # The top region of the list is the most probable one; a click brings it into view.
            first = page.locator("#region-table tbody tr").first
            assert first.get_attribute("data-region") == top["properties"]["name"].split()[-1]
            first.click()
            _settle(page)
            view = page.evaluate(
                "() => { const v = window.histodetect.viewer, item = v.world.getItemAt(0);"
                " const b = item.viewportToImageRectangle(v.viewport.getBounds(true));"
                " return [b.x, b.y, b.width, b.height]; }"
            )
            (x0, y0), (x1, y1) = ring.min(0), ring.max(0)
            assert view[0] <= x0 and view[1] <= y0, (view, ring.min(0))
            assert view[0] + view[2] >= x1 and view[1] + view[3] >= y1, (view, ring.max(0))
            assert view[2] < 4 * max(x1 - x0, y1 - y0, 200)  # zoomed in on it, not the slide
            cx, cy = view[0] + view[2] / 2, view[1] + view[3] / 2
            assert abs(cx - (x0 + x1) / 2) < view[2] / 4 and abs(cy - (y0 + y1) / 2) < view[3] / 4
            assert page.locator("path.region.selected").count() == 1
            page.mouse.move(400, 400)
            assert "(level 0)" in page.inner_text("#cursor")
            assert "µm" in page.inner_text("#scalebar") or "mm" in page.inner_text("#scalebar")
            page.screenshot(path=str(tmp / "cmu1.png"))

            # The SYNTHETIC slide with its ground truth drawn where slidesynth planted it.
            page.goto(f"{url}/slides#slide={SLIDE}")
            page.wait_for_selector("body[data-viewer=ready]")
            _settle(page)
            outlines = page.locator("svg.vectors path.annotation")
            truth = json.loads((annotations / f"{SLIDE}.geojson").read_text())
            assert outlines.count() >= len(truth["features"]) > 0
            assert page.is_enabled("#layer-annotations") and outlines.first.is_visible()
            first_ring = np.array(truth["features"][0]["geometry"]["coordinates"][0])
            corners = _to_page(page, [first_ring.min(0).tolist(), first_ring.max(0).tolist()])
            expected = [*corners[0], *corners[1]]
            boxes = [outlines.nth(i).bounding_box() for i in range(outlines.count())]
            # Same centre to a pixel; the drawn box is a little larger by the stroke's width.
            centre = ((expected[0] + expected[2]) / 2, (expected[1] + expected[3]) / 2)
            assert any(
                abs(b["x"] + b["width"] / 2 - centre[0]) < 1.5
                and abs(b["y"] + b["height"] / 2 - centre[1]) < 1.5
                and 0 <= b["width"] - (expected[2] - expected[0]) < 12
                for b in boxes
            ), (boxes, expected)
            page.uncheck("#layer-annotations")
            assert not outlines.first.is_visible()
            browser.close()
        assert not failed, failed
        assert not errors, errors
        assert not outside, outside
        print(f"screenshot: {tmp / 'cmu1.png'}; pixels (under, drawn): {shots}")
    finally:
        server.terminate()
        server.wait(timeout=30)
