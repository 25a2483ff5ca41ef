"""The objects one app owns, built at start-up and closed at shutdown.

Start-up order: model (verified, warmed) -> cache -> store -> background
monitors. Shutdown: not ready -> drain the batcher (every accepted text
answered) -> flush the store -> stop monitors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.artifact import ArtifactError
from server.cache import PredictionCache
from server.config import Settings
from server.engine import EngineStartError
from server.gpu import GpuMonitor
from server.heap import refreeze
from server.memory import MemoryGuard
from server.metrics import Metrics
from server.predictor import Predictor
from server.runtime import ModelRuntime

log = logging.getLogger(__name__)


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
    started_at: float = field(default_factory=time.time)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def runtime(self) -> ModelRuntime:
        return self.predictor.runtime

    def start_background(self) -> None:
        self.runtime.batcher.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.memory_guard.run(5.0), name="memory-guard"))
        self.publish_model_info()
        self.metrics.ready.set(1)

    def is_ready(self) -> bool:
        return self.runtime.warm and not self.draining

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: not ready, finishing accepted requests")
        self.draining = True
        self.metrics.ready.set(0)

    async def close(self) -> None:
        self.begin_drain()
        await self.runtime.batcher.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        self.gpu.close()

    def publish_model_info(self) -> None:
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(**vars(self.runtime.identity)).set(1)

    def refresh_gauges(self) -> None:
        """Gauges sampled at scrape time (memory, GPU)."""
        self.memory_guard.check()
        self.gpu.update()

    def health(self) -> dict[str, Any]:
        database = self.store.health()
        reasons = []
        if database.get("status") != "ok":
            reasons.append(f"database: {database.get('reason', 'unavailable')}")
        if self.memory_guard.under_pressure:
            reasons.append("memory: above the high-water mark, cache shedding")
        if self.draining:
            reasons.append("draining")
        identity = self.runtime.identity
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "model": {**vars(identity), "labels": self.runtime.labels(), "warm": self.runtime.warm},
            "device": identity.device,
            "provider": identity.provider,
            "queue_depth": self.runtime.batcher.depth,
            "token_budget": self.runtime.budget.current,
            "cache": {"enabled": self.cache.max_bytes > 0, "entries": self.cache.entries,
                      "bytes": self.cache.bytes, "max_bytes": self.cache.max_bytes},
            "database": database,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def reload_in_background(self) -> None:
        """SIGHUP: reload MODEL_PATH; the task is kept so it cannot be garbage-collected mid-way."""
        self._tasks.append(asyncio.get_running_loop().create_task(self.reload(), name="reload"))

    async def reload(self, model_path: str | None = None) -> dict[str, Any]:
        """Load, verify, warm and smoke-test a new model; swap it in only if all of that succeeds."""
        path = Path(model_path) if model_path else self.settings.model_path
        old = self.runtime.identity
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                fresh = await loop.run_in_executor(None, self._load_warm, path)
            except (ArtifactError, EngineStartError, RuntimeError, OSError) as exc:
                self.metrics.model_reloads.labels("failed").inc()
                log.error("model reload from %s failed, still serving %s %s: %s", path, old.name, old.version, exc)
                return {"reloaded": False, "error": str(exc), "serving": vars(old)}
            fresh.batcher.start()
            previous = self.predictor.swap(fresh)
            self.publish_model_info()
            self._tasks.append(loop.create_task(self._retire(previous), name="retire-previous-model"))
        self.metrics.model_reloads.labels("ok").inc()
        log.info("model reloaded from %s: %s %s -> %s %s", path, old.name, old.version,
                 fresh.identity.name, fresh.identity.version)
        return {"reloaded": True, "serving": vars(fresh.identity), "previous": vars(old)}

    async def _retire(self, runtime: ModelRuntime) -> None:
        """Answer everything the previous model accepted, then collect it (see server/heap.py)."""
        await runtime.batcher.drain()
        del runtime
        refreeze()

    def _load_warm(self, path: Path) -> ModelRuntime:
        runtime = ModelRuntime.load(self.settings, self.metrics, model_path=path)
        runtime.warm_up()
        return runtime
