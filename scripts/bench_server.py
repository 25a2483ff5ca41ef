"""Server overhead benchmark (issue 3): the HTTP server against the raw ONNX engine on the same machine.

Prints, for the default artifact on this machine's CPU:
  (a) saturation throughput of the server vs the raw engine at the same batch size (the raw engine's best
      CPU set-up: threads per call, spinning, concurrent callers),
  (b) p50 latency of a lone short request vs one raw engine call,
  (c) texts/s at saturation on SST-2 sentences,
  (d) with --durability ack,async: (b) and (c) for a server per STORE_DURABILITY mode, measured in alternation
      in the same run, and what ack costs against async (the product's target: <= 10% of saturation
      throughput and <= 0.5 ms of lone p50),
  (e) where each text's time goes at each concurrency, read from the server's /metrics and /proc: texts per
      engine batch, padded / real tokens, engine ms per text (timed on the engine worker), the server's event
      loop and engine threads' CPU ms per text, and the load generator's (it shares the cores), so a gap to the
      raw engine can be traced to padding, small batches, the loop or the generator,
  (f) this machine's floor under issue 17's targets (``scripts.benchlib.floor``): a bare ASGI app's POST on the
      same uvicorn set-up and client, alone and with the lone engine call on a worker thread, the raw engine call
      after a lone request's idle gap, tokenization, the spool disk's fdatasync, the engine's CPU per text at the
      server's batches and the generator's; from them the lowest lone overhead and the highest saturation
      fraction this machine allows whatever the server does,
  (g) with --beside NAME=VALUE: (b) and (c) for a server of the first mode with that setting too, measured in
      alternation with the others, so a setting's effect is read within one run (the VM's speed moves by the hour),
  and issue 17's targets: lone overhead <= 1.0 ms over one raw engine call (p50), saturation >= 0.80 of the
  length-sorted raw engine. The server runs with its defaults (STORE_DURABILITY=ack) unless --env says otherwise.

    python scripts/bench_server.py --artifact models/default --data ../shared/data/sst2/dev.tsv
    python scripts/bench_server.py --skip-raw --durability ack,async
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from models.data import LabeledData, load_labeled  # noqa: E402
from scripts.benchlib import floor  # noqa: E402
from scripts.benchlib.argtypes import names  # noqa: E402
from scripts.benchlib.envinfo import environment, header  # noqa: E402
from scripts.benchlib.loadgen import Client, closed_loop, run  # noqa: E402
from scripts.benchlib.serverproc import LiveServer, start_server, stop_server  # noqa: E402
from scripts.benchlib.workload import Draw, Workload  # noqa: E402
from server.artifact import load_artifact  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.engine import OnnxEngine, available_cores, create_engine  # noqa: E402
from server.status import Samples, increase, parse_metrics  # noqa: E402
from server.tokenizer import TextEncoder, pad_batch  # noqa: E402

SHORT = "a charming film"
LONE_ROUNDS, LONE_BLOCK = 6, 50
LONE_OVERHEAD_TARGET_MS, SATURATION_TARGET = 1.0, 0.80  # issue 17: over one raw engine call; of length-sorted raw
DURABILITY_MODES = ("ack", "async")
BARE = "bare ASGI app"  # the floor's transport, among the lone requests' servers
BARE_ENGINE = "bare ASGI app + engine"  # the floor measured: transport, hand-offs and the lone engine call
FLOOR_ENGINE_SECONDS = 2.5  # per set of batches and round, at most half of --seconds
ACK_SATURATION_TARGET_PCT, ACK_LONE_TARGET_MS = 10.0, 0.5


RawRate = Callable[[float], tuple[float, float]]  # seconds -> (texts/s, CPU ms per text) of the raw engine's best
# length-sorted set-up

RAW_CONFIGS = {
    # name: (settings, concurrent callers) -- the engine's CPU set-ups a server could use
    "1 caller x all cores, spinning": ({"engine_workers": 1, "intra_op_spinning": True}, 1),
    "1 caller x all cores": ({"engine_workers": 1}, 1),
    "callers = cores x 1 thread": ({"intra_op_threads": 1}, 0),
}


def engine_rate(engine, encoded: list, batch: int, seconds: float, callers: int) -> float:
    """Texts/s of back-to-back ``batch``-sized engine calls from ``callers`` threads sharing one session (each
    batch padded inside the timed calls, as the server pads its own)."""
    batches = [(encoded[i:i + batch],) for i in range(0, len(encoded), batch)]
    started = time.perf_counter()
    done = floor.run_for(lambda rows: engine.run(*pad_batch(rows)), batches, callers, seconds)
    return done / (time.perf_counter() - started)


def raw_engine(artifact_dir: Path, texts: list[str], batch: int, seconds: float) -> tuple[dict, RawRate]:
    """Texts/s (arrival order, length-sorted) of each CPU set-up of the raw engine, and a way to measure the best
    length-sorted set-up again beside each server level (``server_side``)."""
    artifact = load_artifact(artifact_dir)
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    encoded = encoder.encode(texts)
    by_length = sorted(encoded, key=len)
    result: dict = {"configs": {}}
    engines = {}
    for name, (overrides, callers) in RAW_CONFIGS.items():
        engine = create_engine(artifact, load_settings(device="cpu", model_path=artifact_dir, **overrides))
        callers = callers or available_cores()
        result["variant"] = engine.variant
        result["configs"][name] = {
            "arrival_order_texts_per_s": engine_rate(engine, encoded, batch, seconds, callers),
            "length_sorted_texts_per_s": engine_rate(engine, by_length, batch, seconds, callers),
        }
        engines[name] = (engine, callers)
        print(f"raw engine, {name}: {json.dumps(result['configs'][name])}", flush=True)
    best = max(result["configs"].values(), key=lambda c: c["arrival_order_texts_per_s"])
    result["arrival_order_texts_per_s"] = best["arrival_order_texts_per_s"]
    sorted_best = max(result["configs"], key=lambda name: result["configs"][name]["length_sorted_texts_per_s"])
    result["length_sorted_texts_per_s"] = result["configs"][sorted_best]["length_sorted_texts_per_s"]
    result["length_sorted_best_config"] = sorted_best
    engine, callers = engines[sorted_best]

    def beside(duration: float) -> tuple[float, float]:
        """Texts/s and this process's CPU ms per text (the engine's, as the process does nothing else meanwhile)."""
        cpu = time.process_time()
        rate = engine_rate(engine, by_length, batch, duration, callers)
        return rate, (time.process_time() - cpu) * 1000 / max(rate * duration, 1)

    return result, beside


async def server_side(servers: dict[str, LiveServer], data: LabeledData, concurrency: list[int], seconds: float,
                      raw_call: Callable[[], None] | None, raw_sorted: RawRate | None = None,
                      bare_url: str | None = None, probes: dict[str, Callable[[], float]] | None = None,
                      bare_engine_url: str | None = None) -> dict[str, dict]:
    """For each server (name -> URL): lone-request latency, alternating with the other servers and with lone raw
    engine calls, then closed-loop texts/s at each concurrency, the servers in turn (first one way, then the
    other); saturation is the best level. After each level the raw engine's best length-sorted set-up runs again
    (``raw_sorted``), so each level has a raw figure from the same minutes: other work on a shared VM moved the
    raw engine 2.4x between the start of a run and its server levels.

    Lone requests and raw calls alternate in blocks so that all of them sample the same minutes: on a shared VM
    the raw call alone drifted 0.75-1.9 ms between runs, more than the overhead being measured. So do the lone
    requests to a bare ASGI app (``bare_url``: the floor's transport; ``bare_engine_url``: the same app calling
    the engine on a worker thread, the floor measured) and blocks of each of ``probes`` (the
    floor's tokenization and fdatasync: the spool disk's speed moves with other sessions' writes; each returns the
    ms it measured, and each call follows a pause as long as the bare app's p50 in that round, the idle time a
    server whose own code cost nothing would leave between two lone requests), and each
    server's own engine time per lone request is read from its /metrics (the gap between two lone engine calls is
    the lone p50 less that time).
    """
    probes = probes or {}
    urls = {name: server.url for name, server in servers.items()}
    clients = {name: Client(url, max_connections=max(concurrency) + 4) for name, url in urls.items()}
    bare_urls = {name: url for name, url in ((BARE, bare_url), (BARE_ENGINE, bare_engine_url)) if url}
    lone_clients = {**clients, **{name: Client(url, max_connections=4) for name, url in bare_urls.items()}}
    try:
        lone: dict[str, list[float]] = {name: [] for name in lone_clients}
        raw: list[float] = []
        probed: dict[str, list[float]] = {name: [] for name in probes}
        engine_before: dict[str, Samples] = {}
        for round_ in range(LONE_ROUNDS + 1):  # the first round warms up and is not kept
            if round_ == 1:
                engine_before = {name: scrape(url) for name, url in urls.items()}
            block_of: dict[str, list[float]] = {}
            for name, client in _in_turn(lone_clients, round_):
                block = block_of[name] = []
                for _ in range(LONE_BLOCK):
                    sample = await client.request("/predict", Draw([SHORT], [1], 0), time.perf_counter())
                    block.append((sample.done - sample.due) * 1000)
                if round_:
                    lone[name] += block
            raw_block = []
            for _ in range(LONE_BLOCK if raw_call else 0):
                started = time.perf_counter()
                raw_call()
                raw_block.append((time.perf_counter() - started) * 1000)
            if round_:
                raw += raw_block
            pause = statistics.median(block_of[BARE]) / 1000 if BARE in block_of else 0.0
            for probe, call in probes.items():
                probe_block = [_after_pause(pause, call) for _ in range(LONE_BLOCK)]
                if round_:
                    probed[probe] += probe_block
        lone_engine = {name: engine_ms_per_call(engine_before[name], scrape(url)) for name, url in urls.items()}
        levels: dict[str, dict] = {name: {} for name in urls}
        for level, clients_count in enumerate(concurrency):
            for name, client in _in_turn(clients, level):
                levels[name][str(clients_count)] = await closed_loop_rate(client, servers[name], data, clients_count,
                                                                          seconds)
                label = f"server ({name})" if name else "server"
                print(f"{label} at concurrency {clients_count}: {json.dumps(levels[name][str(clients_count)])}",
                      flush=True)
            if raw_sorted is not None:
                beside, beside_cpu = raw_sorted(seconds)
                print(f"raw engine length-sorted beside concurrency {clients_count}: {beside:.1f} texts/s, "
                      f"{beside_cpu:.2f} CPU ms per text", flush=True)
                for name in urls:
                    measured = levels[name][str(clients_count)]
                    measured["raw_length_sorted_beside_texts_per_s"] = beside
                    measured["raw_length_sorted_beside_cpu_ms_per_text"] = beside_cpu
                    measured["vs_raw_length_sorted_beside"] = measured["texts_per_s"] / beside
    finally:
        for client in lone_clients.values():
            await client.close()
    results = {}
    for name in urls:
        best = max(levels[name], key=lambda c: levels[name][c]["texts_per_s"])
        results[name] = {"lone_request_p50_ms": statistics.median(lone[name]),
                         "lone_raw_call_p50_ms": statistics.median(raw) if raw else float("nan"),
                         "lone_engine_ms": lone_engine[name],
                         "lone_bare_asgi_p50_ms": statistics.median(lone[BARE]) if bare_url else float("nan"),
                         "lone_bare_engine_p50_ms": (statistics.median(lone[BARE_ENGINE]) if bare_engine_url
                                                     else float("nan")),
                         "lone_probes_p50_ms": {probe: statistics.median(ms) for probe, ms in probed.items()},
                         "saturation_texts_per_s": levels[name][best]["texts_per_s"],
                         "saturated_at_concurrency": int(best), "by_concurrency": levels[name]}
    return results


def _timed_ms(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _after_pause(pause_s: float, probe: Callable[[], float]) -> float:
    time.sleep(pause_s)
    return probe()


def engine_ms_per_call(before: Samples, after: Samples) -> float:
    """The server's mean engine time per batch (ms, timed on its engine worker) between two /metrics scrapes."""
    calls = increase(before, after, "sentiment_inference_latency_seconds_count")
    return increase(before, after, "sentiment_inference_latency_seconds_sum") * 1000 / calls if calls else float("nan")


