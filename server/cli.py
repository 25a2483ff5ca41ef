"""`sentiment-analyzer`: serve, doctor, and the store's db / keys / feedback commands.

Every setting is an environment variable (see ``server.config``) and also a
flag of ``serve`` and ``doctor`` (``MAX_BATCH_SIZE`` -> ``--max-batch-size``);
a flag wins over the environment.

Every command but ``serve`` (which drains on SIGINT) ends Ctrl-C with one line
and exit 130, and standard output that refuses the output (a closed pipe, a
full device) with one ERROR line and exit 1, never with a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.early_signals import handle_early_signals

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger("server.cli")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    from server.config import Settings

    group = parser.add_argument_group("settings (each also an environment variable)")
    for name, field in Settings.model_fields.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                           help=f"{field.description} (env {name.upper()})")


def setting_overrides(args: argparse.Namespace) -> dict[str, object]:
    from server.config import Settings

    return {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}


def serve(settings: Settings) -> int:
    """Check everything that can be checked before listening (one line and an exit code per failure), then run."""
    from server.exitcodes import ExitCode
    from server.lifecycle import run_server, stop_asked_before_the_load
    from server.preflight import preflight

    code = preflight(settings)  # configures logging first (once LOG_FILE is known to be writable)
    if code:
        return code
    if stop_asked_before_the_load():
        return ExitCode.OK
    return run_server(settings)


def positive_number(most: float, least: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number above ``least`` (at least it, when not 0) and at most ``most`` (nan, -1,
    1e-300 or 1e308 seconds are mistakes)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (least <= value <= most and value > 0):  # false for nan
            low = f"at least {least:g}" if least else "above 0"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {low} and at most {most:g}")
        return value

    return parse


def base_url(text: str) -> str:
    """An argparse type for ``status --url``: no ``user:password@`` (status sends none, the URL would not even
    resolve, and every message echoes the URL); refused without repeating the password (``redact``). An address
    without a scheme (``localhost:8000``, as curl takes it) is http: it was read as the scheme "localhost", and
    status called a healthy server unreachable, a P0 (red team helper-74)."""
    from urllib.parse import urlsplit

    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
    except ValueError:  # argparse would repeat the value, password and all
        raise argparse.ArgumentTypeError("not a URL (not repeated here: it may hold a password); give the server's "
                                         "base URL, e.g. http://127.0.0.1:8000") from None
    if "@" in parts.netloc:
        from server.store.db import redact

        raise argparse.ArgumentTypeError(f"{redact(text)} holds credentials: give the server's base URL without "
                                         "them (status sends none; /health and /metrics need no key)")
    if parts.scheme not in ("http", "https") or parts.hostname in (None, "", "http", "https") \
            or not _usable_port(parts):  # "https//host"; a bad port was a traceback, or "unreachable: P0"
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL with a host and a port from "
                                         "1 to 65535; give the server's base URL, e.g. http://127.0.0.1:8000")
    return text


def _usable_port(parts) -> bool:
    """No port (the scheme's), or one from 1 to 65535."""
    try:
        return parts.port != 0
    except ValueError:  # not a number, or past 65535
        return False


def add_status_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="incident snapshot of a running server: health, traffic, latency, "
                                 "memory, store, and a proposed P0-P3 severity")
    parser.add_argument("--url", type=base_url, default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--interval", type=positive_number(3600), default=5.0,
                        help="seconds between the two /metrics scrapes (at most 3600)")
    parser.add_argument("--timeout", type=positive_number(600, least=0.1), default=5.0,
                        help="seconds to wait for each answer (0.1 to 600)")
    parser.add_argument("--slo-p99-ms", type=positive_number(3_600_000), default=250.0,
                        help="the inference p99 objective: over it is noted (P3); P2 above 1 s, P1 above 5 s")
    parser.add_argument("--template", choices=("alert", "update", "resolved"),
                        help="print the runbook's communication template filled with the figures")
    parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handler(args: argparse.Namespace) -> int:
        from server.status import run_status

        return run_status(args.url, args.interval, args.timeout, args.slo_p99_ms, args.template, args.json)

    parser.set_defaults(handler=handler)


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        handle_early_signals()  # first: a SIGHUP or SIGTERM during start-up must not kill the process silently
    from server.config import ConfigError, load_settings

    parser = argparse.ArgumentParser(prog="sentiment-analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_setting_flags(commands.add_parser("serve", help="run the HTTP server"))
    add_setting_flags(commands.add_parser("doctor", help="check model, configuration, port and database"))
    add_status_command(commands)
    from server import cli_store

    cli_store.register(commands)
    if undecodable := next((arg for arg in (sys.argv[1:] if argv is None else argv) if not _utf8(arg)), None):
        # a name or id the database cannot take: it failed with "'utf-8' codec can't encode character '\udcff'"
        print(f"ERROR the argument {undecodable!r} is not valid UTF-8: give every name, id and path in UTF-8",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = load_settings(**setting_overrides(args))
        except ConfigError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    if sys.stdout is None:  # started with `>&-`: a new key, a listing would be lost without a word
        print("ERROR standard output is closed: redirect it to a file (or /dev/null)", file=sys.stderr)
        return 1
    try:
        if args.command == "doctor":
            from server.doctor import run_doctor

            code = run_doctor(setting_overrides(args))
        else:
            code = args.handler(args)
        sys.stdout.flush()  # a full device or a closed pipe fails here, not in Python's own flush at exit
        return code
    except KeyboardInterrupt:
        print("ERROR interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # what no command caught itself: a file it names, else standard output refusing a write
        if error.filename is not None:
            print(f"ERROR {error.filename}: {error.strerror or error}", file=sys.stderr)
            return 1
        return cli_store.output_failed(error)


def _utf8(arg: str) -> bool:
    """Whether a command-line argument was valid UTF-8 (Python holds the bytes of one that is not as surrogates)."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
