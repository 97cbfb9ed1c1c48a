"""Throughput of `firm critic serve`: the server's dynamic batching, or the FIRM HTTP critic's client end to end.

Server batching (default): starts the server once per ``--max-batch-size`` value, sends ``--requests`` concurrent chat
requests (one image each), and prints a table of wall time and requests/s.

    python -m firm.critics.bench_server --model DIR --batch-sizes 1 8 --requests 64 --max-tokens 16

Client (``--client``): starts the server once and scores ``--chunks`` chunks of ``--chunk-sizes`` edit requests
(Execution only: one HTTP request each) one after another from a worker thread, as the RL loop does, with
``HTTPCritic`` and with the client it replaced (a new event loop and a new ``httpx.AsyncClient`` for every call,
kept here only for this comparison). The two clients take turns every ``--chunks`` chunks, ``--rounds`` times, so
that a machine's changing load hits both alike. Requests/s counts HTTP requests.

    python -m firm.critics.bench_server --client --model DIR --chunk-sizes 1 8 --max-tokens 1 --batch-timeout 0.005

``--model stub`` serves a stub endpoint on uvicorn that answers at once, so that the table shows the client's costs
alone (with a model, its generation time is in every request).

Both print a table and write a JSON file (``--out``) with the device name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firm.provenance import device_name

STUB = "stub"  # --model stub: a stub endpoint instead of `firm critic serve`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _serve(model: str, batch: int, max_tokens: int, batch_timeout: float = 0.05) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    if model == STUB:
        cmd = [sys.executable, "-m", "firm.critics.bench_server", "--serve-stub", str(port)]
    else:
        cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", model, "--port", str(port)]
        cmd += ["--max-batch-size", str(batch), "--batch-timeout", str(batch_timeout)]
        cmd += ["--max-new-tokens", str(max_tokens)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:].decode(errors='replace')}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base + "/v1/chat/completions"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not become healthy in 300 s")


STUB_ANSWER = '{"reasoning": "stub", "score": 4}'


def _run_stub(port: int) -> None:
    """A stub OpenAI-compatible endpoint on uvicorn (the server stack of `firm critic serve`) that answers every chat
    request at once with a fixed judgement: the client's own costs, without a model's."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):  # noqa: ANN001, ANN202
        await request.body()
        message = {"role": "assistant", "content": STUB_ANSWER}
        return JSONResponse({"object": "chat.completion", "choices": [{"index": 0, "message": message}]})

    async def models(request):  # noqa: ANN001, ANN202
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def health(request):  # noqa: ANN001, ANN202
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


def _per_call_critic_class() -> type:
    """``HTTPCritic`` with the transport it had before issue 23, for the "before" column only: every ``score`` call
    runs ``asyncio.run`` on the calling thread with a new ``httpx.AsyncClient`` (same limits as then), so no
    connection outlives its call. Retries, endpoint balancing and parsing are the current ones."""
    import httpx

    from firm.critics import transport
    from firm.critics.http import HTTPCritic

    class PerCallHTTPCritic(HTTPCritic):
        def score(self, requests):  # noqa: ANN001, ANN202
            requests = list(requests)
            plan_jobs = self.plan_jobs(requests)
            limits = httpx.Limits(max_connections=self.config.max_concurrency, max_keepalive_connections=32)

            async def call():  # noqa: ANN202
                async with httpx.AsyncClient(limits=limits) as client:
                    transport._on_loop.client = client  # what ChatTransport.request sends through
                    try:
                        return await self._judge(requests, plan_jobs)
                    finally:
                        transport._on_loop.client = None

            jobs, comps, plans = asyncio.run(call())
            return self.assemble(requests, jobs, comps, plans)

    return PerCallHTTPCritic


def _chunks(size: int, n: int, offset: int = 0) -> list[list]:
    from PIL import Image

    from firm.critics import EditRequest

    def img(i: int, j: int) -> Image.Image:
        return Image.new("RGB", (32, 32), ((i * 7 + j) % 256, (i * 13) % 256, j % 256))

    return [
        [
            EditRequest(img(i, 0), img(i, j + 1), f"make square {j} blue", dimensions=("execution",), key=f"{i}.{j}")
            for j in range(size)
        ]
        for i in range(offset, offset + n)
    ]


