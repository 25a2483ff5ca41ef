"""``IDLE_SPIN_MS``: keep the CPUs busy for a moment after each batch, so a client's next request finds them awake.

On a virtual machine whose guest has no polling idle driver (``cpuidle-haltpoll``), an idle vCPU halts and
leaves the guest until an interrupt wakes it; the work after that wake-up runs slower, its caches cold. A lone
client's requests pay it at every step: the event loop waits for the engine thread, the engine thread for the
loop, both for the client. Measured on the development VM (Firecracker, 2 vCPUs, no cpuidle driver, 2026-12-06,
one short sentence per request over a kept-alive connection, cache and store out of the way): with two nice-19
busy loops beside the server, its lone p50 went from 2.39-2.45 to 1.67-1.72 ms and its engine call from 1.48-1.66
to 1.23-1.28 ms (the back-to-back raw call's), a bare ASGI app's with the same engine call from 1.52 to 1.37 ms.

With ``IDLE_SPIN_MS`` > 0 the server starts one spinner process per usable core. A spinner runs under
``SCHED_IDLE``: within its cgroup the kernel gives it a CPU only when no other task of the cgroup wants one, and
takes it back at once for any of them that wakes, the server's threads included. Between cgroups (another container,
another systemd service) the policy does not reach: there the server's cgroup competes at its usual weight, so
spinning takes CPU from them as any load would (red team helper-76 measured a SCHED_IDLE busy loop in a sibling
cgroup getting half of a CPU beside a normal one). Each batch dispatched or finished (``touch``) moves a deadline in
shared memory to ``IDLE_SPIN_MS`` from now; the spinners busy-wait until it passes, then block on a pipe until the
next batch after it. Processes rather than threads: a spinning Python thread would take the interpreter lock at
every turn, and the event loop would wait for it. A spinner ends when the pipe's other end closes: at shutdown, or
when the server dies however it dies.

The price: while requests keep coming within the window, every idle cycle of the machine is spent spinning, so
CPU usage reads as full, and a machine that shares its cores with other work gives them less. Each spinner is an
interpreter of its own, about 11 MiB resident (5 MiB its own), outside the memory plan. With a CPU quota
(a container's CPU limit) the spinning would be billed against the quota and the server throttled for it, so
the setting is refused there (``refusal``), as it is off Linux. Off by default.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)

# time.monotonic() until which the spinners spin (CLOCK_MONOTONIC: one per machine). Written by slice assignment,
# one 8-byte copy: ``pack_into`` zeroes its field before it packs, and a spinner reading the zero parked for good.
_DEADLINE = struct.Struct("d")

# The spinner: its own interpreter (-I: no site, no environment), nothing imported beyond the standard library.
# Stop signals ignored: a terminal's Ctrl-C or hang-up, or a service manager's SIGTERM to every process of the
# service, reaches the spinners too, and the server drains for a while after it; they end when the server does.
SPINNER = """
import mmap, os, signal, struct, sys, time
for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(stop, signal.SIG_IGN)
shared_fd, wake_fd = int(sys.argv[1]), int(sys.argv[2])
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
deadline = struct.Struct("d").unpack_from
shared = mmap.mmap(shared_fd, 8, access=mmap.ACCESS_READ)
now = time.monotonic
while os.read(wake_fd, 1):
    while now() < deadline(shared)[0]:
        pass
