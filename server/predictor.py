"""The request path below HTTP: normalization, cache, tokenization, batcher, prediction metrics.

request -> normalize -> cache (per text, single-flight) -> misses tokenized
-> batcher -> probabilities -> Prediction -> cache filled.
"""

from __future__ import annotations

import unicodedata

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

    def swap(self, runtime: ModelRuntime) -> ModelRuntime:
        """Serve ``runtime`` from now on; returns the previous one (to drain). The cache is emptied."""
        previous, self.runtime = self.runtime, runtime
        self.cache.clear()
        return previous

    async def predict(self, texts: list[str], timeout: float | None = None) -> list[Prediction]:
        runtime = self.runtime

        async def compute(misses: list[str]) -> list[Prediction]:
            rows = await runtime.batcher.submit(runtime.encoder.encode(misses), timeout)
            return [self._to_prediction(runtime.labels(), row) for row in rows]

        predictions = await self.cache.get_or_compute(runtime.identity.version, texts, compute)
        self._observe(predictions)
        return predictions

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