def _in_turn(clients: dict[str, Client], turn: int) -> list[tuple[str, Client]]:
    """The servers in their order on even turns and reversed on odd ones, so none always goes first."""
    order = list(clients.items())
    return order[::-1] if turn % 2 else order


def durability_cost(measured: dict[str, dict]) -> dict:
    """What ``ack`` costs against ``async``, measured in the same run, and whether it is within the target."""
    ack, fast = measured["ack"], measured["async"]
    saturation_pct = 100 * (1 - ack["saturation_texts_per_s"] / fast["saturation_texts_per_s"])
    lone_ms = ack["lone_request_p50_ms"] - fast["lone_request_p50_ms"]
    return {"saturation_cost_pct": saturation_pct, "lone_p50_cost_ms": lone_ms,
            "within_target": saturation_pct <= ACK_SATURATION_TARGET_PCT and lone_ms <= ACK_LONE_TARGET_MS}


def server_durability(url: str) -> str | None:
    """The durability mode the server says it runs in (/health), so a report cannot mislabel a server."""
    return httpx.get(url + "/health", timeout=10).json().get("database", {}).get("durability")


async def closed_loop_rate(client: Client, server: LiveServer, data: LabeledData, concurrency: int,
                           seconds: float) -> dict:
    """``concurrency`` clients, one SST-2 text per request (a shuffled pass), each sending again when answered;
    with where the texts' time went (``where_time_went``)."""
    before, cpu_before = scrape(server.url), (thread_cpu_s(server.process.pid), time.process_time())
    started = time.perf_counter()
    samples = await closed_loop(client, "/predict", Workload(data), concurrency, seconds)
    elapsed = time.perf_counter() - started
    after, cpu_after = scrape(server.url), (thread_cpu_s(server.process.pid), time.process_time())
    statuses = Counter(str(sample.status) for sample in samples)
    texts = sum(sample.ok for sample in samples)
    return {"texts_per_s": texts / elapsed, "statuses": dict(statuses),
            **where_time_went(before, after, cpu_before, cpu_after, texts)}


