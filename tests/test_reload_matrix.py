"""Reload matrix: every broken artifact is refused with 409 and its reason, logged at ERROR and counted as failed,
while the server goes on serving the model it had; SIGHUP reloads are logged and counted the same way."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scripts.benchlib.serverproc import ROOT, LiveServer, start_server, stop_server
from server import runtime
from server.app import create_app
from server.artifact import TOKENIZER
from server.budget import MemoryDoesNotFit, TokenBudget
from server.cache import PredictionCache
from server.memory import MemoryGuard, process_rss_bytes
from server.metrics import Metrics
from server.primitives import Draining
from server.services import OverdueLoad
from tests.broken_artifacts import (
    BREAKERS,
    broken_copy,
    copy_artifact,
    edit_manifest,
    manifest_not_object,
    manifest_of,
    rehash,
    write_manifest,
)
from tests.waiting import wait_for

FAILED = 'sentiment_model_reloads_total{result="failed"}'
DONE = 'sentiment_model_reloads_total{result="ok"}'
REFUSED = 'sentiment_model_reloads_total{result="refused"}'


@dataclass
class AdminServer:
    server: LiveServer
    client: httpx.Client

    def metric(self, sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", self.client.get("/metrics").text, re.M)
        return float(match.group(1)) if match else 0.0

    def serving_version(self) -> str:
        response = self.client.post("/predict", json={"text": "a wonderful, moving film"})
        assert response.status_code == 200, response.text
        return response.json()["model"]["version"]


def admin_key(database_url: str) -> str:
    """An admin API key, made with the operators' own command."""
    done = subprocess.run([sys.executable, "-m", "server.cli", "keys", "create", "--name", "reload-matrix",
                           "--role", "admin"], env={"DATABASE_URL": database_url, "PATH": ""}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].strip()


@pytest.fixture(scope="module")
def admin_server(tiny_artifact, tmp_path_factory) -> Iterator[AdminServer]:
    tmp = tmp_path_factory.mktemp("reload")
    database_url = f"sqlite:///{tmp}/reload.db"
    key = admin_key(database_url)
    server = start_server({"MODEL_PATH": str(copy_artifact(tiny_artifact, tmp / "serving")),
                           "DATABASE_URL": database_url}, tmp)
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        yield AdminServer(server, client)
    stop_server(server)


def test_every_broken_artifact_is_refused_logged_and_counted(admin_server, tiny_artifact, tmp_path):
    version = admin_server.serving_version()
    failed_before = admin_server.metric(FAILED)
    paths = {}
    for name in BREAKERS:
        broken = paths[name] = broken_copy(tiny_artifact, tmp_path, name)
        response = admin_server.client.post("/admin/reload", json={"model_path": str(broken)})
        assert response.status_code == 409, f"{name}: {response.status_code} {response.text}"
        body = response.json()
        assert body["reloaded"] is False and body["type"] == "model_reload_failed", body
        assert body["serving"]["version"] == version, body
        assert admin_server.serving_version() == version, name
    assert admin_server.metric(FAILED) - failed_before == len(BREAKERS)
    assert admin_server.metric(DONE) == 0
    log = admin_server.server.log()
    for name, broken in paths.items():
        lines = [line for line in log.splitlines()
                 if " ERROR server.services " in line and f": model reload from {broken} failed" in line]
        assert len(lines) == 1 and "still serving tiny-test" in lines[0], f"{name}:\n{log[-3000:]}"
    assert "Traceback" not in log
    assert admin_server.client.get("/health").json()["status"] == "ok"  # MODEL_PATH is fine: a restart would start