"""


def refusal(idle_spin_ms: int, quota_cores: int | None) -> str | None:
    """Why ``IDLE_SPIN_MS`` cannot be used here, with a CPU quota of ``quota_cores`` (None: it can, or it is off)."""
    if not idle_spin_ms:
        return None
    if not (hasattr(os, "memfd_create") and hasattr(os, "SCHED_IDLE")):
        return f"IDLE_SPIN_MS={idle_spin_ms:g} needs Linux (SCHED_IDLE, memfd); set IDLE_SPIN_MS=0"
    if quota_cores is None:
        return None
    return (f"IDLE_SPIN_MS={idle_spin_ms:g} with a CPU limit ({quota_cores} core(s) by the cgroup's quota): the "
            "spinning would be billed against the limit and the server throttled for it; set IDLE_SPIN_MS=0, or "
            "run without a CPU limit")


class IdleSpin:
    """The spinner processes of one server (module docstring); ``touch`` on the event loop at each batch."""

    def __init__(self, window_s: float, spinners: int) -> None:
        self._window_s = window_s
        self._until = 0.0  # the deadline last written: past it, the spinners are parked on the pipe
        self._gone = False  # every spinner has ended (the pipe has no reader): touch does nothing
        shared_fd = os.memfd_create("idle-spin", os.MFD_CLOEXEC)
        wake_read, self._wake = os.pipe()
        self._shared: mmap.mmap | None = None
        self._processes: list[subprocess.Popen] = []
        try:
            os.ftruncate(shared_fd, _DEADLINE.size)
            self._shared = mmap.mmap(shared_fd, _DEADLINE.size)
            os.set_blocking(self._wake, False)  # a full pipe (spinners gone) must never block the loop
            for _ in range(spinners):
                self._processes.append(subprocess.Popen(
                    [sys.executable, "-I", "-c", SPINNER, str(shared_fd), str(wake_read)],
                    pass_fds=(shared_fd, wake_read), stdin=subprocess.DEVNULL))
        except BaseException:
            os.close(self._wake)  # any spinner already started sees end-of-file and ends: reaped here
            for process in self._processes:
                process.wait()
            if self._shared is not None:
                self._shared.close()
            raise
        finally:
            os.close(shared_fd)
            os.close(wake_read)  # the spinners hold the only read ends: they see end-of-file when the server goes

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def describe(self) -> dict[str, int]:
        """For /health: the window, and how many spinners were started and still run (a killed one is not
        restarted; spinning goes on with the others)."""
        return {"window_ms": round(self._window_s * 1000), "spinners": len(self._processes),
                "running": sum(process.poll() is None and not _stopped(process.pid) for process in self._processes)}

    def touch(self) -> None:
        """Spin for the window from now: move the deadline, then wake the spinners if they may have parked.

        A spinner reads the clock before the deadline and parks only once the clock has passed the deadline it read.
        So after the new deadline is written, a clock still short of the old one means none has parked since; past
        it, they may have, and are woken (bytes left unread by a spinner still spinning only wake it once more)."""
        earlier = self._until
        self._until = time.monotonic() + self._window_s
        self._shared[:_DEADLINE.size] = _DEADLINE.pack(self._until)
        if time.monotonic() < earlier or self._gone:
            return
        try:
            os.write(self._wake, b"s" * len(self._processes))
        except BlockingIOError:  # bytes not yet read are waking them anyway
            pass
        except OSError:  # every spinner is gone (killed): spinning ends, serving goes on
            log.warning("IDLE_SPIN_MS: the spinner processes are gone; the CPUs idle between requests from now")
            self._gone = True

    def close(self) -> None:
        """Stop the spinners at once: they hold nothing to save, so they are killed rather than waited for (one
        stopped by SIGSTOP held the shutdown for the wait's limit), then reaped."""
        os.close(self._wake)
        for process in self._processes:
            process.kill()
        for process in self._processes:
            process.wait()
        self._shared.close()


def _stopped(pid: int) -> bool:
    """Frozen by SIGSTOP (or a debugger): alive, but spinning no more (red team helper-77)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


_active: IdleSpin | None = None


def start(window_ms: int, spinners: int) -> IdleSpin | None:
    """Start the process's spinners (none when ``window_ms`` is 0); ``touch`` reaches them from then on. Spinners
    that cannot start (no processes left to the user, say) are a warning: the server serves without them."""
    global _active
    if window_ms > 0 and _active is None:
        try:
            _active = IdleSpin(window_ms / 1000, spinners)
        except OSError as error:
            log.warning("IDLE_SPIN_MS=%g: cannot start the spinner processes (%s); the CPUs idle between requests",
                        window_ms, error)
            return None
        log.info("IDLE_SPIN_MS=%g: %d spinner process(es) keep the CPUs awake for %g ms after each batch",
                 window_ms, spinners, window_ms)
    return _active


def touch() -> None:
    """A batch was dispatched or finished: spin for the window from now (nothing when spinning is off)."""
    if _active is not None:
        _active.touch()


def describe() -> dict[str, int]:
    """For /health: ``IdleSpin.describe``, or a window of 0 when spinning is off."""
    return _active.describe() if _active is not None else {"window_ms": 0, "spinners": 0, "running": 0}


def stop() -> None:
    global _active
    if _active is not None:
        spin, _active = _active, None
        spin.close()