def scrape(url: str) -> Samples:
    """The server's /metrics, every sample keyed by (name, labels)."""
    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the server's event loop (its main thread) and of all its other threads."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {"loop": 0.0, "other_threads": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        cpu["loop" if tid == str(pid) else "other_threads"] += (int(fields[11]) + int(fields[12])) / tick
    return cpu


def where_time_went(before: Samples, after: Samples, cpu_before: tuple, cpu_after: tuple, texts: int) -> dict:
    """Per text of one level: engine batches, padding, engine time, and CPU of the loop, the server's other
    threads (the engine workers, mostly) and the load generator."""
    def delta(name: str) -> float:
        return increase(before, after, name)

    per_text = 1000 / max(texts, 1)
    batches = delta("sentiment_batch_size_count")
    return {
        "texts_per_batch": delta("sentiment_batch_size_sum") / batches if batches else float("nan"),
        "padded_per_real_token": (delta("sentiment_padded_tokens_total") / delta("sentiment_real_tokens_total")
                                  if delta("sentiment_real_tokens_total") else float("nan")),
        "engine_ms_per_text": delta("sentiment_inference_latency_seconds_sum") * per_text,
        "loop_cpu_ms_per_text": (cpu_after[0]["loop"] - cpu_before[0]["loop"]) * per_text,
        "other_threads_cpu_ms_per_text": (cpu_after[0]["other_threads"] - cpu_before[0]["other_threads"]) * per_text,
        "generator_cpu_ms_per_text": (cpu_after[1] - cpu_before[1]) * per_text,
    }


