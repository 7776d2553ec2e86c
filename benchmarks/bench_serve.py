"""Load test of `anomalens serve`: concurrent clients against batched `predict` on the same machine.

    python benchmarks/bench_serve.py [--method aa-clip] [--backbone test-tiny] [--set image_size=224]
                                     [--clients 8] [--requests 160] [--image-size 256]
                                     [--max-batch-size 8] [--max-wait-ms 5] [--no-heatmap] [--threads N]
                                     [--out PATH]

1. Batched `predict` in this process (random weights, no downloads) on the same random uint8 images, at
   batch 1 and at `--max-batch-size`, after a warm-up call: images/s, the ceiling for the server.
2. `anomalens serve` in a subprocess on a free 127.0.0.1 port (same method and options), then `--clients`
   threads each POSTing one PNG per request over a kept-alive connection until `--requests` are done:
   latency p50/p95, requests/s, errors (any non-200 answer or connection failure).

The two phases run one after the other, never at the same time. Prints a markdown table and writes JSON
(default benchmarks/results/serve.json) with the machine's CPU, cores and load average: CPU figures on a
shared machine are noisy, compare rows of one run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import anomalens as al

DEFAULT_OUT = Path(__file__).parent / "results" / "serve.json"
START_TIMEOUT_S = 180


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="aa-clip")
    parser.add_argument("--backbone", default="test-tiny")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160, help="timed requests, all clients together")
    parser.add_argument("--image-size", type=int, default=256, help="side of the uploaded images")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--no-heatmap", action="store_true", help="ask for scores only")
    parser.add_argument("--threads", type=int, help="torch threads, here and in the server (default torch's)")
    parser.add_argument("--predict-repeats", type=int, default=5, help="timed calls per predict batch size")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    options = dict(_parse(pair) for pair in args.options)
    if args.threads:  # on a busy machine, spinning OpenMP threads can make 2 threads far slower than 1
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.image_size,) * 2 + (3,), dtype=np.uint8) for _ in range(8)]
    predict = predict_throughput(args, options, images)
    served = load_test(args, images)
    report = {
        "machine": machine(),
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
        "predict_images_per_s": predict,
        "serve": served,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(args, predict, served))
    print(f"\nmachine: {report['machine']}\nwritten: {args.out}")


def predict_throughput(args: argparse.Namespace, options: dict, images: list[np.ndarray]) -> dict[str, float]:
    """Images/s of `Method.predict` at batch 1 and at the server's maximum batch size."""
    model = al.create(args.method, backbone=args.backbone, pretrained=None, device="cpu", **options)
    model.predict(images[:1])  # warm-up: text anchors, allocator
    out = {}
    for batch in sorted({1, args.max_batch_size}):
        chunk = (images * (batch // len(images) + 1))[:batch]
        start = time.perf_counter()
        for _ in range(args.predict_repeats):
            model.predict(chunk, batch_size=batch)
        out[str(batch)] = batch * args.predict_repeats / (time.perf_counter() - start)
    return out


def load_test(args: argparse.Namespace, images: list[np.ndarray]) -> dict:
    port = _free_port()
    command = [
        *(
            sys.executable,
            "-m",
            "anomalens.cli",
            "serve",
            "--method",
            args.method,
            "--backbone",
            args.backbone,
        ),
        *("--pretrained", "none", "--host", "127.0.0.1", "--port", str(port), "--quiet", "--device", "cpu"),
        *("--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)),
        *(x for pair in args.options for x in ("--set", pair)),
    ]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(server, port)
        bodies = [_multipart(_png(image), args.no_heatmap) for image in images]
        _run_clients(port, bodies, args.clients, 2 * args.clients)  # warm-up: connections, first batches
        start = time.perf_counter()
        latencies, errors = _run_clients(port, bodies, args.clients, args.requests)
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": args.requests,
        "errors": errors,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ms) if ms else None,
        "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))] if ms else None,
    }


def _run_clients(port: int, bodies: list[tuple[bytes, str]], clients: int, total: int) -> tuple[list, int]:
    """`total` requests spread over `clients` threads; (latencies of the 200s, count of the others)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    left = iter(range(total))

    def client() -> None:
        nonlocal errors
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in left:  # a shared iterator hands out request numbers until all are taken
            body, content_type = bodies[i % len(bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/predict", body, {"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors


def table(args: argparse.Namespace, predict: dict[str, float], served: dict) -> str:
    batch = str(args.max_batch_size)
    rps = served["requests_per_s"]
    return "\n".join(
        [
            f"{args.method} on {args.backbone} {args.options or ''}, {args.image_size}px PNG uploads, "
            f"heatmap {'off' if args.no_heatmap else 'on'}",
            "",
            "| what | images/s | p50 ms | p95 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| `predict`, batch 1 | {predict['1']:.1f} | | | |",
            f"| `predict`, batch {batch} | {predict[batch]:.1f} | | | |",
            f"| serve, {args.clients} clients, {served['requests']} requests | {rps:.1f} "
            f"| {served['p50_ms']:.0f} | {served['p95_ms']:.0f} | {served['errors']} |",
            "",
            f"serve / batched predict: {rps / predict[batch]:.2f}; "
            f"serve / predict batch 1: {rps / predict['1']:.2f}",
        ]
    )


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def _wait_healthy(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"anomalens serve exited: {server.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"anomalens serve did not start within {START_TIMEOUT_S} s")


def _multipart(png: bytes, no_heatmap: bool) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
    ]
    if no_heatmap:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="heatmap"\r\n\r\nfalse\r\n'.encode()
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(pair: str) -> tuple[str, object]:
    key, _, value = pair.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    main()
