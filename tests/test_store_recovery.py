"""The store recovering honestly: replay in bounded chunks and in order, /health that tells the truth (and no
connection details), idle recovery, rows a database refuses, foreign spools and the `spool` commands."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, select, text

from server import cli_store
from server.metrics import Metrics
from server.store import migrate, prediction_store, sink, writer
from server.store import wal as wal_module
from server.store.db import make_engine
from server.store.rejected import FILENAME as REJECTED
from server.store.rejected import RejectedFile, read_entries
from server.store.rows import encode_lines, record_row
from server.store.sink import DatabaseSink
from server.store.spooldir import database_identity, describe_identity
from server.store.tables import PREDICTIONS
from server.store.wal import WriteAheadLog
from tests.store_fixtures import make_record, ok_but_for_lost_records, scraped, stored_ids, wait_until


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_store.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def leave_spool(spool_dir: Path, database_url: str, records: list) -> None:
    """A spool as a previous process left it: the records on disk, bound to ``database_url``."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    wal = WriteAheadLog(spool_dir, 1 << 30)
    wal.open()
    wal.append(encode_lines([record_row(r, True) for r in records]))
    wal.close()
    (spool_dir / "database.json").write_text(json.dumps(database_identity(database_url)))


def migrated(url: str) -> None:
    """The database's schema at this release's head, as `db upgrade` leaves it."""
    engine = create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


def refuse(url: str, condition: str, name: str = "refuse") -> None:
    """Make the database refuse rows matching ``condition`` (``{row}`` before each column): a CHECK constraint on
    PostgreSQL, a trigger on SQLite (which cannot add a constraint to a table)."""
    engine = create_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            check = condition.format(row="")
            connection.execute(text(f"ALTER TABLE predictions ADD CONSTRAINT {name} CHECK (NOT ({check}))"))
        else:
            when = condition.format(row="NEW.")
            connection.execute(text(f"CREATE TRIGGER {name} BEFORE INSERT ON predictions WHEN {when} "
                                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    engine.dispose()


def accept(url: str, name: str = "refuse") -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"ALTER TABLE predictions DROP CONSTRAINT {name}"))
        else:
            connection.execute(text(f"DROP TRIGGER {name}"))
    engine.dispose()


async def test_a_backlog_is_replayed_in_bounded_chunks_in_order_before_new_records(store_db, store_settings,
                                                                                   open_store, monkeypatch):
    settings = store_settings(store_durability="async")
    backlog = [make_record(f"old {i}") for i in range(600)]
    leave_spool(settings.spool_dir, store_db.url, backlog)
    monkeypatch.setattr(writer, "REPLAY_BUDGET_S", 0.0)  # one batch per flush
    written: list[str] = []
    write = DatabaseSink.write

    def slow_write(self, rows, **kwargs):
        written.extend(r["id"] for r in rows)
        time.sleep(0.01)
        return write(self, rows, **kwargs)

    monkeypatch.setattr(DatabaseSink, "write", slow_write)
    metrics = Metrics()
    store = await open_store(settings, metrics, batch_rows=50)
    await wait_until(lambda: written, what="the replay to begin")
    health = store.health()
    assert health["state"] == "replaying" and health["status"] == "degraded"
    assert 0 < health["replay"]["rows_left"] == health["spool_rows"] < 600
    assert scraped(store, metrics.store_up) == 1 and scraped(store, metrics.store_replaying) == 1
    fresh = [make_record(f"new {i}") for i in range(20)]
    for record in fresh:
        store.submit(record)  # async mode: must go behind the backlog, not before it
    await wait_until(lambda: store.health()["status"] == "ok", timeout=30, what="the backlog and the new records")
    await wait_until(lambda: len(written) >= 620, what="the new records")
    assert written[:600] == [r.id for r in backlog]
    assert sorted(written[600:]) == sorted(r.id for r in fresh)
    assert scraped(store, metrics.store_replaying) == 0 and store.health()["replay"] is None


async def test_an_idle_store_sees_the_database_come_back(store_db, store_settings, open_store):
    await asyncio.to_thread(store_db.down)
    metrics = Metrics()
    store = await open_store(store_settings(db_pool_timeout_s=0.3), metrics)
    assert store.health()["state"] == "down" and scraped(store, metrics.store_up) == 0
    await asyncio.to_thread(store_db.up)
    await wait_until(lambda: store.health()["status"] == "ok", what="recovery without any traffic")
    assert scraped(store, metrics.store_up) == 1