@pytest.mark.parametrize("breaker, reason", [
    ("manifest_not_utf8", "UTF-8"), ("manifest_not_object", "not an object"),
    ("file_entry_without_sha256", "sha256"), ("variants_a_list", "variants"),
    ("max_length_not_a_number", "max_sequence_length"), ("max_length_zero", "max_sequence_length"),
    ("max_length_two", "leaves no room for a text's own tokens"),
    ("max_length_huge", "max_sequence_length"), ("max_length_beyond_the_model", "max_sequence_length"),
    ("tokenizer_empty_object", "tokenizer.json"), ("rehashed_nan_weights", "non-finite"),
    ("tokenizer_beyond_the_embeddings", "gives token ids up to 30522, which the model cannot run"),
    ("tokenizer_word_beyond_the_embeddings", "gives token ids up to 40000, which the model cannot run"),
    ("garbage_onnx", "model.int8.onnx"), ("wrong_outputs", "shape"), ("unknown_variant", "fp64"),
    ("label_with_a_line_break", "control character"), ("too_many_labels", "at most 64"),
    ("tokenizer_a_fifo", "tokenizer.json is not a regular file"), ("manifest_a_fifo", "not a regular file"),
    ("manifest_huge", "model manifest too large"),
    ("wrong_bytes", "in manifest.json (restore it or rebuild; a manifest edited by hand: correct its bytes)"),
])
def test_the_409_names_the_reason(admin_server, tiny_artifact, tmp_path, breaker, reason):
    """The cases that answered 500 or an unlogged 503 before: now each 409 says what is wrong."""
    response = admin_server.client.post("/admin/reload", json={"model_path": str(broken_copy(
        tiny_artifact, tmp_path, breaker))})
    assert response.status_code == 409 and reason in response.json()["error"], response.text


def test_a_good_artifact_still_reloads_after_the_failures(admin_server, tiny_artifact):
    done = admin_server.metric(DONE)
    response = admin_server.client.post("/admin/reload", json={"model_path": str(tiny_artifact)})
    assert response.status_code == 200 and response.json()["reloaded"] is True, response.text
    assert admin_server.metric(DONE) == done + 1


