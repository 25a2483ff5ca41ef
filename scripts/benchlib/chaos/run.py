"""``scripts/chaos.py``: run the scenarios on each backend and durability mode, print and write the table.

SQLite gets a fresh file per run; PostgreSQL a server of its own for the whole
invocation (``scripts.benchlib.databases.PgServer``) and a fresh database per
run. The SIGKILL scenarios, whose outcome depends on the moment of the kill,
run ``--runs`` times with a different moment each (seeded: ``--seed``); the
others ``--other-runs`` times. Each run's server logs stay under
``--out``/work; its SQLite files are removed once counted (the large-spool
ones hold GBs). A scenario that crashes is reported as an error in its row
and the rest go on; one this machine cannot run (no tmpfs without root) is
reported as skipped, with the reason. Exit status 1 when a run in ``ack``
mode lost or duplicated a record, failed a check or crashed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from scripts.benchlib.argtypes import names
from scripts.benchlib.chaos.harness import Setup, Unsupported
from scripts.benchlib.chaos.report import Table, section, write_into
from scripts.benchlib.chaos.scenarios import SCENARIOS, Outcome
from scripts.benchlib.databases import PgServer, postgres_database, real_pg_ctl, sqlite_database
from scripts.benchlib.envinfo import environment, header
from scripts.benchlib.serverproc import ROOT

RANDOMIZED = ("sigkill", "sigkill-database-down")
BACKENDS = ("sqlite", "postgresql")
MODES = ("ack", "async")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chaos.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=Path("models/default"), help="model artifact to serve")
    parser.add_argument("--backend", type=names, default=list(BACKENDS), help="sqlite,postgresql")
    parser.add_argument("--mode", type=names, default=list(MODES), help="STORE_DURABILITY values: ack,async")
    parser.add_argument("--scenarios", type=names, default=list(SCENARIOS), help=", ".join(SCENARIOS))
    parser.add_argument("--runs", type=int, default=5, help=f"runs of each SIGKILL scenario ({', '.join(RANDOMIZED)})")
    parser.add_argument("--other-runs", type=int, default=1, help="runs of each other scenario")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--kill-after", type=int, default=250, help="answers before the SIGKILL (the other "
                        "scenarios scale their phases on it)")
    parser.add_argument("--jitter", type=float, default=0.5, help="the SIGKILL comes at a random moment up to this "
                        "many seconds after --kill-after answers")
    parser.add_argument("--large-spool-mib", type=int, default=100, help="spool size the large-spool scenario builds")
    parser.add_argument("--timeout", type=float, default=30.0, help="bound on each wait (start, recovery), seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server setting (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/chaos"),
                        help="chaos.md, chaos.json and each run's server logs (work/)")
    parser.add_argument("--update-doc", type=Path, metavar="MARKDOWN",
                        help="also write the table into this document's generated section, e.g. docs/RELIABILITY.md")
    args = parser.parse_args(argv)
    for option, values, allowed in (("--backend", args.backend, BACKENDS), ("--mode", args.mode, MODES),
                                    ("--scenarios", args.scenarios, tuple(SCENARIOS))):
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            parser.error(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}")
    if not (args.artifact / "manifest.json").is_file():
        parser.error(f"--artifact {args.artifact}: no manifest.json there (build one with `make model`)")
    if "postgresql" in args.backend and real_pg_ctl() is None:
        parser.error("--backend postgresql: PostgreSQL server binaries not found (apt-get install postgresql, or set "
                     "SAP_PG_CTL)")
    return args


@contextmanager
def database_factory(backend: str):
    """``make(directory)`` -> a context giving a fresh ``Database`` on ``backend``."""
    if backend == "sqlite":
        yield sqlite_database
        return
    server = PgServer.launch()
    try:
        yield lambda _directory: postgres_database(server)
    finally:
        server.close()


def machine() -> str:
    """The environment, PostgreSQL's version and the commit (marked when the working tree differs from it)."""
    lines = [header(environment())]
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty=+uncommitted changes"],
                            capture_output=True, text=True).stdout.strip()
    if commit:
        lines.append(f"# commit: {commit}")
    pg_ctl = real_pg_ctl()
    if pg_ctl:
        version = subprocess.run([pg_ctl, "--version"], capture_output=True, text=True).stdout.strip()
        lines.append(f"# PostgreSQL: {version}")
    return "\n".join(lines)


def run_all(args: argparse.Namespace) -> tuple[Table, list[dict]]:
    table, records = Table(), []
    work = (args.out / "work").resolve()  # the servers run in the repository root
    shutil.rmtree(work, ignore_errors=True)
    template = Setup(args.artifact.resolve(), None, work, clients=args.clients, kill_after=args.kill_after,
                     jitter_s=args.jitter, timeout_s=args.timeout, large_spool_bytes=args.large_spool_mib << 20,
                     env=dict(item.split("=", 1) for item in args.env))
    for backend in args.backend:
        with database_factory(backend) as fresh_database:
            for name in args.scenarios:
                runs = args.runs if name in RANDOMIZED else args.other_runs
                for mode in args.mode:
                    for run in range(runs):
                        workdir = Path(tempfile.mkdtemp(prefix=f"{backend}-{name}-{mode}-{run}-", dir=_mkdir(work)))
                        with fresh_database(workdir) as database:
                            setup = replace(template, database=database, workdir=workdir / "run", mode=mode,
                                            seed=args.seed * 1000 + run)
                            records.append(run_one(table, name, setup))
                        for sqlite_file in workdir.rglob("*.db*"):
                            sqlite_file.unlink()
    return table, records


def run_one(table: Table, name: str, setup: Setup) -> dict:
    record = {"scenario": name, "backend": setup.database.backend, "mode": setup.mode, "workdir": str(setup.workdir)}
    try:
        outcome: Outcome = SCENARIOS[name](setup)
    except Unsupported as reason:
        table.row(name, setup.database.backend, setup.mode).skipped = str(reason)
        print(f"{name} on {setup.database.backend}, {setup.mode}: skipped: {reason}", flush=True)
        return {**record, "skipped": str(reason)}
    except Exception as error:  # a crashed run is reported in its row; the others go on
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        table.row(name, setup.database.backend, setup.mode).errors.append(message)
        print(f"{name} on {setup.database.backend}, {setup.mode}: ERROR {message}", flush=True)
        return {**record, "error": message}
    table.add(outcome)
    print(outcome.describe(log_lines=0), flush=True)
    return {**record, "outcome": {**asdict(outcome), "logs": [str(log) for log in outcome.logs]}}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python scripts/chaos.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    described = machine()
    print(described, flush=True)
    started = datetime.now(UTC)
    table, records = run_all(args)
    generated = section(table, command, started.strftime("%Y-%m-%d %H:%M UTC"), described)
    print(table.text())
    _mkdir(args.out)
    (args.out / "chaos.md").write_text(generated + "\n")
    (args.out / "chaos.json").write_text(json.dumps({"command": command, "started": started.isoformat(),
                                                     "machine": described, "runs": records}, indent=2, default=str))
    if args.update_doc:
        write_into(args.update_doc, generated)
    print(f"wrote {args.out / 'chaos.md'}, {args.out / 'chaos.json'}"
          + (f" and the table in {args.update_doc}" if args.update_doc else ""))
    return 1 if broken_promises(table) else 0


def broken_promises(table: Table) -> list[str]:
    """Rows of the mode that promises exactly-once (ack) with a loss, a duplicate, a failed check or a crash."""
    return [row.scenario for row in table.rows.values() if row.mode == "ack" and (
        row.tally.lost or row.tally.duplicated or row.tally.stray or row.failed or row.errors)]
