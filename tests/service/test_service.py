"""The HTTP service and its web page: endpoints, bad input, limits, API key, browser end to end."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
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
import schemathesis
import tifffile
import torch
from fastapi.testclient import TestClient
from hypothesis import settings
from PIL import Image

from histodetect.config import RunConfig, to_dict
from histodetect.data.patchio import decode_patch
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import Predictor
from histodetect.service.app import create_app
from histodetect.slides.maps.mapping import map_image, overlay_png
from histodetect.training.module import PatchModule
from histodetect.training.run_folder import export_model
from tests.conftest import CHROMIUM, CHROMIUM_OFFLINE_FLAGS, fake_patches

FINGERPRINT = "ab" * 32


def _make_run(run: Path) -> Path:
    """A run folder with an untrained model whose probabilities still differ between patches.

    A freshly initialised head gives every patch nearly the same probability; scaling its
    weights spreads them, so that comparisons between patches and with `predict` mean something.
    """
    torch.manual_seed(0)
    cfg = RunConfig()
    module = PatchModule(to_dict(cfg))
    head = module.model.head[-1]
    images, _ = fake_patches(16)
    with torch.no_grad():
        head.weight.mul_(3000)
        norm = {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}
        probe = Predictor(module.model, norm, "cpu")
        centre = float(np.median(probe.predict_proba(images)))
        head.bias.sub_(float(torch.logit(torch.tensor(centre))))
    run.mkdir(parents=True)
    export_model(module, run, {"synthetic": True, "data": FINGERPRINT})
    data = {
        "store": "/somewhere/private/store",
        "source": {"kind": "kaggle", "path": "/somewhere/private/data"},
        "fingerprint": FINGERPRINT,
        "counts": {"train": {"0": 60, "1": 40}},
        "synthetic": True,
    }
    (run / "data.json").write_text(json.dumps(data))
    metrics = {"valid": {"auc": 0.75, "accuracy": 0.7, "n": 20}, "best_checkpoint": "/x/y.ckpt"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("service") / "run")


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor.from_run(run, "cpu")


@pytest.fixture(scope="module")
def client(run, predictor):
    with TestClient(create_app(run, predictor=predictor, device="cpu")) as c:
        yield c


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buf, image, photometric="rgb")
    else:
        Image.fromarray(image).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt], quality=95)
    return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _files(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def _png_pixels(b64: str) -> np.ndarray:
    return _decoded(base64.b64decode(b64))


# ----------------------------------------------------------------------------- endpoints


def test_healthz_and_model_describe_the_run_without_server_paths(client, run):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert info["model_id"] == f"smallcnn-{digest[:12]}"
    assert client.get("/healthz").json()["model_id"] == info["model_id"]
    assert info["arch"] == "smallcnn" and info["synthetic"] is True
    assert info["data"]["fingerprint"] == FINGERPRINT and info["data"]["kind"] == "kaggle"
    assert info["metrics"]["valid"]["auc"] == 0.75
    assert info["limits"]["max_region_pixels"] == 2048 * 2048
    text = json.dumps(info)
    assert "/somewhere" not in text and "ckpt" not in text and str(run.parent) not in text


def test_predict_equals_the_predictor_for_tif_png_and_jpg(client, predictor):
    images, _ = fake_patches(6, seed=3)
    uploads = [(f"p{i}.{fmt}", _encode(images[i], fmt)) for i, fmt in enumerate(["tif", "png"] * 3)]
    uploads.append(("q.jpg", _encode(images[0], "jpg")))
    response = client.post("/v1/predict?include_image=true", files=_files(*uploads))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["file"] for r in body["results"]] == [name for name, _ in uploads]
    seen = np.concatenate([images, _decoded(uploads[-1][1])[None]])
    want = predictor.predict_proba(seen)
    got = np.array([r["probability"] for r in body["results"]])
    assert np.allclose(got, want, atol=1e-6)
    assert np.ptp(got[:6]) > 1e-3  # the patches really differ
    assert [r["label"] for r in body["results"]] == [int(p >= predictor.threshold) for p in got]
    assert body["threshold"] == predictor.threshold and body["tta"] == 1
    for r, image in zip(body["results"], seen, strict=True):
        assert not r["cropped"] and (r["width"], r["height"]) == (96, 96)
        assert np.array_equal(_png_pixels(r["image_png"]), image)
    plain = client.post("/v1/predict", files=_files(uploads[0])).json()["results"][0]
    assert plain["image_png"] is None


def test_larger_patch_is_centre_cropped_and_a_smaller_one_rejected(client, predictor):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (130, 161, 3), dtype=np.uint8)
    response = client.post("/v1/predict", files=_files(("big.png", _encode(big, "png"))))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["cropped"] and (result["width"], result["height"]) == (161, 130)
    top, left = (130 - 96) // 2, (161 - 96) // 2
    centre = np.ascontiguousarray(big[top : top + 96, left : left + 96])
    assert result["probability"] == pytest.approx(
        predictor.predict_proba(centre[None])[0], abs=1e-6
    )

    small = rng.integers(0, 255, (64, 200, 3), dtype=np.uint8)
    response = client.post("/v1/predict", files=_files(("tiny.tif", _encode(small, "tif"))))
    assert response.status_code == 422
    assert "tiny.tif" in response.json()["detail"] and "200x64" in response.json()["detail"]


def test_explain_returns_the_gradcam_overlay_of_explain_py(client, predictor):
    from histodetect.inference.explain import gradcam, overlay

    images, _ = fake_patches(2, seed=4)
    response = client.post("/v1/explain", files={"file": ("e.png", _encode(images[1], "png"))})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    got = _decoded(response.content)
    want = overlay(images[1], gradcam(predictor, images[1][None])[0])
    assert np.array_equal(got, want)
    assert (got[32, 32:64] == 255).all() and (got[32:64, 63] == 255).all()  # the centre box
    prob = float(response.headers["x-probability"])
    assert prob == pytest.approx(predictor.predict_proba(images[1][None])[0], abs=1e-6)
    assert response.headers["x-label"] == str(int(prob >= predictor.threshold))


def test_page_and_its_assets_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refs = re.findall(r"""(?:src|href)="([^"]+)\"""", page.text)
    assert refs and all(not re.match(r"(https?:)?//", r) for r in refs)
    for ref in (r for r in refs if not r.startswith("data:")):
        asset = client.get("/" + ref)
        assert asset.status_code == 200, ref
        assert "http://" not in asset.text and "https://" not in asset.text
    assert client.get("/static/../service.py").status_code == 404


def test_openapi_schema_has_every_endpoint_with_models_and_error_answers(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in [
        ("/v1/predict", "post"),
        ("/v1/explain", "post"),
        ("/v1/region", "post"),
        ("/v1/model", "get"),
        ("/healthz", "get"),
    ]:
        assert method in paths[path], path
    predict = paths["/v1/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PredictResponse"
    )
    for code in ("401", "413", "415", "422", "504"):
        assert code in predict["responses"]
    assert "image/png" in paths["/v1/explain"]["post"]["responses"]["200"]["content"]
    assert "securitySchemes" not in schema.get("components", {})  # no key, none needed
    assert "centre-cropped" in schema["info"]["description"]


# ----------------------------------------------------------------------------- bad input


def test_a_non_image_is_415_naming_the_file_and_fails_the_whole_request(client):
    images, _ = fake_patches(1)
    response = client.post(
        "/v1/predict",
        files=_files(("good.tif", _encode(images[0], "tif")), ("notes.tif", b"just some text")),
    )
    assert response.status_code == 415
    body = response.json()
    assert body["detail"].startswith("notes.tif: not a TIFF, PNG or JPEG image")
    assert body["problems"] == [{"file": "notes.tif", "problem": "not a TIFF, PNG or JPEG image"}]
    response = client.post("/v1/explain", files={"file": ("x.png", b"")})
    assert response.status_code == 415 and "x.png" in response.json()["detail"]


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("cut.tif", lambda b: b[:300], "corrupt or truncated"),
        ("cut.png", lambda b: b[:60], "corrupt or truncated"),
        ("cut.jpg", lambda b: b[:4] + b"\x00" * 40, "corrupt or truncated"),
        ("grey.png", None, "not an RGB image"),
        ("deep.tif", None, "8-bit"),
        ("bands.tif", None, "6 samples per pixel"),
    ],
)
def test_a_corrupt_or_non_rgb_image_is_422_naming_the_file(client, name, make, reason):
    images, _ = fake_patches(1)
    fmt = name.rsplit(".", 1)[1]
    if name == "grey.png":
        buf = io.BytesIO()
        Image.fromarray(images[0][..., 0]).save(buf, format="PNG")
        data = buf.getvalue()
    elif name == "deep.tif":
        buf = io.BytesIO()
        tifffile.imwrite(buf, images[0].astype(np.uint16) * 257, photometric="rgb")
        data = buf.getvalue()
    elif name == "bands.tif":
        buf = io.BytesIO()
        tifffile.imwrite(
            buf, np.zeros((96, 96, 6), np.uint8), photometric="minisblack", planarconfig="contig"
        )
        data = buf.getvalue()
    else:
        data = make(_encode(images[0], fmt))
    response = client.post("/v1/predict", files=_files((name, data)))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{name}: ") and reason in detail


def test_missing_or_invalid_fields_are_422_with_a_message(client):
    response = client.post("/v1/predict")
    assert response.status_code == 422 and "files" in response.json()["detail"]
    images, _ = fake_patches(1)
    response = client.post(
        "/v1/region?mpp=-1", files={"file": ("r.png", _encode(images[0], "png"))}
    )
    assert response.status_code == 422 and "mpp" in response.json()["detail"]


def test_upload_names_never_become_paths(client, tmp_path, monkeypatch):
    import tempfile

    # decode_patch_upload looks decode_patch up in the uploads module.
    from histodetect.service import uploads as decoding

    area = tmp_path / "temp-area"
    area.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(area))
    monkeypatch.chdir(tmp_path)
    read: list[Path] = []
    decode = decoding.decode_patch
    monkeypatch.setattr(decoding, "decode_patch", lambda p: read.append(Path(p)) or decode(p))
    images, _ = fake_patches(2)
    names = ["../../escape.tif", "/etc/histodetect-x.png", "..\\win.tif"]
    uploads = [(n, _encode(images[k % 2], n.rsplit(".", 1)[1])) for k, n in enumerate(names)]
    response = client.post("/v1/predict", files=_files(*uploads))
    assert response.status_code == 200, response.text
    assert [r["file"] for r in response.json()["results"]] == [
        "escape.tif",
        "histodetect-x.png",
        "win.tif",
    ]
    # Written under the temp area with names of the service's own, then removed again.
    assert len(read) == 3 and all(area in p.parents for p in read)
    assert not any(x in p.name for p in read for x in ("escape", "win", "histodetect-x"))
    assert not list(area.iterdir())
    for where in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        assert not (where / "escape.tif").exists() and not (where / "win.tif").exists()
    assert not Path("/etc/histodetect-x.png").exists()


# ----------------------------------------------------------------------------- limits


def test_an_upload_over_the_size_limit_is_413_before_it_is_read(run, predictor):
    app = create_app(run, predictor=predictor, max_upload_mb=0.05)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)  # 120 kB as TIFF
    with TestClient(app) as c:
        response = c.post("/v1/predict", files=_files(("big.tif", _encode(big, "tif"))))
        assert response.status_code == 413
        assert "0.05 MB" in response.json()["detail"]

        # Without a Content-Length (chunked), the body is counted as it arrives.
        def chunks():
            for _ in range(20):
                yield b"x" * 10_000

        response = c.post(
            "/v1/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=zzz"},
        )
        assert response.status_code == 413 and "MB" in response.json()["detail"]
        images, _ = fake_patches(1)
        small = c.post("/v1/predict", files=_files(("ok.png", _encode(images[0], "png"))))
        assert small.status_code == 200


def test_too_many_files_and_too_large_images_are_413(run, predictor):
    app = create_app(run, predictor=predictor, max_files=2, max_patch_side=128, max_pixels=20_000)
    images, _ = fake_patches(3)
    with TestClient(app) as c:
        response = c.post(
            "/v1/predict",
            files=_files(*[(f"{i}.png", _encode(images[i], "png")) for i in range(3)]),
        )
        assert response.status_code == 413 and "limit of 2" in response.json()["detail"]
        wide = np.zeros((96, 300, 3), np.uint8)
        response = c.post("/v1/predict", files=_files(("wide.png", _encode(wide, "png"))))
        assert response.status_code == 413
        assert response.json()["detail"] == (
            "wide.png: 300x96 px is larger than the limit of 128 px a side"
        )
        region = np.zeros((150, 150, 3), np.uint8)
        response = c.post("/v1/region", files={"file": ("r.tif", _encode(region, "tif"))})
        assert response.status_code == 413
        assert response.json()["detail"].startswith("r.tif: 150x150 px = 22,500 pixels")


def test_a_request_over_the_timeout_is_504_and_the_service_recovers(run):
    import threading

    stuck = Predictor.from_run(run, "cpu")
    fast = stuck.predict_proba
    release = threading.Event()

    def blocked(images, tta=1, batch_size=256):
        release.wait(timeout=60)  # the model "runs" until the test lets it finish
        return fast(images, tta, batch_size)

    stuck.predict_proba = blocked
    app = create_app(run, predictor=stuck, timeout_s=0.5)
    images, _ = fake_patches(1)
    upload = _files(("slow.png", _encode(images[0], "png")))
    with TestClient(app) as c:
        response = c.post("/v1/predict", files=upload)
        assert not release.is_set()  # answered while the model was still busy
        assert response.status_code == 504
        assert "0.5 s timeout" in response.json()["detail"]
        release.set()
        # The abandoned batch still runs on the model thread: wait until that thread is free.
        app.state.service.executor.submit(lambda: None).result(timeout=30)
        # A generous deadline for the check that the service still answers: on a loaded
        # machine decoding and predicting one patch can take longer than 0.5 s.
        app.state.service.limits.timeout_s = 60.0
        response = c.post("/v1/predict", files=upload)
        assert response.status_code == 200
        want = fast(images[:1])[0]
        assert response.json()["results"][0]["probability"] == pytest.approx(want, abs=1e-6)


def test_api_key_is_required_for_v1_and_checked_before_the_body(run, predictor):
    app = create_app(run, predictor=predictor, api_key="s3cret", max_upload_mb=0.1)
    images, _ = fake_patches(1)
    with TestClient(app) as c:
        assert c.get("/v1/model").status_code == 401
        wrong = c.get("/v1/model", headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["detail"]
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
        # An oversized upload without the key: refused as unauthorised, never read.
        big = _files(("b.tif", _encode(np.zeros((300, 300, 3), np.uint8), "tif")))
        assert c.post("/v1/predict", files=big).status_code == 401
        good = _files(("g.png", _encode(images[0], "png")))
        assert c.post("/v1/predict", files=good).status_code == 401
        ok = c.post("/v1/predict", files=good, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        schema = c.get("/openapi.json").json()  # open, and it says a key is needed
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
        assert schema["paths"]["/v1/predict"]["post"]["security"]


def test_bad_options_are_refused(run, predictor):
    with pytest.raises(HistodetectError, match="tta"):
        create_app(run, predictor=predictor, tta=3)
    with pytest.raises(HistodetectError, match="positive"):
        create_app(run, predictor=predictor, timeout_s=0)
    with pytest.raises(HistodetectError, match=r"model\.json"):
        create_app(run.parent / "nothing-here")


def test_weights_load_only_from_safetensors(run, tmp_path):
    """A run folder holding its weights only as a (pickled) torch file is refused."""
    copy = tmp_path / "pickled"
    shutil.copytree(run, copy)
    state = Predictor.from_run(run, "cpu").model.state_dict()
    torch.save(state, copy / "model.pth")
    (copy / "model.safetensors").unlink()
    with pytest.raises(HistodetectError, match=r"no model\.safetensors"):
        create_app(copy)


# ----------------------------------------------------------------------------- batching


def test_concurrent_requests_share_batches_and_get_their_own_answers(run, predictor):
    import threading

    import httpx

    app = create_app(run, predictor=predictor)
    service = app.state.service
    batcher = service.batcher
    images, _ = fake_patches(8, seed=7)
    # Hold the model thread until all eight requests wait for it, however slow the machine:
    # the batch formed before that and one batch of all the others are then the only two.
    busy = threading.Event()
    service.executor.submit(busy.wait, 60)
    queued = 0
    submit = batcher.submit

    async def counted(x: np.ndarray) -> np.ndarray:
        nonlocal queued
        queued += 1
        return await submit(x)

    batcher.submit = counted

    async def burst() -> list[dict]:
        async def free_the_model_when_all_wait() -> None:
            while queued < 8:
                await asyncio.sleep(0.01)
            busy.set()

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            posts = [
                c.post("/v1/predict", files=_files((f"{i}.png", _encode(images[i], "png"))))
                for i in range(8)
            ]
            *responses, _ = await asyncio.gather(*posts, free_the_model_when_all_wait())
            return [r.json() for r in responses]

    answers = asyncio.run(burst())
    got = np.array([a["results"][0]["probability"] for a in answers])
    assert [a["results"][0]["file"] for a in answers] == [f"{i}.png" for i in range(8)]
    assert np.allclose(got, predictor.predict_proba(images), atol=1e-6)
    assert sum(batcher.batches) == 8 and len(batcher.batches) <= 2 and max(batcher.batches) >= 4


# ----------------------------------------------------------------------------- region


def test_region_maps_a_larger_image_with_the_slide_code(run):
    # A threshold below every probability: each tissue cell belongs to a region.
    low = Predictor.from_run(run, "cpu")
    low.threshold = 1e-6
    rng = np.random.default_rng(2)
    region = np.full((260, 330, 3), 245, np.uint8)  # white: no tissue
    region[64:224, 96:288] = rng.integers(60, 200, (160, 192, 3), dtype=np.uint8)
    region[64:224, 96:288, 1] //= 2  # pink-purple, like stained tissue
    with TestClient(create_app(run, predictor=low)) as c:
        response = c.post(
            "/v1/region?mpp=0.5", files={"file": ("region.png", _encode(region, "png"))}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["stride"]) == (330, 260, 32)
    assert body["file"] == "region.png" and body["threshold"] == pytest.approx(1e-6)
    want = map_image(low, region, stride=32, mpp=0.5)
    assert body["tissue_fraction"] == pytest.approx(float(want.tissue.mean()))
    assert 0 < body["tissue_fraction"] < 1
    assert body["max_probability"] == pytest.approx(float(want.prob[want.tissue].max()))
    assert len(body["regions"]) == len(want.regions) > 0
    for got, r in zip(body["regions"], want.regions, strict=True):
        assert got["area_px"] == r["area_px"] and got["polygon"] == r["polygon"]
        assert got["area_mm2"] == pytest.approx(got["area_px"] * 0.5**2 / 1e6)
    overlay = _png_pixels(body["overlay_png"])
    assert np.array_equal(overlay, _decoded(overlay_png(region, want)))


def test_every_answer_says_whether_a_patch_is_out_of_scope(client, run, tmp_path):
    from histodetect.inference.scope import fit_scope, save_scope

    images, labels = fake_patches(40, seed=5)
    odd = np.zeros((2, 96, 96, 3), np.uint8)
    odd[..., 1] = 220  # flat green: unlike anything fitted
    uploads = [(f"p{i}.png", _encode(x, "png")) for i, x in enumerate([*images[:3], *odd])]
    # A run without scope statistics: the fields are there, null.
    body = client.post("/v1/predict", files=_files(*uploads)).json()
    assert body["scope_threshold"] is None and body["out_of_scope"] is None
    assert {(r["scope_score"], r["in_scope"]) for r in body["results"]} == {(None, None)}
    # With them: the predictor's scores and flags, in every answer.
    scoped = tmp_path / "scoped"
    shutil.copytree(run, scoped)
    save_scope(scoped, fit_scope(Predictor.from_run(run, "cpu"), images, labels, images))
    predictor = Predictor.from_run(scoped, "cpu")
    region = np.concatenate([np.concatenate([images[k], odd[0]], 1) for k in (0, 1)])
    with TestClient(create_app(scoped, predictor=predictor, device="cpu")) as c:
        assert c.get("/v1/model").json()["scope_threshold"] == predictor.scope_threshold
        body = c.post("/v1/predict", files=_files(*uploads)).json()
        explained = c.post("/v1/explain", files={"file": uploads[-1]})
        mapped = c.post("/v1/region", files={"file": ("r.png", _encode(region, "png"))}).json()
    want = predictor.scope_scores(np.concatenate([images[:3], odd]))
    got = [r["scope_score"] for r in body["results"]]
    assert np.allclose(got, want, rtol=1e-5)
    assert [r["in_scope"] for r in body["results"]] == list(want <= predictor.scope_threshold)
    assert body["results"][-1]["in_scope"] is False and body["out_of_scope"] >= 2
    assert explained.headers["X-In-Scope"] == "no"
    want_map = map_image(predictor, region, stride=32)
    assert mapped["out_of_scope_share"] == pytest.approx(want_map.out_of_scope_share)
    assert mapped["out_of_scope_share"] > 0


def test_region_stride_cannot_multiply_the_work_beyond_the_limit(run, predictor):
    # 200x200 px fits 40,000 pixels; at stride 16 it is 169 patches, over 4x the 40 (+1) that
    # the pixel limit allows at the default stride 32.
    app = create_app(run, predictor=predictor, max_pixels=40_000)
    upload = {"file": ("r.png", _encode(np.full((200, 200, 3), 240, np.uint8), "png"))}
    with TestClient(app) as c:
        response = c.post("/v1/region?stride=16", files=upload)
        assert response.status_code == 413 and "stride 16 is 169 patches" in response.text
        assert c.post("/v1/region?stride=32", files=upload).status_code == 200


def test_region_bad_input(client):
    images, _ = fake_patches(1)
    response = client.post("/v1/region", files={"file": ("r.bin", b"\x00" * 100)})
    assert response.status_code == 415 and "r.bin" in response.json()["detail"]
    small = np.zeros((50, 500, 3), np.uint8)
    response = client.post("/v1/region", files={"file": ("s.png", _encode(small, "png"))})
    assert (
        response.status_code == 422 and "s.png: 500x50 px is smaller" in response.json()["detail"]
    )
    response = client.post("/v1/region", files={"file": ("c.png", _encode(images[0], "png")[:80])})
    assert response.status_code == 422 and "c.png: corrupt" in response.json()["detail"]


# ----------------------------------------------------------------------------- properties


API_KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def api_schema(run, predictor):
    """The OpenAPI schema of an app with an API key, loaded by schemathesis from the app."""
    app = create_app(run, predictor=predictor, api_key=API_KEY)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        ("POST", "/v1/predict", "positive"),
        ("POST", "/v1/predict", "negative"),
        ("POST", "/v1/explain", "positive"),
        ("POST", "/v1/explain", "negative"),
        ("POST", "/v1/region", "positive"),
        ("POST", "/v1/region", "negative"),
        ("GET", "/v1/model", "positive"),
        ("GET", "/healthz", "positive"),
    ],
)
def test_schema_generated_requests_get_no_5xx_and_documented_answers(
    api_schema, method, path, mode
):
    """Schemathesis: valid and invalid requests built from the schema; never a 5xx answer,
    every answer with a documented status, content type and body, and the API key enforced.

    A plain hypothesis loop, as schemathesis' lazy pytest fixture fails on pytest 9. Its
    "schema-valid request accepted" check is left out: the schema cannot say "a real image",
    so generated bytes are rightly answered 415/422.
    """
    from hypothesis import HealthCheck, given
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema[path][method]
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=generation))
    @settings(
        max_examples=10,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        response = case.call_and_validate(
            headers={"X-API-Key": API_KEY}, excluded_checks=[positive_data_acceptance]
        )
        statuses.append(response.status_code)

    check()
    assert statuses and max(statuses) < 500


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(run: Path, log: Path, api_key: str) -> tuple[subprocess.Popen, str]:
    """`histodetect serve RUN` on a free loopback port (default host), ready to answer.

    The key comes from $HISTODETECT_API_KEY, as a user would keep it out of the process list.
    """
    import httpx

    port = _free_port()
    env = {**os.environ, "HISTODETECT_API_KEY": api_key}
    with open(log, "wb") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "histodetect.cli", "serve", str(run), "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"serve did not start: {log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium: apt install chromium")
def test_browser_shows_the_probabilities_of_histodetect_predict(run, shared_sample, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with open(shared_sample / "train_labels.csv", newline="") as fh:
        labels = dict(csv.reader(fh))
    ids = sorted(i for i in labels if i != "id")
    # One patch of each class, so the two numbers differ.
    picks = [next(i for i in ids if labels[i] == "0"), next(i for i in ids if labels[i] == "1")]
    folder = tmp_path / "two"
    folder.mkdir()
    for pid in picks:
        shutil.copy(shared_sample / "train" / f"{pid}.tif", folder / f"{pid}.tif")
    out = tmp_path / "predict.csv"
    cmd = [sys.executable, "-m", "histodetect.cli", "predict", str(run)]
    proc = subprocess.run(
        [*cmd, "--data", str(folder), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        expected = {row["id"]: float(row["label"]) for row in csv.DictReader(fh)}
    assert set(expected) == set(picks)
    assert abs(expected[picks[0]] - expected[picks[1]]) > 1e-3

    server, url = _start_server(run, tmp_path / "serve.log", API_KEY)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=CHROMIUM_OFFLINE_FLAGS,
            )
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            outside: list[str] = []
            local = (url, "blob:", "data:")  # the service, and images made in the page
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(url + "/")
            # The service wants a key: the page asks for it, then shows the model.
            page.wait_for_selector("#key-form:not([hidden])")
            page.fill("#key-input", API_KEY)
            page.click("#key-form button")
            page.wait_for_selector("body[data-model]")
            assert not page.is_visible("#key-form")
            assert all("401" in e for e in errors), errors  # the browser logs the refusal
            errors.clear()
            assert "SYNTHETIC" in page.inner_text("#synthetic")
            page.set_input_files("#patch-input", [str(f) for f in sorted(folder.iterdir())])
            page.wait_for_selector("body[data-patches=done]", timeout=60_000)
            rows = page.query_selector_all("#patch-table tbody tr")
            uploaded = [f.name for f in sorted(folder.iterdir())]
            assert [r.get_attribute("data-file") for r in rows] == uploaded
            for row in rows:
                pid = Path(row.get_attribute("data-file")).stem
                shown = float(row.query_selector("td.probability").inner_text())
                exact = float(row.get_attribute("data-probability"))
                assert abs(exact - expected[pid]) <= 1e-6, (pid, exact, expected[pid])
                assert shown == round(expected[pid], 4) or abs(shown - expected[pid]) < 6e-5
                label = row.query_selector("td.label").inner_text()
                assert label == ("tumour" if expected[pid] >= 0.5 else "no tumour")
                # This run has no scope statistics, and the page says so rather than guess.
                assert row.query_selector("td.scope").inner_text() == "–"
                heat = row.query_selector("img.heat")
                assert heat.get_attribute("data-state") == "ready"
                assert heat.evaluate("img => img.naturalWidth") == 96
                assert row.query_selector(".thumb .centre").is_visible()

            # A region, dropped onto the page (a drag-and-drop of a 3x3 mosaic of real patches).
            tiles = [decode_patch(f) for f in sorted(shared_sample.glob("train/*.tif"))[:9]]
            mosaic = np.concatenate([np.concatenate(tiles[k : k + 3], axis=1) for k in (0, 3, 6)])
            data = base64.b64encode(_encode(mosaic, "png")).decode()
            drop = page.evaluate_handle(
                """data => {
                    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                    const t = new DataTransfer();
                    t.items.add(new File([bytes], "mosaic.png", {type: "image/png"}));
                    return t;
                }""",
                data,
            )
            page.dispatch_event("#region-drop", "drop", {"dataTransfer": drop})
            page.wait_for_selector("body[data-region=done]", timeout=60_000)
            assert "mosaic.png: 288×288 px, stride 32 px" in page.inner_text("#region-summary")
            assert "unavailable" in page.inner_text("#patch-status")
            width = page.eval_on_selector("#region-overlay", "img => img.naturalWidth")
            assert width > 0
            shot = tmp_path / "service_page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 20_000
        assert not errors, errors
        assert not outside, outside  # works offline: nothing but the service was asked
        log = (tmp_path / "serve.log").read_text()
        assert re.search(r"running on http://127\.0\.0\.1:\d+", log), log[-1000:]
        print(f"screenshot: {shot}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_is_a_cli_command_bound_to_loopback_by_default():
    from histodetect.cli.main import build_parser

    args = build_parser().parse_args(["serve", "some-run"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert args.api_key == os.environ.get("HISTODETECT_API_KEY")
