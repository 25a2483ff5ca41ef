"""What this project can check on a lent GPU machine, in one call (``bash scripts/gpu_check.sh``).

Each check ends PASS, FAIL or SKIP with its reason; the table is printed and written to
``OUT/gpu_check.json``. On a machine without a GPU everything GPU-bound skips, which is how CI runs it.

  torch-cuda   PyTorch sees a CUDA device (the image's own stack works; informative)
  nvml         the server's GpuMonitor reads memory and utilisation from the real driver (nvidia-ml-py)
  cuda-ep      ONNX Runtime has its CUDA execution provider (onnxruntime-gpu); the checks below need it
  cuda-engine  the server's CUDA engine (fp16, IO binding) starts and agrees with the CPU engine on real
               sentences (argmax agreement, largest probability difference)
  throughput   texts/s of the CUDA engine at batch 32, arrival order and length-sorted
  oom-split    with the arena capped (CUDA_MEM_LIMIT), a large batch runs out of GPU memory for real;
               ResilientEngine splits it and every row still matches the uncapped engine

The lent machines have no network; their image has PyTorch, ONNX Runtime (CPU build), tokenizers, numpy,
prometheus-client and nvidia-ml-py, but not pydantic-settings or onnxruntime-gpu. ``make gpu-carry``
prepares ``build/gpu_carry`` (wheels for the server's settings, and the SST-2 dev sentences) to carry
there; onnxruntime-gpu (255 MB) is too large to carry, so without it the engine checks skip.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = (ROOT.parent / "shared/data/sst2/dev.tsv", ROOT / "build/gpu_carry/dev.tsv")
FALLBACK_TEXTS = [
    "a gripping, funny and warm film", "dull, lifeless and far too long", "not bad at all",
    "the best performance of the year", "i wanted my two hours back", "an uneven but likeable comedy",
]


@dataclass
class Result:
    check: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    numbers: dict | None = None


class Skip(Exception):
    """The check cannot run here; the message says why."""


def check_torch_cuda() -> Result:
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} sees no CUDA device")
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    return Result("torch-cuda", "PASS", f"{name}, {total / 2**30:.0f} GiB, torch {torch.__version__}")


def check_nvml() -> Result:
    from server.gpu import GpuMonitor
    from server.metrics import Metrics

    metrics = Metrics()
    monitor = GpuMonitor(metrics)
    if not monitor.available:
        raise Skip("NVML unavailable (no nvidia-ml-py, driver or GPU); the server exports no GPU gauges")
    try:
        monitor.update()
    finally:
        monitor.close()
    used = metrics.registry.get_sample_value("sentiment_gpu_memory_used_bytes", {"gpu": "0"})
    total = metrics.registry.get_sample_value("sentiment_gpu_memory_total_bytes", {"gpu": "0"})
    ok = bool(total) and used is not None and 0 <= used <= total
    return Result("nvml", "PASS" if ok else "FAIL", f"gpu 0: {used} of {total} bytes used",
                  {"used_bytes": used, "total_bytes": total})


def check_cuda_ep() -> Result:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise Skip(f"onnxruntime {ort.__version__} has no CUDA execution provider ({', '.join(providers)}): "
                   "install onnxruntime-gpu (pip install .[gpu])")
    return Result("cuda-ep", "PASS", f"onnxruntime {ort.__version__}: {', '.join(providers)}")


class EngineChecks:
    """The checks that need the server's CUDA engine; built once, shared by the three checks."""

    def __init__(self, artifact_dir: Path, texts: list[str]) -> None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("no CUDA execution provider (see cuda-ep)")
        try:
            from server.artifact import load_artifact
            from server.config import load_settings
            from server.engine import create_engine
            from server.tokenizer import TextEncoder
        except ImportError as exc:
            raise Skip(f"the server's dependencies are missing ({exc}): carry build/gpu_carry "
                       "(make gpu-carry)") from None
        self.artifact = load_artifact(artifact_dir)
        self.cuda = create_engine(self.artifact, load_settings(device="cuda", model_path=artifact_dir))
        self.cpu = create_engine(self.artifact, load_settings(device="cpu", model_path=artifact_dir))
        self.encoded = TextEncoder(self.artifact.tokenizer_path, self.artifact.max_length).encode(texts)

    def agreement(self) -> Result:
        from server.engine import softmax
        from server.tokenizer import pad_batch

        gpu, cpu = [], []
        for start in range(0, len(self.encoded), 32):
            ids, mask = pad_batch(self.encoded[start:start + 32])
            gpu.append(softmax(self.cuda.run(ids, mask)))
            cpu.append(softmax(self.cpu.run(ids, mask)))
        gpu_p, cpu_p = np.concatenate(gpu), np.concatenate(cpu)
        agree = float((gpu_p.argmax(1) == cpu_p.argmax(1)).mean())
        diff = float(np.abs(gpu_p - cpu_p).max())
        numbers = {"texts": len(gpu_p), "argmax_agreement": agree, "max_probability_diff": diff,
                   "gpu": f"{self.cuda.variant} on {self.cuda.provider}", "cpu": self.cpu.variant}
        ok = agree >= 0.98 and np.isfinite(gpu_p).all()
        return Result("cuda-engine", "PASS" if ok else "FAIL",
                      f"{self.cuda.variant} on CUDA vs {self.cpu.variant} on CPU: {agree:.1%} same label, "
                      f"max probability difference {diff:.3g}", numbers)

    def throughput(self, seconds: float = 5.0) -> Result:
        from server.tokenizer import pad_batch

        numbers = {}
        for order, encoded in (("arrival", self.encoded), ("length_sorted", sorted(self.encoded, key=len))):
            batches = [pad_batch(encoded[i:i + 32]) for i in range(0, len(encoded), 32)]
            for ids, mask in batches[:3]:
                self.cuda.run(ids, mask)  # warm every shape seen first
            texts, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                for ids, mask in batches:
                    self.cuda.run(ids, mask)
                    texts += len(ids)
            numbers[f"{order}_texts_per_s"] = texts / (time.perf_counter() - started)
        return Result("throughput", "PASS", ", ".join(f"{k} {v:,.0f}" for k, v in numbers.items()), numbers)

    def oom_split(self, mem_limit: int = 256 * 2**20) -> Result:
        from server.budget import TokenBudget
        from server.config import load_settings
        from server.engine import create_cpu_engine, create_engine
        from server.metrics import Metrics
        from server.oom import ResilientEngine

        settings = load_settings(device="cuda", model_path=self.artifact.directory, cuda_mem_limit=mem_limit)
        metrics = Metrics()
        capped = ResilientEngine(create_engine(self.artifact, settings),
                                 lambda: create_cpu_engine(self.artifact, settings),
                                 TokenBudget(settings.max_batch_tokens, metrics), metrics)
        length = self.artifact.max_length
        ids = np.full((64, length), 1000, dtype=np.int64)
        ids[:, 0] = 101
        mask = np.ones_like(ids)
        expected = self.cuda.run(ids[:1], mask[:1])
        logits = capped.run(ids, mask)
        ooms = metrics.registry.get_sample_value("sentiment_oom_events_total", {"device": "cuda"}) or 0
        splits = metrics.registry.get_sample_value("sentiment_batch_splits_total", {"device": "cuda"}) or 0
        diff = float(np.abs(logits - expected).max())
        numbers = {"mem_limit_bytes": mem_limit, "batch": [64, length], "oom_events": ooms, "splits": splits,
                   "max_logit_diff": diff}
        if not ooms:
            return Result("oom-split", "FAIL", f"64 x {length} tokens fit under {mem_limit} bytes: no OOM to "
                          "recover from (lower mem_limit)", numbers)
        ok = logits.shape[0] == 64 and diff < 0.05
        return Result("oom-split", "PASS" if ok else "FAIL", f"{ooms:.0f} real OOMs, {splits:.0f} splits, every row "
                      f"answered (max logit difference {diff:.3g})", numbers)


