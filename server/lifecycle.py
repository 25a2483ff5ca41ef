"""Running the HTTP server: uvicorn with draining on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import sys

import uvicorn

from server.config import Settings


def run_server(settings: Settings) -> int:
    from server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5, server_header=False,
    )
    server = DrainingServer(config)
    # uvicorn re-raises the SIGTERM it drained on; a drained shutdown is a success, so exit 0 then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if server.started else 1))
    server.run()
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT first turning /ready to 503 (then uvicorn's graceful stop)."""

    def handle_exit(self, sig, frame) -> None:
        services = getattr(self.config.app.state, "services", None)
        if services is not None:
            services.begin_drain()
        super().handle_exit(sig, frame)
