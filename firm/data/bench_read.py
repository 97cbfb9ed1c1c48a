"""Read-throughput benchmark of the shard reader: ``python -m firm.data.bench_read``.

Writes a synthetic edit-sample shard set (default 10k samples, two 128x128 PNG images each: smooth gradients with a
few flat rectangles, so PNG sizes resemble simple rendered scenes rather than noise), then reads it back through
:class:`~firm.data.reader.ShardDataset` and a ``StatefulDataLoader`` with full decoding (json + both images to PIL,
schema validation) and reports samples/s per worker count. Prints a table and writes JSON with the machine's name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from firm.data.reader import ReaderConfig, ShardDataset, make_loader
from firm.data.schema import PNG_COMPRESS_LEVEL
from firm.data.writer import ShardWriter


def synthetic_image(seed: int, size: int) -> Image.Image:
    """A smooth colour gradient with 3 flat rectangles (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    img = (c0 * (1 - x)[..., None] + c1 * x[..., None]) * 0.5 + c2 * y[..., None] * 0.5  # (H, W, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(4, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def write_synthetic(root: Path, n: int, size: int, per_shard: int) -> list[str]:
    from tqdm import tqdm

    with ShardWriter(root / "edit", "edit", max_count=per_shard) as w:
        for i in tqdm(range(n), desc="write", unit="sample"):
            w.write(
                {
                    "key": f"s{i:07d}",
                    "source": synthetic_image(2 * i, size),
                    "edited": synthetic_image(2 * i + 1, size),
                    "instruction": f"move the rectangle number {i % 7} to the left",
                    "execution": 1 + i % 5,
                    "consistency": 1 + (i // 5) % 5,
                    "execution_reasoning": "the rectangle moved left as asked; nothing else changed.",
                    "provenance": {"source": "bench_read"},
                }
            )
    return w.shards


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collate_tensors(batch: list[dict]) -> dict:
    """Images stacked into uint8 tensors in the worker (one shared-memory block per field and batch), text as lists:
    what a training pipeline hands to the main process."""
    import torch

    out: dict = {"key": [s["key"] for s in batch], "instruction": [s["instruction"] for s in batch]}
    for k in ("source", "edited"):
        arr = np.stack([np.asarray(s[k]) for s in batch])  # (B, H, W, 3)
        out[k] = torch.from_numpy(arr).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return out


def measure(root: Path, workers: int, batch_size: int, repeats: int, output: str) -> tuple[float, float, int]:
    """Best samples/s over ``repeats`` full passes (each pass includes worker start-up), and the CPU time per
    sample of all processes (main + workers) in that pass -- the figure that does not depend on other load."""
    best, cpu_ms, count = 0.0, 0.0, 0
    for r in range(repeats):
        ds = ShardDataset(root, "edit", ReaderConfig(shuffle_buffer=1000, seed=r))
        collate = collate_tensors if output == "tensor" else None
        loader = make_loader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        c0, k0 = time.process_time(), _children_cpu()
        t0 = time.perf_counter()
        count = sum(len(b["key"]) if isinstance(b, dict) else len(b) for b in loader)
        dt = time.perf_counter() - t0
        del loader  # workers exit and their CPU time is accounted
        cpu = time.process_time() - c0 + _children_cpu() - k0
        if count / dt > best:
            best, cpu_ms = count / dt, 1e3 * cpu / count
    return best, cpu_ms, count


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/bench/data_read_shards", help="where the synthetic shards go (reused)")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--per-shard", type=int, default=500, help="samples per shard")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--outputs",
        nargs="+",
        default=["pil", "tensor"],
        help="what workers hand over: lists of PIL images, or batches of uint8 tensors",
    )
    p.add_argument("--out", default="runs/bench/data_read.json", help="JSON results")
    args = p.parse_args(argv)

    root = Path(args.root)
    marker = root / "done.json"
    spec = {"samples": args.samples, "size": args.size, "per_shard": args.per_shard, "png_level": PNG_COMPRESS_LEVEL}
    if not marker.is_file() or json.loads(marker.read_text()) != spec:
        for old in root.glob("*.tar"):
            old.unlink()
        write_synthetic(root, args.samples, args.size, args.per_shard)
        marker.write_text(json.dumps(spec))
    nbytes = sum(f.stat().st_size for f in root.glob("*.tar"))
    device = f"{cpu_name()} ({os.cpu_count()} logical cores)"
    load = os.getloadavg()
    rows = []
    for output in args.outputs:
        for w in args.workers:
            rate, cpu_ms, count = measure(root, w, args.batch_size, args.repeats, output)
            rows.append(
                {
                    "workers": w,
                    "output": output,
                    "samples": count,
                    "samples_per_s": round(rate, 1),
                    "MB_per_s": round(rate * nbytes / count / 1e6, 1),
                    "cpu_ms_per_sample": round(cpu_ms, 3),
                }
            )
    print(f"\nread throughput: {args.samples} edit samples, 2 x {args.size}px PNG, {nbytes / 1e6:.0f} MB, {device}")
    print(f"load average before: {load[0]:.1f} (other processes share these cores)")
    print(f"{'output':>8} {'workers':>8} {'samples/s':>10} {'MB/s':>8} {'CPU ms/sample':>14}")
    for r in rows:
        print(
            f"{r['output']:>8} {r['workers']:>8} {r['samples_per_s']:>10.1f} {r['MB_per_s']:>8.1f} "
            f"{r['cpu_ms_per_sample']:>14.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device,
        "load_average_before": load[0],
        "config": {**spec, "batch_size": args.batch_size, "bytes": nbytes},
        "results": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
