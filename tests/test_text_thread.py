"""The text thread: long requests' text work off the loop, in order, answered on the loop, closed without leaving
a caller waiting."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.primitives import Draining
from server.text_thread import TextThread


async def test_work_runs_on_the_thread_in_order_and_its_error_reaches_the_caller() -> None:
    thread = TextThread()
    ran: list[tuple[str, str]] = []

    def work(name: str) -> str:
        ran.append((name, threading.current_thread().name))
        if name == "bad":
            raise ValueError("texts[0] is not a text")
        return name.upper()

    try:
        results = await asyncio.gather(thread.run(work, "a"), thread.run(work, "bad"), thread.run(work, "c"),
                                       return_exceptions=True)
    finally:
        thread.close()
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], ValueError) and "texts[0]" in str(results[1])
    assert ran == [("a", "text-work"), ("bad", "text-work"), ("c", "text-work")]


async def test_a_caller_that_goes_away_takes_its_queued_work_with_it() -> None:
    thread = TextThread()
    gate, ran = threading.Event(), []

    def work(name: str) -> None:
        gate.wait(10)
        ran.append(name)

    try:
        first = asyncio.ensure_future(thread.run(work, "first"))
        gone = asyncio.ensure_future(thread.run(work, "gone"))
        last = asyncio.ensure_future(thread.run(work, "last"))
        await asyncio.sleep(0.05)
        gone.cancel()
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, last), 10)
    finally:
        thread.close()
    assert ran == ["first", "last"]


async def test_close_answers_every_waiting_caller_and_refuses_new_work() -> None:
    thread = TextThread()
    gate = threading.Event()
    under_way = asyncio.ensure_future(thread.run(gate.wait, 10))
    queued = asyncio.ensure_future(thread.run(lambda: "never"))
    await asyncio.sleep(0.05)
    thread.close()
    for waiting in (under_way, queued):
        with pytest.raises(Draining, match="shut down before this request's texts were read"):
            await asyncio.wait_for(waiting, 1)
    with pytest.raises(Draining):
        await thread.run(lambda: "late")
    gate.set()
