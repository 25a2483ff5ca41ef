"""How long large requests hold the server's event loop: a readiness probe's latency while clients post large bodies.

A probe process (its own interpreter, so that the load's client cannot delay it) sends ``GET /ready`` every 10 ms,
first for a few seconds on an idle server, then while ``--clients`` clients each post one body after another:
``--texts`` texts of ``--chars`` characters (words drawn from ``--data``; 50 x 20,000 fills the default 1 MiB
body limit). Prints the probe's p50 / p99 / max for both phases and the large requests' statuses. While the loop
tokenizes or normalizes, no request, probe or gRPC call is answered, so the busy phase's maximum is the longest
stall the load caused.

    python scripts/bench_loop_stall.py --data ../shared/data/sst2/dev.tsv
    python scripts/bench_loop_stall.py --data ../shared/data/sst2/dev.tsv --texts 256 --chars 3900
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from models.data import load_labeled  # noqa: E402
from scripts.benchlib.serverproc import start_server, stop_server  # noqa: E402
from scripts.benchlib.stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--data", type=Path, help="a labeled file whose words make the texts (required)")
    parser.add_argument("--texts", type=int, default=50, help="texts per body")
    parser.add_argument("--chars", type=int, default=20_000, help="characters per text")
    parser.add_argument("--clients", type=int, default=4, help="clients posting bodies at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clients post")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    parser.add_argument("--probe", nargs=2, metavar=("PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data is None and not args.probe:
        parser.error("--data is required")
    return args


def probe(port: int, seconds: float) -> dict[str, float]:
    """``GET /ready`` every 10 ms for ``seconds``: latency p50 / p99 / max in ms (run in its own process)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        connection.request("GET", "/ready")
        connection.getresponse().read()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    return {"probes": len(latencies), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies)}


def start_probe(port: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--probe", port, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def bodies(words: list[str], texts: int, chars: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JSON bodies of ``texts`` texts, each ``chars`` characters of words drawn at random."""
    rng = random.Random(seed)

    def text() -> str:
        drawn, size = [], 0
        while size < chars:
            drawn.append(rng.choice(words))
            size += len(drawn[-1]) + 1
        return " ".join(drawn)[:chars]

    return [json.dumps({"texts": [text() for _ in range(texts)]}).encode() for _ in range(count)]


async def post_for(url: str, payloads: list[bytes], seconds: float) -> Counter:
    """Each payload posted again and again by its own client for ``seconds``; the statuses answered."""
    statuses: Counter = Counter()
    async with httpx.AsyncClient(timeout=120) as client:
        async def one_client(payload: bytes) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                answer = await client.post(f"{url}/predict", content=payload,
                                           headers={"Content-Type": "application/json"})
                statuses[answer.status_code] += 1

        await asyncio.gather(*(one_client(payload) for payload in payloads))
    return statuses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(int(args.probe[0]), float(args.probe[1]))))
        return 0
    words = " ".join(load_labeled(args.data).texts).split()
    payloads = bodies(words, args.texts, args.chars, args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server({"MODEL_PATH": str(args.artifact.resolve()), "ENABLE_MODEL_CACHING": "false",
                               "INTRA_OP_THREADS": "0", **dict(item.split("=", 1) for item in args.env)}, Path(tmp))
        try:
            port = server.url.rsplit(":", 1)[1]
            idle = json.loads(start_probe(port, 3).communicate()[0])
            busy_probe = start_probe(port, args.seconds + 2)
            statuses = asyncio.run(post_for(server.url, payloads, args.seconds))
            busy = json.loads(busy_probe.communicate()[0])
        finally:
            stop_server(server)
    print(f"bodies: {args.clients} clients x {args.texts} texts x {args.chars} characters "
          f"({len(payloads[0]):,} bytes each); answered {dict(statuses)}")
    for phase, found in (("idle", idle), ("under the large bodies", busy)):
        print(f"/ready {phase}: p50 {found['p50_ms']:.1f} ms, p99 {found['p99_ms']:.1f} ms, "
              f"max {found['max_ms']:.1f} ms ({found['probes']} probes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