async def test_an_idle_store_sees_the_database_go_down(store_db, store_settings, open_store):
    """It said "up" for as long as no record came to find the outage (red team helper-89)."""
    metrics = Metrics()
    store = await open_store(store_settings(db_pool_timeout_s=0.3), metrics, check_interval_s=0.2)
    await wait_until(lambda: store.health()["status"] == "ok", what="the store up")
    await asyncio.to_thread(store_db.down)
    try:
        await wait_until(lambda: store.health()["state"] == "down", timeout=30, what="the outage seen without traffic")
        assert scraped(store, metrics.store_up) == 0
    finally:
        await asyncio.to_thread(store_db.up)
    await wait_until(lambda: store.health()["status"] == "ok", timeout=30, what="recovery")


@pytest.mark.postgres
async def test_health_names_the_trouble_not_the_connection(pg_store_db, tmp_path, open_store):
    from server.config import load_settings

    settings = load_settings(database_url=pg_store_db.url, spool_dir=tmp_path / "spool", db_pool_timeout_s=0.3,
                             db_auto_migrate=True)
    await asyncio.to_thread(pg_store_db.down)
    store = await open_store(settings)
    health = json.dumps(store.health())
    assert "database unavailable (OperationalError: connection refused)" in health  # its kind (server.store.trouble)
    url = create_engine(pg_store_db.url).url
    for detail in (url.host, str(url.port), f"{url.username}@", "Is the server running", "failed"):
        assert detail not in health, detail
    await asyncio.to_thread(pg_store_db.up)


async def test_a_nul_character_is_stored_replaced_not_refused(store_db, store_settings, open_store):
    settings = store_settings()
    metrics = Metrics()
    store = await open_store(settings, metrics)
    original = "a fine\x00film"
    record = make_record(original)
    await store.record([record])
    await wait_until(lambda: stored_ids(store_db.url) == [record.id], what="the record")
    engine = create_engine(store_db.url)
    with engine.connect() as connection:
        stored_text, digest = connection.execute(select(PREDICTIONS.c.text, PREDICTIONS.c.text_sha256)).one()
    engine.dispose()
    expected = original.replace("\x00", "\ufffd") if store_db.backend == "postgresql" else original
    assert stored_text == expected
    assert digest == hashlib.sha256(original.encode()).hexdigest()  # the hash of what was sent
    assert metrics.store_rejected._value.get() == 0


async def test_a_refused_row_is_isolated_by_halving_and_replayable_after_a_fix(store_db, store_settings, open_store,
                                                                               monkeypatch):
    monkeypatch.setattr(prediction_store, "WATCH_INTERVAL_S", 0.1)
    settings = store_settings()
    metrics = Metrics()
    store = await open_store(settings, metrics, flush_interval_s=0.5)
    refuse(store_db.url, "{row}text = 'poison'")
    statements = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda *args: statements.append(args[2]) if args[2].lstrip().upper().startswith("INSERT") else None)
    records = [make_record(f"fine {i}") for i in range(64)]
    records[37] = make_record("poison")
    await store.record(records)  # one group, one batch
    await wait_until(lambda: len(stored_ids(store_db.url)) == 63, what="the other 63 rows")
    assert len(statements) <= 13, len(statements)  # 1 + 2 per halving level, not 64 one-row inserts
    await wait_until(lambda: store.health()["rejected_rows"] == 1, what="/health to count the refused row")
    assert metrics.store_rejected._value.get() == 1
    kept = [json.loads(line) for line in (settings.spool_dir / REJECTED).read_text().splitlines()]
    assert [entry["row"]["id"] for entry in kept] == [records[37].id]

    assert run_cli("spool", "replay-rejected", "--spool-dir", str(settings.spool_dir),
                   "--into", store_db.url) == 0  # still refused: kept, nothing lost
    assert len(stored_ids(store_db.url)) == 63 and store.health()["rejected_rows"] == 1
    accept(store_db.url)
    assert run_cli("spool", "replay-rejected", "--spool-dir", str(settings.spool_dir),
                   "--into", store_db.url) == 0
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    await wait_until(lambda: store.health()["rejected_rows"] == 0, what="/health to see the replay")


