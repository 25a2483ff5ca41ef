"""Server overhead benchmark (issue 3): the HTTP server against the raw ONNX engine on the same machine.

Prints, for the default artifact on this machine's CPU:
  (a) saturation throughput of the server vs the raw engine at the same batch size (the raw engine's best
      CPU set-up: threads per call, spinning, concurrent callers),
  (b) p50 latency of a lone short request vs one raw engine call,
  (c) texts/s at saturation on SST-2 sentences.

    python scripts/bench_server.py --artifact models/default --data ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.data import LabeledData, load_labeled  # noqa: E402
from scripts.benchlib.envinfo import environment, header  # noqa: E402
from scripts.benchlib.loadgen import Client, closed_loop  # noqa: E402
from scripts.benchlib.serverproc import start_server, stop_server  # noqa: E402
from scripts.benchlib.workload import Draw, Workload  # noqa: E402
from server.artifact import load_artifact  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.engine import available_cores, create_engine  # noqa: E402
from server.tokenizer import TextEncoder, pad_batch  # noqa: E402

SHORT = "a charming film"
LONE_ROUNDS, LONE_BLOCK = 6, 50


RAW_CONFIGS = {
    # name: (settings, concurrent callers) -- the engine's CPU set-ups a server could use
    "1 caller x all cores, spinning": ({"engine_workers": 1, "intra_op_spinning": True}, 1),
    "1 caller x all cores": ({"engine_workers": 1}, 1),
    "callers = cores x 1 thread": ({"intra_op_threads": 1}, 0),
}


def engine_rate(engine, encoded: list, batch: int, seconds: float, callers: int) -> float:
    """Texts/s of back-to-back ``batch``-sized engine calls from ``callers`` threads sharing one session."""
    batches = [encoded[i:i + batch] for i in range(0, len(encoded), batch)]
    end = time.perf_counter() + seconds
    lock = threading.Lock()
    position = 0

    def call() -> int:
        nonlocal position
        done = 0
        while time.perf_counter() < end:
            with lock:
                rows, position = batches[position % len(batches)], position + 1
            engine.run(*pad_batch(rows))
            done += len(rows)
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        done = sum(pool.map(lambda _: call(), range(callers)))
    return done / (time.perf_counter() - started)


def raw_engine(artifact_dir: Path, texts: list[str], batch: int, seconds: float) -> dict:
    """Texts/s (arrival order, length-sorted) of each CPU set-up of the raw engine."""
    artifact = load_artifact(artifact_dir)
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    encoded = encoder.encode(texts)
    by_length = sorted(encoded, key=len)
    result: dict = {"configs": {}}
    for name, (overrides, callers) in RAW_CONFIGS.items():
        engine = create_engine(artifact, load_settings(device="cpu", model_path=artifact_dir, **overrides))
        callers = callers or available_cores()
        result["variant"] = engine.variant
        result["configs"][name] = {
            "arrival_order_texts_per_s": engine_rate(engine, encoded, batch, seconds, callers),
            "length_sorted_texts_per_s": engine_rate(engine, by_length, batch, seconds, callers),
        }
        print(f"raw engine, {name}: {json.dumps(result['configs'][name])}", flush=True)
    best = max(result["configs"].values(), key=lambda c: c["arrival_order_texts_per_s"])
    result["arrival_order_texts_per_s"] = best["arrival_order_texts_per_s"]
    result["length_sorted_texts_per_s"] = max(c["length_sorted_texts_per_s"] for c in result["configs"].values())
    return result


def lone_raw_call(artifact_dir: Path) -> Callable[[], None]:
    """One engine call on the short text, with the server's default CPU set-up, so (b) compares like with like."""
    artifact = load_artifact(artifact_dir)
    engine = create_engine(artifact, load_settings(device="cpu", model_path=artifact_dir))
    lone = pad_batch(TextEncoder(artifact.tokenizer_path, artifact.max_length).encode([SHORT]))
    return lambda: engine.run(*lone)


