"""The compared variants: one runner per (backend, device, precision, graph optimization).

A runner maps numpy int64 ``input_ids``/``attention_mask`` [B, T] to float32 logits [B, labels] and
returns only once the result is on the host, so wall-clock time around ``run`` is the full latency
(host-device copies included on CUDA, as the server pays them). A variant that cannot run here
raises ``Unavailable`` with the reason, which the report prints instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.artifact import Artifact

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class Unavailable(Exception):
    """This variant cannot run in this environment; the message says why."""


@dataclass
class Runner:
    name: str
    run: Callable[[np.ndarray, np.ndarray], np.ndarray] = field(repr=False)
    details: dict


@dataclass(frozen=True)
class Spec:
    """How to build one variant: ONNX Runtime over an artifact file, or PyTorch eager over a checkpoint."""

    name: str
    backend: str  # "onnxruntime" | "torch"
    device: str  # "cpu" | "cuda"
    precision: str  # artifact variant for onnxruntime; "fp32" | "fp16" for torch
    optimized: bool = True  # onnxruntime: ORT_ENABLE_ALL, else ORT_DISABLE_ALL


SPECS = (
    Spec("torch-cpu-fp32", "torch", "cpu", "fp32"),
    Spec("ort-cpu-fp32-noopt", "onnxruntime", "cpu", "fp32", optimized=False),
    Spec("ort-cpu-fp32", "onnxruntime", "cpu", "fp32"),
    Spec("ort-cpu-int8", "onnxruntime", "cpu", "int8"),
    Spec("ort-cuda-fp32", "onnxruntime", "cuda", "fp32"),
    Spec("ort-cuda-fp16", "onnxruntime", "cuda", "fp16"),
    Spec("torch-cuda-fp16", "torch", "cuda", "fp16"),
)
VARIANTS = tuple(spec.name for spec in SPECS)


def build_runner(spec: Spec, artifact: Artifact, checkpoint: Path | None, threads: int) -> Runner:
    """A ready runner for ``spec``; raises ``Unavailable`` saying why it cannot be built here."""
    if spec.backend == "onnxruntime":
        return _ort_runner(spec, artifact, threads)
    return _torch_runner(spec, checkpoint, artifact.labels, threads)


def _ort_runner(spec: Spec, artifact: Artifact, threads: int) -> Runner:
    providers = [CUDA, CPU] if spec.device == "cuda" else [CPU]
    if providers[0] not in ort.get_available_providers():
        raise Unavailable(f"onnxruntime {ort.__version__} has no {CUDA} (a CPU build; GPUs need onnxruntime-gpu)")
    if spec.precision not in artifact.variants():
        hint = ("; models.build checks fp32 but ships it only with --keep-fp32: rebuild with it to run this variant"
                if spec.precision == "fp32" else "")
        raise Unavailable(f"the artifact has no {spec.precision} variant (available: {artifact.variants()}){hint}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if spec.optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    path = artifact.variant_path(spec.precision)
    session = ort.InferenceSession(str(path), options, providers=providers)
    provider = session.get_providers()[0]
    if provider != providers[0]:
        raise Unavailable(f"{providers[0]} did not initialise (ONNX Runtime fell back to {provider})")

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    details = {
        "backend": "onnxruntime", "device": spec.device, "precision": spec.precision, "provider": provider,
        "graph_optimization": "ORT_ENABLE_ALL" if spec.optimized else "ORT_DISABLE_ALL", "file": path.name,
    }
    return Runner(spec.name, run, details)


def same_outputs(checkpoint_labels: list[str], artifact_labels: list[str]) -> bool:
    """The checkpoint's logits mean the artifact's labels: the same names in the same order, or unnamed positions
    (``LABEL_<i>``) that ``models.build --labels`` named."""
    if len(checkpoint_labels) != len(artifact_labels):
        return False
    unnamed = all(label.upper() == f"LABEL_{i}" for i, label in enumerate(checkpoint_labels))
    return unnamed or checkpoint_labels == artifact_labels


def _torch_runner(spec: Spec, checkpoint: Path | None, artifact_labels: list[str], threads: int) -> Runner:
    if checkpoint is None:
        raise Unavailable("no --checkpoint given (PyTorch eager runs the Hugging Face checkpoint directory)")
    if not Path(checkpoint).is_dir():
        raise Unavailable(f"checkpoint directory not found: {checkpoint}")
    try:
        import torch

        from models.export import ExportError, labels_of, load_checkpoint
    except ImportError as exc:
        raise Unavailable(f"PyTorch eager needs torch and transformers (pip install .[train]): {exc}") from None
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no usable CUDA device")
    torch.set_num_threads(threads)
    dtype = torch.float16 if spec.precision == "fp16" else torch.float32
    try:
        model = load_checkpoint(checkpoint)[0]
    except ExportError as exc:
        raise Unavailable(str(exc)) from None
    if not same_outputs(labels_of(model), artifact_labels):
        raise Unavailable(f"the checkpoint's labels {labels_of(model)} are not the artifact's {artifact_labels}: "
                          "it is not the model the artifact was built from")
    model = model.to(device=spec.device, dtype=dtype)

    def run(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(spec.device)
            mask = torch.from_numpy(attention_mask).to(spec.device)
            return model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()

    device = torch.cuda.get_device_name() if spec.device == "cuda" else "cpu"
    details = {"backend": "torch", "device": spec.device, "precision": spec.precision, "provider": device,
               "checkpoint": str(checkpoint)}
    return Runner(spec.name, run, details)