def test_a_failed_sighup_reload_is_logged_and_counted(tiny_artifact, tmp_path):
    model = copy_artifact(tiny_artifact, tmp_path / "model")
    server = start_server({"MODEL_PATH": str(model)}, tmp_path)
    try:
        manifest_not_object(model)  # what used to escape the reload as a 500, unlogged when it came by SIGHUP
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        failed = 0.0
        while time.monotonic() < deadline:
            match = re.search(rf"^{re.escape(FAILED)} (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
            failed = float(match.group(1)) if match else 0.0
            if failed:
                break
            time.sleep(0.1)
        assert failed == 1
        assert httpx.post(server.url + "/predict", json={"text": "still serving"}).status_code == 200
        # MODEL_PATH itself is broken: a restart would not start, which /health said nothing of (red team helper-89)
        health = httpx.get(server.url + "/health").json()
        said = [r for r in health["reasons"] if r.startswith(f"model: MODEL_PATH {model} failed to reload at ")]
        assert health["status"] == "degraded" and len(said) == 1 and "a restart would not start" in said[0], health
        shutil.rmtree(model)
        copy_artifact(tiny_artifact, model)  # mended
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: httpx.get(server.url + "/health").json()["status"] == "ok", "the mended reload", timeout=60)
    finally:
        assert stop_server(server) == 0
    errors = [line for line in server.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "model reload from" in errors[0] and "not an object" in errors[0], errors


async def test_reload_tasks_are_dropped_when_done_and_the_memory_guard_follows_the_new_model(make_settings):
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        services = app.state.services
        background = len(services._tasks)
        first = services.runtime
        assert (await services.reload())["reloaded"] is True
        assert services.runtime is not first
        guard = services.memory_guard  # no await below until pressure is lifted: its own loop cannot interleave
        guard._set_pressure(True)
        assert services.runtime.budget.memory_pressure and not first.budget.memory_pressure
        guard._set_pressure(False)
        assert not services.runtime.budget.memory_pressure
        services.reload_in_background()
        for _ in range(600):  # the SIGHUP task, then its retire task, finish and are dropped
            if len(services._tasks) == background:
                break
            await asyncio.sleep(0.05)
        assert len(services._tasks) == background


class ShutAfterStart:
    """The engine of the model served at start-up, which holds every call while ``open`` is cleared."""

    def __init__(self, engine) -> None:
        self.engine, self.device, self.provider, self.variant = engine, engine.device, engine.provider, engine.variant
        self.open = threading.Event()
        self.open.set()

    def run(self, input_ids, attention_mask):
        self.open.wait(60)
        return self.engine.run(input_ids, attention_mask)


def app_holding_its_first_engine(make_settings, **overrides) -> tuple[FastAPI, list[ShutAfterStart]]:
    """An app whose engines are each wrapped in ``ShutAfterStart`` (the first model's is ``held[0]``), one text per
    batch on one worker: held, it runs one text and queues the rest."""
    held: list[ShutAfterStart] = []
    app = create_app(make_settings(engine_workers=1, max_batch_size=1, max_wait_ms=0, enable_model_caching=False,
                                   **overrides),
                     wrap_engine=lambda engine: held.append(ShutAfterStart(engine)) or held[-1])
    return app, held


async def five_queued_on_the_held_first_model(services, engine: ShutAfterStart) -> list[asyncio.Task]:
    """Six one-text predictions: one in the held engine call, five queued behind it."""
    engine.open.clear()
    asking = [asyncio.create_task(services.predictor.predict([f"text number {i}"])) for i in range(6)]
    for _ in range(3000):
        if services.runtime.batcher.depth == 5:
            break
        await asyncio.sleep(0.01)
    assert services.runtime.batcher.depth == 5
    return asking


async def test_texts_a_reloads_previous_model_still_has_queued_count_in_the_queue_depth(make_settings):
    """After a swap, texts the previous model took are answered by it while it drains (up to REQUEST_TIMEOUT_S):
    the queue's gauge and /health counted the serving model's queue only, so a full queue read empty."""
    app, held = app_holding_its_first_engine(make_settings)
    async with app.router.lifespan_context(app):
        services = app.state.services
        first, engine = services.runtime, held[0]
        asking = await five_queued_on_the_held_first_model(services, engine)
        try:
            assert (await services.reload())["reloaded"] is True
            assert services.runtime is not first and services.runtime.batcher.depth == 0
            services.refresh_gauges()
            assert services.metrics.queue_depth._value.get() == 5
            assert services.health()["queue_depth"] == 5
        finally:
            engine.open.set()
        assert len(await asyncio.gather(*asking)) == len(asking)
        for _ in range(600):  # the previous model drained and let go
            if not services._retiring:
                break
            await asyncio.sleep(0.05)
        services.refresh_gauges()
        assert not services._retiring and services.metrics.queue_depth._value.get() == 0


async def test_shutdown_fails_what_a_reloads_previous_model_has_not_answered_by_the_drain_deadline(make_settings):
    """Shutdown drained the serving model only and cancelled the previous model's own drain: the texts that model
    still held were neither answered nor failed at the drain's deadline (each caller waited on, past it)."""
    app, held = app_holding_its_first_engine(make_settings, drain_timeout_s=0.5)
    try:
        async with app.router.lifespan_context(app):
            services = app.state.services
            asking = await five_queued_on_the_held_first_model(services, held[0])
            assert (await services.reload())["reloaded"] is True
        # the lifespan's end closed the services: every caller has its answer, the engine still held
        outcomes = await asyncio.wait_for(asyncio.gather(*asking, return_exceptions=True), 5)
        assert [type(outcome) for outcome in outcomes] == [Draining] * len(asking), outcomes
    finally:
        for engine in held:
            engine.open.set()


def test_memory_guard_follow_applies_the_present_pressure_to_the_new_budget(make_settings):
    settings, metrics = make_settings(), Metrics()
    readings = {"rss": 95}
    old, new = TokenBudget(1000, metrics), TokenBudget(1000, metrics)
    guard = MemoryGuard(settings, metrics, PredictionCache(0, metrics), old,
                        rss_reader=lambda: readings["rss"], limit_reader=lambda: 100)
    assert guard.check() and old.current == 500
    guard.follow(new)
    assert new.current == 500
    readings["rss"] = 10
    assert not guard.check()
    assert new.current == 1000 and old.current == 500


def test_reload_of_a_path_that_is_not_a_directory_is_refused(admin_server, tmp_path):
    (tmp_path / "a-file").write_text("x")
    os.mkfifo(tmp_path / "a-fifo")
    (tmp_path / "a-loop").symlink_to(tmp_path / "a-loop")
    for path, said in ((tmp_path / "a-file", "a-file is a file, not a model directory"),
                       (tmp_path / "a-fifo", "a-fifo is a named pipe (FIFO), not a model directory"),  # "a file"
                       (tmp_path / "a-loop", "a-loop cannot be followed to a directory"),  # "cannot serve: Runtime..."
                       (tmp_path / "nowhere", "model directory not found"),
                       (Path("relative/nowhere"), "model directory not found")):
        response = admin_server.client.post("/admin/reload", json={"model_path": str(path)})
        assert response.status_code == 409 and said in response.json()["error"], response.text


def test_a_reload_asked_for_during_the_drain_is_refused_503_as_sighup_is_ignored(tiny_artifact, tmp_path):
    """A replica on its way out loads no model: the reload would hold the drain up by its load and warm-up."""
    database_url = f"sqlite:///{tmp_path}/drain.db"
    key = admin_key(database_url)
    server = start_server({"MODEL_PATH": str(tiny_artifact), "DATABASE_URL": database_url, "DRAIN_GRACE_S": "3"},
                          tmp_path)
    try:
        server.process.send_signal(signal.SIGTERM)  # the listener stays open DRAIN_GRACE_S
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/ready").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        response = httpx.post(server.url + "/admin/reload", json={"model_path": str(tiny_artifact)},
                              headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 503 and response.json()["type"] == "draining", response.text
        assert "no model reload" in response.json()["error"] and "Retry-After" in response.headers
    finally:
        stop_server(server)
    assert "model reloaded" not in server.log()


def slow_loads(services, monkeypatch) -> list[Path]:
    """Each model load takes 0.3 s more, so that reloads pile up behind it; returns the paths loaded, in order."""
    loads: list[Path] = []
    load = services._load_warm

    def slow_load(path: Path):
        loads.append(path)
        time.sleep(0.3)
        return load(path)

    monkeypatch.setattr(services, "_load_warm", slow_load)
    return loads


def test_a_storm_of_reloads_costs_two_loads_and_every_caller_gets_the_outcome(make_settings, monkeypatch):
    """One load under way, one queued behind it that every later request joins (the red-team's storm of 30 SIGHUPs
    and POSTs ran 30 loads in a row, 5.5 s of a core each with the default model)."""
    with TestClient(create_app(make_settings())) as client:
        services = client.app.state.services
        loads = slow_loads(services, monkeypatch)  # the storm arrives while one loads

        async def storm() -> list[dict]:
            return await asyncio.gather(*(services.reload() for _ in range(10)))

        outcomes = client.portal.call(storm)
        assert len(loads) == 2 and all(outcome["reloaded"] for outcome in outcomes)
        reloaded = client.get("/metrics").text
        assert f"{DONE} 2.0" in reloaded
        assert client.post("/predict", json={"text": "still serving"}).status_code == 200
        client.portal.call(services.reload)  # nothing queued any more: a later request loads again
        assert len(loads) == 3


def test_a_load_that_hangs_is_answered_at_reload_timeout_s_and_no_load_runs_beside_it(make_settings, monkeypatch,
                                                                                       caplog):
    """A load hung on its files or in the engine held the reload lock for good: every later POST and SIGHUP waited
    behind it without an answer. Now the reload answers 409 at ``RELOAD_TIMEOUT_S``; while that load still runs,
    reloads are refused at once (a second model's memory beside it is not planned for); once it ends its model is
    dropped and reloads load again."""
    with TestClient(create_app(make_settings(reload_timeout_s=0.5))) as client:
        services = client.app.state.services
        serving = services.runtime.identity
        release = threading.Event()
        load = services._load_warm
        loads: list[Path] = []

        def hung_load(path: Path):
            loads.append(path)
            if len(loads) == 1:
                release.wait(60)
            return load(path)

        monkeypatch.setattr(services, "_load_warm", hung_load)
        started = time.monotonic()
        first = client.portal.call(services.reload)
        assert time.monotonic() - started < 5 and not first["reloaded"], first
        assert "did not finish within RELOAD_TIMEOUT_S (0.5 s)" in first["error"] and first["serving"] == vars(serving)
        again = client.portal.call(services.reload)  # refused at once: the hung load still runs
        assert not again["reloaded"] and "still running past RELOAD_TIMEOUT_S" in again["error"], again
        metrics = client.get("/metrics").text  # a refusal tried nothing: not a failure an alert should count
        assert len(loads) == 1 and f"{FAILED} 1.0" in metrics and f"{REFUSED} 1.0" in metrics
        reasons = " ".join(client.get("/health").json()["reasons"])
        assert "MODEL_PATH" in reasons and "may hang loading it the same way" in reasons, reasons  # not "fix it"
        assert "did not finish within RELOAD_TIMEOUT_S" in reasons  # the refusal, which judged nothing, kept it
        assert "reload: the load of" in reasons and "reloads are refused until it ends" in reasons
        assert client.post("/predict", json={"text": "still serving"}).status_code == 200
        with caplog.at_level("WARNING", logger="server.services"):
            release.set()
            wait_for(lambda: services._overdue_load is None, timeout=60, what="the overdue load's end")
        assert "ended after" in caplog.text and "(loaded); its model is dropped" in caplog.text
        assert services.runtime.identity == serving  # what it loaded late was not swapped in
        assert client.get("/health").json()["reasons"] == []  # it loads, if slowly: a restart would start
        assert client.portal.call(services.reload)["reloaded"] and len(loads) == 2


def test_an_overdue_load_still_running_at_shutdown_is_not_logged_as_ended(make_settings, caplog):
    """The loop's end cancels its task: it was logged as "ended ... (loaded) ... reloads are taken again" while its
    thread still hung (red team helper-103)."""
    with TestClient(create_app(make_settings())) as client:
        services = client.app.state.services

        async def overdue_then_cancelled() -> None:
            load = asyncio.get_running_loop().create_future()
            services._overdue(OverdueLoad(load, services.settings.model_path, time.monotonic()))
            with caplog.at_level("WARNING"):
                load.cancel()
                await asyncio.sleep(0.05)

        client.portal.call(overdue_then_cancelled)
        assert services._overdue_load is None
        said = [r.getMessage() for r in caplog.records if r.name in ("server.services", "asyncio")]
        assert said == []  # no "ended", and no error raised in the callback


def test_an_artifact_claiming_the_serving_version_with_other_labels_is_refused(admin_server, tiny_artifact, tmp_path):
    """A manifest whose labels were edited by hand kept the version: records, feedback and the drift metrics before
    and after the reload carried the same version for two label mappings."""
    serving = admin_server.serving_version()
    swapped = copy_artifact(tiny_artifact, tmp_path / "swapped")
    manifest = manifest_of(swapped)
    manifest["labels"] = manifest["labels"][::-1]
    write_manifest(swapped, manifest)
    failed = admin_server.metric(FAILED)
    response = admin_server.client.post("/admin/reload", json={"model_path": str(swapped)})
    assert response.status_code == 409 and "give the artifact a new version" in response.json()["error"]
    assert admin_server.metric(FAILED) == failed + 1 and admin_server.serving_version() == serving

    manifest["version"] = f"{serving}-relabelled"
    write_manifest(swapped, manifest)
    response = admin_server.client.post("/admin/reload", json={"model_path": str(swapped)})
    assert response.status_code == 200 and admin_server.serving_version() == f"{serving}-relabelled"
    assert admin_server.client.post("/admin/reload", json={"model_path": str(tiny_artifact)}).status_code == 200


def test_a_version_served_before_comes_back_only_with_its_own_labels(admin_server, tiny_artifact, tmp_path):
    """The check compared only with the model serving: a reload to another model in between let a relabelled copy of
    the first one in, and the store then held that version's records under two label mappings."""
    serving = admin_server.serving_version()
    other = copy_artifact(tiny_artifact, tmp_path / "other")
    edit_manifest(other, lambda manifest: manifest.update(version=f"{serving}-between"))
    assert admin_server.client.post("/admin/reload", json={"model_path": str(other)}).status_code == 200
    relabelled = copy_artifact(tiny_artifact, tmp_path / "relabelled")
    edit_manifest(relabelled, lambda manifest: manifest.update(labels=manifest["labels"][::-1]))
    response = admin_server.client.post("/admin/reload", json={"model_path": str(relabelled)})
    assert response.status_code == 409 and f"version {serving!r}" in response.json()["error"], response.text
    assert "was served with labels" in response.json()["error"]
    assert admin_server.serving_version() == f"{serving}-between"
    # under another name it is another model: records and metrics tell them apart, and the cache goes by the load
    edit_manifest(relabelled, lambda manifest: manifest.update(name="another-name"))
    response = admin_server.client.post("/admin/reload", json={"model_path": str(relabelled)})
    assert response.status_code == 200 and admin_server.serving_version() == serving, response.text
    assert admin_server.client.post("/admin/reload", json={"model_path": str(tiny_artifact)}).status_code == 200


def test_reloads_queued_when_the_drain_begins_load_nothing(make_settings, monkeypatch):
    """Eight reloads queued before a SIGTERM swapped models seven times while the server drained, and used all of its
    time: the one under way finishes, the rest are refused 503 draining."""
    with TestClient(create_app(make_settings())) as client:
        services = client.app.state.services
        loads = slow_loads(services, monkeypatch)
        model = services.settings.model_path

        async def queue_then_drain() -> list:
            reloads = [asyncio.ensure_future(services.reload(str(model))) for _ in range(4)]
            await asyncio.sleep(0.1)  # the first is loading, the second waits for the lock, the others join it
            services.begin_drain()
            return await asyncio.gather(*reloads, return_exceptions=True)

        outcomes = client.portal.call(queue_then_drain)
        assert len(loads) == 1 and outcomes[0]["reloaded"] is True, outcomes
        assert all(isinstance(outcome, Draining) for outcome in outcomes[1:]), outcomes
        assert "no model reload" in outcomes[1].message


def test_a_reload_whose_load_ends_once_shutdown_has_begun_swaps_nothing_in(make_settings, monkeypatch):
    """Swapped in during ``close``, the new model missed the drain of the models ``close`` drains, and the reload
    answered "reloaded" to a server shutting down (review helper-101)."""
    with TestClient(create_app(make_settings())) as client:
        services = client.app.state.services
        slow_loads(services, monkeypatch)
        serving = services.runtime

        async def reload_then_close() -> BaseException | dict:
            reload = asyncio.ensure_future(services.reload())
            await asyncio.sleep(0.1)  # loading
            services.begin_drain()
            services.closing = True  # what ``close`` sets first
            return (await asyncio.gather(reload, return_exceptions=True))[0]

        outcome = client.portal.call(reload_then_close)
        assert isinstance(outcome, Draining) and services.runtime is serving, outcome


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_model_path_is_refused_not_read_as_the_configured_one(admin_server, path):
    response = admin_server.client.post("/admin/reload", json={"model_path": path})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request: model_path: is empty, which names no artifact: "
                                               "give the artifact's directory, or leave model_path out"), response.text


