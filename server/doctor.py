"""`sentiment-analyzer doctor`: the runbook's "application won't start" checks, each with a fix.

The checks are start-up's own (``server.preflight``), so doctor says ok exactly when ``serve`` would start:
every setting and how they fit together, writable paths (a probe file really created and removed), the
database (doctor also connects to it), the port, the device, and the model really loaded with its smoke
predictions run. Unlike start-up, doctor runs every check and never stops at the first failure; a check
that depends on one that failed (the model on the device) is skipped. It never raises: anything a check
did not foresee is reported as that check's failure.
"""

from __future__ import annotations

from collections.abc import Callable

from server.config import ConfigError, load_settings
from server.engine import first_line
from server.exitcodes import StartupError
from server.preflight import DOCTOR_CHECKS, run_check


def run_doctor(overrides: dict[str, object] | None = None, print_fn: Callable[[str], None] = print) -> int:
    """Print one line per check (and its fix); 0 when all pass, 1 otherwise."""
    try:
        settings = load_settings(**(overrides or {}))
    except ConfigError as exc:
        print_fn(f"[FAIL] configuration: {exc}")
        print_fn("       fix: correct the variable named above (see the README's configuration table)")
        return 1
    except Exception as exc:  # doctor must answer whatever the environment holds
        print_fn(f"[FAIL] configuration: {first_line(exc)}")
        return 1
    failed: set[str] = set()
    for check in DOCTOR_CHECKS:
        if check.needs in failed:
            print_fn(f"[skip] {check.name}: not checked, since the {check.needs} check failed")
            failed.add(check.name)
            continue
        try:
            detail = run_check(check, settings)
        except StartupError as exc:
            failed.add(check.name)
            print_fn(f"[FAIL] {check.name}: {exc}")
            print_fn(f"       fix: {check.fix}")
        else:
            print_fn(f"[ok  ] {check.name}: {detail}")
    return 1 if failed else 0
