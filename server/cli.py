"""`sentiment-analyzer`: serve, doctor, and the store's db / keys / feedback commands.

Every setting is an environment variable (see ``server.config``) and also a
flag of ``serve`` and ``doctor`` (``MAX_BATCH_SIZE`` -> ``--max-batch-size``);
a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import uvicorn

from server.config import ConfigError, Settings, load_settings

log = logging.getLogger("server.cli")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also an environment variable)")
    for name, field in Settings.model_fields.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                           help=f"{field.description} (env {name.upper()})")


def setting_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}


def serve(settings: Settings) -> int:
    from server.app import create_app
    from server.artifact import ArtifactError, load_artifact
    from server.doctor import port_problem
    from server.engine import EngineStartError, resolve_device
    from server.logging_setup import configure_logging

    configure_logging(settings)
    problem = port_problem(settings.host, settings.port)
    if problem:
        log.error("cannot start: %s; stop the other process or set PORT to a free port", problem)
        return 2
    try:  # fail fast with one line, before uvicorn wraps the error in a lifespan traceback
        load_artifact(settings.model_path)
        resolve_device(settings)
    except (ArtifactError, EngineStartError) as exc:
        log.error("cannot start: %s", exc)
        return 3
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sentiment-analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_setting_flags(commands.add_parser("serve", help="run the HTTP server"))
    add_setting_flags(commands.add_parser("doctor", help="check model, configuration, port and database"))
    from server import cli_store

    cli_store.register(commands)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from server.doctor import run_doctor

        return run_doctor(setting_overrides(args))
    if args.command == "serve":
        try:
            settings = load_settings(**setting_overrides(args))
        except ConfigError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
