"""The chaos scenarios: each runs real servers through one kind of trouble and counts what became of every request.

A scenario takes a ``Setup`` (model, database with an outage switch, a fresh
directory, durability mode, load) and returns an ``Outcome``: the tally
(``scripts.benchlib.chaos.tally``) plus the checks specific to it (the second
process refused to start, 503 + Retry-After when the spool was full, ...).
The guarantee every scenario checks: every request answered 200 has its
record exactly once once the server says it has recovered (/health ok, an
empty spool and no record queued in memory, in the same answer). Records are
counted only then, with the recovered server still running.

Choices the contract leaves open, made here:
- Recovery is awaited for ``Setup.timeout_s`` (30 s by default); a server that has not recovered by then fails
  the recovery check and is counted as it stands.
- The large spool is built black-box, by traffic while the database is down: 32 texts of 8,000 characters per
  request, all the same text so that the prediction cache spares the inference (12k distinct long texts
  would spend most of a minute in the tokenizer; 200k short rows, minutes). Its bound on memory compares the
  restarted server's peak RSS with a fresh server's (same settings, empty spool); see ``large_spool`` for
  why the spool is sized above the model's start-up transient.
- "Full spool" is tried two ways: a tmpfs smaller than SPOOL_MAX_BYTES mounted at SPOOL_DIR (the disk
  fills: needs root, otherwise ``Unsupported``), and SPOOL_MAX_BYTES itself (1 MiB is its minimum).
  In ``ack`` mode (and the default) the server must refuse with 503 + Retry-After once it cannot spool.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, select

from scripts.benchlib.chaos.harness import (
    Harness,
    Setup,
    degraded,
    directory_bytes,
    health,
    memory_bytes,
    recovered,
    tmpfs,
    wait_health,
)
from scripts.benchlib.chaos.tally import Tally, count, stored_rows
from scripts.benchlib.chaos.traffic import Attempt, Traffic, nul_text, repeated_text
from scripts.benchlib.serverproc import ROOT
from server.exitcodes import ExitCode
from server.store.tables import PREDICTIONS

MiB = 1 << 20


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class Outcome:
    scenario: str
    backend: str
    mode: str
    load: str
    tally: Tally
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)  # the servers' logs, for a failure's explanation

    @property
    def problems(self) -> list[str]:
        """Everything that went wrong; empty when the scenario kept every promise."""
        tally = self.tally
        found = [f"{check.name}: {check.detail}" for check in self.checks if not check.passed]
        if tally.lost:
            found.append(f"{tally.lost} of {tally.answered} answered requests have no record "
                         f"(e.g. request ids {tally.lost_ids[:5]})")
        if tally.duplicated:
            found.append(f"{tally.duplicated} requests have a record stored more than once "
                         f"(e.g. {tally.duplicated_ids[:5]})")
        if tally.stray:
            found.append(f"{tally.stray} records belong to no request of this run")
        return found

    def describe(self, log_lines: int = 15) -> str:
        """The outcome for a person: counts, problems, and the end of each server's log when something failed."""
        tally = self.tally
        lines = [f"{self.scenario} on {self.backend}, durability {self.mode} ({self.load}): "
                 f"{tally.answered} answered, {tally.stored} stored, {tally.lost} lost, {tally.duplicated} "
                 f"duplicated, {tally.refused} refused, {tally.unanswered_recorded} recorded unanswered",
                 *(f"  note: {note}" for note in self.notes),
                 *(f"  PROBLEM {problem}" for problem in self.problems)]
        if self.problems and log_lines > 0:
            for log in self.logs:
                tail = log.read_text(errors="replace").splitlines()[-log_lines:] if log.exists() else []
                lines += [f"  --- {log.name} (last {len(tail)} lines)", *(f"  | {line}" for line in tail)]
        return "\n".join(lines)


def recovery_check(ok: bool, state: dict | None, waited: float, what: str = "recovered") -> Check:
    detail = (f"in {waited:.1f} s" if ok else
              f"not within {waited:.0f} s; last /health: {state and {'status': state['status'], **state['database']}}")
    return Check(f"{what}: /health ok with an empty spool", ok, detail)


def _outcome(name: str, setup: Setup, load: str, tally: Tally, checks: list[Check], harness: Harness,
             notes: list[str] | None = None) -> Outcome:
    return Outcome(name, setup.database.backend, setup.mode_name, load, tally, checks, notes or [],
                   [server.log_path for server in harness.servers])