def machine_floor(measured: dict[str, dict], target_server: str, durability: dict[str, str | None],
                  encoder: TextEncoder, texts: list[str], engine: tuple[OnnxEngine, int] | None,
                  raw_call: Callable[[], None] | None, batch: int, seconds: float) -> dict:
    """Section (f): this machine's floor (``scripts.benchlib.floor``) and what it allows: the lone overhead of each
    server (an ``ack`` one waits for an fdatasync) and the saturation of ``target_server`` (the one the targets are
    read from). Transport, tokenization and fdatasync come from the lone rounds (``server_side``); the engine is
    measured here, after the servers stopped. No engine figures without an engine."""
    nan = float("nan")
    probed = measured[target_server]["lone_probes_p50_ms"]
    result: dict = {
        "transport_p50_ms": measured[target_server]["lone_bare_asgi_p50_ms"],
        "bare_engine_p50_ms": measured[target_server]["lone_bare_engine_p50_ms"],
        "raw_call_p50_ms": measured[target_server]["lone_raw_call_p50_ms"],
        "tokenization_p50_ms": probed["tokenization"], "fsync_p50_ms": probed["fsync"],
    }
    fsync = {name: result["fsync_p50_ms"] if durability[name] == "ack" else None for name in measured}
    gaps = {name: (max(0.0, served["lone_request_p50_ms"] - served["lone_engine_ms"]),  # the lone loop's gap
                   # a server whose own code cost nothing would idle its engine for these only
                   result["transport_p50_ms"] + result["tokenization_p50_ms"] + (fsync[name] or 0.0))
            for name, served in measured.items()}
    back_to_back, *after_gaps = (floor.engine_call_p50s(raw_call, [0.0, *(gap / 1000 for pair in gaps.values()
                                                                          for gap in pair)])
                                 if raw_call else [nan] * (2 * len(gaps) + 1))
    result["engine_back_to_back_p50_ms"] = back_to_back
    result["lone"] = {}
    for index, (name, served) in enumerate(measured.items()):
        after_lone_gap, after_floor_gap = after_gaps[2 * index:2 * index + 2]
        result["lone"][name or "default"] = {
            "durability": durability[name], "server_engine_ms": served["lone_engine_ms"],
            "lone_gap_ms": gaps[name][0], "engine_after_lone_gap_p50_ms": after_lone_gap,
            "floor_gap_ms": gaps[name][1], "engine_after_floor_gap_p50_ms": after_floor_gap,
            **floor.lone_overhead_floor(result["transport_p50_ms"], after_floor_gap, back_to_back,
                                        result["tokenization_p50_ms"], fsync[name],
                                        served["lone_request_p50_ms"] - served["lone_raw_call_p50_ms"],
                                        LONE_OVERHEAD_TARGET_MS,
                                        result["bare_engine_p50_ms"] - result["raw_call_p50_ms"])}
    level = str(measured[target_server]["saturated_at_concurrency"])
    saturated = measured[target_server]["by_concurrency"][level]
    shaped = {key: saturated[key] for key in ("texts_per_batch", "padded_per_real_token")}
    cpu = {"server": nan, "sorted": nan}
    if engine is not None and all(map(math.isfinite, shaped.values())):
        rows = sorted(encoder.encode(texts), key=len)
        batch_sets = {"server": floor.server_like_batches(rows, shaped["texts_per_batch"],
                                                          shaped["padded_per_real_token"], encoder.max_length),
                      "sorted": [pad_batch(rows[i:i + batch]) for i in range(0, len(rows), batch)]}
        shaped = floor.composition(batch_sets["server"])  # what was run: the server's shape up to rounding
        cpu = floor.engine_cpu_ms_per_text(engine[0].run, batch_sets, engine[1], min(FLOOR_ENGINE_SECONDS, seconds / 2))
    result["engine_cpu"] = {
        "callers": engine[1] if engine else None,
        "server_batches": {"at_concurrency": int(level), **shaped, "cpu_ms_per_text": cpu["server"]},
        "length_sorted": {"texts_per_batch": batch, "cpu_ms_per_text": cpu["sorted"]},
    }
    result["saturation"] = floor.saturation_ceiling(
        available_cores(), cpu["server"], saturated["generator_cpu_ms_per_text"], cpu["sorted"],
        saturated.get("raw_length_sorted_beside_texts_per_s", nan), saturated.get("vs_raw_length_sorted_beside", nan),
        SATURATION_TARGET, saturated["loop_cpu_ms_per_text"] + saturated["other_threads_cpu_ms_per_text"])
    return result


