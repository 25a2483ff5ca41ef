"""bench_server's section (f), this machine's floor: the derivations with fixed inputs, and real smokes of the
transport (a bare ASGI app on uvicorn) and fdatasync measurements."""

from __future__ import annotations

import asyncio
import math
import random
import signal
import threading
import time

import numpy as np
import pytest

from scripts.benchlib import floor
from scripts.benchlib.loadgen import Client
from scripts.benchlib.serverproc import stop_server
from scripts.benchlib.workload import Draw


def test_lone_overhead_floor_adds_transport_idle_engine_tokenization_and_the_ack_sync():
    ack = floor.lone_overhead_floor(transport_ms=0.45, engine_idle_ms=1.71, engine_back_to_back_ms=1.44,
                                    tokenization_ms=0.05, fsync_ms=0.24, measured_overhead_ms=2.01, target_ms=1.0)
    assert ack["engine_idle_penalty_ms"] == pytest.approx(0.27)
    assert ack["floor_ms"] == pytest.approx(0.45 + 0.27 + 0.05 + 0.24)
    assert ack["server_above_floor_ms"] == pytest.approx(2.01 - 1.01)
    assert ack["target_reachable"] is False  # 1.01 ms of floor under a 1.0 ms target
    fast = floor.lone_overhead_floor(0.45, 1.71, 1.44, 0.05, None, 1.43, 1.0)  # async: no sync to wait for
    assert fast["fsync_ms"] == 0.0 and fast["floor_ms"] == pytest.approx(0.77) and fast["target_reachable"] is True
    unmeasured = floor.lone_overhead_floor(0.45, math.nan, math.nan, 0.05, None, math.nan, 1.0)  # --skip-raw
    assert unmeasured["target_reachable"] is None


def test_the_measured_floor_the_bare_app_with_the_engine_judges_the_target_over_the_summed_one():
    """The bare app with the engine costs more than its parts measured apart (transport after an engine call on a
    paused VM is slower): the floor is the measured one, plus what that app does not do (tokenize, fdatasync)."""
    ack = floor.lone_overhead_floor(0.45, 1.71, 1.44, 0.05, 0.24, 2.01, 1.0, bare_engine_overhead_ms=1.30)
    assert ack["summed_floor_ms"] == pytest.approx(1.01) and ack["floor_ms"] == pytest.approx(1.30 + 0.05 + 0.24)
    assert ack["server_above_floor_ms"] == pytest.approx(2.01 - 1.59) and ack["target_reachable"] is False
    fast = floor.lone_overhead_floor(0.45, 1.71, 1.44, 0.05, None, 1.43, 1.0, bare_engine_overhead_ms=0.60)
    assert fast["floor_ms"] == pytest.approx(0.65) and fast["target_reachable"] is True
    above = floor.lone_overhead_floor(0.45, 1.71, 1.44, 0.05, None, 1.43, 1.0, bare_engine_overhead_ms=0.96)
    assert above["summed_floor_ms"] == pytest.approx(0.77) and above["target_reachable"] is False  # 1.01 measured


def test_saturation_ceiling_is_the_cores_over_engine_and_generator_cpu_per_text():
    ceiling = floor.saturation_ceiling(cores=2, engine_cpu_ms_per_text=2.07, generator_cpu_ms_per_text=0.27,
                                       raw_length_sorted_cpu_ms_per_text=1.90,
                                       raw_length_sorted_beside_texts_per_s=1050.0, measured_fraction=0.53,
                                       target=0.80)
    assert ceiling["ceiling_texts_per_s"] == pytest.approx(2000 / 2.34)
    assert ceiling["fraction_of_raw_length_sorted"] == pytest.approx(1.90 / 2.34)
    assert ceiling["fraction_of_raw_beside"] == pytest.approx(2000 / 2.34 / 1050)
    assert ceiling["target_reachable"] is True  # 0.81 >= 0.80
    assert ceiling["own_cpu_budget_ms_per_text"] == pytest.approx(1.90 / 0.80 - 2.34)
    assert math.isnan(ceiling["own_cpu_ms_per_text"])  # the server's CPU not given
    slower = floor.saturation_ceiling(2, 2.10, 0.30, 1.90, 1050.0, 0.53, 0.80)
    assert slower["fraction_of_raw_length_sorted"] == pytest.approx(1.90 / 2.40)
    assert slower["target_reachable"] is False  # 0.79
    assert slower["own_cpu_budget_ms_per_text"] < 0  # no room left for any server code
    served = floor.saturation_ceiling(2, 2.07, 0.27, 1.90, 1050.0, 0.53, 0.80, server_cpu_ms_per_text=2.60)
    assert served["own_cpu_ms_per_text"] == pytest.approx(2.60 - 2.07)
    assert floor.saturation_ceiling(2, math.nan, 0.27, math.nan, 1050.0, 0.53, 0.80)["target_reachable"] is None


@pytest.mark.parametrize("mean", [1.0, 8.7, 17.25, 0.4])
def test_batch_sizes_average_the_servers_texts_per_batch(mean):
    sizes = floor.batch_sizes(mean, 872)
    assert sum(sizes) == 872 and min(sizes) >= 1
    full = sizes[:-1]  # the last one takes what is left
    assert set(full) <= {max(1, math.floor(mean)), max(1, math.ceil(mean))}
    assert sum(full) / len(full) == pytest.approx(max(mean, 1.0), abs=0.05)


