"""Throughput of `firm critic serve` with and without dynamic batching.

Starts the server once per ``--max-batch-size`` value, sends ``--requests`` concurrent chat requests (one image
each), and prints a table of wall time and requests/s; results go to a JSON file with the device name.

    python -m firm.critics.bench_server --model DIR --batch-sizes 1 8 --requests 64 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


async def _fire(url: str, n: int, max_tokens: int) -> tuple[float, int]:
    import httpx
    from PIL import Image

    from firm.critics.http import image_data_url

    bodies = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": image_data_url(Image.new("RGB", (64, 64), (i, 0, 0)))},
                        },
                        {"type": "text", "text": f"Describe image {i}."},
                    ],
                }
            ],
            "max_tokens": max_tokens,
        }
        for i in range(n)
    ]
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[client.post(url, json=b) for b in bodies])
        dt = time.perf_counter() - t0
    return dt, sum(r.status_code == 200 for r in rs)


def _serve(model: str, batch: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch-size", str(batch), "--batch-timeout", "0.05", "--max-new-tokens", str(max_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base + "/v1/chat/completions"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not become healthy in 300 s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory to serve")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default="critic_server_bench.json")
    args = ap.parse_args(argv)
    device = _device_name()
    rows = []
    for bs in args.batch_sizes:
        proc, url = _serve(args.model, bs, args.max_tokens)
        try:
            asyncio.run(_fire(url, 4, args.max_tokens))  # warm-up
            dt, ok = asyncio.run(_fire(url, args.requests, args.max_tokens))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        rows.append({"max_batch_size": bs, "requests": args.requests, "ok": ok, "wall_s": dt, "req_per_s": ok / dt})
    print(f"device: {device}   model: {args.model}   max_tokens: {args.max_tokens}")
    print(f"{'max_batch_size':>14} {'requests':>9} {'ok':>5} {'wall_s':>8} {'req/s':>8}")
    for r in rows:
        print(f"{r['max_batch_size']:>14} {r['requests']:>9} {r['ok']:>5} {r['wall_s']:>8.2f} {r['req_per_s']:>8.2f}")
    Path(args.out).write_text(json.dumps({"device": device, "model": args.model, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
