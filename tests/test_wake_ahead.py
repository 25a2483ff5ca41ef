"""The loop's wake-up ahead of a lone batch's hand-back (server/wake_ahead.py), and when the batcher arms it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.batcher import Batcher
from server.metrics import Metrics
from server.wake_ahead import LEAD_S, WakeAhead
from tests.test_batcher import RecordingEngine, settings


class Timer:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerLoop:
    """Only what WakeAhead asks of a loop: ``call_later``, recorded."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback) -> Timer:
        callback()  # the wake-up runs nothing
        self.timers.append(Timer(delay))
        return self.timers[-1]


def test_nothing_is_armed_before_a_lone_batch_has_been_timed():
    loop = TimerLoop()
    WakeAhead(loop).started_alone()
    assert loop.timers == []


def test_the_wake_comes_at_least_the_lead_ahead_of_the_expected_hand_back_in_whole_milliseconds():
    loop = TimerLoop()
    wake = WakeAhead(loop)
    wake.back(0.0035, alone=True)
    wake.started_alone()
    assert [timer.delay for timer in loop.timers] == [0.003]  # 3.5 ms less the 0.2 ms lead, rounded down
    assert LEAD_S == 0.0002


def test_a_batch_expected_back_within_the_lead_and_a_millisecond_is_not_worth_a_wake():
    loop = TimerLoop()
    wake = WakeAhead(loop)
    wake.back(0.0011, alone=True)
    wake.started_alone()
    assert loop.timers == []


def test_the_hand_back_cancels_a_wake_still_to_come():
    loop = TimerLoop()
    wake = WakeAhead(loop)
    wake.back(0.005, alone=True)
    wake.started_alone()
    wake.back(0.002, alone=True)  # came back early
    assert loop.timers[0].cancelled


def test_the_expectation_follows_lone_batches_only():
    loop = TimerLoop()
    wake = WakeAhead(loop)
    wake.back(0.0035, alone=True)
    wake.back(0.050, alone=False)  # ran beside another batch: not what a lone batch takes
    wake.started_alone()
    wake.back(0.0135, alone=True)  # moves the expectation 30 % of the way: 3.5 + 3 = 6.5 ms
    wake.started_alone()
    assert [timer.delay for timer in loop.timers] == [0.003, 0.006]


@pytest.mark.parametrize(("workers", "armed", "alone"), [
    (2, 3, [False, True]),  # the second request starts on the other worker, beside the first
    (1, 4, [True, True]),  # the second waits for the first, then starts with nothing else
])
async def test_the_batcher_arms_the_wake_for_batches_that_start_with_nothing_else_running_or_waiting(
        monkeypatch, workers, armed, alone):
    arms, backs = [], []
    monkeypatch.setattr(WakeAhead, "started_alone", lambda self: arms.append(True))
    monkeypatch.setattr(WakeAhead, "back", lambda self, took_s, alone: backs.append(alone))
    engine = RecordingEngine(delay=0.01)
    batcher = Batcher(engine, settings(engine_workers=workers, max_batch_size=1), Metrics())
    batcher.start()
    for _ in range(2):  # a lone client
        await batcher.submit([np.array([1, 2])])
    assert (len(arms), backs) == (2, [True, True])
    engine.gate.clear()  # the next batch holds its worker; a second request comes meanwhile
    first = asyncio.ensure_future(batcher.submit([np.array([3])]))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(batcher.submit([np.array([4])]))
    await asyncio.sleep(0.05)
    engine.gate.set()
    await asyncio.gather(first, second)
    assert len(arms) == armed
    assert sorted(backs[2:]) == alone  # each batch's hand-back says whether it started alone
    await batcher.drain()
