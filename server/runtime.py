"""One loaded model: artifact, tokenizer, engine (OOM-resilient), token budget and batcher.

Hot reload builds a new ``ModelRuntime`` beside the serving one, warms it,
smoke-tests it, and only then swaps it in; the old one drains in the
background. ``load_checked`` is the one way start-up checks (``server.preflight``),
``doctor`` and reload load a model: whatever goes wrong comes out as an
``ArtifactError`` or ``EngineStartError`` whose message is one line naming the
artifact and the fix.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.artifact import MANIFEST, TOKENIZER, Artifact, ArtifactError, load_artifact
from server.batcher import Batcher
from server.budget import TokenBudget
from server.config import Settings
from server.engine import Engine, EngineStartError, create_cpu_engine, create_engine, first_line
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
        self.encoder = load_encoder(artifact, settings.strict_truncation)
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
        """A smoke prediction (first: its failures say the most), then every warm-up shape once; returns seconds
        spent."""
        started = time.monotonic()
        self.smoke_test()
        shapes = warmup_shapes(self.engine.device, self.settings.max_batch_size, self.settings.max_batch_tokens,
                               self.artifact.max_length)
        for batch, length in shapes:
            ids = np.full((batch, length), 1000, dtype=np.int64)
            self.engine.run(ids, np.ones_like(ids))
        self.warm = True
        elapsed = time.monotonic() - started
        log.info("model %s %s warm on %s (%d shapes, %.2f s)", self.identity.name, self.identity.version,
                 self.identity.provider, len(shapes), elapsed)
        return elapsed

    def smoke_test(self) -> None:
        """Real predictions through tokenizer and engine must give finite logits, one per label.

        Two probes: the smoke texts as a batch, and one text of the manifest's ``max_sequence_length``
        (proof that the model accepts the length the server will truncate to).
        """
        where = self.artifact.directory
        encoded = self.encoder.encode(SMOKE_TEXTS)
        self._check_logits(self.engine.run(*pad_batch(encoded)), len(encoded))
        longest = np.resize(encoded[0], self.artifact.max_length)
        try:
            logits = self.engine.run(*pad_batch([longest]))
        except Exception as exc:
            raise ModelCheckFailed(
                f"model {where} cannot run a text of its max_sequence_length ({self.artifact.max_length} tokens, "
                f"from {MANIFEST}): {first_line(exc)}; set it to what the model supports or rebuild the artifact"
            ) from None
        self._check_logits(logits, 1)

    def _check_logits(self, logits: np.ndarray, rows: int) -> None:
        logits, where, expected = np.asarray(logits), self.artifact.directory, (rows, len(self.labels()))
        if logits.shape != expected:
            raise ModelCheckFailed(f"model {where}: a smoke prediction gave logits of shape {logits.shape}, expected "
                                   f"{expected} (one per label in {MANIFEST}): the ONNX file does not fit the manifest")
        if not np.isfinite(logits).all():
            raise ModelCheckFailed(f"model {where}: a smoke prediction gave non-finite logits (NaN or inf): the "
                                   "weights are damaged; restore or rebuild the artifact")


class ModelCheckFailed(ArtifactError):
    """The artifact's files verified, but the model cannot be served: it failed to load or to predict."""


def load_encoder(artifact: Artifact, strict: bool) -> TextEncoder:
    try:
        return TextEncoder(artifact.tokenizer_path, artifact.max_length, strict=strict)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise ModelCheckFailed(f"tokenizer unusable: {artifact.directory / TOKENIZER}: {first_line(exc)} "
                               "(restore it or rebuild the artifact)") from None


def load_checked(settings: Settings, metrics: Metrics, model_path: Path | None = None, warm: bool = True,
                 wrap_engine: Callable[[Engine], Engine] | None = None) -> ModelRuntime:
    """Load, verify and warm (``warm``) or only smoke-test a model; every failure is one clear exception.

    ``ArtifactError`` (files, manifest, tokenizer, a failed smoke prediction) or ``EngineStartError`` (the
    device); anything unexpected from ONNX Runtime or the tokenizer is wrapped as ``ModelCheckFailed``
    rather than let through, so no caller can mistake it for a server fault.
    """
    path = Path(model_path or settings.model_path)
    try:
        runtime = ModelRuntime.load(settings, metrics, model_path=path, wrap_engine=wrap_engine)
        if warm:
            runtime.warm_up()
        else:
            runtime.smoke_test()
            runtime.warm = True
    except (ArtifactError, EngineStartError):
        raise
    except Exception as exc:
        raise ModelCheckFailed(f"model {path} cannot serve: {first_line(exc)} (check the artifact, or rebuild it)"
                               ) from exc
    return runtime