def run_check(name: str, check: Callable[[], Result]) -> Result:
    try:
        return check()
    except Skip as reason:
        return Result(name, "SKIP", str(reason))
    except Exception as exc:  # a check that breaks is a finding, not a crash of the whole run
        return Result(name, "FAIL", f"{type(exc).__name__}: {exc}")


def load_texts(path: Path | None) -> list[str]:
    for candidate in ([path] if path else DATA_CANDIDATES):
        if candidate.is_file():
            from models.data import load_labeled

            return load_labeled(candidate).texts
    return FALLBACK_TEXTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "models/default")
    parser.add_argument("--data", type=Path, help="labeled TSV (default: SST-2 dev if found, else built-in texts)")
    parser.add_argument("--out", type=Path, default=ROOT / "build/gpu_check")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    args = parser.parse_args(argv)
    texts = load_texts(args.data)
    results = [run_check("torch-cuda", check_torch_cuda), run_check("nvml", check_nvml),
               run_check("cuda-ep", check_cuda_ep)]
    engines: list[EngineChecks] = []  # built by the first engine check that runs, shared by the others

    def on_engines(use: Callable[[EngineChecks], Result]) -> Callable[[], Result]:
        def check() -> Result:
            if not engines:
                engines.append(EngineChecks(args.artifact, texts))
            return use(engines[0])
        return check

    results += [run_check("cuda-engine", on_engines(lambda e: e.agreement())),
                run_check("throughput", on_engines(lambda e: e.throughput(args.seconds))),
                run_check("oom-split", on_engines(lambda e: e.oom_split()))]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    for r in results:
        print(f"{r.status:4}  {r.check:12} {r.detail}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
