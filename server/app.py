"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan owns start-up and drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable

from fastapi import FastAPI

from server import __version__
from server.cache import PredictionCache
from server.config import Settings
from server.engine import Engine
from server.exitcodes import StartupError
from server.fastpath import PATH, PredictFastPath
from server.gpu import GpuMonitor
from server.heap import freeze_long_lived, thaw
from server.http import ObservedASGI, api_routes, document_errors, install_error_handlers
from server.memory import MemoryGuard
from server.metrics import Metrics
from server.predictor import Predictor
from server.preflight import load_model
from server.protocols import kserve_v1, oip_v2, tei
from server.routes import router
from server.routes_store import router as store_router
from server.services import Services
from server.store import KeyStore, PredictionStore
from server.store.keycache import KeyCache
from server.store.keysnapshot import KeySnapshot
from server.store.spooldir import database_identity
from server.worker_threads import MODEL_LOAD_THREAD, UnjoinedExecutor, on_own_thread

log = logging.getLogger(__name__)
# FastAPI 0.16x asks on every request whether OpenTelemetry is configured (environment lookups: ~5% of the event
# loop's CPU per /predict at 64 clients, py-spy). The server's metrics are Prometheus'; where the option exists,
# that per-request check is off.
NATIVE_TELEMETRY_OFF = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                        if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


async def build_services(settings: Settings, metrics: Metrics,
                         wrap_engine: Callable[[Engine], Engine] | None = None) -> Services:
    """The model (start-up's one load of it, ``server.preflight.load_model``: a failure is a ``StartupError``
    with its exit code), then the cache, store and key cache around it."""
    runtime = await on_own_thread(functools.partial(load_model, settings, metrics, warm=settings.warmup,
                                                    wrap_engine=wrap_engine), name=MODEL_LOAD_THREAD)
    cache_bytes = runtime.settings.cache_max_bytes if settings.enable_model_caching else 0  # as the memory plan says
    cache = PredictionCache(cache_bytes, metrics)
    store = PredictionStore(settings, metrics)
    await store.start()  # StartupError (SchemaBehind, SpoolLocked, SpoolDirUnusable): one line and its exit code
    keys = KeyCache(KeyStore(store.engine), metrics, settings.key_cache_ttl_s,
                    snapshot=KeySnapshot(settings.spool_dir, database_identity(settings.database_url)))
    await keys.start()
    if settings.auth_mode == "open":
        log.warning("AUTH_MODE=open: /predict accepts requests without an API key")
    return Services(
        settings=settings,
        metrics=metrics,
        predictor=Predictor(runtime, cache, metrics, settings.low_confidence_threshold),
        cache=cache,
        store=store,
        keys=keys,
        memory_guard=MemoryGuard(settings, metrics, cache, runtime.budget),
        gpu=GpuMonitor(metrics),
    )


def create_app(settings: Settings, wrap_engine: Callable[[Engine], Engine] | None = None) -> FastAPI:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        asyncio.get_running_loop().set_default_executor(UnjoinedExecutor(thread_name_prefix="blocking-call"))
        services = await build_services(settings, metrics, wrap_engine)
        app.state.services = services
        services.start_background()
        grpc_server = None
        if settings.grpc_port:  # imported only when on: server/protocols/oip_grpc.py says why
            from server.protocols.oip_grpc import GrpcServer

            grpc_server = GrpcServer(services)
            try:
                await grpc_server.start()
            except StartupError:
                await services.close()
                raise
        app.openapi()  # built now, not on the loop inside the first request that reads it (``document_errors``)
        freeze_long_lived()  # the "ready" line is server.lifecycle's: it says so only when it will listen
        try:
            yield
        finally:  # signals (SIGHUP reload, the drain) belong to whoever runs the app: server/lifecycle.py
            if grpc_server is not None:  # after the HTTP drain; its calls under way get until the drain deadline
                await grpc_server.stop()
            await services.close()
            thaw()

    app = FastAPI(
        title="Sentiment Analyzer Pro",
        version=__version__,
        description="Sentiment analysis on ONNX Runtime with dynamic batching. See the README for configuration.",
        lifespan=lifespan,
        redirect_slashes=False,  # paths are exact: the redirect's Location echoed the client's Host header
        **NATIVE_TELEMETRY_OFF,
    )
    app.include_router(router)
    app.include_router(store_router)
    app.include_router(tei.router)
    app.include_router(kserve_v1.router)
    app.include_router(oip_v2.router)
    install_error_handlers(app)
    document_errors(app)
    app.state.metrics = metrics
    predict_route = next(route for route in api_routes(app.routes) if route.path == PATH and "POST" in route.methods)
    app.add_middleware(PredictFastPath, services=lambda: app.state.services, route=predict_route)  # inner
    app.add_middleware(ObservedASGI, metrics=metrics, max_body_bytes=settings.max_request_bytes)  # outer
    return app