def test_server_like_batches_keep_the_rows_and_reach_the_servers_padding():
    rng = random.Random(3)
    rows = sorted((np.arange(1, rng.randint(3, 40) + 1, dtype=np.int64) for _ in range(300)), key=len)
    batches = floor.server_like_batches(rows, texts_per_batch=6.5, padded_per_real_token=1.3, max_length=64)
    assert floor.composition(batches[:-1])["texts_per_batch"] == pytest.approx(6.5, abs=0.05)
    shape = floor.composition(batches)
    assert shape["padded_per_real_token"] == pytest.approx(1.3, abs=0.02)  # to the nearest whole column
    kept = [ids[i, :mask[i].sum()] for ids, mask in batches for i in range(len(ids))]
    assert all(np.array_equal(a, b) for a, b in zip(kept, rows, strict=True))  # same rows, same order, unpadded
    assert all(not ids[mask == 0].any() for ids, mask in batches)  # padding is the pad id, masked out
    capped = floor.server_like_batches(rows, 6.5, 10.0, max_length=64)
    assert max(ids.shape[1] for ids, _ in capped) == 64  # never wider than the model takes


def test_engine_call_p50s_idles_the_gap_before_each_call_and_blocks_in_turn():
    calls: list[tuple[float, float]] = []
    gaps = [0.0, 0.003]

    def call() -> None:
        calls.append((time.perf_counter(), time.perf_counter()))

    p50s = floor.engine_call_p50s(call, gaps, rounds=2, block=4)
    assert len(p50s) == 2 and all(p >= 0 for p in p50s)
    assert len(calls) == (2 + 1) * 2 * 4  # a warm-up round, then two kept, each a block per gap
    for round_ in range(3):
        idle_block = calls[round_ * 8 + 4: round_ * 8 + 8]
        previous = calls[round_ * 8 + 3: round_ * 8 + 7]
        assert all(start - before[1] >= 0.003 for (start, _), before in zip(idle_block, previous, strict=True))


def test_engine_cpu_ms_per_text_counts_cpu_per_text_of_each_set():
    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """2 ms of this thread's CPU per batch, whatever its size."""
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    one, two = (np.zeros((1, 4)), np.zeros((1, 4))), (np.zeros((2, 4)), np.zeros((2, 4)))
    cpu = floor.engine_cpu_ms_per_text(run, {"one per batch": [one], "two per batch": [two]}, callers=1,
                                       seconds=0.2, rounds=1)
    assert cpu["one per batch"] >= 2.0 and cpu["two per batch"] >= 1.0
    assert 1.5 < cpu["one per batch"] / cpu["two per batch"] < 2.6


def lone_requests_to(server, count: int) -> list:
    """``count`` lone requests through bench_server's client, then the server stopped (it must stop cleanly)."""
    async def lone_requests() -> list:
        client = Client(server.url, max_connections=4)
        try:
            return [await client.request("/predict", Draw(["a charming film"], [1], 0), time.perf_counter())
                    for _ in range(count)]
        finally:
            await client.close()

    try:
        return asyncio.run(asyncio.wait_for(lone_requests(), 60))
    finally:
        assert stop_server(server) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal


def test_transport_smoke_a_bare_asgi_app_answers_the_lone_requests_client(tmp_path):
    samples = lone_requests_to(floor.start_bare_server(tmp_path), 20)
    assert all(sample.ok and sample.correct == 1 for sample in samples)  # parsed and scored like /predict's answer
    assert all(sample.latency > 0 for sample in samples)


def test_a_bare_app_with_the_engine_runs_one_engine_call_per_request(tmp_path, tiny_artifact):
    """``bare_engine_app`` answers as ``bare_app`` does, after the call on its worker thread; and the subprocess
    built from an artifact answers the lone requests' client."""
    calls = []
    app = floor.bare_engine_app(lambda: calls.append(threading.current_thread().name))

    async def one_request() -> list[dict]:
        sent, body = [], [{"type": "http.request", "body": b'{"text": "x"}', "more_body": False}]

        async def receive() -> dict:
            return body.pop()

        async def send(message: dict) -> None:
            sent.append(message)

        await app({"type": "http"}, receive, send)
        return sent

    sent = asyncio.run(one_request())
    assert sent[0]["status"] == 200 and sent[1]["body"] == floor.BARE_RESPONSE
    assert len(calls) == 1 and calls[0].startswith("engine")  # on the worker thread, not the loop

    samples = lone_requests_to(floor.start_bare_server(tmp_path, engine=(tiny_artifact, "a charming film")), 10)
    assert all(sample.ok for sample in samples)


def test_fsync_smoke_appends_and_syncs_in_the_directory_and_cleans_up(tmp_path):
    with floor.fsync_probe(tmp_path, size=300) as append:
        took = [append() for _ in range(20)]
        (probe,) = tmp_path.iterdir()
        assert probe.stat().st_size == 20 * 300 and probe.read_bytes().count(b"\n") == 20
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert all(0 < ms < 10_000 for ms in took)  # each call says what its sync took, in ms


def test_the_fsync_probe_runs_what_precedes_the_sync_untimed(tmp_path):
    """As in the server, the sync follows the lone engine call (``before``), whose time is not the sync's."""
    calls = []
    with floor.fsync_probe(tmp_path, before=lambda: (calls.append(1), time.sleep(0.2))) as append:
        took = append()
    assert calls == [1] and took < 200  # the sleep timed would make it 200 or more
