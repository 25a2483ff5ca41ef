"""The engine's worker threads (``server.worker_threads``): each call on the thread asked for, in order; a
failing call is logged and the thread lives on; a thread in a call is named for the exit's check."""

from __future__ import annotations

import threading

import pytest

from server.worker_threads import WorkerThreads, threads_in_call

WAIT_S = 30


def test_calls_run_in_order_on_the_thread_asked_for_and_a_failure_leaves_the_thread_alive(caplog):
    threads = WorkerThreads(2, "test")
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def note(n: int) -> None:
        seen.append((n, threading.current_thread().name))

    def fail() -> None:
        raise RuntimeError("a call's own bug")

    threads.submit(1, note, 1)
    threads.submit(1, fail)
    threads.submit(1, note, 2)
    threads.submit(0, note, 3)
    threads.submit(1, done.set)
    assert done.wait(WAIT_S)
    threads.shutdown(wait=True)
    assert [n for n, name in seen if name == "test_1"] == [1, 2]
    assert (3, "test_0") in seen
    assert "a call's own bug" in caplog.text


def test_a_thread_in_a_call_is_named_until_it_returns_and_pending_calls_can_be_cancelled():
    threads = WorkerThreads(1, "hung")
    release, entered = threading.Event(), threading.Event()
    ran: list[str] = []

    def hang() -> None:
        entered.set()
        release.wait(WAIT_S)

    threads.submit(0, hang)
    threads.submit(0, ran.append, "never")
    assert entered.wait(WAIT_S)
    assert [thread.name for thread in threads_in_call()] == ["hung_0"]
    threads.shutdown(wait=False, cancel_pending=True)
    release.set()
    threads.shutdown(wait=True)
    assert ran == [] and threads_in_call() == []
    with pytest.raises(RuntimeError, match="shut down"):  # a call after shutdown would never run: refused
        threads.submit(0, ran.append, "too late")
