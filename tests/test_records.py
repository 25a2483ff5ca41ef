"""A request's records synced on its engine worker (``server.records.WorkerRecords``): what the loop learns."""

from __future__ import annotations

import numpy as np

from server.primitives import ModelIdentity
from server.records import RecordContext, RecordKeys, WorkerRecords
from server.store import SpoolUnavailable

CONTEXT = RecordContext("req-1", None, ModelIdentity(name="m", version="1", variant="fp32", provider="cpu",
                                                     device="cpu"), store_text=True)
ROWS = [np.array([0.2, 0.8], dtype=np.float32), np.array([0.9, 0.1], dtype=np.float32)]


class Store:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.synced: list[list] = []

    def record_here(self, records) -> None:
        self.synced.append(records)
        if self.error:
            raise self.error

    def deliver_here(self) -> None:  # what the loop runs with the batch's hand-off
        pass


def worker_records(store: Store) -> WorkerRecords:
    texts = ["a fine film", "a dull film"]
    return WorkerRecords(store, texts, ["negative", "positive"], 0.0, CONTEXT, RecordKeys.of(texts))


def test_the_records_say_what_the_model_answered_in_input_order_once():
    store = Store()
    follow_up = worker_records(store)
    assert follow_up(ROWS) == store.deliver_here  # the writer hears of them with the batch's hand-off
    assert follow_up(ROWS) is None  # a second call (a bug upstream) records nothing again
    assert len(store.synced) == 1 and follow_up.records is store.synced[0] and follow_up.refused is None
    assert [(r.text, r.label, r.request_id, r.cached) for r in follow_up.records] == [
        ("a fine film", "positive", "req-1", False), ("a dull film", "negative", "req-1", False)]
    assert follow_up.recording_s > 0


def test_a_refusal_or_an_unknown_failure_is_a_503_never_a_second_recording(caplog):
    full_store = Store(SpoolUnavailable("full", "the prediction spool is full"))
    full = worker_records(full_store)
    assert full(ROWS) == full_store.deliver_here  # the refusal reaches the writer too
    assert full.records is None and full.refused.cause == "full"

    broken = worker_records(Store(RuntimeError("after the append, perhaps")))
    broken(ROWS)
    assert broken.records is None and broken.refused.cause == "io_error" and "RuntimeError" in broken.refused.message
    assert "on the engine worker failed" in caplog.text
