"""Offline ONNX benchmark: PyTorch eager vs ONNX Runtime variants on one artifact, same inputs.

    python scripts/bench_onnx.py --artifact models/default --checkpoint build/finetune/best \
        --data ../shared/data/sst2/dev.tsv --batch-sizes 1,8,32 --seq-lens 16,64,128 --repeats 10 \
        --out bench_results/onnx

Variants that cannot run here (no checkpoint, no GPU, no such artifact file) are skipped with a
line saying why; the ONNX Runtime fp32 variants need an artifact built with ``--keep-fp32``
(``models.build`` checks fp32 but ships only int8 and fp16 by default). Accuracy matches the
file's labels to the artifact's by name (``--label-map`` when they differ). Writes bench.json,
bench.csv, throughput.png and latency.png into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchlib.argtypes import names, positive_ints  # noqa: E402
from scripts.benchlib.envinfo import usable_cpus  # noqa: E402
from scripts.benchlib.runners import VARIANTS  # noqa: E402


def _label_map(text: str) -> dict[str, str] | None:
    from models.labels import parse_label_map

    try:
        return parse_label_map(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="model artifact directory (manifest.json, ...)")
    parser.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint directory for PyTorch eager")
    parser.add_argument("--data", type=Path, required=True, help="labeled TSV/CSV (text, label)")
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 8, 32], help="default 1,8,32")
    parser.add_argument("--seq-lens", type=positive_ints, default=[16, 64, 128], help="default 16,64,128")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per cell first (default 2)")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="intra-op threads (default: usable CPUs)")
    parser.add_argument("--variants", type=names, default=list(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--eval-limit", type=int, help="score accuracy on the first N texts only (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--label-map", type=_label_map, help="the file's labels as the artifact's, e.g. "
                                                             "0=negative,1=positive (default: matched by name)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/onnx"), help="output directory")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.eval_batch_size < 1:
        parser.error("--repeats, --threads and --eval-batch-size must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.labels import LabelMismatch
    from scripts.benchlib.offline import BenchConfig, run_benchmark
    from scripts.benchlib.report import write_all

    options = {key: value for key, value in vars(args).items() if key != "out"}
    try:
        report = run_benchmark(BenchConfig(**options))
    except LabelMismatch as exc:
        raise SystemExit(f"{args.data}: {exc}") from None
    except ValueError as exc:  # e.g. a sequence length beyond the artifact's maximum
        raise SystemExit(str(exc)) from None
    for path in write_all(report, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
