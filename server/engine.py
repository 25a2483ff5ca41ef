"""ONNX Runtime inference session: provider selection, CUDA options, IO binding.

``DEVICE=auto`` uses CUDA when the CUDA execution provider is installed and a
session actually starts on it, else CPU with one WARNING. ``DEVICE=cuda``
without a usable GPU is a start-up error. The variant follows the device
(fp16 on CUDA, int8 on CPU) unless ``MODEL_VARIANT`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from server.artifact import Artifact
from server.cgroup import CGROUP_ROOT, cpu_quota_cores
from server.config import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineStartError(RuntimeError):
    """The engine cannot start with the configured device/variant."""


class ModelFileError(EngineStartError):
    """ONNX Runtime refused the model file itself (not the device): unparseable, or not the inputs the server feeds."""


MODEL_INPUTS = ("input_ids", "attention_mask")
NO_EXTERNAL_DATA = "\0"  # the name of an empty external-data table's one entry: no file can be named so


class Engine(Protocol):
    device: str
    provider: str
    variant: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its affinity mask, capped by the container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores(cgroup_root)
    return min(cores, quota) if quota else cores


def cuda_provider_options(settings: Settings) -> dict[str, str]:
    """Deliberate CUDA EP options: the device, a memory cap, and arena growth by request.

    ``kSameAsRequested`` grows the arena by what a batch needs instead of
    doubling, so memory follows the largest batch seen rather than twice it.
    """
    options = {
        "device_id": str(settings.cuda_device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    if settings.cuda_mem_limit:
        options["gpu_mem_limit"] = str(settings.cuda_mem_limit)
    return options


def engine_workers(settings: Settings, device: str) -> int:
    """How many batches run at once: ``ENGINE_WORKERS``, or when 0 (auto) 2 on a CPU with 2+ cores, else 1.

    Two batches in flight on half the cores each beat one batch on all of them on a busy CPU server: while
    one batch computes, the other's Python side (padding, softmax, answering) runs, and single-threaded runs
    need no thread synchronisation. Measured on 2 cores at saturation: +18% texts/s. The price is a lone long
    text's latency (it gets half the cores): set ``ENGINE_WORKERS=1`` where that matters more.
    """
    if settings.engine_workers:
        return settings.engine_workers
    return 2 if device == "cpu" and available_cores() >= 2 else 1


def intra_op_threads(settings: Settings, device: str) -> int:
    """``INTRA_OP_THREADS``, or when 0 (auto) the available cores shared among the engine workers."""
    return settings.intra_op_threads or max(1, available_cores() // engine_workers(settings, device))


def cpu_oversubscription(settings: Settings) -> str | None:
    """What to change when ``INTRA_OP_THREADS`` × the engine workers exceeds the cores this process may use on a
    CPU; None when it does not. Each inference then waits on pool threads that cannot run, and every thread is
    made at start: measured on 2 cores, 500 threads made a lone prediction about 5 times slower, 3,000 took 36 s
    to start. A warning, not a refusal: one extra thread on a core costs little."""
    if not settings.intra_op_threads or settings.device == "cuda":
        return None
    cores, workers = available_cores(), engine_workers(settings, "cpu")
    if settings.intra_op_threads * workers <= cores:
        return None
    fitting = max(1, cores // workers)
    return (f"INTRA_OP_THREADS={settings.intra_op_threads} × {workers} engine worker(s) is "
            f"{settings.intra_op_threads * workers} CPU threads on {cores} usable core(s): inferences wait on threads "
            f"that cannot run; set INTRA_OP_THREADS=0 (auto: {fitting} here) or at most {fitting}")


def session_options(settings: Settings, device: str, threads: int | None = None) -> ort.SessionOptions:
    """Full graph optimization, one operator at a time, ``threads`` (default ``intra_op_threads``) inside each.

    Spinning is off unless ``INTRA_OP_SPINNING``: after each parallel operator ONNX Runtime's pool threads
    otherwise busy-wait for the next one, and in a server those cycles are taken from the event loop that
    parses, tokenizes and answers requests on the same cores.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or intra_op_threads(settings, device)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
    return options


