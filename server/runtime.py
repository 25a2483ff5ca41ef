"""One loaded model: artifact, tokenizer, engine (OOM-resilient), token budget and batcher.

Hot reload builds a new ``ModelRuntime`` beside the serving one, warms it,
smoke-tests it, and only then swaps it in; the old one drains in the
background.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.artifact import Artifact, load_artifact
from server.batcher import Batcher
from server.budget import TokenBudget
from server.config import Settings
from server.engine import Engine, create_cpu_engine, create_engine
from server.metrics import Metrics
from server.oom import ResilientEngine
from server.primitives import ModelIdentity
from server.tokenizer import TextEncoder, pad_batch

log = logging.getLogger(__name__)
SMOKE_TEXTS = ["a wonderful, moving film", "a dull and tedious mess"]


def warmup_shapes(device: str, max_batch: int, max_tokens: int, max_length: int) -> list[tuple[int, int]]:
    """(batch, length) shapes to run before ready.

    CUDA: every power-of-two bucket within the token budget, so no request
    meets a new shape cold (kernel selection, arena growth). CPU: ONNX
    Runtime compiles nothing per shape, so the smallest, a typical and the
    largest shape (which sizes the memory arena) suffice.
    """
    sizes = [s for s in (2**i for i in range(13)) if s < max_batch] + [max_batch]
    lengths = [n for n in (2**i for i in range(3, 13)) if n < max_length] + [max_length]
    grid = [(b, n) for b, n in itertools.product(sizes, lengths) if b * n <= max_tokens]
    if device == "cuda" or len(grid) <= 3:
        return grid
    typical = min(grid, key=lambda shape: abs(shape[0] - max_batch) + abs(shape[1] - 32))
    largest = max(grid, key=lambda shape: (shape[0] * shape[1], shape[1]))
    return sorted({grid[0], typical, largest})


class ModelRuntime:
    def __init__(self, artifact: Artifact, engine: Engine, budget: TokenBudget, settings: Settings,
                 metrics: Metrics) -> None:
        self.artifact = artifact
        self.settings = settings
        self.encoder = TextEncoder(artifact.tokenizer_path, artifact.max_length, strict=settings.strict_truncation)
        self.budget = budget
        self.engine = engine
        self.batcher = Batcher(engine, settings, metrics, token_budget=lambda: budget.current)
        self.identity = ModelIdentity(
            name=artifact.name, version=artifact.version, variant=engine.variant,
            provider=engine.provider, device=engine.device,
        )
        self.warm = False

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, model_path: Path | None = None,
             wrap_engine: Callable[[Engine], Engine] | None = None) -> ModelRuntime:
        """Verify and load an artifact; ``wrap_engine`` lets tests inject faults around the primary engine."""
        artifact = load_artifact(model_path or settings.model_path)
        primary = create_engine(artifact, settings)
        if wrap_engine is not None:
            primary = wrap_engine(primary)
        budget = TokenBudget(settings.max_batch_tokens, metrics)
        engine = ResilientEngine(primary, lambda: create_cpu_engine(artifact, settings), budget, metrics)
        return cls(artifact, engine, budget, settings, metrics)

    def labels(self) -> list[str]:
        return self.artifact.labels

    def warm_up(self) -> float:
        """Run every warm-up shape once, then a smoke prediction; returns seconds spent."""
        started = time.monotonic()
        shapes = warmup_shapes(self.engine.device, self.settings.max_batch_size, self.settings.max_batch_tokens,
                               self.artifact.max_length)
        for batch, length in shapes:
            ids = np.full((batch, length), 1000, dtype=np.int64)
            self.engine.run(ids, np.ones_like(ids))
        self.smoke_test()
        self.warm = True
        elapsed = time.monotonic() - started
        log.info("model %s %s warm on %s (%d shapes, %.2f s)", self.identity.name, self.identity.version,
                 self.identity.provider, len(shapes), elapsed)
        return elapsed

    def smoke_test(self) -> None:
        """A real prediction through tokenizer and engine must give finite probabilities of the right width."""
        encoded = self.encoder.encode(SMOKE_TEXTS)
        logits = np.asarray(self.engine.run(*pad_batch(encoded)))
        if logits.shape != (len(SMOKE_TEXTS), len(self.labels())) or not np.isfinite(logits).all():
            raise RuntimeError(f"smoke prediction gave logits of shape {logits.shape} (expected "
                               f"{(len(SMOKE_TEXTS), len(self.labels()))}) or non-finite values")
