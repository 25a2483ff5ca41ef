"""The in-process API key cache (server/store/keycache.py) on a real SQLite database, with the database's
failures injected: which checks read the database, what a reload picks up, what an outage does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from server.config import load_settings
from server.metrics import Metrics
from server.store import keycache
from server.store.db import make_engine
from server.store.keycache import KeyCache, KeyCheckUnavailable
from server.store.keys import KeyStore, key_digest
from server.store.keysnapshot import KeySnapshot
from server.store.migrate import prepare_schema
from server.store.tables import API_KEYS


class FlakyKeyStore(KeyStore):
    """A real KeyStore that counts its reads and writes, and fails them all while ``failing`` is set."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.failing = False
        self.finds = 0
        self.loads = 0
        self.use_writes: list[dict] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._count = threading.Lock()

    def _fail(self) -> None:
        if self.failing:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused (injected)"))

    def find(self, digest):
        with self._count:
            self.finds += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.01)  # long enough for concurrent reads to overlap
            self._fail()
            return super().find(digest)
        finally:
            with self._count:
                self.in_flight -= 1

    def all_by_digest(self):
        self.loads += 1
        self._fail()
        return super().all_by_digest()

    def record_use(self, last_used):
        self._fail()
        self.use_writes.append(dict(last_used))
        super().record_use(last_used)


@pytest.fixture
def engine(tmp_path: Path):
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/keys.db", spool_dir=tmp_path / "spool")
    engine = make_engine(settings)
    prepare_schema(engine, settings)
    yield engine
    engine.dispose()


async def started(store: KeyStore, ttl_s: float = 60.0) -> KeyCache:
    cache = KeyCache(store, Metrics(), ttl_s)
    await cache.start()
    return cache


def fallbacks(cache: KeyCache) -> float:
    return cache._metrics.key_cache_fallbacks._value.get()


async def test_known_keys_are_checked_without_reading_the_database(engine):
    store = FlakyKeyStore(engine)
    record, key = store.create("ci", "predict")
    cache = await started(store)
    for _ in range(50):
        assert (await cache.authenticate(key)).id == record.id
    assert store.finds == 0 and store.loads == 1


async def test_a_key_created_elsewhere_is_read_once_then_cached(engine):
    store = FlakyKeyStore(engine)
    cache = await started(store)
    record, key = KeyStore(engine).create("made on another replica", "predict")
    assert (await cache.authenticate(key)).id == record.id
    assert (await cache.authenticate(key)).id == record.id
    assert store.finds == 1


async def test_a_reload_picks_up_revocations_and_new_keys_made_elsewhere(engine):
    store = FlakyKeyStore(engine)
    record, key = store.create("leaked", "predict")
    cache = await started(store)
    elsewhere = KeyStore(engine)  # another replica, or the CLI
    elsewhere.revoke(record.id)
    new_record, new_key = elsewhere.create("new", "admin")
    assert (await cache.authenticate(key)).revoked_at is None  # a cache: judged as last read until reloaded
    assert await cache.refresh()
    assert (await cache.authenticate(key)).revoked_at is not None
    assert (await cache.authenticate(new_key)).id == new_record.id
    assert store.finds == 0  # both came with the reload


async def test_the_background_refresher_applies_a_revocation_made_elsewhere(engine):
    store = FlakyKeyStore(engine)
    record, key = store.create("leaked", "predict")
    cache = await started(store, ttl_s=0.2)
    refresher = asyncio.create_task(cache.run())
    try:
        KeyStore(engine).revoke(record.id)
        deadline = time.monotonic() + 30
        while (await cache.authenticate(key)).revoked_at is None:
            assert time.monotonic() < deadline, "the revocation never reached the cache"
            await asyncio.sleep(0.05)
    finally:
        refresher.cancel()
    assert store.loads >= 2


