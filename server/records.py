"""A request's prediction records: built from its predictions, and in ack mode made durable on the engine worker.

With ``STORE_DURABILITY=ack`` a request is answered only once its records are synced to the spool. Through the
committer that costs a lone request two thread hand-offs beyond the sync (loop to the committer, which is
asleep, and back: ~0.1 ms each on this project's VM, most of it waking an idle CPU). The engine worker that
computed the request is awake, so when one batch holds every text of a request, nothing else waits, another
engine worker is free for what comes meanwhile and no other follow-up runs (the batcher decides:
``Batcher.submit``'s ``on_worker``; with one engine worker, as on CUDA, never), ``WorkerRecords`` builds the
records there, right after the engine call, and syncs them on that thread (``PredictionStore.record_here``); the
answer is handed back to the loop with its records already durable, and the same hand-off tells the store's
writer of them (``PredictionStore.deliver_here``: no wake-up of the loop of its own). Under load, records go
through the committer, whose one sync covers every request finishing together.

A record synced on the worker whose request then fails (its deadline passed while the batch ran, its client
went away, a drain's time limit abandoned it) is kept: it says what the model answered, like a record synced
just before a crash that lost its answer. Every request answered 200 has its records exactly once either way.
A record's ``latency_ms`` is taken where it is built: on the worker, when the engine's results are ready, or on
the loop after the predictions.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from server.predictor import prediction_of
from server.primitives import ModelIdentity, Prediction, PredictionRecord, new_id
from server.store import PredictionStore, SpoolUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordContext:
    """What a request's records share: who asked, which model answered, whether texts are kept."""

    request_id: str
    api_key_id: str | None
    identity: ModelIdentity
    store_text: bool


@dataclass(frozen=True)
class RecordKeys:
    """The parts of a request's records known at admission: their ids, the texts' hashes, the time. Made on the
    loop before the engine call, so a follow-up on the engine worker does not make them after it (~30 us there,
    where the engine call has just flushed the caches, against ~5 us before it)."""

    ids: list[str]
    text_sha256: list[str]
    created_at: datetime

    @classmethod
    def of(cls, texts: list[str]) -> RecordKeys:
        return cls([new_id() for _ in texts], [hashlib.sha256(text.encode()).hexdigest() for text in texts],
                   datetime.now(UTC))


def prediction_records(texts: list[str], predictions: list[Prediction], context: RecordContext, keys: RecordKeys,
                       latency_ms: float) -> list[PredictionRecord]:
    """One record per text, in order; ``latency_ms`` is the request's, from admission to its predictions."""
    identity = context.identity
    return [PredictionRecord(
        id=record_id, created_at=keys.created_at,
        request_id=context.request_id,
        text=text if context.store_text else None,
        text_sha256=text_sha256,
        label=p.label, score=p.score, probabilities=p.probabilities,
        model_name=identity.name, model_version=identity.version, device=identity.device,
        latency_ms=latency_ms, cached=p.cached, api_key_id=context.api_key_id,
    ) for text, p, record_id, text_sha256 in zip(texts, predictions, keys.ids, keys.text_sha256, strict=True)]


class WorkerRecords:
    """A request's records, synced on the engine worker that computed all its texts (module docstring).

    After the predictions, on the loop: ``records`` holds them once they are durable, ``refused`` says why they
    may not be (answer 503: the spool refused them, or the sync failed in a way that leaves it unknown; 413: they
    are larger than the whole spool), and
    both are None when the follow-up did not run (the caller then records the predictions itself);
    ``recording_s`` is how long the worker spent on them after the predictions were ready (not compute time:
    ``classify`` leaves it out of the request's). The worker sets them before it hands the batch back to the
    loop, which reads them only after that.
    """

    def __init__(self, store: PredictionStore, texts: list[str], labels: list[str], started: float,
                 context: RecordContext, keys: RecordKeys) -> None:
        self._store = store
        self._texts = texts
        self._labels = labels
        self._started = started  # time.perf_counter() at admission
        self._context = context
        self._keys = keys
        self._once = threading.Lock()  # a second call (a bug upstream) must not record the request again
        self.records: list[PredictionRecord] | None = None
        self.refused: SpoolUnavailable | None = None
        self.recording_s = 0.0

    def __call__(self, rows: list[np.ndarray]) -> Callable[[], None] | None:
        """On the engine worker: the request's label probabilities, in input order. Returns what the loop is to
        run with the batch's hand-off, the store's ``deliver_here`` (None for a second call, which does nothing)."""
        if not self._once.acquire(blocking=False):
            return None
        ready = time.perf_counter()
        predictions = [prediction_of(self._labels, row, False) for row in rows]  # truncation is not recorded
        records = prediction_records(self._texts, predictions, self._context, self._keys,
                                     (ready - self._started) * 1000)
        try:
            self._store.record_here(records)
            self.records = records
        except SpoolUnavailable as error:
            self.refused = error
        except Exception as error:  # appended or not, unknown: answer 503, never record it again through the loop
            log.exception("store: syncing a request's records on the engine worker failed")
            self.refused = SpoolUnavailable("io_error", f"recording failed: {type(error).__name__}")
        self.recording_s = time.perf_counter() - ready
        return self._store.deliver_here
