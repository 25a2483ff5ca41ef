"""The load generator: one aiohttp session, closed-loop workers and an open-loop scheduler.

Why aiohttp and not httpx or wrk: on this 2-core machine the generator shares the CPU with the
server, so its cost per request matters. Measured against a trivial FastAPI endpoint, httpx's
AsyncClient spent ~2.2 ms of client CPU per request and aiohttp ~0.2 ms (10x less). wrk is
cheaper still but closed-loop only (its latencies suffer from coordinated omission), and checking
each response's labels for accuracy would need Lua; a Python core is also what the later
side-by-side against other servers calls as a function.

The generator's event loop is uvloop where it is installed (``run``; ``uvicorn[standard]`` brings it): at 256
clients against the server it spent 0.20 ms of CPU per request against asyncio's own loop's 0.24 (2-core VM).

Open loop: requests are scheduled at arrival times fixed in advance (Poisson or constant) and each
is sent as its own task, so a slow response never delays the next send; latency is measured from
the scheduled time, so queueing anywhere (client connection pool, server) counts (no coordinated
omission). ``Sample.lag`` records how late each request actually left: if it grows, the generator
is the bottleneck.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson

from models.labels import model_label_for, resolve_labels
from scripts.benchlib.workload import Draw, Workload

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where installed (module docstring)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@dataclass
class Sample:
    """One request: when it was due and done (perf_counter seconds), and what came back."""

    due: float
    done: float
    lag: float  # how long after ``due`` the request actually started
    status: int | None  # None: no HTTP response (connection error, timeout)
    error: str | None = None
    retry_after: bool = False
    texts: int = 0
    duplicates: int = 0
    scored: int = 0
    correct: int = 0
    cached: int = 0

    @property
    def latency(self) -> float:
        return self.done - self.due

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def label_matches(expected: str | int, predicted: str) -> bool:
    """Whether a predicted label is the file's ``expected`` one, matched by name as ``models.labels`` matches
    (same name in any case, ``LABEL_<i>`` for ``i``, SST-2's 0 = negative / 1 = positive)."""
    return model_label_for(str(expected), [predicted]) == predicted


def score(payload: bytes, labels: list[str | int]) -> tuple[int, int]:
    """(correct, cached) predictions of a /predict response against the texts' true labels.

    The response's ``probabilities`` name every label of the serving model (the artifact's ``labels``); a true
    label that matches none of them raises ``LabelMismatch``, which stops the load test with the labels on both
    sides rather than scoring every text wrong.
    """
    predictions = orjson.loads(payload)["predictions"]
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} texts")
    if predictions and "probabilities" in predictions[0]:
        resolve_labels([str(y) for y in labels], list(predictions[0]["probabilities"]))
    correct = sum(label_matches(y, p["label"]) for p, y in zip(predictions, labels, strict=True))
    return correct, sum(bool(p.get("cached")) for p in predictions)


class PredictProtocol:
    """How a request body is written and a 200 response scored: this project's ``POST /predict`` contract.

    Other servers speak other protocols; the side-by-side benchmark passes a subclass per peer
    (``scripts.benchlib.peers.adapters``) so that the same generator drives them all.
    """

    name = "ours"
    content_type = "application/json"

    def encode(self, draw: Draw) -> bytes:
        return orjson.dumps(draw.body())

    def score(self, payload: bytes, labels: list[str | int]) -> tuple[int, int]:
        return score(payload, labels)


class Client:
    """Keep-alive connections to one server; ``request`` returns a ``Sample`` whatever the server does, and raises
    only ``LabelMismatch`` (the labeled file does not fit the served model: no result would mean anything)."""

    def __init__(self, base_url: str, max_connections: int = 256, timeout: float = 30.0,
                 headers: dict[str, str] | None = None, protocol: PredictProtocol | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.protocol = protocol or PredictProtocol()
        self._content_type = {"Content-Type": self.protocol.content_type}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=timeout),
            headers=headers,
        )
        self.in_flight = self.max_in_flight = 0

    async def close(self) -> None:
        await self._session.close()

    async def request(self, path: str, draw: Draw | None, due: float) -> Sample:
        """POST ``draw`` in the protocol's encoding (GET when None); latency counts from ``due``."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        sample = Sample(due, due, time.perf_counter() - due, None)
        if draw is not None:
            sample.texts, sample.duplicates = len(draw.texts), draw.duplicates
        try:
            if draw is None:
                call = self._session.get(self.base_url + path)
            else:
                call = self._session.post(self.base_url + path, data=self.protocol.encode(draw),
                                          headers=self._content_type)
            async with call as response:
                payload = await response.read()
                sample.status, sample.retry_after = response.status, "Retry-After" in response.headers
            if sample.status == 200 and draw is not None:
                sample.correct, sample.cached = self.protocol.score(payload, draw.labels)
                sample.scored = len(draw.labels)
        except (TimeoutError, aiohttp.ClientError) as exc:
            sample.error = type(exc).__name__
        except (ValueError, KeyError, TypeError, IndexError):  # a 200 whose body is not the contract's
            sample.error = "bad_response"
        finally:
            self.in_flight -= 1
        sample.done = time.perf_counter()
        return sample


async def closed_loop(client: Client, path: str, workload: Workload | None, concurrency: int,
                      seconds: float) -> list[Sample]:
    """``concurrency`` workers, each sending its next request as soon as the last one is answered."""
    end = time.perf_counter() + seconds
    samples: list[Sample] = []

    async def worker() -> None:
        while (now := time.perf_counter()) < end:
            samples.append(await client.request(path, workload.next() if workload else None, now))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def arrival_times(rate: float, seconds: float, arrival: str, rng: random.Random) -> list[float]:
    """Offsets in [0, seconds) of requests arriving at ``rate`` per second: Poisson or evenly spaced."""
    if arrival == "constant":
        return [k / rate for k in range(int(rate * seconds) + 1) if k / rate < seconds]
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def open_loop(client: Client, path: str, workload: Workload, rate: float, seconds: float,
                    arrival: str = "poisson", seed: int = 0) -> list[Sample]:
    """Send at the scheduled arrival times whatever the responses do."""
    origin = time.perf_counter()
    tasks = []
    for offset in arrival_times(rate, seconds, arrival, random.Random(seed)):
        due = origin + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.request(path, workload.next(), due)))
    return list(await asyncio.gather(*tasks))