class OnnxEngine:
    """One ONNX Runtime session. ``run`` is blocking; the batcher calls it from its worker threads (ONNX Runtime
    sessions accept concurrent runs). Built from the variant's verified bytes (``Artifact.read_variant``), never
    from its path: the session holds its own copy of every weight."""

    def __init__(self, artifact: Artifact, variant: str, device: str, settings: Settings,
                 threads: int | None = None) -> None:
        self.variant = variant
        self.device = device
        options = session_options(settings, device, threads)
        if device == "cuda":
            providers: list = [(CUDA, cuda_provider_options(settings)), CPU]
        else:
            providers = [CPU]
        path = artifact.variant_path(variant)
        graph, external = artifact.read_variant(variant)
        # Always a table, even an empty one: without it ONNX Runtime reads a location the graph names but the
        # manifest does not list from the working directory (a graph given as bytes has no directory), unchecked.
        # It copies the bytes during session creation.
        table = external or {NO_EXTERNAL_DATA: b""}
        options.add_external_initializers_from_files_in_memory(
            list(table), list(table.values()), [len(data) for data in table.values()])
        try:
            # Without ``enable_fallback=0`` ONNX Runtime's wrapper answers a failed start by printing the error to
            # stdout (into the JSON log stream) and building the session again on its fallback providers: on CUDA
            # a CPU session, whose "did not start on CUDA" then hid why; on CPU the same failure twice.
            self._session = ort.InferenceSession(graph, sess_options=options, providers=providers, enable_fallback=0)
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            # On CPU nothing but the file can be at fault; on CUDA it may be the device.
            if device == "cpu":
                raise ModelFileError(f"cannot load model file {path}: {first_line(exc)} (restore it or rebuild the "
                                     "artifact)") from None
            raise EngineStartError(f"cannot start model file {path} on CUDA: {first_line(exc)}") from None
        # The wrapper keeps a model given as bytes for good, to build the session again on other providers (the
        # fallback, off here): the graph's size of memory (its own comment says as much).
        self._session._model_bytes = None
        inputs = [i.name for i in self._session.get_inputs()]
        if sorted(inputs) != sorted(MODEL_INPUTS):
            raise ModelFileError(f"model file {path} takes inputs {inputs}; the server feeds {list(MODEL_INPUTS)} "
                                 "(re-export it with models/export.py)")
        self.provider = self._session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise EngineStartError(
                f"ONNX Runtime did not start {path} on CUDA (providers: {self._session.get_providers()})"
            )
        self._output = self._session.get_outputs()[0].name
        self._shrink_tokens = settings.arena_shrink_tokens
        self._shrink = ort.RunOptions()
        arena = f"gpu:{settings.cuda_device_id}" if device == "cuda" else "cpu:0"
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arena)

    def _run_options(self, input_ids: np.ndarray) -> ort.RunOptions | None:
        """Shrink the arena after an oversized batch, so one long request does not pin its memory for good.

        Measured on the default int8 model (CPU): a 16 x 512 batch grows RSS from 99 to 625 MiB and it stays
        there; with shrinkage it returns to 121 MiB. Typical batches (32 x ~30 tokens) skip it.
        """
        return self._shrink if 0 < self._shrink_tokens < input_ids.size else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.device == "cuda":
            return self._run_bound(input_ids, attention_mask)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self._session.run([self._output], feeds, self._run_options(input_ids))[0].astype(np.float32, copy=False)

    def _run_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """IO binding: inputs copied to the GPU once, output allocated by ORT on the device."""
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_output(self._output, "cuda", self._session_device_id())
        self._session.run_with_iobinding(binding, self._run_options(input_ids))
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)

    def _session_device_id(self) -> int:
        return int(self._session.get_provider_options().get(CUDA, {}).get("device_id", 0))


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, bounded: ORT's messages can run to kilobytes of C++ frames."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def resolve_device(settings: Settings) -> str:
    """The device to use, or ``EngineStartError`` when DEVICE=cuda cannot be honoured."""
    if settings.device == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if settings.device == "cuda":
        raise EngineStartError(
            "DEVICE=cuda but ONNX Runtime has no CUDA execution provider "
            f"(available: {ort.get_available_providers()}); install the gpu extra (onnxruntime-gpu) "
            "and check `nvidia-smi`, or set DEVICE=auto to fall back to CPU"
        )
    return "cpu"


def create_engine(artifact: Artifact, settings: Settings) -> OnnxEngine:
    """The primary engine: CUDA when asked for or usable, CPU otherwise (one WARNING on fallback)."""
    device = resolve_device(settings)
    variant = artifact.choose_variant(settings.model_variant, device)
    if device == "cuda":
        try:
            return OnnxEngine(artifact, variant, "cuda", settings)
        except EngineStartError as exc:
            if settings.device == "cuda":
                raise
            log.warning("CUDA unusable, falling back to CPU: %s", exc)
            variant = artifact.choose_variant(settings.model_variant, "cpu")
    elif settings.device == "auto":
        log.warning("no CUDA execution provider available; running on CPU")
    return OnnxEngine(artifact, variant, "cpu", settings)


def create_cpu_engine(artifact: Artifact, settings: Settings) -> OnnxEngine:
    """A CPU session for per-example fallback after GPU out-of-memory: fp32 when shipped (closest to the GPU's
    results), else what the CPU would serve. It runs one text at a time for the GPU's single engine worker,
    so it gets every core rather than a CPU worker's share."""
    variant = "fp32" if "fp32" in artifact.variants() else artifact.choose_variant("auto", "cpu")
    return OnnxEngine(artifact, variant, "cpu", settings, threads=settings.intra_op_threads or available_cores())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
