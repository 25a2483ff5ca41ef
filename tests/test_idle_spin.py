"""IDLE_SPIN_MS: spinner processes that keep the CPUs awake for a window after each batch, and end with the server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import psutil
import pytest

from scripts.benchlib.serverproc import start_server, stop_server
from server import idle_spin
from server.batcher import Batcher
from server.engine import available_cores
from server.exitcodes import ExitCode, StartupError
from server.idle_spin import IdleSpin, refusal
from server.metrics import Metrics
from server.preflight import check_configuration
from tests.test_batcher import RecordingEngine, settings
from tests.waiting import wait_for

WAIT_S = 10.0  # wait_for's bound unless a test says otherwise
POLL_S = 0.02  # fine enough to see a 0.3 s window


def spinning(pid: int) -> bool:
    """Runnable: in its busy loop (whether or not the kernel gives it a CPU now); parked, it sleeps on the pipe."""
    return psutil.Process(pid).status() == psutil.STATUS_RUNNING


def parked(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_SLEEPING


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def spin():
    spinning = IdleSpin(window_s=0.3, spinners=2)
    yield spinning
    spinning.close()


def test_spinners_run_at_idle_priority_spin_for_the_window_after_a_touch_then_park(spin):
    # never ahead of the server's own threads (each sets it first thing, once its interpreter has started)
    wait_for(lambda: all(os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in spin.pids), "SCHED_IDLE spinners",
             timeout=WAIT_S, every=POLL_S)
    wait_for(lambda: all(parked(pid) for pid in spin.pids), "the spinners parked before any touch",
             timeout=WAIT_S, every=POLL_S)
    time.sleep(0.1)
    assert all(parked(pid) for pid in spin.pids)
    spin.touch()
    wait_for(lambda: all(spinning(pid) for pid in spin.pids), "the spinners spinning after a touch", timeout=0.25,
             every=POLL_S)
    wait_for(lambda: all(parked(pid) for pid in spin.pids), "the spinners parked once the 0.3 s window is over",
             timeout=2, every=POLL_S)


def test_a_touch_within_the_window_extends_it(spin):
    wait_for(lambda: all(parked(pid) for pid in spin.pids), "the spinners parked", timeout=WAIT_S, every=POLL_S)
    spin.touch()
    for _ in range(6):  # 0.6 s of touches every 0.1 s: the 0.3 s window never runs out
        time.sleep(0.1)
        assert all(spinning(pid) for pid in spin.pids)
        spin.touch()
    wait_for(lambda: all(parked(pid) for pid in spin.pids), "the spinners parked once the touches stop", timeout=2,
             every=POLL_S)


def test_close_ends_the_spinners_even_mid_window():
    spinning = IdleSpin(window_s=30, spinners=2)
    spinning.touch()
    started = time.monotonic()
    spinning.close()
    assert time.monotonic() - started < 2
    assert all(gone(pid) for pid in spinning.pids)


def test_close_kills_a_stopped_spinner_at_once_rather_than_wait_for_it():
    """A spinner frozen by SIGSTOP held the shutdown for a 2 s wait per spinner (red team helper-76)."""
    spinning = IdleSpin(window_s=30, spinners=2)
    wait_for(lambda: all(parked(pid) for pid in spinning.pids), "the spinners parked", timeout=WAIT_S, every=POLL_S)
    os.kill(spinning.pids[0], signal.SIGSTOP)
    started = time.monotonic()
    spinning.close()
    assert time.monotonic() - started < 1
    assert all(gone(pid) for pid in spinning.pids)


def test_a_start_that_fails_part_way_reaps_the_spinners_it_started(monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def second_fails(*args, **kwargs):
        if started:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(real_popen(*args, **kwargs))
        return started[0]

    monkeypatch.setattr(idle_spin.subprocess, "Popen", second_fails)
    with pytest.raises(BlockingIOError):
        IdleSpin(window_s=0.02, spinners=2)
    assert started[0].returncode == 0  # it saw the pipe close, ended, and was waited for: no zombie left


def test_health_says_how_many_spinners_run(spin):
    assert spin.describe() == {"window_ms": 300, "spinners": 2, "running": 2}
    os.kill(spin.pids[1], signal.SIGSTOP)  # alive, but spinning no more (red team helper-77)
    wait_for(lambda: spin.describe()["running"] == 1, "one spinner counted running", timeout=WAIT_S, every=POLL_S)
    os.kill(spin.pids[0], signal.SIGKILL)
    wait_for(lambda: spin.describe()["running"] == 0, "no spinner counted running", timeout=WAIT_S, every=POLL_S)


def test_spinners_end_when_the_server_is_killed(tmp_path):
    """SIGKILL leaves no chance to close them: the pipe's end closing with the process is what stops them."""
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from server.idle_spin import IdleSpin
        spin = IdleSpin(window_s=0.5, spinners=2)
        spin.touch()
        print(*spin.pids, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    pids = [int(pid) for pid in owner.stdout.readline().split()]
    assert len(pids) == 2 and not any(gone(pid) for pid in pids)
    owner.kill()
    owner.wait()
    wait_for(lambda: all(gone(pid) for pid in pids), "the spinners to end with their server", timeout=5, every=POLL_S)


def test_stop_signals_to_the_whole_process_group_leave_the_spinners_to_end_with_the_server(spin):
    """A service manager's SIGTERM (or a terminal's SIGINT, SIGHUP) to every process: the server drains for a while
    after it, and its batches still touch the spinners, which must not be gone (a warning would say so)."""
    wait_for(lambda: all(os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in spin.pids), "the spinners started",
             timeout=WAIT_S, every=POLL_S)
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        for pid in spin.pids:
            os.kill(pid, stop)
    time.sleep(0.2)
    assert not any(gone(pid) for pid in spin.pids)
    spin.touch()
    wait_for(lambda: all(spinning(pid) for pid in spin.pids), "the spinners spinning after the touch", timeout=1,
             every=POLL_S)


def test_touch_after_every_spinner_was_killed_only_warns_once(caplog):
    spinning = IdleSpin(window_s=0.05, spinners=1)
    try:
        os.kill(spinning.pids[0], signal.SIGKILL)
        wait_for(lambda: spinning._processes[0].poll() is not None, "the killed spinner reaped", timeout=WAIT_S,
                 every=POLL_S)
        time.sleep(0.06)  # past the window: the next touch writes to the pipe
        spinning.touch()
        time.sleep(0.06)
        spinning.touch()
        assert [r.message for r in caplog.records].count(
            "IDLE_SPIN_MS: the spinner processes are gone; the CPUs idle between requests from now") == 1
    finally:
        spinning.close()


async def test_the_batcher_touches_at_each_dispatch_and_each_finished_batch(monkeypatch):
    touches: list[float] = []
    monkeypatch.setattr(idle_spin, "touch", lambda: touches.append(time.monotonic()))
    batcher = Batcher(RecordingEngine(), settings(), Metrics())
    batcher.start()
    await batcher.submit([np.array([1, 2])])
    assert len(touches) == 2
    await asyncio.gather(*(batcher.submit([np.array([1, n])]) for n in range(3)))
    assert len(touches) >= 4  # at least one more batch, dispatched and finished
    await batcher.drain()


def test_refusal_under_a_cpu_quota_or_off_linux_names_the_setting_and_the_fix(monkeypatch):
    assert refusal(0, 2) is None
    assert refusal(5, None) is None
    under_quota = refusal(5, 2)
    assert "IDLE_SPIN_MS=5" in under_quota and "set IDLE_SPIN_MS=0" in under_quota and "2 core(s)" in under_quota
    monkeypatch.delattr(os, "SCHED_IDLE")
    assert refusal(5, None) == "IDLE_SPIN_MS=5 needs Linux (SCHED_IDLE, memfd); set IDLE_SPIN_MS=0"
    assert refusal(0, None) is None


def test_spinners_that_cannot_start_are_a_warning_and_the_server_goes_on(monkeypatch, caplog):
    def no_processes(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(idle_spin.subprocess, "Popen", no_processes)
    descriptors = len(os.listdir("/proc/self/fd"))
    assert idle_spin.start(20, 2) is None
    idle_spin.touch()  # nothing to touch: no error
    assert "cannot start the spinner processes" in caplog.text
    assert len(os.listdir("/proc/self/fd")) == descriptors  # the pipe and shared memory were closed


def test_a_window_is_whole_milliseconds_from_1_to_1000_or_0(make_settings):
    """A window of a microsecond passed as on: each batch then woke every spinner for nothing (red team helper-76)."""
    for bad in ("0.5", "1e-300", "-1", "1001", "nan"):
        with pytest.raises(ValueError, match="IDLE_SPIN_MS"):
            make_settings(idle_spin_ms=bad)
    assert make_settings(idle_spin_ms="1").idle_spin_ms == 1


def test_health_shows_spinning_off_by_default():
    assert idle_spin.describe() == {"window_ms": 0, "spinners": 0, "running": 0}


def test_start_up_refuses_idle_spin_under_a_cpu_quota(make_settings, monkeypatch):
    monkeypatch.setattr("server.preflight.cpu_quota_cores", lambda: 2)
    with pytest.raises(StartupError) as refused:
        check_configuration(make_settings(idle_spin_ms=5))
    assert refused.value.exit_code == ExitCode.CONFIG and "IDLE_SPIN_MS=5" in str(refused.value)
    assert check_configuration(make_settings()).startswith("every value is valid")


def test_a_server_with_idle_spin_runs_one_spinner_per_core_and_ends_them_at_shutdown(tiny_artifact, tmp_path):
    server = start_server({"MODEL_PATH": str(tiny_artifact), "IDLE_SPIN_MS": "20"}, tmp_path)
    try:
        spinners = [child for child in psutil.Process(server.process.pid).children()
                    if "sched_setscheduler" in " ".join(child.cmdline())]
        assert len(spinners) == available_cores()
        assert httpx.post(server.url + "/predict", json={"text": "fine"}, timeout=10).status_code == 200
        assert httpx.get(server.url + "/health", timeout=10).json()["idle_spin"] == {
            "window_ms": 20, "spinners": available_cores(), "running": available_cores()}
    finally:
        assert stop_server(server) == 0
    assert all(gone(child.pid) for child in spinners)
    assert "spinner process(es) keep the CPUs awake" in server.log()