# --- SIGKILL ------------------------------------------------------------------------------------------------


def sigkill(setup: Setup) -> Outcome:
    """SIGKILL mid-stream at a random moment after ``kill_after`` answers, restart on the same spool and database."""
    return _sigkill(setup, database_down=False)


def sigkill_database_down(setup: Setup) -> Outcome:
    """The same with the database down from before the first request until after the SIGKILL."""
    return _sigkill(setup, database_down=True)


def _sigkill(setup: Setup, database_down: bool) -> Outcome:
    delay = random.Random(setup.seed).uniform(0, setup.jitter_s)
    load = f"{setup.clients} clients x 1 text, SIGKILL 0-{setup.jitter_s:g} s (random) after {setup.kill_after} answers"
    with Harness(setup) as harness:
        server = harness.start()
        if database_down:
            setup.database.down()
        traffic = harness.traffic(server)
        reached = traffic.wait_answered(setup.kill_after, setup.timeout_s)
        time.sleep(delay)
        harness.kill(server)
        attempts = traffic.stop()
        checks = [Check(f"{setup.kill_after} answers before the SIGKILL", reached, f"{traffic.answered} answered")]
        setup.database.up()
        restarted = harness.start()
        checks.append(recovery_check(*wait_health(restarted.url, recovered, setup.timeout_s)))
        tally = count(attempts, stored_rows(setup.database.url))
    notes = [f"SIGKILL {delay:.2f} s after the {setup.kill_after}th answer, with {traffic.answered} answered"]
    return _outcome("sigkill-database-down" if database_down else "sigkill", setup, load, tally, checks, harness,
                    notes)


# --- database outages ---------------------------------------------------------------------------------------


def outage(setup: Setup) -> Outcome:
    """The database goes down in mid-stream and comes back; no SIGKILL."""
    third = max(1, setup.kill_after // 3)
    load = f"{setup.clients} clients x 1 text; database down after {third} answers, up after {2 * third}"
    with Harness(setup) as harness:
        server = harness.start()
        traffic = harness.traffic(server)
        checks = [Check("answers before the outage", traffic.wait_answered(third, setup.timeout_s))]
        setup.database.down()
        checks.append(Check("answers go on while the database is down",
                            traffic.wait_answered(2 * third, setup.timeout_s), f"{traffic.answered} answered"))
        setup.database.up()
        checks.append(Check("answers after the outage", traffic.wait_answered(3 * third, setup.timeout_s)))
        attempts = traffic.stop()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s)))
        tally = count(attempts, stored_rows(setup.database.url))
    return _outcome("outage", setup, load, tally, checks, harness)


def idle_recovery(setup: Setup) -> Outcome:
    """The database comes back while no prediction arrives: the server must notice by itself, both when it
    started during the outage with nothing to write and when it has spooled records."""
    half = max(1, setup.kill_after // 2)
    load = f"no traffic, then {setup.clients} clients x 1 text for {half} answers during an outage, then idle"
    with Harness(setup) as harness:
        setup.database.down()
        server = harness.start()
        noticed, state, _ = wait_health(server.url, degraded, setup.timeout_s)
        checks = [Check("/health degraded after a start during an outage", noticed, f"last /health: {state}")]
        setup.database.up()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s),
                                     what="recovered with no traffic, nothing spooled"))
        setup.database.down()
        traffic = harness.traffic(server)
        checks.append(Check("answers while the database is down", traffic.wait_answered(half, setup.timeout_s)))
        attempts = traffic.stop()
        noticed, state, _ = wait_health(server.url, degraded, setup.timeout_s)
        checks.append(Check("/health degraded with records spooled", noticed, f"last /health: {state}"))
        setup.database.up()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s),
                                     what="recovered with no traffic, records spooled"))
        tally = count(attempts, stored_rows(setup.database.url))
    return _outcome("idle-recovery", setup, load, tally, checks, harness)


# --- the spool ----------------------------------------------------------------------------------------------


def spool_disk_full(setup: Setup) -> Outcome:
    """The disk under SPOOL_DIR (a tmpfs of ``full_spool_bytes``) fills during an outage."""
    return _full_spool(setup, on_tmpfs=True)