async def test_a_revocation_through_the_cache_is_at_once_and_survives_a_reload_read_before_it(engine):
    store = FlakyKeyStore(engine)
    record, key = store.create("leaked", "predict")
    other, other_key = store.create("bystander", "predict")
    cache = await started(store)
    assert (await asyncio.to_thread(cache.revoke, other.id)).revoked_at is not None
    assert (await cache.authenticate(other_key)).revoked_at is not None  # no reload needed

    read_before_revoking = store.all_by_digest

    def snapshot_then_revoke():
        snapshot = read_before_revoking()
        cache.revoke(record.id)  # commits after the reload's read, before the reload swaps it in
        return snapshot

    store.all_by_digest = snapshot_then_revoke
    assert await cache.refresh()
    assert (await cache.authenticate(key)).revoked_at is not None
    store.all_by_digest = read_before_revoking
    assert await cache.refresh()
    assert (await cache.authenticate(key)).revoked_at is not None


async def test_a_key_read_just_before_its_revocation_through_the_cache_is_refused_at_once(engine):
    """A key created elsewhere since the last reload, so not cached: a check reads it from the database, the
    revocation through this cache commits meanwhile, then the read is cached. The revocation found no entry to
    change, and the stale read was cached unrevoked until the next reload (red team helper-65: 13 s)."""
    store = FlakyKeyStore(engine)
    cache = await started(store)
    record, key = store.create("created elsewhere", "predict")  # after the cache's load
    real_find = store.find
    read, revoked = threading.Event(), threading.Event()

    def find_then_wait(digest):
        found = real_find(digest)
        read.set()
        revoked.wait(10)  # the revocation commits after this read and before the cache takes it
        return found

    store.find = find_then_wait
    checking = asyncio.ensure_future(cache.authenticate(key))
    await asyncio.to_thread(read.wait, 10)
    await asyncio.to_thread(cache.revoke, record.id)
    revoked.set()
    await checking  # the check under way read the key before it was revoked
    store.find = real_find
    assert (await cache.authenticate(key)).revoked_at is not None


async def test_during_an_outage_known_keys_are_judged_from_the_cache_counted_and_logged_once(engine, caplog):
    store = FlakyKeyStore(engine)
    good, good_key = store.create("client", "predict")
    revoked, revoked_key = store.create("old", "predict")
    store.revoke(revoked.id)
    cache = await started(store, ttl_s=0.05)
    store.failing = True
    await asyncio.sleep(0.1)  # every entry is now older than the TTL
    assert not await cache.refresh()
    with caplog.at_level(logging.WARNING, logger="server.store.keycache"):
        for _ in range(5):
            assert (await cache.authenticate(good_key)).id == good.id
        assert (await cache.authenticate(revoked_key)).revoked_at is not None
    assert fallbacks(cache) == 6
    assert store.finds == 0  # the outage is known: no request waits on the database
    warnings = [r.getMessage() for r in caplog.records if "judged by its state" in r.getMessage()]
    assert len(warnings) == 1 and "injected" in warnings[0] and good.id in warnings[0]


async def test_a_failed_read_of_a_stale_key_falls_back_to_the_cache(engine):
    store = FlakyKeyStore(engine)
    record, key = store.create("client", "predict")
    cache = await started(store, ttl_s=0.05)
    await asyncio.sleep(0.1)  # stale, and no reload has failed yet: the check tries the database
    store.failing = True
    assert (await cache.authenticate(key)).id == record.id
    assert store.finds == 1 and fallbacks(cache) == 1


async def test_an_unknown_key_during_an_outage_is_503_until_the_database_is_back(engine):
    store = FlakyKeyStore(engine)
    cache = await started(store)
    record, key = KeyStore(engine).create("created elsewhere during the outage", "predict")
    store.failing = True
    with pytest.raises(KeyCheckUnavailable) as refused:
        await cache.authenticate(key)
    assert refused.value.status_code == 503 and refused.value.retry_after >= 1
    assert "database" in refused.value.message and "retry" in refused.value.message
    with pytest.raises(KeyCheckUnavailable):
        await cache.authenticate("sap_never-issued")
    assert store.finds == 1  # once the outage is known, unknown keys do not queue on the database
    store.failing = False
    assert await cache.refresh()
    assert (await cache.authenticate(key)).id == record.id
    assert await cache.authenticate("sap_never-issued") is None