def test_a_model_path_holding_a_nul_is_422_not_a_failed_reload(admin_server):
    response = admin_server.client.post("/admin/reload", json={"model_path": "models/\u0000default"})
    assert response.status_code == 422 and "contains a NUL character" in response.json()["error"], response.text


def test_a_failed_reload_gives_back_the_memory_its_load_took(admin_server, tiny_artifact, tmp_path):
    """A tokenizer's many small allocations stayed with the process when a reload failed after loading it: a red
    team's 42 MB one left RSS 300 MiB up, the server degraded and every later reload refused for want of memory.
    Here an 8 MB one (400,000 words, ids the model cannot run): +56 MiB stayed before, ~2 MiB now."""
    big = copy_artifact(tiny_artifact, tmp_path / "big-tokenizer")
    tokenizer = json.loads((big / TOKENIZER).read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"zz{n}": len(vocab) + n for n in range(400_000)})
    (big / TOKENIZER).write_text(json.dumps(tokenizer))
    rehash(big, TOKENIZER)
    process = psutil.Process(admin_server.server.process.pid)
    before = process.memory_info().rss
    response = admin_server.client.post("/admin/reload", json={"model_path": str(big)})
    assert response.status_code == 409 and "which the model cannot run" in response.json()["error"], response.text
    # Given back on the server's loop just after the answer: beside two busy loops on both cores that took 0.4-0.6 s,
    # and a fixed 0.5 s wait read +62 MiB still held.
    deadline = time.monotonic() + 10
    while True:
        grown = (process.memory_info().rss - before) / 2**20
        if grown < 25 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert grown < 25, f"RSS {grown:.0f} MiB above what it was before the failed reload"