def spool_cap(setup: Setup) -> Outcome:
    """SPOOL_MAX_BYTES (``full_spool_bytes``) is reached during an outage."""
    return _full_spool(setup, on_tmpfs=False)


def _full_spool(setup: Setup, on_tmpfs: bool) -> Outcome:
    size = setup.full_spool_bytes
    where = f"a {size // 1024} KiB tmpfs" if on_tmpfs else f"SPOOL_MAX_BYTES={size}"
    load = (f"{setup.clients} clients x 8 texts of 4,000 characters (one text, cached), database down until the "
            f"spool ({where}) is full; back; full again and SIGKILL")
    filling = {"texts_per_request": 8, "text": repeated_text(4000)}  # ~32 KiB of records a request, little inference
    strict = setup.mode in (None, "ack")
    with tmpfs(setup.spool_dir, size) if on_tmpfs else nullcontext(), Harness(setup) as harness:
        server = harness.start(**({} if on_tmpfs else {"SPOOL_MAX_BYTES": str(size)}))
        traffic = harness.traffic(server, **filling)
        checks = [Check("answers before the outage", traffic.wait_answered(20, setup.timeout_s))]
        setup.database.down()
        full = traffic.wait(_spool_full(setup, size), setup.timeout_s)
        attempts = traffic.stop()
        refusals = [attempt for attempt in attempts if attempt.status == 503]
        notes = [f"spool {directory_bytes(setup.spool_dir)} bytes when traffic stopped; {len(refusals)} answered 503"]
        if strict:
            checks.append(Check("503 + Retry-After once the spool cannot take more records",
                                full and bool(refusals) and all(a.retry_after for a in refusals),
                                f"{len(refusals)} 503s, {sum(a.retry_after for a in refusals)} with Retry-After"))
        setup.database.up()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s)))
        after = harness.traffic(server)
        checks.append(Check("serves again after recovery", after.wait_answered(20, setup.timeout_s)))
        attempts += after.stop()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s), what="recovered again"))
        # Full again, then SIGKILL: what was answered must be on the disk, whole (no torn line glued to the next).
        setup.database.down()
        refill = harness.traffic(server, **filling)
        refill.wait(_spool_full(setup, size), setup.timeout_s)
        harness.kill(server)
        attempts += refill.stop()
        setup.database.up()
        restarted = harness.start(**({} if on_tmpfs else {"SPOOL_MAX_BYTES": str(size)}))
        checks.append(recovery_check(*wait_health(restarted.url, recovered, setup.timeout_s),
                                     what="recovered from a SIGKILL with the spool full"))
        tally = count(attempts, stored_rows(setup.database.url))
    return _outcome("spool-disk-full" if on_tmpfs else "spool-cap", setup, load, tally, checks, harness, notes)


def _spool_full(setup: Setup, size: int) -> Callable[[Traffic], bool]:
    """True once 10 requests were refused, or once the spool has been at 90% of ``size`` for 2 s of traffic
    (a server that neither refuses nor spools by then is serving unrecorded: the count will say)."""
    since: list[float] = []

    def full(traffic: Traffic) -> bool:
        if traffic.refused >= 10:
            return True
        if not since and directory_bytes(setup.spool_dir) >= 0.9 * size:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] > 2
    return full