async def test_the_first_load_failing_does_not_stop_the_server_and_a_later_one_recovers(engine, caplog):
    store = FlakyKeyStore(engine)
    record, key = store.create("client", "predict")
    store.failing = True
    with caplog.at_level(logging.WARNING, logger="server.store.keycache"):
        cache = await started(store)
    assert "503 until the database can be read" in caplog.text
    with pytest.raises(KeyCheckUnavailable):
        await cache.authenticate(key)
    store.failing = False
    assert await cache.refresh()
    assert (await cache.authenticate(key)).id == record.id


async def test_unknown_keys_are_remembered_so_repeating_one_costs_no_reads(engine, monkeypatch):
    monkeypatch.setattr(keycache, "MAX_UNKNOWN", 2)
    store = FlakyKeyStore(engine)
    cache = await started(store, ttl_s=0.3)
    for _ in range(10):
        assert await cache.authenticate("sap_guess-1") is None
    assert store.finds == 1
    await asyncio.sleep(0.4)  # the verdict expires with the TTL
    assert await cache.authenticate("sap_guess-1") is None
    assert store.finds == 2
    for guess in ("sap_guess-2", "sap_guess-3"):  # two more: the oldest verdict is dropped
        assert await cache.authenticate(guess) is None
    assert await cache.authenticate("sap_guess-3") is None
    assert store.finds == 4
    assert await cache.authenticate("sap_guess-1") is None
    assert store.finds == 5


async def test_a_flood_of_new_keys_reads_the_database_a_few_at_a_time(engine):
    store = FlakyKeyStore(engine)
    cache = await started(store)
    verdicts = await asyncio.gather(*(cache.authenticate(f"sap_guess-{i}") for i in range(20)),
                                    *(cache.authenticate("sap_same-guess") for _ in range(20)))
    assert verdicts == [None] * 40
    assert store.most_in_flight <= keycache.LOOKUP_CONCURRENCY
    assert store.finds <= 20 + keycache.LOOKUP_CONCURRENCY  # the same key, waiting, is answered by the first read


async def test_uses_are_written_in_one_batch_off_the_request_path_and_kept_through_an_outage(engine):
    store = FlakyKeyStore(engine)
    first, first_key = store.create("a", "predict")
    second, second_key = store.create("b", "admin")
    cache = await started(store)
    await cache.authenticate(first_key)
    await cache.authenticate(second_key)
    assert store.use_writes == [] and all(k.last_used_at is None for k in store.list())
    store.failing = True
    await cache.write_uses()
    store.failing = False
    await cache.write_uses()
    assert [sorted(batch) for batch in store.use_writes] == [sorted([first.id, second.id])]
    assert all(k.last_used_at is not None for k in store.list())
    await cache.write_uses()
    assert len(store.use_writes) == 1  # nothing new to write


async def test_close_writes_the_last_uses_but_does_not_wait_on_a_database_that_does_not_answer(engine, monkeypatch):
    monkeypatch.setattr(keycache, "CLOSE_WRITE_TIMEOUT_S", 0.2)
    store = FlakyKeyStore(engine)
    record, key = store.create("a", "predict")
    cache = await started(store)
    await cache.authenticate(key)
    await cache.close()
    assert store.list()[0].last_used_at is not None
    cache = await started(store)  # a closed cache's threads are gone
    await cache.authenticate(key)
    answer = threading.Event()
    store.record_use = lambda _used: answer.wait(30)  # a database that hangs
    await cache.close()
    assert not answer.is_set()  # close returned while the write was still waiting
    answer.set()


async def test_last_use_never_moves_backwards(engine):
    store = KeyStore(engine)
    record, _ = store.create("a", "predict")
    later, earlier = store.list()[0].created_at.replace(year=2100), store.list()[0].created_at
    store.record_use({record.id: later})
    store.record_use({record.id: earlier})  # another replica's older batch, arriving late
    assert store.list()[0].last_used_at == later


# the KeyStore underneath