NESTED = b'{"a":' + b"[" * 200_000 + b"\\ud800" + b"]" * 200_000 + b"}\n"  # past json's recursion limit


@pytest.mark.parametrize("damaged", [b"\x00garbage, not a record\n", NESTED],
                         ids=["garbage", "nested-past-the-recursion-limit"])
async def test_a_damaged_spool_line_is_set_aside_without_blaming_the_database(store_db, store_settings, open_store,
                                                                              caplog, damaged):
    """A line damaged on disk never reaches the database: the log said "the database refused" it, sending an
    operator after constraints and schemas. A line nested past ``json``'s recursion limit raised RecursionError in
    the writer, which held the database down for good (red team helper-61)."""
    settings = store_settings()
    records = [make_record(f"t{i}") for i in range(4)]
    leave_spool(settings.spool_dir, store_db.url, records[:2])
    wal = WriteAheadLog(settings.spool_dir, 1 << 30)
    wal.open()
    wal.append(damaged)
    wal.append(encode_lines([record_row(r, True) for r in records[2:]]))
    wal.close()
    store = await open_store(settings)
    await wait_until(lambda: len(stored_ids(store_db.url)) == 4, what="the four records around the damaged line")
    await wait_until(lambda: store.health()["rejected_rows"] == 1, what="/health to count the damaged line")
    assert store.health()["status"] == "ok", store.health()
    kept = [json.loads(line) for line in (settings.spool_dir / REJECTED).read_text().splitlines()]
    assert [(entry["error"], entry["line"]) for entry in kept] == [("unreadable spool line", damaged.decode())]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("1 spool lines are damaged, not records: set aside in" in m and "no replay can write them" in m
               for m in errors), errors
    assert not any("database refused" in m for m in errors), errors


async def test_a_database_that_refuses_every_row_is_down_not_a_reason_to_set_rows_aside(store_db, store_settings,
                                                                                         open_store):
    settings = store_settings()
    store = await open_store(settings)
    refuse(store_db.url, "{row}score >= 0")
    records = [make_record(f"t{i}") for i in range(5)]
    await store.record(records)
    await wait_until(lambda: store.health()["state"] == "down", what="the store to give up on the database")
    assert "refuses every row" in store.health()["reason"]
    assert store.health()["rejected_rows"] == 0 and not (settings.spool_dir / REJECTED).exists()
    accept(store_db.url)
    await wait_until(lambda: store.health()["status"] == "ok", what="recovery")
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)


async def test_a_spool_for_another_database_is_kept_apart_until_replayed_on_purpose(store_db, store_settings,
                                                                                    open_store, tmp_path,
                                                                                    monkeypatch, capsys, caplog):
    monkeypatch.setattr(prediction_store, "WATCH_INTERVAL_S", 0.1)
    records = [make_record(f"t{i}") for i in range(20)]
    settings = store_settings()
    leave_spool(settings.spool_dir, store_db.url, records)
    engine = make_engine(settings)
    migrate.upgrade(engine)
    engine.dispose()
    other_url = f"sqlite:///{tmp_path}/other.db"

    metrics = Metrics()
    store = await open_store(store_settings(database_url=other_url), metrics)
    health = store.health()
    assert health["status"] == "degraded" and len(health["foreign_spools"]) == 1
    # records in no database: a red team found /metrics silent (store up, nothing spooled), so no alert could fire
    assert scraped(store, metrics.store_foreign_spool_rows) == 20
    foreign = health["foreign_spools"][0]
    assert foreign["rows"] == 20 and foreign["command"].startswith("sentiment-analyzer spool replay --spool-dir")
    # the database to replay it into is named, never as this server's DATABASE_URL (which is the wrong one)
    assert foreign["command"].endswith("--into URL") and "DATABASE_URL" not in foreign["command"]
    assert foreign["database"] == describe_identity(database_identity(store_db.url)), foreign
    assert foreign["path"] in health["reason"]
    assert any(r.levelname == "ERROR" and "not for this DATABASE_URL" in r.getMessage() for r in caplog.records)
    await store.record([make_record("for the other one")])  # keeps serving, into its own database
    await wait_until(lambda: len(stored_ids(other_url)) == 1, what="the new database's own record")
    assert stored_ids(store_db.url) == []

    monkeypatch.setenv("DATABASE_URL", other_url)
    assert run_cli("spool", "replay", "--spool-dir", foreign["path"]) == 1
    assert "pass --into URL" in capsys.readouterr().err
    assert run_cli("spool", "replay", "--spool-dir", str(settings.spool_dir)) == 1  # the server holds it
    assert "in use by another process" in capsys.readouterr().err
    assert run_cli("spool", "replay", "--spool-dir", foreign["path"], "--into", store_db.url) == 0
    assert "replayed 20 predictions" in capsys.readouterr().out
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)
    assert not Path(foreign["path"]).exists()
    await wait_until(lambda: store.health()["status"] == "ok", what="/health to see the foreign spool gone")
    await wait_until(lambda: scraped(store, metrics.store_foreign_spool_rows) == 0, what="the gauge to follow")
    assert len(stored_ids(other_url)) == 1