def print_floor(found: dict) -> None:
    """Section (f) as printed lines."""
    cpu, ceiling = found["engine_cpu"], found["saturation"]
    print("(f) this machine's floor, measured in this run (what no server code can go below here):")
    print(f"(f) in the lone rounds, p50: a POST to a bare ASGI app on the server's uvicorn set-up (httptools, "
          f"the same loop) through the same client {found['transport_p50_ms']:.2f} ms; tokenizing the short text "
          f"{found['tokenization_p50_ms']:.3f} ms; a small append + fdatasync beside the spools "
          f"{found['fsync_p50_ms']:.2f} ms")
    print(f"(f) in the lone rounds, p50: the same bare app running the lone raw engine call on a worker thread "
          f"before it answers {found['bare_engine_p50_ms']:.2f} ms, "
          f"{found['bare_engine_p50_ms'] - found['raw_call_p50_ms']:.2f} ms over the raw call's "
          f"{found['raw_call_p50_ms']:.2f} ms in the same rounds")
    for name, lone in found["lone"].items():
        print(f"(f) raw engine call p50 ({name}): {found['engine_back_to_back_p50_ms']:.2f} ms back to back, "
              f"{lone['engine_after_lone_gap_p50_ms']:.2f} ms after the lone loop's idle gap "
              f"({lone['lone_gap_ms']:.2f} ms: lone p50 less the server's own engine time per lone request, "
              f"{lone['server_engine_ms']:.2f} ms), {lone['engine_after_floor_gap_p50_ms']:.2f} ms after the floor's "
              f"gap ({lone['floor_gap_ms']:.2f} ms: transport, tokenization{', fsync' if lone['fsync_ms'] else ''})")
    shaped = cpu["server_batches"]
    print(f"(f) engine CPU per text ({cpu['callers']} callers, the server's set-up): "
          f"{shaped['cpu_ms_per_text']:.2f} ms at the server's batches at {shaped['at_concurrency']} clients "
          f"({shaped['texts_per_batch']:.1f} texts, {shaped['padded_per_real_token']:.2f} padded per real token) vs "
          f"{cpu['length_sorted']['cpu_ms_per_text']:.2f} ms length-sorted in batches of "
          f"{cpu['length_sorted']['texts_per_batch']}; load generator {ceiling['generator_cpu_ms_per_text']:.2f} ms")
    for name, lone in found["lone"].items():
        fsync = f" + fsync {lone['fsync_ms']:.2f}" if lone["fsync_ms"] else ""
        print(f"(f) lone overhead floor ({name}) = bare app with the engine {lone['bare_engine_overhead_ms']:.2f} + "
              f"tokenization {lone['tokenization_ms']:.3f}{fsync} = {lone['floor_ms']:.2f} ms (summed from the parts: "
              f"transport {lone['transport_ms']:.2f} + idle engine {lone['engine_idle_penalty_ms']:.2f} + the same"
              f" = {lone['summed_floor_ms']:.2f} ms): target <= {lone['target_ms']} ms "
              f"{_reach(lone['target_reachable'])}; "
              f"measured {lone['measured_overhead_ms']:.2f} ms ({lone['server_above_floor_ms']:+.2f} ms over the "
              "floor)")
    print(f"(f) saturation ceiling = {ceiling['cores']} cores x 1000 / ({ceiling['engine_cpu_ms_per_text']:.2f} engine "
          f"+ {ceiling['generator_cpu_ms_per_text']:.2f} generator CPU ms per text) = "
          f"{ceiling['ceiling_texts_per_s']:.0f} texts/s = {ceiling['fraction_of_raw_length_sorted']:.2f} of the "
          f"length-sorted raw engine by CPU ({ceiling['raw_length_sorted_cpu_ms_per_text']:.2f} ms per text; "
          f"{ceiling['fraction_of_raw_beside']:.2f} of its {ceiling['raw_length_sorted_beside_texts_per_s']:.0f} "
          f"texts/s beside that level): target >= {ceiling['target']} {_reach(ceiling['target_reachable'])}; "
          f"measured {ceiling['measured_fraction']:.2f}")
    print(f"(f) the server's own CPU per text beside the engine at that level: {ceiling['own_cpu_ms_per_text']:.2f} ms "
          f"(its loop and other threads less the engine's {ceiling['engine_cpu_ms_per_text']:.2f}); the target leaves "
          f"it {ceiling['own_cpu_budget_ms_per_text']:.2f} ms")


