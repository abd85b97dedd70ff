"""Slide viewer tiles: latency over a scripted zoom-and-pan, cold and warm, and server memory.

Usage: python benchmarks/viewer_tiles.py [--maps MAPS] [--big 16384] [--workers 4] [--keep DIR]

1. CMU-1 (the real ../shared/slides/CMU-1-Small-Region.svs, 2220 x 2967 px, one level),
   mapped by `histodetect slide` with an untrained default model (tile serving does not depend
   on the weights), unless --maps gives a `slide` output folder already holding it.
2. `histodetect view MAPS` is started in a child process, as a user would, and the requests
   an OpenSeadragon page makes with the tumour map on (a JPEG slide tile and a PNG map tile for
   every tile position) are replayed over HTTP from --workers client threads, one view at a
   time: the whole slide (every coarse level), zooming in step by step on the centre to full
   resolution, then panning over the whole slide at full resolution, view by view. Cold: a
   freshly started server (every cache empty). Warm: the same requests again.
3. Memory: the server's resident set (VmRSS, and its peak VmHWM) after startup, after the cold
   pass and after the warm one; then, with --big N, a fresh server pans over every full-
   resolution tile of an N x N px SYNTHETIC pyramidal slide (its map random cells: only tile
   serving is measured), far more tiles than the 64 MB tile cache holds, to show that memory
   stays bounded.

Targets (2 cores): p50 <= 30 ms warm, <= 150 ms cold. The client shares the cores with the
server, so the figures include its cost. Results: benchmarks/results/viewer_tiles.txt.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import cli, save_results, untrained_run

CMU1 = Path(__file__).resolve().parents[2] / "shared" / "slides" / "CMU-1-Small-Region.svs"
VIEW = (1000, 750)  # the viewer's stage on a 1400 x 900 window, in screen px


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`histodetect view MAPS` in a child process, and keep-alive connections to it."""

    def __init__(self, maps: Path, log: Path, *options: str) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "histodetect.cli", "view", str(maps), "--port", str(self.port)]
        cmd += options
        env = {k: v for k, v in os.environ.items() if k != "HISTODETECT_API_KEY"}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
        self._local = threading.local()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"view did not start:\n{log.read_text()[-2000:]}")
            try:
                if self.get("/healthz")[0] == 200:
                    break
            except OSError:
                self._local.conn = None
                time.sleep(0.3)

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, 30)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closes connections idle for 5 s; a browser reconnects, so do we.
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def memory_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server process in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _tiles_in_view(info: dict, level: int, centre: tuple[float, float]) -> list[tuple[int, int]]:
    """Tile (col, row) of ``level`` that a VIEW-sized window centred on ``centre`` (level-0
    px) shows, as Deep Zoom numbers them."""
    scale = 2.0 ** (info["levels"] - 1 - level)  # level-0 px per level px
    w, h = math.ceil(info["width"] / scale), math.ceil(info["height"] / scale)
    t = info["tile_size"]
    cx, cy = centre[0] / scale, centre[1] / scale
    x0, x1 = max(0, cx - VIEW[0] / 2), min(w, cx + VIEW[0] / 2)
    y0, y1 = max(0, cy - VIEW[1] / 2), min(h, cy + VIEW[1] / 2)
    cols = range(int(x0 // t), math.ceil(x1 / t))
    rows = range(int(y0 // t), math.ceil(y1 / t))
    return [(c, r) for r in rows for c in cols]


def scripted_views(info: dict, pan_only: bool = False) -> list[list[tuple[int, int, int]]]:
    """The tiles (level, col, row) each view of the script needs that no earlier view did."""
    top = info["levels"] - 1
    fit = max(info["width"] / VIEW[0], info["height"] / VIEW[1])
    home = top - max(0, math.floor(math.log2(fit)))  # the first level at least as fine as home
    centre = (info["width"] / 2, info["height"] / 2)
    views = []
    if not pan_only:
        for level in range(0, home + 1):  # the whole slide: coarse levels first, as OSD does
            views.append([(level, c, r) for c, r in _tiles_in_view(info, level, centre)])
        for level in range(home + 1, top + 1):  # zoom in on the centre, one level a step
            views.append([(level, c, r) for c, r in _tiles_in_view(info, level, centre)])
    # Pan at full resolution over the whole slide, row after row (half a view a step).
    ys = np.arange(VIEW[1] / 2, info["height"] + VIEW[1] / 2, VIEW[1] / 2)
    for i, y in enumerate(ys):
        xs = np.arange(VIEW[0] / 2, info["width"] + VIEW[0] / 2, VIEW[0] / 2)
        for x in xs if i % 2 == 0 else xs[::-1]:
            views.append([(top, c, r) for c, r in _tiles_in_view(info, top, (x, y))])
    seen: set = set()
    out = []
    for view in views:
        fresh = [t for t in view if t not in seen]
        seen.update(fresh)
        if fresh:
            out.append(fresh)
    return out


def replay(server: Server, slide_id: str, views, workers: int) -> dict[str, list[float]]:
    """Request every view's slide and map tiles, a view at a time; latencies in ms."""
    times: dict[str, list[float]] = {"slide": [], "map": []}

    def fetch(job):
        layer, (level, col, row) = job
        ext = "jpeg" if layer == "slide" else "png"
        t0 = time.perf_counter()
        status, body = server.get(f"/v1/slides/{slide_id}/tiles/{layer}/{level}/{col}_{row}.{ext}")
        if status != 200:
            raise SystemExit(f"tile {layer}/{level}/{col}_{row}: HTTP {status}: {body[:200]!r}")
        return layer, (time.perf_counter() - t0) * 1000

    with ThreadPoolExecutor(workers) as pool:
        for view in views:
            jobs = [(layer, t) for t in view for layer in ("slide", "map")]
            for layer, ms in pool.map(fetch, jobs):
                times[layer].append(ms)
    return times


def summary_line(name: str, times: dict[str, list[float]]) -> str:
    every = times["slide"] + times["map"]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return (
        f"{name:5s} {len(every):5d} tiles  p50 {pct(every, 50):6.1f} ms  p99 {pct(every, 99):6.1f} "
        f"ms   (slide JPEG p50 {pct(times['slide'], 50):.1f} / p99 {pct(times['slide'], 99):.1f}; "
        f"map PNG p50 {pct(times['map'], 50):.1f} / p99 {pct(times['map'], 99):.1f})"
    )


def cmu1_maps(work: Path) -> Path:
    """`histodetect slide` of CMU-1 with an untrained default model, into work/maps."""
    if not CMU1.is_file():
        sys.exit(f"{CMU1} not found: this benchmark needs the real CMU-1 slide")
    maps = work / "maps"
    if not (maps / CMU1.stem / "summary.json").is_file():
        run = untrained_run(work / "run")
        cli("slide", run, CMU1, "--out", maps, "--quiet")
    return maps


def big_maps(work: Path, n: int) -> Path:
    """An N x N px SYNTHETIC pyramidal slide and a stored map of random cells beside it."""
    from PIL import Image

    from histodetect.slides.synthetic.slide import write_synthetic_slide

    slide = work / f"synthetic-{n}.tif"
    tissue = [(0.5 * n, 0.5 * n, 0.42 * n, 0.40 * n)]
    if not slide.exists():
        write_synthetic_slide(slide, n, n, tissue, [(0.45 * n, 0.5 * n, 0.08 * n, 0.06 * n)])
    folder = work / "big-maps" / slide.stem
    folder.mkdir(parents=True, exist_ok=True)
    cells = math.ceil(n / 32)
    rng = np.random.default_rng(0)
    prob = rng.random((cells, cells)).astype(np.float32)
    yy, xx = np.mgrid[0:cells, 0:cells] * 32 + 16
    cx, cy, rx, ry = tissue[0]
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    np.save(folder / "prob.npy", np.where(inside, prob, 0))
    Image.fromarray(inside.astype(np.uint8) * 255).save(folder / "tissue.png")
    summary = {
        "slide": str(slide),
        "synthetic": True,
        "warning": "SYNTHETIC slide, random map: for timing tiles only",
        "level0_size_px": [n, n],
        "level0_mpp": 0.972,
        "level_downsample": 1.0,
        "resample_factor": 1.0,
        "stride_px": 32,
        "threshold": 0.5,
        "score": float(prob[inside].max()),
        "n_regions": 0,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder.parent


def big_pan(maps: Path, sid: str, cache_mb: int, work: Path, workers: int) -> list[str]:
    """Pan over every full-resolution tile of the big slide on a fresh server: latency and
    the server's memory after each quarter of the pan."""
    server = Server(maps, work / f"view-big-{cache_mb}.log", "--tile-cache-mb", str(cache_mb))
    try:
        info = json.loads(server.get(f"/v1/slides/{sid}")[1])["slide"]
        views = scripted_views(info, pan_only=True)
        marks = [f"start {server.memory_mib()[0]:.0f}"]
        times: dict[str, list[float]] = {"slide": [], "map": []}
        done = 0
        quarter = max(1, math.ceil(len(views) / 4))
        for i in range(0, len(views), quarter):
            part = replay(server, sid, views[i : i + quarter], workers)
            for k in times:
                times[k] += part[k]
            done += sum(map(len, views[i : i + quarter]))
            marks.append(f"{done} positions {server.memory_mib()[0]:.0f}")
        peak = server.memory_mib()[1]
        held = json.loads(server.get("/healthz")[1])
    finally:
        server.stop()
    return [
        summary_line("big", times) + f"   (tile cache {cache_mb} MB)",
        f"      memory: {', '.join(marks)}; peak {peak:.0f}; the cache held "
        f"{held['cached_bytes'] / 2**20:.1f} MB in {held['cached_tiles']} tiles at the end",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=Path, help="a `slide` output folder holding CMU-1")
    parser.add_argument("--big", type=int, default=16384, help="side of the large slide (0: skip)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent client requests")
    parser.add_argument("--keep", type=Path, help="folder to keep the maps and slides in")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        maps = args.maps or cmu1_maps(work)
        print(f"maps ready in {time.perf_counter() - t0:.0f} s: {maps}", flush=True)
        server = Server(maps, work / "view-cold.log")
        try:
            _, body = server.get(f"/v1/slides/{CMU1.stem}")
            info = json.loads(body)["slide"]
            views = scripted_views(info)
            n_tiles = sum(map(len, views))
            lines.append(
                f"CMU-1 ({info['width']}x{info['height']} px, {info['levels']} Deep Zoom levels of "
                f"254 px tiles): {len(views)} views (whole slide, zoom in to full resolution, pan "
                f"over all of it), {n_tiles} tile positions x (slide JPEG + map PNG), "
                f"{args.workers} client threads, {os.cpu_count()} cores"
            )
            rss0 = server.memory_mib()
            cold = replay(server, CMU1.stem, views, args.workers)
            rss1 = server.memory_mib()
            warm = replay(server, CMU1.stem, views, args.workers)
            rss2 = server.memory_mib()
            held = json.loads(server.get("/healthz")[1])
        finally:
            server.stop()
        lines += [
            summary_line("cold", cold) + "   (target p50 <= 150 ms)",
            summary_line("warm", warm) + "   (target p50 <= 30 ms)",
            f"server memory: {rss0[0]:.0f} MiB after start, {rss1[0]:.0f} MiB after the cold pass "
            f"(whole slide at full resolution), {rss2[0]:.0f} MiB after the warm one; peak "
            f"{rss2[1]:.0f} MiB; tile cache {held['cached_bytes'] / 2**20:.1f} MB in "
            f"{held['cached_tiles']} tiles, {held['cache_hits']} hits",
        ]
        print("\n".join(lines[1:]), flush=True)
        if args.big:
            t0 = time.perf_counter()
            big = big_maps(work, args.big)
            made = time.perf_counter() - t0
            lines.append(
                f"SYNTHETIC {args.big}x{args.big} px pyramidal TIFF (ready in {made:.0f} s; map: "
                "random cells), every full-resolution tile panned over once (slide + map), cold; "
                "server memory in MiB after each quarter of the pan, with two tile cache sizes "
                "(OpenSlide's decoded-tile cache 64 MB in both):"
            )
            for cache_mb in (64, 16):
                lines += big_pan(big, f"synthetic-{args.big}", cache_mb, work, args.workers)
    save_results("viewer_tiles", lines)


if __name__ == "__main__":
    main()