def test_keys_are_stored_hashed_and_revoked_idempotently(engine):
    keys = KeyStore(engine)
    record, key = keys.create("ci bot", "predict")
    assert key.startswith("sap_") and len(key) > 40
    with engine.connect() as connection:
        stored = connection.execute(select(API_KEYS)).one()
    assert key not in [str(v) for v in stored] and stored.key_sha256 == key_digest(key)
    assert keys.find(key_digest(key)).id == record.id
    assert keys.find(key_digest(key + "x")) is None
    revoked = keys.revoke(record.id)
    assert revoked.revoked_at is not None
    assert keys.find(key_digest(key)).revoked_at == revoked.revoked_at
    assert keys.revoke(record.id).revoked_at == revoked.revoked_at  # a second revocation keeps the first time
    assert keys.revoke("nope") is None
    with pytest.raises(ValueError, match="role"):
        keys.create("x", "root")
    with pytest.raises(ValueError, match="name"):
        keys.create("  ", "predict")


class StalledKeyStore(FlakyKeyStore):
    """Its key reads wait until ``answer`` is set: a database server that stopped answering."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.answer = threading.Event()

    def find(self, digest):
        self.answer.wait(30)
        return super().find(digest)


async def test_a_key_lookup_the_database_never_answers_is_a_503_not_a_request_held_for_good(engine):
    """A lookup whose connection went to a stopped server held its request with no answer (red team helper-68:
    one of four requests with a new key still waiting when its client gave up at 100 s)."""
    store = StalledKeyStore(engine)
    cache = KeyCache(store, Metrics(), ttl_s=60, lookup_timeout_s=0.2)
    await cache.start()
    try:
        record, key = KeyStore(engine).create("made elsewhere a moment ago", "predict")
        with pytest.raises(KeyCheckUnavailable):
            await asyncio.wait_for(cache.authenticate(key), 10)
        with pytest.raises(KeyCheckUnavailable):  # taken as down: no further read waits
            await asyncio.wait_for(cache.authenticate("sk-another-unknown-key"), 10)
    finally:
        store.answer.set()
    assert await cache.refresh()  # the database answers again
    assert (await cache.authenticate(key)).id == record.id


async def test_a_start_while_the_database_is_down_judges_keys_by_the_last_run_s_snapshot(engine, tmp_path):
    """A server that started during an outage knew no keys and answered every keyed request 503 (red team
    helper-68), against "the database being down never stops predictions (keyed ones included)"."""
    record, key = KeyStore(engine).create("in use", "predict")
    revoked, revoked_key = KeyStore(engine).create("leaked", "predict")
    KeyStore(engine).revoke(revoked.id)
    snapshot = KeySnapshot(tmp_path, {"dialect": "sqlite", "database": "the one"})
    left = snapshot.path.with_name(snapshot.path.name + ".partial")  # a write cut short before, or put there
    left.write_text("{}")
    left.chmod(0o644)  # its mode was kept, and the snapshot read by all (red team helper-104)
    await started_with(KeyStore(engine), snapshot)  # the last run, while the database could be read
    assert snapshot.path.stat().st_mode & 0o777 == 0o600 and not left.exists()

    down = FlakyKeyStore(engine)
    down.failing = True
    cache = await started_with(down, snapshot)
    assert (await cache.authenticate(key)).id == record.id
    assert (await cache.authenticate(revoked_key)).revoked_at is not None  # still refused
    with pytest.raises(KeyCheckUnavailable):  # a key the snapshot does not hold cannot be judged
        await cache.authenticate("sk-never-seen")

    elsewhere = await started_with(down, KeySnapshot(tmp_path, {"dialect": "sqlite", "database": "another"}))
    with pytest.raises(KeyCheckUnavailable):  # another database's keys are not taken
        await elsewhere.authenticate(key)


async def started_with(store: KeyStore, snapshot: KeySnapshot) -> KeyCache:
    cache = KeyCache(store, Metrics(), ttl_s=60, snapshot=snapshot)
    await cache.start()
    return cache


async def test_a_key_revoked_through_the_cache_stays_revoked_in_the_snapshot_at_once(engine, tmp_path):
    """A key revoked with ``DELETE /admin/keys`` was written to the snapshot only at the next reload (every
    KEY_CACHE_TTL_S / 2, and only while the database could be read): a SIGKILL and the database stopped within
    that window, and the restarted server accepted the key for the whole outage (red team helper-104). A reload that
    read the keys before the revocation must not write it back unrevoked either."""
    store = FlakyKeyStore(engine)
    record, key = store.create("leaked", "predict")
    snapshot = KeySnapshot(tmp_path, {"dialect": "sqlite", "database": "the one"})
    cache = await started_with(store, snapshot)

    read_before_revoking = store.all_by_digest

    def read_then_revoke():
        keys = read_before_revoking()
        store.all_by_digest = read_before_revoking  # the revocation's own read of the keys, for the snapshot
        cache.revoke(record.id)  # commits, and writes the snapshot, after this reload's read
        return keys

    store.all_by_digest = read_then_revoke
    assert await cache.refresh()  # writes what it read only if nothing newer is in the file
    created, created_key = await asyncio.to_thread(cache.create, "made here", "predict")

    down = FlakyKeyStore(engine)
    down.failing = True
    restarted = await started_with(down, snapshot)  # killed, and started again during an outage
    assert (await restarted.authenticate(key)).revoked_at is not None
    assert (await restarted.authenticate(created_key)).id == created.id


def test_a_snapshot_whose_fields_have_the_wrong_types_is_not_used(tmp_path, caplog):
    """A hand-edited snapshot with a list for a key's id or role was taken, and every request with such a key was
    answered 500 (``TypeError: unhashable type``: red team helper-104); it is refused as unreadable, as malformed JSON
    is."""
    identity = {"dialect": "sqlite", "database": "the one"}
    fields = {"id": "k1", "name": "n", "role": "predict", "created_at": "2026-12-07T00:00:00+00:00",
              "last_used_at": None, "revoked_at": None}
    snapshot = KeySnapshot(tmp_path, identity)
    for wrong in ({"id": ["x"]}, {"role": ["admin"]}, {"role": "root"}, {"name": 3}, {"revoked_at": 5}):
        snapshot.path.write_text(json.dumps({"database": identity, "read_at": 1.0,
                                             "keys": {"d" * 64: {**fields, **wrong}}}))
        caplog.clear()
        assert snapshot.read() is None, wrong
        assert "cannot be read" in caplog.text, wrong
    snapshot.path.write_text(json.dumps({"database": identity, "read_at": 1.0, "keys": {"d" * 64: fields}}))
    assert snapshot.read()[0]["d" * 64].role == "predict"


async def test_a_snapshot_that_cannot_be_written_is_said_until_one_can(engine, tmp_path):
    """With ``keys.json`` a directory (or the disk full), only a throttled WARNING said so, and /health said ok:
    ``snapshot_trouble`` is /health's ``keys:`` reason (``Services.health``) until a write passes."""
    snapshot = KeySnapshot(tmp_path, {"dialect": "sqlite", "database": "the one"})
    snapshot.path.mkdir()
    cache = await started_with(KeyStore(engine), snapshot)
    assert cache.snapshot_trouble is not None and str(snapshot.path) in cache.snapshot_trouble
    assert "older snapshot, or none" in cache.snapshot_trouble
    snapshot.path.rmdir()
    await asyncio.to_thread(cache.create, "a change", "predict")  # written at once, as any change is
    assert cache.snapshot_trouble is None and snapshot.read() is not None


async def test_key_lookups_do_not_wait_behind_slow_calls_on_the_loops_default_threads(engine):
    """Slow admin listings (``run_db``: the loop's default executor, 6 threads on 2 cores) held every thread, and a
    valid key made since the last reload was refused 503 "database unavailable" after the lookup's 5 s, the cache
    then taken as down (red team helper-106): the key cache has threads of its own."""
    store = KeyStore(engine)
    cache = KeyCache(store, Metrics(), ttl_s=60, lookup_timeout_s=2.0)
    await cache.start()
    record, key = store.create("made after the load", "predict")
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    release = threading.Event()
    held = [loop.run_in_executor(None, release.wait, 30) for _ in range(4)]  # every default thread, and a queue
    try:
        assert (await cache.authenticate(key)).id == record.id
    finally:
        release.set()
        await asyncio.gather(*held)
