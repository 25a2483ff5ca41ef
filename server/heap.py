"""Keep CPython's full garbage collections off the request path by freezing the long-lived heap.

The server builds a large, long-lived heap at start-up (FastAPI, pydantic, SQLAlchemy, ONNX Runtime
bindings, the model runtime) and afterwards churns small short-lived objects per request. Every full
collection scans all tracked objects: under open-loop load (440 requests/s on 2 cores) they stopped the
event loop for 60-77 ms every few seconds. ``gc.freeze`` moves what exists into a generation the
collector never scans; full collections then took 1-6 ms, and client p99 at that load went from
117-153 ms (4 runs) to 40-102 ms (17 runs, median 57) with ``scripts/loadtest.py --mode open --rate 440``.

Frozen objects are still freed by reference counting, but a frozen reference cycle never would be, so
a model reload thaws, collects and freezes again once the previous model is retired, and shutdown
thaws (an app that ends inside a longer-lived process, such as a test run, leaves nothing frozen).

Young collections: CPython collects its youngest generation whenever tracked allocations exceed deallocations by
700, and at load the requests in flight alone are thousands of live objects, so it kept collecting them and
moving them up a generation to be scanned again: at 256 clients (2-core VM, ``gc.callbacks``), in 10 s, 500-550
young collections, 45-50 middle ones (3-7 ms each) and 3-4 full ones, 0.4-0.6 s of the event loop's time and
0.07-0.1 ms of its ~0.4 ms per request. While the server runs, the young threshold is ``YOUNG_THRESHOLD``: 4-9 young
collections and no older one in the same 10 s (~20 ms). What it costs is garbage in reference cycles freed later:
the request path leaves none (``Batcher.submit``), a refused body's error is let go at once
(``server.http.let_go``), and each closed connection leaves a small one in uvicorn's protocol, without the body
bytes it received and never read (``GuardedHttpProtocol._drop_unread_bodies``; 6,000 requests on a new
connection each: RSS 202 MB before, 211 MB after). A threshold of 0 (the collector off) is left so;
shutdown puts back the one found.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # net tracked allocations between young collections (CPython's default: 700)
_found_thresholds: tuple[int, ...] | None = None  # the process's own, put back by ``thaw``


def freeze_long_lived() -> None:
    """Collect what is already garbage, then exempt everything left from future collections and collect the young
    generation less often (module docstring)."""
    global _found_thresholds
    gc.collect()
    gc.freeze()
    if _found_thresholds is None:
        _found_thresholds = gc.get_threshold()
        young, *older = _found_thresholds
        if young:
            gc.set_threshold(max(young, YOUNG_THRESHOLD), *older)


def refreeze() -> None:
    """After long-lived objects were dropped (a retired model): collect them, freeze the rest again."""
    gc.unfreeze()
    freeze_long_lived()


def thaw() -> None:
    global _found_thresholds
    gc.unfreeze()
    if _found_thresholds is not None:
        gc.set_threshold(*_found_thresholds)
        _found_thresholds = None
