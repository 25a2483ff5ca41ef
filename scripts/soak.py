"""Memory soak: stream unique texts at a bounded rate and record RSS and cache bytes over time.

Starts the server (small CACHE_MAX_BYTES so the cache fills and evicts early) unless --url is given,
sends never-repeating texts at --rate requests/s for --seconds, samples /metrics every second, and
writes soak.csv and soak.png (RSS and cache bytes vs time). A flat RSS after the cache fills is the
expected picture.

    python scripts/soak.py --seconds 300 --rate 50 --cache-max-bytes 2000000 --out bench_results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from scripts.benchlib.serverproc import start_server, stop_server  # noqa: E402

SAMPLED = ("sentiment_process_resident_memory_bytes", "sentiment_cache_bytes", "sentiment_cache_entries",
           "sentiment_cache_evictions_total")
WORDS = "good bad film plot acting dull bright warm cold funny sad long short clever tired fresh".split()


def unique_text(i: int) -> str:
    """A sentence no earlier request used: the counter spelled in words plus a varying tail."""
    digits = " ".join(WORDS[int(d)] for d in str(i))
    return f"review {i}: {digits} " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(4 + i % 20))


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SAMPLED:
            values[name] = float(value)
    return values


async def soak(url: str, rate: float, seconds: float, sample_every: float = 1.0) -> list[dict]:
    rows: list[dict] = []
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        sent = errors = 0

        async def post(i: int) -> None:
            nonlocal errors
            async with session.post(url + "/predict", json={"text": unique_text(i)}) as response:
                await response.read()
                errors += response.status != 200

        async def sampler() -> None:
            while (elapsed := time.perf_counter() - started) < seconds:
                async with session.get(url + "/metrics") as response:
                    values = parse_metrics(await response.text())
                rows.append({"t_s": round(elapsed, 2), "sent": sent, "errors": errors, **values})
                await asyncio.sleep(sample_every)

        sampling = asyncio.create_task(sampler())
        tasks = []
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.create_task(post(sent)))
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        await sampling
    return rows


def write(rows: list[dict], out: Path, cache_limit: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "soak.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    t = [r["t_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [r.get(SAMPLED[0], 0) / 2**20 for r in rows], label="process RSS (MiB)")
    ax.plot(t, [r.get(SAMPLED[1], 0) / 2**20 for r in rows], label="cache bytes (MiB)")
    ax.axhline(cache_limit / 2**20, linestyle="--", color="grey", label="CACHE_MAX_BYTES")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"Soak: {rows[-1]['sent'] if rows else 0} unique texts, {rows[-1]['errors'] if rows else 0} errors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start one on models/default")
    parser.add_argument("--artifact", type=Path, default=Path("models/default"))
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--cache-max-bytes", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench_results/soak"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.url is None:
            server = start_server({"MODEL_PATH": str(args.artifact.resolve()),
                                   "CACHE_MAX_BYTES": str(args.cache_max_bytes)}, Path(tmp))
        try:
            rows = asyncio.run(soak(args.url or server.url, args.rate, args.seconds))
        finally:
            if server is not None:
                stop_server(server)
    write(rows, args.out, args.cache_max_bytes)
    rss = [r.get(SAMPLED[0], 0) for r in rows]
    half = len(rss) // 2
    print(f"{rows[-1]['sent']} texts, {rows[-1]['errors']} errors; RSS {rss[half] / 2**20:.1f} MiB at the midpoint, "
          f"{rss[-1] / 2**20:.1f} MiB at the end; cache {rows[-1].get(SAMPLED[1], 0) / 2**20:.2f} MiB "
          f"(limit {args.cache_max_bytes / 2**20:.2f}); wrote {args.out}/soak.png")


if __name__ == "__main__":
    main()
