"""One loaded model: artifact, tokenizer, engine (OOM-resilient), memory plan, token budget and batcher.

Loading measures what the model's batches cost in memory (``server.memory_model``) and plans batches, engine
workers, queue and cache to fit the memory limit (``server.budget``); the runtime's ``settings`` are the
planned ones, and warm-up runs only shapes within the planned budget.

Hot reload builds a new ``ModelRuntime`` beside the serving one, warms it,
smoke-tests it, and only then swaps it in; the old one drains in the
background. ``load_checked`` is the one way start-up checks (``server.preflight``),
``doctor`` and reload load a model: whatever goes wrong comes out as an
``ArtifactError`` or ``EngineStartError`` whose message is one line naming the
artifact and the fix.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.artifact import MANIFEST, TOKENIZER, Artifact, ArtifactError, load_artifact
from server.batcher import Batcher
from server.budget import TEXT_WORK_BYTES, Area, MemoryDoesNotFit, MemoryPlan, TokenBudget, mib, plan_memory
from server.cgroup import memory_limit_bytes
from server.config import Settings
from server.engine import (
    Engine,
    EngineStartError,
    create_cpu_engine,
    create_engine,
    cuda_available,
    engine_workers,
    first_line,
)
from server.exitcodes import StartupError
from server.memory import process_rss_bytes, return_large_blocks
from server.memory_model import CostModel, DeviceMemory, HostMemory, measure
from server.metrics import Metrics
from server.oom import ResilientEngine
from server.primitives import ModelIdentity
from server.tokenizer import TextEncoder, pad_batch

log = logging.getLogger(__name__)
SMOKE_TEXTS = ["a wonderful, moving film", "a dull and tedious mess"]
TOKENIZER_LOAD_FACTOR = 20  # bytes of memory per byte of tokenizer.json while it loads (measured 13-19)
TOKENIZER_CHECKED_FROM = 64 << 20  # what a tokenizer must need to load before ``check_tokenizer_fits`` looks


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


_LOADS = itertools.count(1)


class ModelRuntime:
    def __init__(self, artifact: Artifact, encoder: TextEncoder, engine: Engine, budget: TokenBudget,
                 settings: Settings, metrics: Metrics) -> None:
        self.artifact = artifact
        self.settings = settings
        self.encoder = encoder
        self.budget = budget
        self.engine = engine
        self.batcher = Batcher(engine, settings, metrics, token_budget=budget.at)
        self.identity = ModelIdentity(
            name=artifact.name, version=artifact.version, variant=engine.variant,
            provider=engine.provider, device=engine.device,
        )
        self.warm = False
        self.load_key = next(_LOADS)  # this load's own: the prediction cache's model key (``server.cache``)

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, model_path: Path | None = None,
             wrap_engine: Callable[[Engine], Engine] | None = None) -> ModelRuntime:
        """Verify and load an artifact, check its predictions, measure its batches' memory and plan to the limit.

        The runtime's ``settings`` are ``settings`` with the planned values (``MemoryPlan.apply``);
        ``MemoryDoesNotFit`` when they cannot fit. ``wrap_engine`` lets tests inject faults around the primary
        engine (the memory is measured on the engine itself).
        """
        return_large_blocks()  # before anything large is allocated (server.memory), the probes included
        artifact = load_artifact(model_path or settings.model_path)
        check_tokenizer_fits(artifact, settings)
        encoder = load_encoder(artifact, settings.strict_truncation)
        gpu = DeviceMemory.open(settings.cuda_device_id) if settings.device != "cpu" and cuda_available() else None
        gpu_before = gpu.current() if gpu else 0
        engine = create_engine(artifact, settings)
        meter = HostMemory() if engine.device == "cpu" else gpu  # None on CUDA without NVML
        gc.collect()
        baseline = meter.current() if meter else 0  # before the first run (server.memory_model)
        check_predictions(engine, encoder, artifact)
        plan = fit_memory(engine, encoder, artifact, settings, meter, baseline, gpu_before)
        planned = plan.apply(settings)
        if not settings.intra_op_threads and plan.engine_workers != engine_workers(settings, engine.device):
            on_device = planned.model_copy(update={"device": engine.device})  # CUDA not tried nor warned twice
            del engine  # first, so the two sessions are never in memory together
            engine = create_engine(artifact, on_device)  # its threads shared among the planned workers
        primary = wrap_engine(engine) if wrap_engine is not None else engine
        budget = TokenBudget(plan.batch_tokens, metrics, plan=plan)
        resilient = ResilientEngine(primary, lambda: create_cpu_engine(artifact, settings), budget, metrics)
        return cls(artifact, encoder, resilient, budget, planned, metrics)

    @property
    def memory_plan(self) -> MemoryPlan | None:
        return self.budget.plan

    def labels(self) -> list[str]:
        return self.artifact.labels

    def warm_up(self) -> float:
        """A smoke prediction (first: its failures say the most), then every warm-up shape once, whose logits are
        checked as the smoke prediction's are; returns seconds spent. Unchecked, a model that gave two rows (or NaN)
        for batches of three texts or more passed start-up, doctor and reload, then failed live requests with 500s
        that blamed their texts (red team helper-85)."""
        started = time.monotonic()
        self.smoke_test()
        shapes = warmup_shapes(self.engine.device, self.settings.max_batch_size, self.settings.max_batch_tokens,
                               self.artifact.max_length)
        for batch, length in shapes:
            ids = np.full((batch, length), 1000, dtype=np.int64)
            _check_logits(self.artifact, self.engine.run(ids, np.ones_like(ids)), batch,
                          f"a warm-up batch of {batch} x {length} tokens")
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
        check_predictions(self.engine, self.encoder, self.artifact)


def check_predictions(engine: Engine, encoder: TextEncoder, artifact: Artifact) -> None:
    """The smoke probes (``ModelRuntime.smoke_test``) through ``engine``: ``ModelCheckFailed`` naming what is wrong."""
    where = artifact.directory
    frame = encoder.frame_tokens
    if frame >= artifact.max_length:  # every text would be cut to them ([CLS] [SEP]), and all answered alike
        raise ModelCheckFailed(f"model {where}: max_sequence_length {artifact.max_length} in {MANIFEST} leaves no room "
                               f"for a text's own tokens (its tokenizer adds {frame} to every text); set it to what "
                               "the model was trained with")
    encoded = encoder.encode(SMOKE_TEXTS)
    _check_logits(artifact, engine.run(*pad_batch(encoded)), len(encoded))
    longest = np.resize(encoded[0], artifact.max_length)
    try:
        logits = engine.run(*pad_batch([longest]))
    except Exception as exc:
        raise ModelCheckFailed(
            f"model {where} cannot run a text of its max_sequence_length ({artifact.max_length} tokens, "
            f"from {MANIFEST}): {first_line(exc)}; set it to what the model supports or rebuild the artifact"
        ) from None
    _check_logits(artifact, logits, 1)
    highest = encoder.highest_id()
    probe = encoded[0].copy()
    probe[len(probe) // 2] = highest
    try:
        _check_logits(artifact, engine.run(*pad_batch([probe])), 1)
    except ModelCheckFailed:
        raise
    except Exception as exc:  # a tokenizer with more ids than the model embeds failed each batch holding one
        raise ModelCheckFailed(
            f"model {where}: its {TOKENIZER} gives token ids up to {highest}, which the model cannot run "
            f"({first_line(exc)}): a text with such a token would fail every request in its batch; build the artifact "
            "with the tokenizer the model was trained with") from None


def _check_logits(artifact: Artifact, logits: np.ndarray, rows: int, what: str = "a smoke prediction") -> None:
    logits, where, expected = np.asarray(logits), artifact.directory, (rows, len(artifact.labels))
    if logits.shape != expected:
        raise ModelCheckFailed(f"model {where}: {what} gave logits of shape {logits.shape}, expected "
                               f"{expected} (one per label in {MANIFEST}): the ONNX file does not fit the manifest")
    if not np.isfinite(logits).all():
        raise ModelCheckFailed(f"model {where}: {what} gave non-finite logits (NaN or inf): the "
                               "weights are damaged; restore or rebuild the artifact")


def fit_memory(engine: Engine, encoder: TextEncoder, artifact: Artifact, settings: Settings,
               meter: HostMemory | DeviceMemory | None, baseline: int, gpu_before: int) -> MemoryPlan:
    """Measure ``engine``'s batches with ``meter`` (``server.memory_model.measure``) and plan them to the limit.

    On CUDA ``meter`` reads the GPU's memory (``gpu_before``: its reading before the model loaded) and the
    batches are planned there; without NVML (``meter`` None) they cannot be, and MAX_BATCH_TOKENS stays as set
    (out-of-memory batches are still split and retried). A cost model that measured nothing (no meter) or sampled
    its peaks is not exact: /health says ``peak_exact`` false, and start-up logs one WARNING that says why.
    """
    sample = encoder.encode(SMOKE_TEXTS)[0]

    def run(batch: int, length: int) -> None:
        ids = np.resize(sample, (batch, length))
        engine.run(ids, np.ones_like(ids))

    high, host_limit, max_length = settings.memory_high_water, memory_limit_bytes(), artifact.max_length
    device_area = None
    if isinstance(meter, DeviceMemory):
        limit = settings.cuda_mem_limit or meter.total() - gpu_before
        model = measure(run, meter, max_length, baseline, gpu_before + limit * high)
        device_area = Area(f"GPU {meter.index}'s memory", limit, baseline - gpu_before, high)
        host_base = HostMemory().current()
    elif meter is None:  # nothing measured: the plan leaves the batches out, so its peak is not exact
        log.warning("GPU memory cannot be read (no pynvml or NVML): MAX_BATCH_TOKENS is not derived from it and the "
                    "planned peak leaves the batches out (peak_exact false); out-of-memory batches are split and "
                    "retried")
        model, host_base = CostModel(0.0, 0.0, exact=False), HostMemory().current()
    else:
        model, host_base = measure(run, meter, max_length, baseline, host_limit * high), baseline
    if meter is not None and not model.exact:  # sampled (not measured at all: the warning above says so)
        log.warning("memory peaks were sampled, not read from the kernel's high-water mark (/proc/self/clear_refs "
                    "not writable): the cost model may read low")
    auto = engine_workers(settings.model_copy(update={"engine_workers": 0}), engine.device)
    plan = plan_memory(settings, Area("the memory limit", host_limit, host_base, high), model, max_length, auto,
                       device_area)
    log.info("memory plan: %s", summary(plan))
    if "max_batch_tokens" in settings.model_fields_set and settings.max_batch_tokens < max_length:
        # a batch always holds one text: below the max length the cap is not flat (red team helper-74)
        log.warning("MAX_BATCH_TOKENS=%d is below the model's max length (%d tokens): a batch always holds at least "
                    "one text, so a text of more than %d tokens runs alone, past it; set %d or more for a cap that "
                    "holds at every length", settings.max_batch_tokens, max_length, settings.max_batch_tokens,
                    max_length)
    return plan


def summary(plan: MemoryPlan) -> str:
    """The plan in one log line."""
    area, model, n = plan.batch_area, plan.model, plan.max_length
    derived = ", ".join(name.upper() for name in plan.derived) or "none"
    return (f"limit {mib(plan.host.limit)}, high water {mib(plan.host.ceiling)}; model and server "
            f"{mib(plan.host.base)}, cache {mib(plan.cache_max_bytes)}, tokenizer {mib(TEXT_WORK_BYTES)}, "
            f"{plan.max_queue} queued texts "
            f"{mib(plan.queue_bytes)}, {plan.engine_workers} engine worker(s) x a batch of up to "
            f"{plan.batch_tokens_at_peak // n} x {n} tokens (MAX_BATCH_TOKENS={plan.batch_tokens}) "
            f"{mib(plan.batch_bytes)} in {area.name}; peak {mib(plan.device_peak or plan.host_peak)} of "
            f"{mib(area.ceiling)}; a padded token costs {model.token_bytes(n) / 1024:,.1f} KiB at {n} tokens, "
            f"{model.token_bytes(max(1, n // 8)) / 1024:,.1f} KiB at {max(1, n // 8)}; derived: {derived}")


class ModelCheckFailed(ArtifactError):
    """The artifact's files verified, but the model cannot be served: it failed to load or to predict."""


