"""The request path below HTTP: normalization, cache, tokenization, batcher, prediction metrics.

request -> normalize -> cache (per text, single-flight) -> misses tokenized
-> batcher -> probabilities -> Prediction -> cache filled.

STRICT_TRUNCATION is judged per request, before the shared computation: a
request's texts are tokenized up front and a text over the model's maximum
length fails that request alone with a 422 naming its own ``texts[i]``. A
text is therefore never refused inside a computation shared with other
requests (which would fail them too, naming an index in someone else's list).

The drift families (``sentiment_predictions_total``, ``sentiment_prediction_
confidence``, ``sentiment_low_confidence_predictions_total``) count what the
model computed: each computation's texts once. Cache hits and requests that
shared a concurrent computation are not counted again, so a hot text answered
from the cache cannot mask (or fake) a shift in what the model says.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import numpy as np

from server.cache import PredictionCache
from server.metrics import Metrics
from server.primitives import Prediction
from server.runtime import ModelRuntime


def normalize(text: str) -> str:
    """The text as the model and the cache see it: Unicode NFC, outer whitespace removed."""
    return unicodedata.normalize("NFC", text).strip()


class Predictor:
    def __init__(self, runtime: ModelRuntime, cache: PredictionCache, metrics: Metrics,
                 low_confidence_threshold: float) -> None:
        self.runtime = runtime
        self.cache = cache
        self._metrics = metrics
        self._low_confidence = low_confidence_threshold
        metrics.known_labels(runtime.labels())

    def swap(self, runtime: ModelRuntime) -> ModelRuntime:
        """Serve ``runtime`` from now on; returns the previous one (to drain). The cache is emptied."""
        previous, self.runtime = self.runtime, runtime
        self.cache.clear()
        self._metrics.known_labels(runtime.labels())
        return previous

    async def predict(self, texts: list[str], timeout: float | None = None) -> list[Prediction]:
        runtime = self.runtime
        encode = self._strict_encoder(runtime, texts) if runtime.encoder.strict else runtime.encoder.encode

        async def compute(misses: list[str]) -> list[Prediction]:
            rows = await runtime.batcher.submit(encode(misses), timeout)
            predictions = [self._to_prediction(runtime.labels(), row) for row in rows]
            self._observe(predictions)
            return predictions

        return await self.cache.get_or_compute(runtime.identity.version, texts, compute)

    @staticmethod
    def _strict_encoder(runtime: ModelRuntime, texts: list[str]) -> Callable[[list[str]], list[np.ndarray]]:
        """Tokenize the request's own texts now (InputTooLong names ``texts[i]`` of this request); misses reuse them.

        The misses a computation gets are always some of the request's texts, so nothing is tokenized twice.
        """
        ids_by_text = dict(zip(texts, runtime.encoder.encode(texts), strict=True))
        return lambda misses: [ids_by_text[text] for text in misses]

    @staticmethod
    def _to_prediction(labels: list[str], probabilities: np.ndarray) -> Prediction:
        best = int(np.argmax(probabilities))
        return Prediction(
            label=labels[best],
            score=float(probabilities[best]),
            probabilities={label: float(p) for label, p in zip(labels, probabilities, strict=True)},
        )

    def _observe(self, predictions: list[Prediction]) -> None:
        m = self._metrics
        for p in predictions:
            m.predictions.labels(p.label).inc()
            m.confidence.observe(p.score)
            if p.score < self._low_confidence:
                m.low_confidence.inc()
