"""The objects one app owns, built at start-up and closed at shutdown.

Start-up order: model (verified, warmed) -> cache -> store -> background
monitors. Shutdown: not ready -> drain the batcher (every accepted text
answered) -> flush the store -> stop monitors.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import idle_spin
from server.artifact import ArtifactError
from server.batcher import Batcher
from server.cache import PredictionCache
from server.config import Settings
from server.engine import EngineStartError, available_cores
from server.exitcodes import StartupError
from server.gpu import GpuMonitor
from server.heap import refreeze
from server.memory import MemoryGuard, trim_heap
from server.metrics import Metrics
from server.predictor import Predictor, model_key
from server.primitives import Draining, EngineStuck, KeysUnknown, ModelIdentity, ServerError
from server.runtime import ModelRuntime, load_checked
from server.worker_threads import on_own_thread

log = logging.getLogger(__name__)
STORE_CLOSE_MIN_S = 5.0  # the store's shutdown always gets this long, however little of the drain's time is left


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    predictor: Predictor
    cache: PredictionCache
    store: Any
    keys: Any
    memory_guard: MemoryGuard
    gpu: GpuMonitor
    draining: bool = False
    closing: bool = False  # ``close`` has begun: a model loaded from now on is not swapped in (``_reload_now``)
    drain_deadline: float | None = None  # time.monotonic() by which accepted requests must be answered
    # gRPC calls answered after the drain began, and abandoned at its deadline (HTTP's: server.connections)
    drain_answered: int = 0
    drain_abandoned: int = 0
    started_at: float = field(default_factory=time.time)
    # MODEL_PATH's own artifact failed its last reload: a restart would not start (/health says so until one passes)
    model_path_failed: str | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _queued_reloads: dict[Path, asyncio.Future] = field(default_factory=dict)  # waiting for the one under way
    # the labels of each model (name, version) this process has served: one comes back only with its own labels
    _served_labels: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _retiring: list[ModelRuntime] = field(default_factory=list)  # swapped out by a reload, answering what they took
    # the engines of models a reload swapped out whose drain left a worker in its call (no request waited for it);
    # weak: a call that ends lets its model go as ``_retire`` meant to
    _left_running: list[tuple[ModelIdentity, weakref.ref[Batcher]]] = field(default_factory=list)
    _overdue_load: OverdueLoad | None = None  # a reload's load still running past RELOAD_TIMEOUT_S

    @property
    def runtime(self) -> ModelRuntime:
        return self.predictor.runtime

    def start_background(self) -> None:
        self.runtime.batcher.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.memory_guard.run(5.0), name="memory-guard"))
        self._tasks.append(asyncio.get_running_loop().create_task(self.keys.run(), name="key-cache"))
        self.publish_model_info()
        idle_spin.start(self.settings.idle_spin_ms, available_cores())
        self.metrics.ready.set(1)

    def is_ready(self) -> bool:
        """Warm, and nothing in ``not_ready``: not draining, not every engine worker stuck on one batch, not keys
        required and none known."""
        return self.runtime.warm and self.not_ready() is None

    def not_ready(self) -> ServerError | None:
        """Why the readiness probes of every protocol answer 503, or None when ready. The port opens only once the
        model is warm, so it is draining, a stuck engine, or keys required and none known."""
        if self.draining:
            return Draining("not ready: draining for shutdown")
        if self.engine_stuck()[0]:
            return EngineStuck("not ready: every engine worker is stuck on one batch (see /health)")
        if reason := self.keys_unknown():
            return KeysUnknown(f"not ready: {reason}")
        return None

    def keys_unknown(self) -> str | None:
        """Why no prediction can be answered for want of API keys, or None. A replica started while the database was
        down, with no key snapshot in SPOOL_DIR (a new one: scaled out in the outage, an emptyDir after a restart),
        said ready and refused every keyed request 503 ``key_check_unavailable`` (red team helper-99)."""
        if self.settings.auth_mode != "required" or self.keys.loaded:
            return None
        return ("AUTH_MODE=required and no API key is known yet: the database that holds them cannot be read and "
                "SPOOL_DIR holds no key snapshot of it that can be used (the log says why, when one is there: "
                "another database's, unreadable, not a file); every prediction would be refused until it can be read "
                "(the server is ready within a second of reading it)")

    def engine_stuck(self) -> tuple[bool, str | None]:
        """(every engine worker stuck, why: for /health) after one batch ran past ``REQUEST_TIMEOUT_S``, which no
        request waits for: requests then time out (503 ``deadline``) while the server said ok and ready."""
        batcher = self.runtime.batcher
        stuck, longest = batcher.stuck_workers(self.settings.request_timeout_s)
        if not stuck:
            return False, None
        return stuck == batcher.workers, (
            f"engine: {stuck} of {batcher.workers} engine workers on one batch for more than REQUEST_TIMEOUT_S "
            f"({longest:.0f} s): the engine may be stuck; requests time out (503 deadline) meanwhile"
            + ("; not ready" if stuck == batcher.workers else "") + ". Restart the instance if it does not end")

    def retired_engines_stuck(self) -> list[str]:
        """/health's reasons for models a reload swapped out whose engine workers are still on one batch past
        REQUEST_TIMEOUT_S, draining or left in their call by a drain that gave up (``_retire``): such a call holds
        its model's threads and memory, and on a GPU its device memory, while the serving model answers, and /health
        said ok (not a readiness matter: the serving model's workers are free)."""
        left = [(identity, batcher) for identity, ref in self._left_running if (batcher := ref()) is not None]
        self._left_running = [(identity, weakref.ref(batcher)) for identity, batcher in left
                              if batcher.stuck_workers(0.0)[0]]
        reasons = []
        engines = [(runtime.identity, runtime.batcher) for runtime in self._retiring] + left
        for identity, batcher in engines:
            stuck, longest = batcher.stuck_workers(self.settings.request_timeout_s)
            if stuck:
                reasons.append(f"engine: {identity.name} {identity.version}, swapped out by a reload, has {stuck} "
                               f"engine worker{'s' if stuck > 1 else ''} on one batch for more than "
                               f"REQUEST_TIMEOUT_S ({longest:.0f} s): its threads and memory are held until the call "
                               "ends (the serving model answers). Restart the instance if it does not end")
        return reasons

    def begin_drain(self, deadline: float | None = None) -> None:
        """Not ready from now on (/ready and new /predict answer 503).

        ``deadline`` (``time.monotonic()``) is when requests under way must have been answered; without one,
        DRAIN_TIMEOUT_S from the first call.
        """
        if not self.draining:
            log.info("draining: not ready, finishing accepted requests")
        self.draining = True
        self.metrics.ready.set(0)
        if deadline is not None:
            self.drain_deadline = deadline
        elif self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s

    async def close(self) -> None:
        """Answer what the batchers accepted (until the drain deadline), stop the monitors, close the store.

        The store gets the time left until the deadline, and at least ``STORE_CLOSE_MIN_S``: even after a drain
        that used all its time, what it holds is written or spooled rather than lost.
        """
        self.begin_drain()
        self.closing = True
        # with the models a reload swapped out and still answering: cancelling their own drain (``_retire``) left
        # their queued texts to no deadline, unanswered and unfailed
        left = self._time_left()
        await asyncio.gather(*(runtime.batcher.drain(timeout=left) for runtime in (self.runtime, *self._retiring)))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.keys.close()
        self.predictor.close()
        await self.store.close(max(self._time_left(), STORE_CLOSE_MIN_S))
        self.gpu.close()
        idle_spin.stop()

    def _time_left(self) -> float:
        return max(0.0, self.drain_deadline - time.monotonic())

    def publish_model_info(self) -> None:
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(**vars(self.runtime.identity)).set(1)

    def refresh_gauges(self) -> None:
        """Gauges sampled at scrape time (memory, GPU, the engine's queue, the store). The queue's and the store's
        were set at each change, ~10 sets on the event loop per lone request. Memory figures that cannot be read
        keep their last values (the guard's own checks log why): a scrape still answers."""
        with contextlib.suppress(OSError):
            self.memory_guard.check()
        self.gpu.update()
        self.metrics.queue_depth.set(self.queue_depth())
        self.store.state.publish()
        if self.runtime.warm:  # sentiment_ready says what /ready says: a stuck engine too
            self.metrics.ready.set(1 if self.is_ready() else 0)

    def queue_depth(self) -> int:
        """Texts waiting for an engine: the serving model's, and those a reload's previous model took before the
        swap and still has to answer (its drain may take up to REQUEST_TIMEOUT_S; they were not counted)."""
        return self.runtime.batcher.depth + sum(runtime.batcher.depth for runtime in self._retiring)

    def health(self) -> dict[str, Any]:
        database = self.store.health()
        reasons = []
        if database.get("status") != "ok":
            reasons.append(f"database: {database.get('reason', 'unavailable')}")
        if self.memory_guard.under_pressure:
            reasons.append("memory: above the high-water mark, cache shedding")
        if outgrown := self.memory_guard.plan_outgrown():
            reasons.append(f"memory: {outgrown}")
        memory = self.memory_guard.describe()
        if "unreadable" in memory:
            reasons.append(f"memory: the figures cannot be read ({memory['unreadable']})")
        if self.draining:
            reasons.append("draining")
        if stuck := self.engine_stuck()[1]:
            reasons.append(stuck)
        reasons += self.retired_engines_stuck()
        if keys := self.keys_unknown():
            reasons.append(f"keys: {keys}")
        if snapshot := self.keys.snapshot_trouble:  # only /health knew nothing of it (red team helper-104)
            reasons.append(f"keys: {snapshot}")
        if self.settings.auth_mode == "required" and self.keys.cannot_read and not keys:
            # every prediction needs a key then, and /health said ok meanwhile (red team helper-106)
            reasons.append("keys: the API keys cannot be read from the database (the log says why): keys this server "
                           "knows are judged from its cache, one it does not know is answered 503 "
                           "key_check_unavailable until they can")
        if self.model_path_failed:
            reasons.append(self.model_path_failed)
        if overdue := self._overdue_load:
            reasons.append(f"reload: the load of {overdue.path} has run {time.monotonic() - overdue.started:.0f} s, "
                           "past RELOAD_TIMEOUT_S (its files or the engine may hang); reloads are refused until it "
                           "ends (restart the instance if it does not)")
        identity = self.runtime.identity
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "model": {**vars(identity), "labels": self.runtime.labels(), "warm": self.runtime.warm},
            "device": identity.device,
            "provider": identity.provider,
            "queue_depth": self.queue_depth(),
            "token_budget": self.runtime.budget.current,
            "memory": memory,
            "cache": {"enabled": self.cache.max_bytes > 0, "entries": self.cache.entries,
                      "bytes": self.cache.bytes, "max_bytes": self.cache.max_bytes},
            "database": database,
            "idle_spin": idle_spin.describe(),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def reload_in_background(self) -> None:
        """SIGHUP: reload MODEL_PATH. ``reload`` logs and counts the outcome, as for POST /admin/reload; the task
        is kept until it finishes so it cannot be garbage-collected mid-way."""
        self._keep_until_done(asyncio.get_running_loop().create_task(self._reload_in_background(), name="reload"))

    async def reload(self, model_path: str | None = None) -> dict[str, Any]:
        """Load, verify, warm and smoke-test a new model; swap it in only if all of that succeeds.

        Every failure, whatever raised it, leaves the serving model in place, is logged at ERROR, counted in
        ``sentiment_model_reloads_total{result="failed"}`` and returned with its reason (answered 409).

        Reloads run one at a time. A reload of a path that already has one waiting behind the reload under way
        joins that one and gets its outcome: a storm of SIGHUPs or POSTs costs two loads, not one each (5.5 s of a
        core each for the default model; the red-team's storm of 30 ran 30 in a row). The one under way is not
        joined: the files may have changed since it read them.
        """
        self._refuse_reload_while_draining()
        path = Path(model_path) if model_path is not None else self.settings.model_path
        if self._overdue_load is not None:
            return self._refuse_while_overdue(path)
        queued = self._queued_reloads.get(path)
        if queued is not None:
            return await asyncio.shield(queued)
        outcome = self._queued_reloads[path] = asyncio.get_running_loop().create_future()
        try:
            async with self._reload_lock:
                del self._queued_reloads[path]  # under way: a later request queues a load of its own
                self._refuse_reload_while_draining()  # queued behind one that ran into the drain
                result = await self._reload_now(path) if self._overdue_load is None else \
                    self._refuse_while_overdue(path)
        except BaseException as exc:  # cancelled while waiting or loading: those who joined learn it too
            if self._queued_reloads.get(path) is outcome:
                del self._queued_reloads[path]
            outcome.set_exception(exc)
            outcome.exception()  # marked retrieved: no one may be left to await it
            raise
        outcome.set_result(result)
        return result

    def _refuse_reload_while_draining(self) -> None:
        """A replica on its way out loads no model: the drain would wait for it (a red team's eight queued reloads
        swapped models seven times while draining and used all of its time)."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("the server is draining for shutdown: no model reload; reload the replica that replaces "
                           "it")

    async def _reload_in_background(self) -> None:
        try:
            await self.reload()
        except Draining:
            log.info("model reload (SIGHUP) dropped: the server is draining for shutdown")

    async def _reload_now(self, path: Path) -> dict[str, Any]:
        old, loop = self.runtime.identity, asyncio.get_running_loop()
        log.info("model reload from %s: loading (serving %s %s meanwhile)", path, old.name, old.version)
        started = time.monotonic()
        load = asyncio.ensure_future(on_own_thread(self._load_warm, path, name="model-reload"))
        try:
            try:
                fresh = await asyncio.wait_for(asyncio.shield(load), self.settings.reload_timeout_s)
            except TimeoutError:
                self._overdue(OverdueLoad(load, path, started))
                raise ReloadOverdue(f"the load of {path} did not finish within RELOAD_TIMEOUT_S "
                                    f"({self.settings.reload_timeout_s:g} s): its files or the engine may hang; it "
                                    "goes on in the background, and reloads are refused until it ends (its model is "
                                    "then dropped), or restart the server") from None
            self._served_labels.setdefault(model_key(self.runtime), self.runtime.labels())
            same_model_other_labels(self._served_labels, fresh)
        except Exception as exc:
            return self._reload_failed(path, old, exc)
        except asyncio.CancelledError:  # shutdown (``close``) cancels a SIGHUP's reload; the load is then dropped
            log.warning("model reload from %s abandoned: the server is shutting down (still serving %s %s)", path,
                        old.name, old.version)
            load.cancel()  # shielded from the cancel: what it loads is not waited for, nor its error reported
            raise
        if self.closing:  # swapped in now, it would miss the drain of the models ``close`` is draining
            log.warning("model reload from %s dropped: the server began shutting down while it loaded (still "
                        "serving %s %s)", path, old.name, old.version)
            self._refuse_reload_while_draining()
        fresh.batcher.start()
        self._served_labels.setdefault(model_key(fresh), fresh.labels())
        previous = self.predictor.swap(fresh)
        self.memory_guard.follow(fresh.budget)
        self.publish_model_info()
        self._retiring.append(previous)
        self._keep_until_done(loop.create_task(self._retire(previous), name="retire-previous-model"))
        self.metrics.model_reloads.labels("ok").inc()
        if path == self.settings.model_path:
            self.model_path_failed = None
        log.info("model reloaded from %s: %s %s -> %s %s", path, old.name, old.version,
                 fresh.identity.name, fresh.identity.version)
        return {"reloaded": True, "serving": vars(fresh.identity), "previous": vars(old)}

    def _reload_failed(self, path: Path, old: ModelIdentity, exc: Exception) -> dict[str, Any]:
        """Count and log a failed reload; an exception ``load_checked`` did not already explain gets a traceback
        too, since only a bug in the server can raise one."""
        self.metrics.model_reloads.labels("failed").inc()
        asyncio.get_running_loop().call_soon(release_failed_load)  # once ``exc`` and its frames are let go
        # StartupError: MemoryDoesNotFit
        expected = isinstance(exc, ArtifactError | EngineStartError | StartupError | ReloadOverdue)
        reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        self._note_model_path_failed(path, exc, reason)
        log.error("model reload from %s failed, still serving %s %s: %s", path, old.name, old.version, reason,
                  exc_info=None if expected else exc)
        return {"reloaded": False, "error": f"model reload failed, still serving {old.name} {old.version}: {reason}",
                "type": "model_reload_failed", "serving": vars(old)}

    def _note_model_path_failed(self, path: Path, exc: BaseException, reason: str) -> None:
        """/health's reason after ``MODEL_PATH`` itself failed to reload, a SIGHUP's: after a failed reload /health
        said ok, the pod then failing to start at its next restart (red team helper-89)."""
        if path != self.settings.model_path:
            return
        old = self.runtime.identity
        outlook = "a restart may hang loading it the same way: look at its storage" if isinstance(exc, ReloadOverdue) \
            else "a restart would not start: fix the artifact"
        self.model_path_failed = (f"model: MODEL_PATH {path} failed to reload at "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} ({reason[:300]}); still "
                                  f"serving {old.name} {old.version}, but {outlook}, then reload")

    def _overdue(self, overdue: OverdueLoad) -> None:
        """A load past RELOAD_TIMEOUT_S: its thread cannot be stopped, and a second load beside it would hold a
        second model's memory where the memory plan has room for one, so reloads are refused until it ends. What
        it loaded is dropped then; the next reload loads afresh. A load that hung (an artifact on a stalled network
        file system, a warm-up hung in the engine) held the reload lock for good: every later reload and SIGHUP
        waited behind it, their callers without an answer."""
        self._overdue_load, path = overdue, overdue.path

        def ended(done: asyncio.Future) -> None:
            self._overdue_load = None
            if done.cancelled():  # the loop's end, at shutdown: it did not end (the exit names its thread)
                return
            error = done.exception()
            log.warning("model reload from %s ended after %.0f s, past its RELOAD_TIMEOUT_S (%s); its model is "
                        "dropped and reloads are taken again", path, time.monotonic() - overdue.started,
                        f"failed: {error}"[:300] if error else "loaded")
            if error is not None:
                self._note_model_path_failed(path, error, str(error))
            elif path == self.settings.model_path:
                self.model_path_failed = None  # it loads, if slowly: a restart would start
            asyncio.get_running_loop().call_soon(release_failed_load)

        overdue.task.add_done_callback(ended)

    def _refuse_while_overdue(self, path: Path) -> dict[str, Any]:
        """A reload refused, loading nothing, while an overdue load runs: counted ``refused``, not ``failed`` (an
        alert on failed reloads fired for each of a storm of SIGHUPs that tried nothing: red team helper-103)."""
        self.metrics.model_reloads.labels("refused").inc()
        old = self.runtime.identity
        reason = (f"the load of {self._overdue_load.path} is still running past RELOAD_TIMEOUT_S (its files or the "
                  "engine may hang); no other load runs beside it: reload again once it ends (logged), or restart "
                  "the server")
        log.warning("model reload from %s refused, still serving %s %s: %s", path, old.name, old.version, reason)
        return {"reloaded": False, "error": f"model reload refused, still serving {old.name} {old.version}: {reason}",
                "type": "model_reload_failed", "serving": vars(old)}

    def _keep_until_done(self, task: asyncio.Task) -> None:
        """Hold a reference to ``task`` while it runs and drop it when done, so repeated reloads do not pile up."""
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)

    async def _retire(self, runtime: ModelRuntime) -> None:
        """Answer everything the previous model accepted, then collect it (see server/heap.py)."""
        try:
            await self.predictor.finished_with(runtime)
            await runtime.batcher.drain()
            if runtime.batcher.stuck_workers(0.0)[0]:  # a call no request waits for, left running (``drain``)
                self._left_running.append((runtime.identity, weakref.ref(runtime.batcher)))
        finally:  # cancelled by ``close`` too: the list must not hold the model for the process's life
            self._retiring.remove(runtime)
        del runtime
        refreeze()
        trim_heap()

    def _load_warm(self, path: Path) -> ModelRuntime:
        return load_checked(self.settings, self.metrics, model_path=path, warm=True)


class ReloadOverdue(Exception):
    """A reload's load ran past RELOAD_TIMEOUT_S (``Services._overdue``)."""


@dataclass(frozen=True)
class OverdueLoad:
    """A reload's load still running past RELOAD_TIMEOUT_S (``Services._overdue``): its task, what it loads, since
    when (``time.monotonic()``)."""

    task: asyncio.Future
    path: Path
    started: float


def release_failed_load() -> None:
    """What a failed load built (a tokenizer, a session), collected, and its pages given back to the system
    (``trim_heap``)."""
    gc.collect()
    trim_heap()


def same_model_other_labels(served: dict[tuple[str, str], list[str]], fresh: ModelRuntime) -> None:
    """``ArtifactError`` when ``fresh`` claims the name and version of a model this process has served, with other
    labels (a manifest edited by hand): records, feedback and the drift metrics go by the name and version, and
    could not tell the two mappings apart. Every model served counts, not only the one serving: a reload to another
    model in between let a red team's relabelled copy of the first in. (The prediction cache goes by the load, not
    the version: ``server.cache``.)"""
    labels = served.get(model_key(fresh))
    if labels is not None and fresh.labels() != labels:
        raise ArtifactError(f"{fresh.artifact.directory}: {fresh.identity.name} version {fresh.identity.version!r} "
                            f"was served with labels {labels}, and this artifact's are "
                            f"{fresh.labels()}; records and metrics carry the name and version and could not tell them "
                            "apart: give the artifact a new version in manifest.json (models.build derives one from "
                            "the files)")
