"""The durability suite: live servers through SIGKILL, database outages, a full spool disk, two processes on one
SPOOL_DIR, a restart on another DATABASE_URL, NUL text, an idle recovery and a large spool at start, on SQLite
and on a real PostgreSQL. Each asserts that every request answered 200 has its record exactly once once the
server has recovered, plus what the scenario itself promises (exit code 7, 503 + Retry-After, bounded memory).

The scenarios are ``scripts/benchlib/chaos/scenarios.py``: ``scripts/chaos.py`` runs the same ones longer and
per durability mode and writes the table in docs/RELIABILITY.md. Here the server runs in its default mode (the
one the guarantee is for) with a small load, so that each test takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.benchlib.chaos import scenarios
from scripts.benchlib.chaos.harness import Setup, Unsupported
from scripts.benchlib.chaos.report import BEGIN, END, write_into
from scripts.benchlib.chaos.scenarios import Outcome
from scripts.benchlib.chaos.tally import count
from scripts.benchlib.chaos.traffic import Attempt
from scripts.benchlib.databases import sqlite_database

MiB = 1 << 20


@pytest.fixture
def setup(tiny_artifact: Path, tmp_path: Path) -> Callable[..., Setup]:
    """A scenario's setup on the tiny model: 4 clients, a SIGKILL within 0.3 s after 60 answers, 30 s waits."""

    def make(database, **overrides) -> Setup:
        values = {"clients": 4, "kill_after": 60, "jitter_s": 0.3, "timeout_s": 30.0, **overrides}
        return Setup(tiny_artifact, database, tmp_path / "run", **values)

    return make


def test_count_tells_lost_duplicated_stray_and_unanswered_records_apart():
    attempts = [
        Attempt("ok", 2, 200, ids=["a", "b"]),
        Attempt("lost-one", 2, 200, ids=["c", "d"]),
        Attempt("twice", 1, 200, ids=["e"]),
        Attempt("extra", 1, 200, ids=["f"]),
        Attempt("no-ids", 2, 200),  # an answer without record ids: counted by the request's texts
        Attempt("no-ids-short", 2, 200),
        Attempt("in-flight", 1, None),  # no answer, yet recorded: allowed
        Attempt("refused", 1, 503, retry_after=True),
    ]
    rows = [("a", "ok"), ("b", "ok"), ("c", "lost-one"), ("e", "twice"), ("e", "twice"), ("f", "extra"),
            ("g", "extra"), ("h", "no-ids"), ("i", "no-ids"), ("j", "no-ids-short"), ("k", "in-flight"),
            ("z", "nobody")]
    tally = count(attempts, rows)
    assert (tally.sent, tally.answered, tally.refused, tally.unanswered_recorded) == (8, 6, 1, 1)
    assert tally.stored == 4 and sorted(tally.lost_ids) == ["lost-one", "no-ids-short"]
    assert sorted(tally.duplicated_ids) == ["extra", "twice"] and tally.stray == 1
    assert not tally.exactly_once
    assert count(attempts[:1], rows[:2]).exactly_once


def test_the_table_replaces_only_the_generated_section(tmp_path):
    document = tmp_path / "RELIABILITY.md"
    document.write_text(f"# Prose kept by hand\n\n{BEGIN}\nold table\n{END}\n\nmore prose\n")
    write_into(document, f"{BEGIN}\nnew table\n{END}")
    assert document.read_text() == f"# Prose kept by hand\n\n{BEGIN}\nnew table\n{END}\n\nmore prose\n"


def assert_kept_promises(outcome: Outcome, answered: int) -> None:
    """At least ``answered`` requests were answered, each recorded exactly once, and every check passed."""
    assert outcome.tally.answered >= answered, outcome.describe()
    assert not outcome.problems, outcome.describe()


def test_sigkill_mid_stream_loses_no_answered_prediction(store_db, setup):
    outcome = scenarios.sigkill(setup(store_db, seed=1))
    assert_kept_promises(outcome, answered=60)


def test_sigkill_while_the_database_is_down_loses_no_answered_prediction(store_db, setup):
    outcome = scenarios.sigkill_database_down(setup(store_db, seed=2))
    assert_kept_promises(outcome, answered=60)


def test_full_spool_disk_refuses_with_503_and_loses_nothing(store_db, setup):
    try:
        outcome = scenarios.spool_disk_full(setup(store_db, full_spool_bytes=2 * MiB))
    except Unsupported as reason:
        pytest.skip(str(reason))
    assert_kept_promises(outcome, answered=20)
    assert outcome.tally.refused, outcome.describe()


def test_spool_cap_refuses_with_503_and_loses_nothing(tmp_path, setup):
    with sqlite_database(tmp_path) as database:
        outcome = scenarios.spool_cap(setup(database, full_spool_bytes=1 * MiB))
    assert_kept_promises(outcome, answered=20)
    assert outcome.tally.refused, outcome.describe()


def test_a_second_process_on_the_same_spool_dir_refuses_to_start(tmp_path, setup):
    with sqlite_database(tmp_path) as database:
        outcome = scenarios.two_processes(setup(database))
    assert_kept_promises(outcome, answered=30)


@pytest.mark.postgres
def test_text_with_nul_is_stored_on_postgresql(pg_store_db, setup):
    outcome = scenarios.nul_text_stored(setup(pg_store_db))
    assert_kept_promises(outcome, answered=15)


def test_a_spool_is_not_replayed_into_another_database_url(store_db, setup):
    outcome = scenarios.other_database(setup(store_db))
    assert_kept_promises(outcome, answered=30)


def test_an_idle_server_notices_that_the_database_is_back(store_db, setup):
    outcome = scenarios.idle_recovery(setup(store_db))
    assert_kept_promises(outcome, answered=30)


@pytest.mark.postgres
def test_a_large_spool_at_start_is_replayed_in_bounded_memory(pg_store_db, setup):
    outcome = scenarios.large_spool(setup(pg_store_db, large_spool_bytes=48 * MiB))
    assert_kept_promises(outcome, answered=100)