async def server_side(url: str, data: LabeledData, concurrency: list[int], seconds: float,
                      raw_call: Callable[[], None] | None) -> dict:
    """Lone-request latency (alternating with lone raw engine calls), then closed-loop texts/s at each
    concurrency; saturation is the best of them.

    Lone requests and raw calls alternate in blocks so that both sample the same minutes: on a shared VM
    the raw call alone drifted 0.75-1.9 ms between runs, more than the overhead being measured.
    """
    client = Client(url, max_connections=max(concurrency) + 4)
    try:
        lone, raw = [], []
        for round_ in range(LONE_ROUNDS + 1):  # the first round warms up and is not kept
            block = []
            for _ in range(LONE_BLOCK):
                sample = await client.request("/predict", Draw([SHORT], [1], 0), time.perf_counter())
                block.append((sample.done - sample.due) * 1000)
            raw_block = []
            for _ in range(LONE_BLOCK if raw_call else 0):
                started = time.perf_counter()
                raw_call()
                raw_block.append((time.perf_counter() - started) * 1000)
            if round_:
                lone, raw = lone + block, raw + raw_block
        levels = {}
        for clients in concurrency:
            levels[str(clients)] = await closed_loop_rate(client, data, clients, seconds)
            print(f"server at concurrency {clients}: {json.dumps(levels[str(clients)])}", flush=True)
    finally:
        await client.close()
    best = max(levels, key=lambda c: levels[c]["texts_per_s"])
    return {"lone_request_p50_ms": statistics.median(lone),
            "lone_raw_call_p50_ms": statistics.median(raw) if raw else float("nan"),
            "saturation_texts_per_s": levels[best]["texts_per_s"],
            "saturated_at_concurrency": int(best), "by_concurrency": levels}


async def closed_loop_rate(client: Client, data: LabeledData, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, one SST-2 text per request (a shuffled pass), each sending again when answered."""
    started = time.perf_counter()
    samples = await closed_loop(client, "/predict", Workload(data), concurrency, seconds)
    elapsed = time.perf_counter() - started
    statuses = Counter(str(sample.status) for sample in samples)
    return {"texts_per_s": sum(sample.ok for sample in samples) / elapsed, "statuses": dict(statuses)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path("models/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2/dev.tsv"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", default="64,128,256",
                        help="comma-separated client counts; saturation is the best texts/s among them")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/server"))
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server setting, e.g. --env STORE_PREDICTIONS=false (repeatable)")
    parser.add_argument("--skip-raw", action="store_true", help="measure only the server")
    args = parser.parse_args(argv)
    data = load_labeled(args.data)
    print(header(environment()))
    raw = ({"variant": "-", "arrival_order_texts_per_s": float("nan"), "length_sorted_texts_per_s": float("nan")}
           if args.skip_raw else raw_engine(args.artifact, data.texts, args.batch, args.seconds))
    print("raw engine:", json.dumps(raw))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server({"MODEL_PATH": str(args.artifact.resolve()), "ENABLE_MODEL_CACHING": "false",
                               "MAX_BATCH_SIZE": str(args.batch), "INTRA_OP_THREADS": "0",
                               **dict(item.split("=", 1) for item in args.env)}, Path(tmp))
        try:
            concurrency = [int(c) for c in args.concurrency.split(",")]
            raw_call = None if args.skip_raw else lone_raw_call(args.artifact)
            served = asyncio.run(server_side(server.url, data, concurrency, args.seconds, raw_call))
        finally:
            stop_server(server)
    report = {
        "raw": raw, "server": served,
        "a_server_vs_raw_arrival_order": served["saturation_texts_per_s"] / raw["arrival_order_texts_per_s"],
        "a_server_vs_raw_length_sorted": served["saturation_texts_per_s"] / raw["length_sorted_texts_per_s"],
        "b_lone_overhead_ms": served["lone_request_p50_ms"] - served["lone_raw_call_p50_ms"],
        "c_saturation_texts_per_s": served["saturation_texts_per_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_server.json").write_text(json.dumps(report, indent=2))
    print(f"(a) server / best raw engine at batch {args.batch}: {report['a_server_vs_raw_arrival_order']:.2f} "
          f"(arrival order), {report['a_server_vs_raw_length_sorted']:.2f} (length-sorted)")
    print(f"(b) lone short request p50 {served['lone_request_p50_ms']:.2f} ms vs raw call "
          f"{served['lone_raw_call_p50_ms']:.2f} ms: overhead {report['b_lone_overhead_ms']:.2f} ms")
    print(f"(c) saturation: {served['saturation_texts_per_s']:.1f} texts/s "
          f"(at {served['saturated_at_concurrency']} concurrent clients)")


if __name__ == "__main__":
    main()