def check_tokenizer_fits(artifact: Artifact, settings: Settings) -> None:
    """``MemoryDoesNotFit`` when loading the artifact's tokenizer would take the process past MEMORY_HIGH_WATER x
    its memory limit. The memory plan measures the engine, not the tokenizer, which takes 13-19 times its file's
    size to load (0.7 MB: 10 MiB; 19 times for the same re-saved without spaces; a red team's 42 MB, 2-million-word
    one: 523 MiB, which a reload under a 700 MiB limit with the serving model held took to 925 MiB). Only one that
    needs ``TOKENIZER_CHECKED_FROM`` or more is checked: a usual one (the default's: 14 MiB) is part of what the
    memory plan then measures, whose refusal names the limit to set (this check, refusing first, named the
    tokenizer instead)."""
    size = artifact.manifest["files"][TOKENIZER]["bytes"]
    needed = size * TOKENIZER_LOAD_FACTOR
    if needed < TOKENIZER_CHECKED_FROM:  # a usual one: the memory plan's own refusal says more, and says it better
        return
    limit = memory_limit_bytes()
    left = settings.memory_high_water * limit - process_rss_bytes()
    if needed > left:
        raise MemoryDoesNotFit(
            f"{artifact.directory / TOKENIZER} ({mib(size)}) needs about {mib(needed)} to load, and the server has "
            f"{mib(max(0, left))} left under MEMORY_HIGH_WATER x its memory limit of {mib(limit)}",
            "give the server more memory (or use a smaller tokenizer)")