def large_spool(setup: Setup) -> Outcome:
    """A restart on a large spool: recovery, and a peak memory that does not grow with the spool's size.

    Loading a model can briefly take far more memory than serving it (the default model: a peak some 500 MiB
    above its steady RSS), and a spool read into memory after that transient does not raise the peak until it is
    bigger than the gap. So the spool is built to ``large_spool_bytes`` *above* that gap, measured on a fresh
    server, and the restart's peak RSS may exceed the fresh server's by at most a quarter of
    ``large_spool_bytes`` (32 MiB at most): replay batches and driver buffers, not the spool.
    """
    with Harness(setup) as harness:
        fresh = harness.start(SPOOL_DIR=str(setup.workdir / "empty-spool"))
        time.sleep(1)  # let the load's transient memory go back before reading the steady RSS
        baseline = memory_bytes(fresh.process.pid, "VmHWM")
        transient = baseline - memory_bytes(fresh.process.pid, "VmRSS")
        harness.kill(fresh)
        target = transient + setup.large_spool_bytes
        allowance = min(setup.large_spool_bytes // 4, 32 * MiB)
        scale = max(1.0, target / (100 * MiB))  # waits grow with the spool to build and replay
        load = (f"4 clients x 32 texts of 8,000 characters (one text, cached), database down until the spool holds "
                f"{target // MiB} MiB")
        server = harness.start(SPOOL_MAX_BYTES=str(2 * target))
        setup.database.down()
        traffic = harness.traffic(server, 4, texts_per_request=32, text=repeated_text(8000))
        filled = traffic.wait(lambda _: directory_bytes(setup.spool_dir) >= target, setup.timeout_s * 4 * scale)
        attempts = traffic.stop()
        harness.stop(server)
        size = directory_bytes(setup.spool_dir)
        checks = [Check(f"a spool of {target // MiB} MiB built", filled, f"{size / MiB:.0f} MiB")]
        setup.database.up()
        restarted = harness.start(SPOOL_MAX_BYTES=str(2 * target))
        ok, state, waited = wait_health(restarted.url, recovered, setup.timeout_s * 4 * scale)
        checks.append(recovery_check(ok, state, waited))
        growth = memory_bytes(restarted.process.pid, "VmHWM") - baseline
        checks.append(Check(f"peak RSS of the restart at most {allowance // MiB} MiB above a fresh server's",
                            growth <= allowance, f"+{growth / MiB:.0f} MiB over {baseline / MiB:.0f} MiB"))
        notes = [f"spool {size / MiB:.0f} MiB (the model's start-up transient: {transient / MiB:.0f} MiB); restart "
                 f"peak RSS {growth / MiB:+.0f} MiB over a fresh server's {baseline / MiB:.0f} MiB; recovered in "
                 f"{waited:.1f} s"]
        tally = count(attempts, stored_rows(setup.database.url))
    return _outcome("large-spool", setup, load, tally, checks, harness, notes)


# --- SPOOL_DIR ownership ------------------------------------------------------------------------------------


def two_processes(setup: Setup) -> Outcome:
    """A second server on the same SPOOL_DIR must refuse to start (exit 7, one line) and disturb nothing."""
    quarter = max(1, setup.kill_after // 4)
    load = f"{setup.clients} clients x 1 text to the first server; a second one started on its SPOOL_DIR"
    with Harness(setup) as harness:
        first = harness.start()
        traffic = harness.traffic(first)
        checks = [Check("answers before the second start", traffic.wait_answered(quarter, setup.timeout_s))]
        second = harness.start(wait_ready=False)
        code = harness.refusal(second)
        errors = [line for line in second.log().splitlines() if "ERROR" in line]
        checks.append(Check(f"the second process exits with {int(ExitCode.SPOOL_LOCKED)} (SPOOL_LOCKED)",
                            code == ExitCode.SPOOL_LOCKED,
                            "it started and served" if code is None else f"exit code {code}"))
        checks.append(Check("with one ERROR line naming SPOOL_DIR and no traceback",
                            len(errors) == 1 and str(setup.spool_dir) in errors[0] and "Traceback" not in second.log(),
                            f"ERROR lines: {errors[:3]}"))
        answered = traffic.answered
        checks.append(Check("the first server keeps serving",
                            traffic.wait_answered(answered + quarter, setup.timeout_s)))
        attempts = traffic.stop()
        checks.append(recovery_check(*wait_health(first.url, recovered, setup.timeout_s)))
        tally = count(attempts, stored_rows(setup.database.url))
    return _outcome("two-processes", setup, load, tally, checks, harness)


def other_database(setup: Setup) -> Outcome:
    """Records spooled for one database; restart with another DATABASE_URL: the spool must not go there but be
    set aside and reported on /health, and the command /health gives must deliver it to the first database."""
    half = max(1, setup.kill_after // 2)
    other_url = f"sqlite:///{setup.workdir / 'other.db'}"
    load = (f"{setup.clients} clients x 1 text, {half} answers while the database is down; SIGTERM; restart on "
            f"another database ({half // 2} answers there); `spool replay` into the first")
    with Harness(setup) as harness:
        first = harness.start()
        setup.database.down()
        traffic = harness.traffic(first)
        checks = [Check("answers while the database is down", traffic.wait_answered(half, setup.timeout_s))]
        spooled = traffic.stop()
        checks.append(Check("the first server stops cleanly (SIGTERM)", harness.stop(first) == 0))
        setup.database.up()
        second = harness.start(DATABASE_URL=other_url)
        own_traffic = harness.traffic(second)
        checks.append(Check("the restarted server serves",
                            own_traffic.wait_answered(max(1, half // 2), setup.timeout_s)))
        own = own_traffic.stop()
        # Once its own records are in, a replay of the old spool would have happened: it comes before new rows.
        checks.append(Check("the restarted server records its own predictions",
                            _wait_recorded(own, other_url, setup.timeout_s)))
        spooled_ids = {attempt.request_id for attempt in spooled}
        leaked = sum(request_id in spooled_ids for _, request_id in stored_rows(other_url))
        checks.append(Check("nothing spooled for the first database went into the other", not leaked,
                            f"{leaked} records replayed into {other_url}"))
        state = health(second.url)
        foreign = (state or {}).get("database", {}).get("foreign_spools") or []
        answered = sum(attempt.answered for attempt in spooled)
        checks.append(Check("/health reports the spool set aside, with its records", bool(foreign) and sum(
            spool["rows"] for spool in foreign) >= answered, f"{answered} answered; foreign_spools: {foreign}"))
        for spool in foreign:
            replay = subprocess.run([sys.executable, "-m", "server.cli", "spool", "replay", "--spool-dir",
                                     spool["path"], "--into", setup.database.url], env=harness.env(), cwd=ROOT,
                                    capture_output=True, text=True, timeout=setup.timeout_s * 4)
            checks.append(Check(f"`sentiment-analyzer spool replay --spool-dir {spool['path']} --into` succeeds",
                                replay.returncode == 0,
                                f"exit {replay.returncode}: {(replay.stdout + replay.stderr)[-500:]}"))

        def cleared(state: dict | None) -> bool:
            return recovered(state) and not state["database"].get("foreign_spools")

        checks.append(recovery_check(*wait_health(second.url, cleared, setup.timeout_s),
                                     what="the set-aside spool gone from /health after the replay"))
        tally = count(spooled, stored_rows(setup.database.url)) + count(own, stored_rows(other_url))
    return _outcome("other-database", setup, load, tally, checks, harness)


def _wait_recorded(attempts: list[Attempt], url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while count(attempts, stored_rows(url)).lost:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# --- content ------------------------------------------------------------------------------------------------


def nul_text_stored(setup: Setup) -> Outcome:
    """Texts holding U+0000 (PostgreSQL's text type refuses it): stored, with the original text's sha256."""
    quarter = max(1, setup.kill_after // 4)
    load = f"{setup.clients} clients x 2 texts holding U+0000, {quarter} answers"
    with Harness(setup) as harness:
        server = harness.start()
        traffic = harness.traffic(server, texts_per_request=2, text=nul_text)
        checks = [Check("answers", traffic.wait_answered(quarter, setup.timeout_s))]
        attempts = traffic.stop()
        checks.append(recovery_check(*wait_health(server.url, recovered, setup.timeout_s)))
        tally = count(attempts, stored_rows(setup.database.url))
        wrong = _wrong_digests([a for a in attempts if a.answered], setup.database.url)
        checks.append(Check("each record keeps the sha256 of the text as sent", not wrong,
                            f"{wrong} requests' records have other digests"))
    return _outcome("nul-text", setup, load, tally, checks, harness)


def _wrong_digests(attempts: list[Attempt], url: str) -> int:
    """Answered requests whose stored records' text_sha256 are not those of the texts they sent."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(PREDICTIONS.c.request_id, PREDICTIONS.c.text_sha256)).all()
    finally:
        engine.dispose()
    digests: dict[str, Counter] = defaultdict(Counter)
    for request_id, digest in rows:
        digests[request_id][digest] += 1
    wrong = 0
    for attempt in attempts:
        sent = Counter(hashlib.sha256(nul_text(attempt.request_id, index).encode()).hexdigest()
                       for index in range(attempt.texts))
        wrong += digests.get(attempt.request_id, Counter()) != sent
    return wrong


SCENARIOS: dict[str, Callable[[Setup], Outcome]] = {
    "sigkill": sigkill,
    "sigkill-database-down": sigkill_database_down,
    "outage": outage,
    "idle-recovery": idle_recovery,
    "spool-disk-full": spool_disk_full,
    "spool-cap": spool_cap,
    "two-processes": two_processes,
    "other-database": other_database,
    "nul-text": nul_text_stored,
    "large-spool": large_spool,
}