def _reach(reachable: bool | None) -> str:
    return {True: "reachable on this machine now", False: "UNREACHABLE on this machine now",
            None: "not judged (not measured)"}[reachable]


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
    parser.add_argument("--durability", type=names, default=None, metavar="MODES",
                        help="a server per STORE_DURABILITY mode (e.g. ack,async), measured in alternation; reports "
                        "what ack costs against async")
    parser.add_argument("--beside", action="append", default=[], metavar="NAME=VALUE",
                        help="also a server of the first durability mode with this setting, measured in alternation "
                        "with the others (e.g. --beside IDLE_SPIN_MS=20; repeatable): its effect within one run")
    args = parser.parse_args(argv)
    if args.durability and not set(args.durability) <= set(DURABILITY_MODES):
        parser.error(f"--durability {','.join(args.durability)}: choose from {', '.join(DURABILITY_MODES)}")
    data = load_labeled(args.data)
    print(header(environment()))
    raw, raw_sorted = (({"variant": "-", "arrival_order_texts_per_s": float("nan"),
                         "length_sorted_texts_per_s": float("nan")}, None)
                       if args.skip_raw else raw_engine(args.artifact, data.texts, args.batch, args.seconds))
    print("raw engine:", json.dumps(raw))
    modes = args.durability or [""]  # "": the server's default, not named
    beside = {f"{modes[0] or 'default'} {setting}": setting for setting in args.beside}
    plans = {mode: (mode, []) for mode in modes} | {name: (modes[0], [setting]) for name, setting in beside.items()}
    artifact = load_artifact(args.artifact)
    encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        servers, bare, bare_engine = {}, None, None
        try:
            for index, (name, (mode, extra)) in enumerate(plans.items()):
                (Path(tmp) / str(index)).mkdir()
                servers[name] = start_server({
                    "MODEL_PATH": str(args.artifact.resolve()), "ENABLE_MODEL_CACHING": "false",
                    "MAX_BATCH_SIZE": str(args.batch), "INTRA_OP_THREADS": "0",
                    **dict(item.split("=", 1) for item in args.env), **({"STORE_DURABILITY": mode} if mode else {}),
                    **dict(item.split("=", 1) for item in extra),
                }, Path(tmp) / str(index))
            bare = floor.start_bare_server(Path(tmp))
            concurrency = [int(c) for c in args.concurrency.split(",")]
            engine = None if args.skip_raw else floor.default_cpu_engine(args.artifact)
            bare_engine = None if args.skip_raw else floor.start_bare_server(Path(tmp), engine=(args.artifact, SHORT))
            raw_call = floor.lone_call(engine[0], encoder, SHORT) if engine else None  # (b) compares like with like
            with floor.fsync_probe(Path(tmp), before=raw_call) as fsync_beside_spools:
                probes = {"tokenization": lambda: _timed_ms(lambda: encoder.encode([SHORT])),
                          "fsync": fsync_beside_spools}
                measured = run(server_side(servers, data, concurrency, args.seconds, raw_call, raw_sorted,
                                           bare.url, probes, bare_engine.url if bare_engine else None))
            said = {mode: server_durability(server.url) for mode, server in servers.items()}
        finally:
            for server in [*servers.values(), *(server for server in (bare, bare_engine) if server)]:
                stop_server(server)
        found = machine_floor(measured, modes[0], said, encoder, data.texts, engine, raw_call, args.batch,
                              args.seconds)
    served = measured[modes[0]]
    saturated = served["by_concurrency"][str(served["saturated_at_concurrency"])]
    report = {
        "raw": raw, "server": served,
        "a_server_vs_raw_arrival_order": served["saturation_texts_per_s"] / raw["arrival_order_texts_per_s"],
        "a_server_vs_raw_length_sorted": served["saturation_texts_per_s"] / raw["length_sorted_texts_per_s"],
        "a_server_vs_raw_length_sorted_beside": saturated.get("vs_raw_length_sorted_beside", float("nan")),
        "b_lone_overhead_ms": served["lone_request_p50_ms"] - served["lone_raw_call_p50_ms"],
        "c_saturation_texts_per_s": served["saturation_texts_per_s"],
    }
    report["targets"] = {
        "lone_overhead_ms": {"target": LONE_OVERHEAD_TARGET_MS, "measured": report["b_lone_overhead_ms"],
                             "met": report["b_lone_overhead_ms"] <= LONE_OVERHEAD_TARGET_MS},
        "saturation_vs_length_sorted_raw": {"target": SATURATION_TARGET,  # the raw figure of the same minutes
                                            "measured": report["a_server_vs_raw_length_sorted_beside"],
                                            "met": report["a_server_vs_raw_length_sorted_beside"] >= SATURATION_TARGET},
    }
    report["f_floor"] = found
    if beside:
        report["beside"] = {name: {**measured[name], "server_says": said[name]} for name in beside}
    if args.durability:
        report["durability"] = {mode: {**measured[mode], "server_says": said[mode]} for mode in modes}
        if set(modes) == set(DURABILITY_MODES):
            report["durability"]["ack_cost"] = durability_cost(measured)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_server.json").write_text(json.dumps(report, indent=2))
    print(f"(a) server / best raw engine at batch {args.batch}: {report['a_server_vs_raw_arrival_order']:.2f} "
          f"(arrival order), {report['a_server_vs_raw_length_sorted']:.2f} (length-sorted); "
          f"{report['a_server_vs_raw_length_sorted_beside']:.2f} of the length-sorted raw engine measured right after "
          "that level")
    print(f"(b) lone short request p50 {served['lone_request_p50_ms']:.2f} ms vs raw call "
          f"{served['lone_raw_call_p50_ms']:.2f} ms: overhead {report['b_lone_overhead_ms']:.2f} ms")
    print(f"(c) saturation: {served['saturation_texts_per_s']:.1f} texts/s "
          f"(at {served['saturated_at_concurrency']} concurrent clients)")
    for level, measured_level in served["by_concurrency"].items():
        print(f"(e) at {level} clients, per text: {measured_level['texts_per_batch']:.1f} texts per batch, "
              f"{measured_level['padded_per_real_token']:.2f} padded per real token, engine "
              f"{measured_level['engine_ms_per_text']:.2f} ms; CPU: loop {measured_level['loop_cpu_ms_per_text']:.2f} "
              f"ms, other server threads {measured_level['other_threads_cpu_ms_per_text']:.2f} ms, load generator "
              f"{measured_level['generator_cpu_ms_per_text']:.2f} ms; the raw engine length-sorted right after: "
              f"{measured_level.get('raw_length_sorted_beside_cpu_ms_per_text', float('nan')):.2f} CPU ms")
    for name, target in report["targets"].items():
        print(f"target {name}: {target['measured']:.2f} (target {'<=' if name == 'lone_overhead_ms' else '>='} "
              f"{target['target']}): {'met' if target['met'] else 'NOT met'}")
    for mode in args.durability or []:
        print(f"(d) STORE_DURABILITY={mode} (/health says {said[mode]}): lone p50 "
              f"{measured[mode]['lone_request_p50_ms']:.2f} ms, saturation "
              f"{measured[mode]['saturation_texts_per_s']:.1f} texts/s")
    for name in beside:
        server = measured[name]
        fraction = server["by_concurrency"][str(server["saturated_at_concurrency"])].get("vs_raw_length_sorted_beside",
                                                                                          float("nan"))
        print(f"(g) {name} (/health says {said[name]}): lone p50 {server['lone_request_p50_ms']:.2f} ms (overhead "
              f"{server['lone_request_p50_ms'] - server['lone_raw_call_p50_ms']:.2f} ms), saturation "
              f"{server['saturation_texts_per_s']:.1f} texts/s, {fraction:.2f} of the length-sorted raw engine "
              "beside it")
    if "ack_cost" in report.get("durability", {}):
        cost = report["durability"]["ack_cost"]
        print(f"(d) ack costs {cost['saturation_cost_pct']:.1f}% of saturation (target <= "
              f"{ACK_SATURATION_TARGET_PCT:.0f}%) and {cost['lone_p50_cost_ms']:.2f} ms of lone p50 (target <= "
              f"{ACK_LONE_TARGET_MS} ms): {'within' if cost['within_target'] else 'OUTSIDE'} the target")
    print_floor(found)


if __name__ == "__main__":
    main()