def _bench_client(args: argparse.Namespace, device: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from firm.critics.http import HTTPCritic

    logging.getLogger("firm.critics").setLevel(logging.ERROR)  # a random tiny critic's answers do not parse
    clients = {
        "per-call client (before)": _per_call_critic_class(),
        "long-lived client (after)": HTTPCritic,
    }
    proc, url = _serve(args.model, max(args.chunk_sizes), args.max_tokens, args.batch_timeout)
    base = url[: -len("/chat/completions")]
    rows = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-scorer")  # the RL loop scores on a worker thread
    try:
        for size in args.chunk_sizes:
            conf = HTTPCritic.Config(endpoints=[base], max_tokens=args.max_tokens, parse_retries=0, max_retries=0)
            critics = {name: cls(conf) for name, cls in clients.items()}
            totals = {name: [0, 0, 0.0] for name in clients}  # chunks, HTTP requests, seconds
            for c in critics.values():  # warm-up: model name, server caches, first connections
                pool.submit(lambda c=c: [c.score(ch) for ch in _chunks(size, 3)]).result()
            for r in range(args.rounds):  # alternate, so that drift hits both columns alike
                for name, c in critics.items():
                    chunks = _chunks(size, args.chunks, offset=r * args.chunks)
                    before = c.stats["generations"] + c.stats["reply_failures"]

                    def run(c=c, chunks=chunks) -> float:
                        t0 = time.perf_counter()
                        for ch in chunks:
                            c.score(ch)
                        return time.perf_counter() - t0

                    dt = pool.submit(run).result()
                    t = totals[name]
                    t[0] += len(chunks)
                    t[1] += c.stats["generations"] + c.stats["reply_failures"] - before
                    t[2] += dt
            for c in critics.values():
                getattr(c, "close", lambda: None)()
            for name, (n_chunks, n_req, dt) in totals.items():
                rows.append(
                    {
                        "chunk_size": size,
                        "client": name,
                        "chunks": n_chunks,
                        "requests": n_req,
                        "wall_s": dt,
                        "req_per_s": n_req / dt,
                        "ms_per_chunk": 1000 * dt / n_chunks,
                    }
                )
    finally:
        pool.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    if args.model == STUB:
        server = {"kind": "stub (uvicorn, a fixed answer at once)"}
    else:
        server = {"kind": "firm critic serve", "max_batch_size": max(args.chunk_sizes)}
        server["batch_timeout"] = args.batch_timeout
    print(f"device: {device}   model: {args.model}   max_tokens: {args.max_tokens}   httpx {httpx.__version__}")
    print("server: " + ", ".join(f"{k}={v}" for k, v in server.items()))
    head = ["chunk", "client", "chunks", "requests", "wall_s", "req/s", "ms/chunk", "x"]
    print("{:>5} {:<26} {:>6} {:>8} {:>7} {:>7} {:>8} {:>5}".format(*head))
    for r in rows:
        ref = next(x for x in rows if x["chunk_size"] == r["chunk_size"] and "before" in x["client"])
        print(
            f"{r['chunk_size']:>5} {r['client']:<26} {r['chunks']:>6} {r['requests']:>8} {r['wall_s']:>7.2f} "
            f"{r['req_per_s']:>7.1f} {r['ms_per_chunk']:>8.2f} {r['req_per_s'] / ref['req_per_s']:>5.2f}"
        )
    return {
        "benchmark": "http critic client",
        "device": device,
        "model": args.model,
        "max_tokens": args.max_tokens,
        "server": server,
        "rounds": args.rounds,
        "httpx": httpx.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"checkpoint directory to serve; {STUB!r}: a stub endpoint (--client only)")
    ap.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--client", action="store_true", help="benchmark the HTTP critic's client instead of batching")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batch-timeout", type=float, default=0.05, help="the server's --batch-timeout")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 8], help="--client: requests per score() call")
    ap.add_argument("--chunks", type=int, default=2, help="--client: chunks per client and round")
    ap.add_argument("--rounds", type=int, default=60, help="--client: rounds, alternating the clients")
    ap.add_argument("--out", default=None, help="JSON results (default critic_{server,client}_bench.json)")
    args = ap.parse_args(argv)
    if args.serve_stub:
        return _run_stub(args.serve_stub)
    if not args.model or (args.model == STUB and not args.client):
        ap.error("give --model DIR (or --model stub with --client)")
    device = device_name()
    if args.client:
        out = Path(args.out or "critic_client_bench.json")
        out.write_text(json.dumps(_bench_client(args, device), indent=2))
        print(f"wrote {out}")
        return
    rows = []
    for bs in args.batch_sizes:
        proc, url = _serve(args.model, bs, args.max_tokens, args.batch_timeout)
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
    out = Path(args.out or "critic_server_bench.json")
    out.write_text(json.dumps({"device": device, "model": args.model, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
