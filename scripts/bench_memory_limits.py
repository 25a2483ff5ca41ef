"""The price of the memory plan: saturation texts/s of the CPU image under different container memory limits.

For each ``--limits`` value the image runs with ``docker run --memory``, on its defaults (every memory setting
derived from the limit) with the prediction cache and store off, so that only the engine and its batching
are measured. Three closed loops, ``--seconds`` each: ``--concurrency`` clients sending one SST-2 sentence per
request; ``--long-concurrency`` clients sending 16 texts per request made of SST-2 sentences, mid-length
(~``MID_WORDS`` words, 205-230 tokens), then long (~560 words, cut to the model's 512 tokens). Prints the plan
the server made, texts/s answered 200 in each loop, and the container's cgroup peak.

``--flat`` runs each limit a second time with ``MAX_BATCH_TOKENS`` set to 98 % of what the first run derived
and ``ENGINE_WORKERS`` to its workers: a MAX_BATCH_TOKENS the user sets is a flat cap at every padded width,
so that run packs batches as the server did before the budget depended on the width (server/budget.py), and
the mid-length loop shows what the width budget buys. (98 %: the model's measured base varies by a few MB
from one start to the next, and the derived value exactly would not always fit again.)

    python scripts/bench_memory_limits.py --data ../shared/data/sst2/dev.tsv --limits 600m,1g,2g --seconds 20

The load generator runs on the same machine as the container: compare figures only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from models.data import load_labeled  # noqa: E402
from scripts.benchlib.serverproc import free_port  # noqa: E402

LONG_WORDS = 560
MID_WORDS = 180
LONG_PER_REQUEST = 16


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def long_texts(pool: list[str], rng: random.Random, count: int, length: int = LONG_WORDS) -> list[str]:
    """Texts of about ``length`` words made of SST-2 sentences (varied, so no two requests are the same)."""
    texts = []
    for _ in range(count):
        words: list[str] = []
        while len(words) < length:
            words += rng.choice(pool).split()
        texts.append(" ".join(words[:length]))
    return texts


async def closed_loop(url: str, make_texts, concurrency: int, seconds: float) -> tuple[float, int]:
    """(texts/s answered 200, requests not answered 200) over ``seconds`` after a 2 s ramp."""
    answered, failed = 0, 0
    started = time.monotonic()
    window_start, stop = started + 2.0, started + 2.0 + seconds

    async def client(client_id: int) -> None:
        nonlocal answered, failed
        rng = random.Random(client_id)
        async with httpx.AsyncClient(timeout=300) as http:
            while time.monotonic() < stop:
                texts = make_texts(rng)
                response = await http.post(url + "/predict", json={"texts": texts})
                done = time.monotonic()
                if response.status_code != 200:
                    failed += 1
                elif window_start <= done < stop:
                    answered += len(texts)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return answered / seconds, failed


def run_limit(image: str, limit: str, pool: list[str], args: argparse.Namespace, flat: dict | None = None) -> dict:
    """One container at ``limit``; ``flat``: the derived run's row, whose budget this run sets flat (``--flat``)."""
    name, port = f"sentiment-analyzer-bench-{limit}", free_port()
    settings = ["-e", f"MAX_BATCH_TOKENS={int(flat['batch_tokens'] * 0.98)}", "-e",
                f"ENGINE_WORKERS={flat['workers']}"] if flat else []
    docker("rm", "-f", name, check=False)
    docker("run", "-d", "--name", name, "--network", "host", "--memory", limit, "--memory-swap", limit,
           "-e", f"PORT={port}", "-e", "ENABLE_MODEL_CACHING=false", "-e", "STORE_PREDICTIONS=false",
           "-e", "REQUEST_TIMEOUT_S=300", *settings, image)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or json.loads(docker("inspect", "-f", "{{json .State}}", name))[
                    "Status"] == "exited":
                raise SystemExit(f"{name} did not get ready:\n{docker('logs', name, check=False)[-3000:]}")
            time.sleep(0.5)
        plan = httpx.get(url + "/health", timeout=30).json()["memory"]["plan"]
        short, short_failed = asyncio.run(closed_loop(url, lambda rng: [rng.choice(pool)], args.concurrency,
                                                      args.seconds))
        mid, mid_failed = asyncio.run(closed_loop(url, lambda rng: long_texts(pool, rng, LONG_PER_REQUEST, MID_WORDS),
                                                  args.long_concurrency, args.seconds))
        long, long_failed = asyncio.run(closed_loop(url, lambda rng: long_texts(pool, rng, LONG_PER_REQUEST),
                                                    args.long_concurrency, args.seconds))
        peak = docker("exec", name, "sh", "-c", "cat /sys/fs/cgroup/memory.peak 2>/dev/null || "
                      "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes").split()[0]
        oom = json.loads(docker("inspect", "-f", "{{json .State}}", name))["OOMKilled"]
    finally:
        docker("rm", "-f", name, check=False)
    return {"limit": limit, "budget": "flat" if flat else "per width", "workers": plan["engine_workers"],
            "batch_tokens": plan["batch_tokens"], "tokens_at_256": plan["batch_tokens_at_length"].get("256"),
            "texts_at_512": plan["batch_texts_at_max_length"], "sst2_texts_s": round(short, 1),
            "mid_texts_s": round(mid, 1), "long_texts_s": round(long, 1),
            "not_200": short_failed + mid_failed + long_failed,
            "cgroup_peak_mib": round(int(peak) / 2**20), "oom_killed": oom}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="SST-2 TSV (header text\\tlabel)")
    parser.add_argument("--limits", default="1g,2g", help="docker --memory values, comma-separated")
    parser.add_argument("--image", default="sentiment-analyzer:cpu")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window of each loop")
    parser.add_argument("--concurrency", type=int, default=32, help="clients of the SST-2 loop")
    parser.add_argument("--long-concurrency", type=int, default=4, help="clients of the mid and long-text loops")
    parser.add_argument("--flat", action="store_true", help="also run each limit with MAX_BATCH_TOKENS set to "
                        "what it derived (the budget flat across widths)")
    args = parser.parse_args(argv)
    pool = [text for text in load_labeled(args.data).texts if text]
    rows = []
    for limit in args.limits.split(","):
        rows.append(run_limit(args.image, limit, pool, args))
        if args.flat:
            rows.append(run_limit(args.image, limit, pool, args, flat=rows[-1]))
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
