"""Running the server: start-up, signals, and the drain on SIGTERM/SIGINT.

Start-up. The application's lifespan (model, cache, store) is entered here,
before uvicorn opens the port, rather than by uvicorn: a ``StartupError`` it
raises (the spool locked by another process, the database schema behind)
comes out as one line "cannot start: <what and how to fix it>" and its own
exit code, not uvicorn's traceback and exit status 3.

Signals are handled on the event loop (``loop.add_signal_handler``): the
handler proper only wakes the loop, and everything else (logging, metrics,
locks) runs as an ordinary loop callback. SIGHUP reloads the model
(``Services.reload_in_background``); one that arrives before the server is
ready, the moments before the event loop runs included, is remembered and
logged, and the reload runs once the server is ready (its default action
would have killed the process).

The drain, from SIGTERM or SIGINT at t:

* t: ``/ready`` answers 503 and new ``/predict`` requests 503 + Retry-After +
  ``Connection: close``; every response from now on closes its connection.
  The listener stays open, so health checks get the 503 rather than
  "connection refused", and ``/health`` and ``/metrics`` still answer.
* t + ``DRAIN_GRACE_S``: the listener closes, idle keep-alive connections are
  closed; requests under way go on (the engine keeps running).
* t + ``DRAIN_GRACE_S`` + ``DRAIN_TIMEOUT_S`` at the latest: what is still
  unanswered (a hung engine call, a client still sending its body) gets 503
  and is counted as abandoned; every connection is closed.
* then the application shuts down: the batcher (its own time limit ends a
  hung engine call's wait), the monitors, and the store, which gets the time
  left and at least a few seconds to write or spool what it holds.

The last log line says what happened: "shutdown: answered N requests during
drain, abandoned M". N counts every response sent after the signal (in-flight
requests finishing, the 503s refusing new ones, health checks, 408s, gRPC
calls); M the requests answered 503 at the deadline, and the gRPC calls
answered UNAVAILABLE then (server/protocols/oip_grpc.py). The exit status is 0
when M is 0, ``ExitCode.RUNTIME`` (1) otherwise. A second SIGTERM/SIGINT ends the waiting at
once (what is unanswered then is abandoned); during start-up, it stops the process without waiting for the model
load under way. A thread that never returns (a
hung engine call) does not hold the exit: the process ends without joining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from server.config import Settings
from server.connections import ConnectionGuard
from server.early_signals import remember_early_hangups, take_early_hangup, take_early_stop
from server.exitcodes import ExitCode, StartupError
from server.worker_threads import MODEL_LOAD_THREAD, threads_in_call

if TYPE_CHECKING:
    from server.services import Services

log = logging.getLogger("server.lifecycle")
POLL_S = 0.05  # how often the drain looks at the clock and the connections
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class DrainClock:
    """The drain's two moments, in ``time.monotonic()`` seconds."""

    began: float
    stop_listening_at: float
    deadline: float  # for requests to be answered
    ended_early: bool = False  # by a second signal (``end_now``), not by DRAIN_TIMEOUT_S

    @classmethod
    def starting_now(cls, settings: Settings) -> DrainClock:
        now = time.monotonic()
        return cls(now, now + settings.drain_grace_s, now + settings.drain_grace_s + settings.drain_timeout_s)

    def end_now(self) -> None:
        now = time.monotonic()
        self.ended_early = self.ended_early or now < self.deadline  # a third signal must not undo it
        self.stop_listening_at = min(self.stop_listening_at, now)
        self.deadline = min(self.deadline, now)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the start-up, signal handling and drain described in the module docstring."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.guard = ConnectionGuard(settings, app.state.metrics)
        self.drain: DrainClock | None = None
        self.hangup_pending = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task | None = None  # serve() until the app has started: a second signal cancels it
        super().__init__(uvicorn.Config(
            app, host=settings.host, port=settings.port, http=self.guard.protocol_factory(), ws="none",
            lifespan="off",  # entered by serve(), before the port opens
            log_config=None, access_log=False, server_header=False,
        ))

    @property
    def services(self) -> Services | None:
        return getattr(self.app.state, "services", None)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._starting = asyncio.current_task()
        with self._signals_handled(self.loop):
            if stop_asked_before_the_load():
                return
            try:
                async with self.app.router.lifespan_context(self.app):
                    self._starting = None
                    await self._serve_started(sockets)
            except asyncio.CancelledError:
                if self._starting is None:  # not ours: cancelled from outside
                    raise
                log.warning("stopping now, during start-up: the model load under way is abandoned")

    async def _serve_started(self, sockets: list[socket.socket] | None) -> None:
        """Once the app has started: listen, unless a signal during start-up asked to stop."""
        if self.hangup_pending and not self.should_exit:
            log.info("ready: running the model reload the SIGHUP during start-up asked for")
            self.services.reload_in_background()
        if not self.should_exit:
            identity, settings = self.services.runtime.identity, self.settings
            log.info("ready: %s %s on %s, listening on %s:%d", identity.name, identity.version,
                     identity.provider, settings.host, settings.port)
            await super().serve(sockets)
        else:  # a SIGTERM during start-up (a "ready ... listening" line logged here had nothing listen)
            log.info("stopping: the model has loaded, and the server stops without listening")

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        """uvicorn's own handlers run in the signal's context; ``serve`` installs loop handlers instead."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _signals_handled(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread: a server run in a thread is stopped with begin_drain()
            return
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.begin_drain, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        if take_early_hangup():
            loop.call_soon(self.hangup)
        try:
            yield
        finally:
            for sig in (*STOP_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            remember_early_hangups()

    def hangup(self) -> None:
        """SIGHUP: reload the model; before the server is ready, once it is."""
        services = self.services
        if services is None:
            if not self.hangup_pending:
                log.warning("SIGHUP during start-up: the model reload will run once the server is ready")
            self.hangup_pending = True
        elif services.draining:
            log.warning("SIGHUP while draining: no model reload")
        else:
            services.reload_in_background()

    def begin_drain(self, reason: str = "shutdown requested") -> None:
        """Stop being ready and start the drain's clock; a second call ends the waiting at once."""
        if self.drain is not None:
            if self._starting is not None:  # nothing is served yet: a model load is not waited for
                if any(thread.name == MODEL_LOAD_THREAD for thread in threads_in_call()):
                    log.warning("%s again during start-up: stopping now", reason)
                    self._starting.cancel()  # raised where start-up awaits the load, before the store starts
                else:  # the store is starting (a schema migration, a spool replay): not cut in the middle
                    log.warning("%s again during start-up: stopping once the store has started", reason)
                return
            log.warning("%s again: ending the drain now; requests not answered yet are abandoned", reason)
            self.drain.end_now()
            if self.services is not None:  # the batcher's and gRPC's wait end now too
                self.services.begin_drain(self.drain.deadline)
            return
        settings = self.settings
        self.drain = DrainClock.starting_now(settings)
        self.should_exit = True
        if self.services is None:
            log.info("%s during start-up: stopping once the model has loaded, without listening", reason)
            return
        log.info("%s: draining; /ready answers 503, the listener stays open %.1f s (DRAIN_GRACE_S), then requests "
                 "under way get up to %.1f s more (DRAIN_TIMEOUT_S)", reason, settings.drain_grace_s,
                 settings.drain_timeout_s)
        self.services.begin_drain(self.drain.deadline)
        self.guard.begin_drain()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The drain (uvicorn calls this once its main loop sees ``should_exit``)."""
        if self.drain is None:
            self.begin_drain()
        clock = self.drain
        await wait_until(lambda: time.monotonic() >= clock.stop_listening_at)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self.guard.close_idle()
        log.info("draining: stopped listening %.1f s after the signal; %d requests being answered",
                 time.monotonic() - clock.began, self.guard.unanswered())
        await wait_until(lambda: not self.guard.unanswered() or time.monotonic() >= clock.deadline)
        unanswered = self.guard.unanswered()
        self.guard.abandon_unanswered()
        if unanswered:
            why = "a second signal ended the drain" if clock.ended_early else "DRAIN_GRACE_S + DRAIN_TIMEOUT_S"
            log.warning("draining: %d requests not answered %.1f s after the signal (%s): answered 503", unanswered,
                        time.monotonic() - clock.began, why)


def stop_asked_before_the_load() -> bool:
    """Whether a SIGTERM or SIGINT came before the event loop handled signals (``server.early_signals``); if so,
    it is logged, and start-up stops here."""
    stop = take_early_stop()
    if stop is not None:
        log.info("%s during start-up, before the model load: stopping now", stop)
    return stop is not None


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(POLL_S)


def run_server(settings: Settings) -> int:
    """Serve until drained; the exit status (see the module docstring)."""
    from server.app import create_app

    log.info("starting: checks passed; loading the model from %s", settings.model_path)
    server = DrainingServer(create_app(settings), settings)
    try:
        server.run()
    except StartupError as error:
        log.error("cannot start: %s", error)
        return error.exit_code
    except SystemExit as exit_:
        if exit_.code != STARTUP_FAILURE:
            raise
        log.error("cannot start: %s:%d could not be bound (the line above says why); stop the other process or "
                  "set PORT to a free port", settings.host, settings.port)
        return ExitCode.PORT
    stuck = threads_still_running(grace_s=1.0)
    if stuck:
        log.warning("exiting without waiting for %d threads still running (a model load abandoned, a hung engine "
                    "call, or a database call hung on an unanswering database): %s", len(stuck), ", ".join(stuck))
    services = server.services  # its counts are the gRPC calls'
    answered = server.guard.answered + (services.drain_answered if services else 0)
    abandoned = server.guard.abandoned + (services.drain_abandoned if services else 0)
    if server.started or answered or abandoned:
        log.info("shutdown: answered %d requests during drain, abandoned %d", answered, abandoned)
    else:  # stopped during start-up: there was no drain to tell of
        log.info("shutdown: stopped during start-up, before listening; no request was taken")
    code = ExitCode.RUNTIME if abandoned else ExitCode.OK
    if stuck:
        logging.shutdown()
        # The interpreter's exit would join such threads (forever, for a call that never returns), or tear ONNX
        # Runtime down under an engine thread still in a call.
        os._exit(code)
    gc.freeze()  # the process ends now: a last full collection of the whole heap would only delay it (2 s here)
    return code


def threads_still_running(grace_s: float) -> list[str]:
    """Names of the threads other than this one still running after ``grace_s``: those that would keep the
    process from exiting, and the engine's worker threads still in a call (daemons: the interpreter would tear
    ONNX Runtime down under them)."""
    until = time.monotonic() + grace_s
    names = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, until - time.monotonic()))
        if thread.is_alive():
            names.append(thread.name)
    while threads_in_call() and time.monotonic() < until:
        time.sleep(POLL_S)
    return names + [thread.name for thread in threads_in_call()]