def test_a_tokenizer_too_large_for_the_memory_left_is_refused_before_it_loads(make_settings, tiny_artifact,
                                                                               monkeypatch):
    """Loading one takes 13-19 times its file's size, outside the memory plan: a 42 MB tokenizer took a reload
    under a 700 MiB limit to 925 MiB."""
    settings = make_settings(model_path=tiny_artifact)
    left = 100 << 20
    monkeypatch.setattr(runtime, "memory_limit_bytes",
                        lambda: (process_rss_bytes() + left) / settings.memory_high_water)
    monkeypatch.setattr(runtime, "TOKENIZER_LOAD_FACTOR", 200)  # the tiny tokenizer as one needing ~136 MiB
    with pytest.raises(MemoryDoesNotFit, match=r"tokenizer\.json \(1 MiB\) needs about 1\d\d MiB to load, and the "
                                               r"server has \d+ MiB left under MEMORY_HIGH_WATER"):
        runtime.load_checked(settings, Metrics(), warm=False)
    monkeypatch.setattr(runtime, "TOKENIZER_LOAD_FACTOR", 20)  # ~14 MiB: the memory plan judges it with the rest
    runtime.load_checked(settings, Metrics(), warm=False)


def test_an_oip_request_naming_a_version_is_not_answered_by_the_model_a_reload_swapped_in(admin_server, tiny_artifact,
                                                                                         tmp_path):
    """The model and version an OIP v2 request names were checked before its body arrived: a reload meanwhile had
    the next model answer it, in that model's labels and shape, as if it were the one asked for."""
    serving = admin_server.serving_version()
    other = copy_artifact(tiny_artifact, tmp_path / "other")
    edit_manifest(other, lambda manifest: manifest.update(version=f"{serving}-next"))
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]})
    host, port = admin_server.server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"POST /v2/models/tiny-test/versions/{serving}/infer HTTP/1.1\r\nHost: x\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body[:10]}".encode())
        try:
            assert admin_server.client.post("/admin/reload", json={"model_path": str(other)}).status_code == 200
            connection.sendall(body[10:].encode())
            answer = connection.makefile("rb").read1(65536).decode()
        finally:
            assert admin_server.client.post("/admin/reload", json={"model_path": str(tiny_artifact)}).status_code \
                == 200
    assert answer.startswith("HTTP/1.1 404"), answer
    assert "the model was replaced while this request ran" in answer and f"{serving}-next" in answer, answer
