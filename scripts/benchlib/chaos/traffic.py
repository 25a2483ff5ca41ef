"""Client traffic for the chaos scenarios: closed-loop clients that log every request they send.

Each request carries its own ``X-Request-Id`` (a tag unique to the ``Traffic``
object, the client's number and its sequence number), so a record in the
database can be traced back to the request that made it. A request that fails
is never retried under the same id: a retry is a new request, as a real
client's would be, so a record is never ambiguous between two attempts.

The clients run on an asyncio loop in a thread of their own, so a scenario can
be written as plain blocking steps (start traffic, wait for N answers, kill
the server, stop traffic). aiohttp rather than httpx: on 2 shared cores its
per-request CPU cost is a tenth of httpx's (see ``scripts.benchlib.loadgen``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

SENTENCES = (
    "a gripping, funny and moving film",
    "dull, lifeless and far too long",
    "one of the best films of the year",
    "the plot makes no sense and the acting is wooden",
    "charming from start to finish",
    "an utterly forgettable sequel",
)
FILLER = "the cast is good but the script wanders and the ending is rushed ".split()

TextMaker = Callable[[str, int], str]  # (request id, index in the request) -> the text to classify


def short_text(request_id: str, index: int) -> str:
    """A short review that no other request sends (its request id is in it)."""
    return f"{request_id}/{index}: {SENTENCES[(len(request_id) + index) % len(SENTENCES)]}"


def long_text(chars: int) -> TextMaker:
    """Texts of about ``chars`` characters: records of that size fill a spool quickly."""

    def make(request_id: str, index: int) -> str:
        head = short_text(request_id, index)
        words = [head]
        size = len(head)
        while size < chars:
            word = FILLER[(size // 7) % len(FILLER)]
            words.append(word)
            size += len(word) + 1
        return " ".join(words)[:chars]

    return make


def repeated_text(chars: int) -> TextMaker:
    """The same text of ``chars`` characters in every request: the server's prediction cache answers all but the
    first, so large records cost the server almost no inference (the large spool is built in seconds)."""
    text = long_text(chars)("repeated", 0)
    return lambda request_id, index: text


def nul_text(request_id: str, index: int) -> str:
    """A text holding U+0000, which a PostgreSQL text column cannot store as it is."""
    return f"{short_text(request_id, index)} \x00 and after the NUL"


@dataclass
class Attempt:
    """One request and what became of it."""

    request_id: str
    texts: int
    status: int | None = None  # None: no HTTP answer (connection refused or reset, timeout)
    ids: list[str] | None = None  # the predictions' record ids, when the answer carries them
    retry_after: bool = False

    @property
    def answered(self) -> bool:
        return self.status == 200


class Traffic:
    """``clients`` closed-loop clients against ``url``'s /predict until ``stop()``; every attempt is logged."""

    def __init__(self, url: str, clients: int = 8, texts_per_request: int = 1, text: TextMaker = short_text,
                 timeout_s: float = 30.0, pause_s: float = 0.05) -> None:
        self.url = url.rstrip("/")
        self.clients = clients
        self.texts_per_request = texts_per_request
        self.text = text
        self.timeout_s = timeout_s
        self.pause_s = pause_s  # between a failed or refused request and the client's next one
        self.tag = uuid.uuid4().hex[:8]
        self.attempts: list[Attempt] = []  # appended from the traffic thread; list.append is atomic
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=f"traffic-{self.tag}",
                                        daemon=True)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> list[Attempt]:
        """Let each client finish the request it has in flight, then return every attempt (again if stopped)."""
        self._stopping.set()
        self._thread.join(self.timeout_s + 10)
        if self._thread.is_alive():
            raise RuntimeError(f"traffic to {self.url} did not stop within {self.timeout_s + 10} s")
        return list(self.attempts)

    @property
    def answered(self) -> int:
        return sum(attempt.answered for attempt in list(self.attempts))

    @property
    def refused(self) -> int:
        return sum(attempt.status == 503 for attempt in list(self.attempts))

    def wait(self, condition: Callable[[Traffic], bool], timeout_s: float) -> bool:
        """Whether ``condition(self)`` came true within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition(self):
            if time.monotonic() > deadline or not self._thread.is_alive():
                return condition(self)
            time.sleep(0.02)
        return True

    def wait_answered(self, count: int, timeout_s: float) -> bool:
        """Whether ``count`` requests in all were answered 200 within ``timeout_s``."""
        return self.wait(lambda traffic: traffic.answered >= count, timeout_s)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(self._client(session, number) for number in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, number: int) -> None:
        sequence = 0
        while not self._stopping.is_set():
            request_id = f"{self.tag}-{number}-{sequence}"
            sequence += 1
            texts = [self.text(request_id, index) for index in range(self.texts_per_request)]
            attempt = await self._send(session, request_id, texts)
            self.attempts.append(attempt)
            if not attempt.answered:
                await asyncio.sleep(self.pause_s)

    async def _send(self, session: aiohttp.ClientSession, request_id: str, texts: list[str]) -> Attempt:
        attempt = Attempt(request_id, len(texts))
        body = {"text": texts[0]} if len(texts) == 1 else {"texts": texts}
        try:
            async with session.post(self.url + "/predict", data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json", "X-Request-Id": request_id}) as answer:
                payload = await answer.read()
                status, attempt.retry_after = answer.status, "Retry-After" in answer.headers
        except (TimeoutError, aiohttp.ClientError):
            return attempt
        attempt.status = status
        if status == 200:
            try:
                document = orjson.loads(payload)
                ids = [prediction.get("id") for prediction in document["predictions"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                return attempt  # answered, though not as the contract says: counted by request id and texts
            attempt.request_id = document.get("request_id") or request_id
            attempt.ids = ids if all(ids) else None
        return attempt
