"""A request's prediction records: built from its predictions, and in ack mode made durable on the engine worker.

With ``STORE_DURABILITY=ack`` a request is answered only once its records are synced to the spool. Through the
committer that costs a lone request two thread hand-offs beyond the sync (loop to the committer, which is
asleep, and back: ~0.1 ms each on this project's VM, most of it waking an idle CPU). The engine worker that
computed the request is awake, so when one batch holds every text of a request, nothing else waits and another
engine worker is free for what comes meanwhile (the batcher decides: ``Batcher.submit``'s ``on_worker``; with one
engine worker, as on CUDA, never), ``WorkerRecords`` builds the records there, right after
the engine call, and syncs them on that thread (``PredictionStore.record_here``); the answer is handed back to
the loop with its records already durable. Under load, records go through the committer, whose one sync covers
every request finishing together.

A record synced on the worker whose request then fails (its deadline passed while the batch ran, its client
went away) is kept: it says what the model answered, like a record synced just before a crash that lost its
answer. Every request answered 200 has its records exactly once either way. A record's ``latency_ms`` is taken
where it is built: on the worker, when the engine's results are ready, or on the loop after the predictions.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from server.predictor import prediction_of
from server.primitives import ModelIdentity, Prediction, PredictionRecord
from server.store import SpoolUnavailable


def prediction_records(texts: list[str], predictions: list[Prediction], *, request_id: str, api_key_id: str | None,
                       identity: ModelIdentity, store_text: bool, latency_ms: float) -> list[PredictionRecord]:
    """One record per text, in order; ``latency_ms`` is the request's, from admission to its predictions."""
    return [PredictionRecord(
        request_id=request_id,
        text=text if store_text else None,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        label=p.label, score=p.score, probabilities=p.probabilities,
        model_name=identity.name, model_version=identity.version, device=identity.device,
        latency_ms=latency_ms, cached=p.cached, api_key_id=api_key_id,
    ) for text, p in zip(texts, predictions, strict=True)]


class WorkerRecords:
    """A request's records, synced on the engine worker that computed all its texts (module docstring).

    After the predictions, on the loop: ``records`` holds them once they are durable, ``refused`` says why the
    spool would not take them (answer 503), and both are None when the follow-up did not run (the caller then
    records the predictions itself). The worker sets them before it hands the batch back to the loop, which
    reads them only after that.
    """

    def __init__(self, store, texts: list[str], labels: list[str], started: float, **fields) -> None:
        self._store = store
        self._texts = texts
        self._labels = labels
        self._started = started  # time.perf_counter() at admission
        self._fields = fields  # prediction_records' keywords but latency_ms
        self.records: list[PredictionRecord] | None = None
        self.refused: SpoolUnavailable | None = None

    def __call__(self, rows: list[np.ndarray]) -> None:
        """On the engine worker: the request's label probabilities, in input order."""
        predictions = [prediction_of(self._labels, row, False) for row in rows]  # truncation is not recorded
        records = prediction_records(self._texts, predictions, latency_ms=(time.perf_counter() - self._started) * 1000,
                                     **self._fields)
        try:
            self._store.record_here(records)
        except SpoolUnavailable as error:
            self.refused = error
            return
        self.records = records