def test_a_replay_counts_rows_the_database_already_holds_apart_from_those_it_wrote(store_db, tmp_path,
                                                                                  monkeypatch, capsys):
    """A spool replayed again after an interrupted replay (or a copy of one) offers rows the database holds: they
    are not inserted twice, and the report used to count them as written."""
    records = [make_record(f"t{i}") for i in range(20)]
    migrated(store_db.url)
    monkeypatch.setenv("DATABASE_URL", store_db.url)
    leave_spool(tmp_path / "first", store_db.url, records[:15])
    assert run_cli("spool", "replay", "--spool-dir", str(tmp_path / "first")) == 0
    assert "replayed 15 predictions from" in capsys.readouterr().out
    leave_spool(tmp_path / "again", store_db.url, records)
    assert run_cli("spool", "replay", "--spool-dir", str(tmp_path / "again")) == 0
    assert ": 5 written, 15 already in the database or repeated in the spool, 0 refused" in capsys.readouterr().out
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)


def test_a_replay_reports_damaged_lines_and_a_repeated_record_as_what_they_are(store_db, tmp_path, monkeypatch,
                                                                              capsys):
    """A damaged line was counted among the predictions replayed and refused, and a record repeated in the spool as
    one the database held already."""
    records = [make_record(f"t{i}") for i in range(2)]
    migrated(store_db.url)
    monkeypatch.setenv("DATABASE_URL", store_db.url)
    leave_spool(tmp_path / "spool", store_db.url, records)
    wal = WriteAheadLog(tmp_path / "spool", 1 << 30)
    wal.open()
    wal.append(b"\x00garbage, not a record\n")
    wal.append(encode_lines([record_row(records[0], True)]))
    wal.close()
    assert run_cli("spool", "replay", "--spool-dir", str(tmp_path / "spool")) == 0
    out = capsys.readouterr().out
    assert out.startswith("replayed 3 predictions and 1 damaged line that is not a record from "), out
    assert ": 2 written, 1 already in the database or repeated in the spool, 0 refused, 1 damaged line (kept in " \
           in out, out
    assert sorted(stored_ids(store_db.url)) == sorted(r.id for r in records)


def test_spool_status_counts_damaged_lines_apart_from_the_predictions(store_db, tmp_path, monkeypatch, capsys):
    """Status counted lines, so a damaged one was a prediction there and a damaged line at replay (red team 59)."""
    records = [make_record(f"t{i}") for i in range(3)]
    leave_spool(tmp_path / "spool", store_db.url, records[:2])
    monkeypatch.setattr(wal_module, "LINE_LIMIT", 1000)  # a line longer than this is no record
    wal = WriteAheadLog(tmp_path / "spool", 1 << 30)
    wal.open()
    wal.append(b"\x00garbage, not a record\n")
    wal.append(b"[1, 2]\n")  # JSON, but not a record
    wal.append(NESTED)  # read again by json, whose recursion limit it passes
    wal.append(b"x" * 3000 + b"\n")  # over the limit: skipped to its end, not held
    wal.append(encode_lines([record_row(records[2], True)]))
    wal.append(b'{"torn": ')  # no newline: a crash in mid-append, not a line (the server cuts it at start)
    wal.close()
    assert run_cli("spool", "status", "--spool-dir", str(tmp_path / "spool")) == 0
    out = capsys.readouterr().out
    assert ": 3 predictions, 4 damaged lines that are not records (" in out, out