def load_encoder(artifact: Artifact, strict: bool) -> TextEncoder:
    tokenizer = artifact.read_verified(TOKENIZER)
    try:
        return TextEncoder(tokenizer, artifact.max_length, strict=strict)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise ModelCheckFailed(f"tokenizer unusable: {artifact.directory / TOKENIZER}: {first_line(exc)} "
                               "(restore it or rebuild the artifact)") from None


def load_checked(settings: Settings, metrics: Metrics, model_path: Path | None = None, warm: bool = True,
                 wrap_engine: Callable[[Engine], Engine] | None = None) -> ModelRuntime:
    """Load, verify and warm (``warm``) or only smoke-test a model; every failure is one clear exception.

    ``ArtifactError`` (files, manifest, tokenizer, a failed smoke prediction), ``EngineStartError`` (the
    device) or ``MemoryDoesNotFit`` (a ``StartupError``: the settings cannot fit the memory limit); anything
    unexpected from ONNX Runtime or the tokenizer is wrapped as ``ModelCheckFailed`` rather than let through,
    so no caller can mistake it for a server fault.
    """
    path = Path(model_path or settings.model_path)
    try:
        runtime = ModelRuntime.load(settings, metrics, model_path=path, wrap_engine=wrap_engine)
        if warm:
            runtime.warm_up()
        else:
            runtime.smoke_test()
            runtime.warm = True
    except (ArtifactError, EngineStartError, StartupError):
        raise
    except Exception as exc:
        raise ModelCheckFailed(f"model {path} cannot serve: {first_line(exc)} (check the artifact, or rebuild it)"
                               ) from exc
    return runtime

