"""Service load: a bounded burst of concurrent /v1/predict requests vs offline `predict`.

Usage: python benchmarks/serve_load.py [FOLDER] [--run RUN] [--requests 600] [--concurrency 16]
                                      [--rounds 3]
       (FOLDER defaults to ../shared/pcam-sample/train; without --run a freshly initialised
       default model is used: speed does not depend on its weights)

Starts `histodetect serve` on 127.0.0.1 in a subprocess, waits until it answers, then sends
bursts of concurrent multipart uploads of real .tif patches from an asyncio client: one
scenario with one patch per request (interactive use) and one with 16 (a batch upload). It
prints throughput (patches/s), p50/p99 request latency and the number of failed requests
(anything but 200), and the offline rate of the same model on the same files with the code
`histodetect predict` runs (decode in threads, predict_patches). Offline runs and service
bursts alternate over a few rounds, so a change in the machine's other load affects both.
Client and server share the machine's cores, so the service figures include the client's cost.
Results are also written to benchmarks/results/serve_load.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import SAMPLE, save_results, untrained_run

from histodetect.inference.predictor import Predictor, list_patches, predict_patches

DEFAULT = SAMPLE / "train"


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    """`histodetect serve RUN --port PORT` (default host 127.0.0.1), once it answers /healthz."""
    cmd = [sys.executable, "-m", "histodetect.cli", "serve", str(run), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited early:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve did not answer within 120 s")


async def burst(
    url: str, bodies: list[list[tuple[str, bytes]]], concurrency: int
) -> tuple[float, list[float], int]:
    """Send every request, ``concurrency`` at a time; (seconds, latencies, failed count)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(files: list[tuple[str, bytes]]) -> None:
            nonlocal failed
            async with gate:
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", files=[("files", f) for f in files])
                    ok = response.status_code == 200 and len(response.json()["results"]) == len(
                        files
                    )
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                failed += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, latencies, failed


def offline_rate(predictor: Predictor, patches, n: int) -> tuple[int, float]:
    """(patches, seconds) of `predict`'s own code on the first ``n`` files, after a warm-up."""
    subset = type(patches)(patches.ids[:n], files=patches.files[:n])
    t0 = time.perf_counter()
    predict_patches(predictor, subset, progress=False)
    return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--run", type=Path, help="a trained run (default: a fresh model)")
    parser.add_argument("--requests", type=int, default=600, help="1-patch requests in all")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="offline/service alternations")
    args = parser.parse_args()

    patches = list_patches(args.folder)
    scenarios = {1: args.requests, 16: max(args.requests // 8, 1)}  # patches/request: requests
    n_offline = min(len(patches.ids), 1024)
    with tempfile.TemporaryDirectory(prefix="hd-serve-load-") as tmp:
        run = args.run
        if run is None:
            run = untrained_run(Path(tmp) / "run")
        predictor = Predictor.from_run(run, "cpu")
        files = [(p.name, p.read_bytes()) for p in patches.files]
        port = free_port()
        server = start_server(run, port, Path(tmp) / "serve.log")
        url = f"http://127.0.0.1:{port}"
        header = (
            f"histodetect serve on {url}; model {predictor.meta['arch']}, {len(files)} .tif "
            f"files in {args.folder}; concurrency {args.concurrency}; torch threads "
            f"{torch.get_num_threads()}; {len(os.sched_getaffinity(0))} CPUs shared by client "
            f"and server; {args.rounds} rounds, each: offline predict on {n_offline} files, "
            "then each service burst"
        )
        # Alternating rounds: a change in the machine's other load hits both sides alike.
        offline: list[tuple[int, float]] = []
        served = {
            k: {"patches": 0, "seconds": 0.0, "latencies": [], "failed": 0} for k in scenarios
        }
        try:
            asyncio.run(burst(url, [[f] for f in files[:32]], 4))  # warm-up
            offline_rate(predictor, patches, min(n_offline, 256))  # warm-up
            cursor = 0
            for _ in range(args.rounds):
                offline.append(offline_rate(predictor, patches, n_offline))
                for per_request, total in scenarios.items():
                    n = max(total // args.rounds, 1)
                    bodies = []
                    for _ in range(n):
                        bodies.append(
                            [files[(cursor + j) % len(files)] for j in range(per_request)]
                        )
                        cursor += per_request
                    seconds, latencies, failed = asyncio.run(burst(url, bodies, args.concurrency))
                    s = served[per_request]
                    s["patches"] += n * per_request
                    s["seconds"] += seconds
                    s["latencies"] += latencies
                    s["failed"] += failed
        finally:
            server.terminate()
            server.wait(timeout=30)

    # On a shared machine the other load decides the absolute figures; say what it was.
    header += f"; load average at the end {os.getloadavg()[0]:.1f}"
    offline_total = sum(n for n, _ in offline) / sum(t for _, t in offline)
    per_round = ", ".join(f"{n / t:.0f}" for n, t in offline)
    lines = [header]
    for per_request, s in served.items():
        ms = np.percentile(np.array(s["latencies"]) * 1000, [50, 99])
        rate = s["patches"] / s["seconds"]
        lines.append(
            f"service, {per_request:>2} patch(es)/request: {len(s['latencies'])} requests, "
            f"{len(s['latencies']) / s['seconds']:6.1f} requests/s, {rate:6.0f} patches/s "
            f"({rate / offline_total:.2f} x offline), latency p50 {ms[0]:.0f} ms, "
            f"p99 {ms[1]:.0f} ms, failed {s['failed']}"
        )
    lines.append(
        f"offline predict (predict_patches, TTA 1): {offline_total:6.0f} patches/s "
        f"(rounds: {per_round})"
    )
    total_failed = sum(s["failed"] for s in served.values())
    lines.append(f"failed requests in all bursts: {total_failed}")
    save_results("serve_load", lines)
    if total_failed:
        raise SystemExit(f"{total_failed} request(s) failed")


if __name__ == "__main__":
    main()