def test_spool_status_says_what_a_spool_holds_and_for_which_database(store_db, tmp_path, monkeypatch, capsys):
    spool_dir = tmp_path / "spool"
    leave_spool(spool_dir, store_db.url, [make_record("a"), make_record("b")])
    monkeypatch.setenv("SPOOL_DIR", str(spool_dir))
    assert run_cli("spool", "status") == 0
    out = capsys.readouterr().out
    assert "2 predictions" in out and "0 rejected rows" in out
    assert ("sqlite:////" if store_db.backend == "sqlite" else "postgresql://postgres@127.0.0.1:") in out


async def test_a_segment_removed_by_hand_does_not_stall_the_writer_and_its_records_count_as_lost(
        store_db, store_settings, open_store, caplog):
    """Counted and on /health: they were only logged, /health ok and no lost record counted, while 7,576 answered
    predictions' records never reached the database (red team helper-88)."""
    settings = store_settings(db_pool_timeout_s=0.3)
    leave_spool(settings.spool_dir, store_db.url, [make_record("removed by an operator")])
    await asyncio.to_thread(store_db.down)
    metrics = Metrics()
    store = await open_store(settings, metrics)
    assert store.health()["spool_rows"] == 1
    for segment in settings.spool_dir.glob("wal-*"):
        segment.unlink()
    await asyncio.to_thread(store_db.up)
    await wait_until(lambda: ok_but_for_lost_records(store.health()),
                     what="the writer to get past the missing records")
    assert store.health()["lost_rows"] == 1 and metrics.store_lost._value.get() == 1
    assert any("disappeared" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    record = make_record("after")
    await store.record([record])
    await wait_until(lambda: store.health()["queue_depth"] == 0, what="the new record to be written")
    assert stored_ids(store_db.url) == [record.id]


async def test_a_spool_from_an_earlier_release_is_set_aside_as_of_an_unknown_database(store_db, store_settings,
                                                                                        open_store, capsys):
    settings = store_settings()
    settings.spool_dir.mkdir(parents=True)
    records = [make_record(f"old release {i}") for i in range(3)]
    (settings.spool_dir / "predictions.jsonl").write_bytes(encode_lines([record_row(r, True) for r in records]))
    store = await open_store(settings)
    (foreign,) = store.health()["foreign_spools"]
    assert foreign["rows"] == 3 and not (settings.spool_dir / "predictions.jsonl").exists()
    await store.record([make_record("new")])  # the current spool goes on as usual

    assert run_cli("spool", "replay", "--spool-dir", foreign["path"]) == 1  # its database is unknown: say which
    assert "an unknown database" in capsys.readouterr().err
    assert run_cli("spool", "replay", "--spool-dir", foreign["path"], "--into", store_db.url) == 0
    await wait_until(lambda: len(stored_ids(store_db.url)) == 4, what="the old records and the new one")
    assert {r.id for r in records} <= set(stored_ids(store_db.url))


def test_a_row_lacking_an_optional_column_does_not_strip_it_from_the_rest_of_its_chunk(store_db, tmp_path,
                                                                                         monkeypatch):
    """Rows are inserted many to a statement whose columns were the first row's: a first line without ``text`` or
    ``api_key_id`` (a release before keys, a hand edit) stored every other row of its chunk without its text and
    its key, and a prediction without its key takes feedback from anyone holding its id."""
    spool_dir = tmp_path / "spool"
    records = [make_record(f"text {n}", api_key_id=f"key{n}") for n in range(4)]
    leave_spool(spool_dir, store_db.url, [])
    rows = [record_row(r, True) for r in records]
    del rows[0]["text"], rows[0]["api_key_id"]
    wal = WriteAheadLog(spool_dir, 1 << 30)
    wal.open()
    wal.append(encode_lines(rows))
    wal.close()
    monkeypatch.setenv("SPOOL_DIR", str(spool_dir))
    migrated(store_db.url)
    assert run_cli("spool", "replay", "--into", store_db.url) == 0
    engine = create_engine(store_db.url)
    with engine.connect() as connection:
        stored = {row.id: (row.text, row.api_key_id) for row in connection.execute(select(PREDICTIONS))}
    engine.dispose()
    assert stored == {records[0].id: (None, None),
                      **{r.id: (r.text, r.api_key_id) for r in records[1:]}}


def test_refused_rows_are_kept_whole_or_not_at_all_when_the_disk_is_full(small_tmpfs):
    """``rejected.jsonl`` took a short write on a full disk unchecked: the replay said the rows were kept and
    deleted their spool segment, while the file held some of them and half a line, which the next append then
    spoiled. Now an append that does not fit leaves the file as it was and raises, naming it; a line torn
    earlier stays a line of its own."""
    rejected = RejectedFile(small_tmpfs)
    rejected.append([{"error": "refused", "row": {"id": "first"}}])
    before = rejected.path.read_bytes()
    filler = small_tmpfs / "filler"
    with pytest.raises(OSError):  # fill the disk to its last byte
        with filler.open("wb") as handle:
            while True:
                handle.write(b"x" * 4096)
                handle.flush()
    filler.write_bytes(filler.read_bytes()[:-6000])  # room for part of what comes next, not all of it
    big = [{"error": "refused", "row": {"id": f"r{n}", "text": "y" * 1000}} for n in range(20)]
    with pytest.raises(OSError, match=r"No space left on device: '.*rejected\.jsonl'"):
        rejected.append(big)
    assert rejected.path.read_bytes() == before
    filler.unlink()
    with rejected.path.open("ab") as handle:
        handle.write(b'{"error": "torn by a cras')  # a crash mid-append, no newline
    rejected.append(big)
    entries = [entry for entry, _ in read_entries(rejected.path)]
    assert [e["row"]["id"] if e else None for e in entries] == ["first", None] + [f"r{n}" for n in range(20)]


def test_the_rejected_count_includes_a_torn_last_line_which_the_replay_offers(tmp_path):
    """``spool status`` counted newlines: a last line without one (a crash mid-append, a hand edit) was left out,
    though ``read_entries`` reads it and the replay offers the row in it."""
    rejected = RejectedFile(tmp_path)
    assert rejected.count() == 0
    rejected.append([{"error": "refused", "row": {"id": f"r{n}"}} for n in range(2)])
    assert rejected.count() == 2
    with rejected.path.open("ab") as handle:
        handle.write(b'{"error": "refused", "row": {"id": "r2"}}')  # no newline
    assert rejected.count() == len(list(read_entries(rejected.path))) == 3


def test_two_replays_of_the_rejected_rows_at_once_are_one_and_a_refusal(store_db, tmp_path, capsys):
    """Two `replay-rejected` run together both offered the taken file: one ended in a traceback, and each set the
    rows still refused aside again, so they were kept twice."""
    spool_dir = tmp_path / "spool"
    leave_spool(spool_dir, store_db.url, [])
    migrated(store_db.url)
    refuse(store_db.url, "{row}text = 'poison'")
    rejected = RejectedFile(spool_dir)
    rejected.append([{"error": "refused", "row": record_row(make_record("poison"), True)}])
    kept = rejected.path.read_bytes()
    with rejected.replaying():  # another replay under way
        assert run_cli("spool", "replay-rejected", "--spool-dir", str(spool_dir), "--into", store_db.url) == 1
        err = capsys.readouterr().err
        assert err.startswith("ERROR another `spool replay-rejected` is offering the rows of") and \
            len(err.splitlines()) == 1, err
        assert rejected.path.read_bytes() == kept
    assert run_cli("spool", "replay-rejected", "--spool-dir", str(spool_dir), "--into", store_db.url) == 0
    assert len([entry for entry, _ in read_entries(rejected.path)]) == 1  # still refused, kept once


def test_a_spool_ending_in_rows_the_database_refuses_is_replayed_to_its_end(store_db, tmp_path, capsys):
    """A batch whose every row was refused made the replay stop as if the database refused everything: a spool
    ending in rows a hand-added constraint refuses could never be replayed (nor its segment freed). Now the
    database is asked whether it takes a plain row (rolled back): it does, so those are set aside, however
    many."""
    spool_dir = tmp_path / "spool"
    leave_spool(spool_dir, store_db.url, [make_record("poison") for _ in range(sink.REFUSED_STREAK + 2)])
    migrated(store_db.url)
    refuse(store_db.url, "{row}text = 'poison'")
    assert run_cli("spool", "replay", "--into", str(store_db.url), "--spool-dir", str(spool_dir)) == 0
    assert f"0 written, {sink.REFUSED_STREAK + 2} refused" in capsys.readouterr().out
    assert len(list(read_entries(spool_dir / REJECTED))) == sink.REFUSED_STREAK + 2
    assert stored_ids(store_db.url) == []
