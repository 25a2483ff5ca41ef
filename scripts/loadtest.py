"""Load test of a running server's POST /predict: closed-loop concurrency sweep or open-loop rates.

    python scripts/loadtest.py --url http://127.0.0.1:8000 --data ../shared/data/sst2/dev.tsv \
        --mode closed --concurrency 1,2,4,8,16 --duration 10
    python scripts/loadtest.py --url http://127.0.0.1:8000 --data ../shared/data/sst2/dev.tsv \
        --mode open --rate 50,100,200 --duplicate-ratio 0.2 --texts-per-request 1

Prints one line per load level and the generator's headroom; writes loadtest-<mode>.json and
loadtest-<mode>.png into --out. The core is ``scripts.benchlib.loadrun.run_loadtest``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchlib.argtypes import positive_floats, positive_ints  # noqa: E402
from scripts.benchlib.loadreport import write_loadtest  # noqa: E402
from scripts.benchlib.loadrun import LoadTestConfig, run_loadtest  # noqa: E402


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def _length_mix(text: str) -> tuple[float, float, float]:
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not three non-negative weights short,medium,long")
    return weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--data", type=Path, required=True, help="labeled TSV/CSV (text, label)")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 2, 4, 8, 16], help="closed loop levels")
    parser.add_argument("--rate", type=positive_floats, default=[50.0, 100.0, 200.0], help="open loop requests/s")
    parser.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open loop arrivals")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--duplicate-ratio", type=float, default=0.0, help="chance a text repeats an earlier one")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--length-mix", type=_length_mix, help="weights of short,medium,long texts, e.g. 0.5,0.3,0.2")
    parser.add_argument("--predict-path", default="/predict")
    parser.add_argument("--baseline-path", default="/health", help="trivial endpoint for the generator's ceiling")
    parser.add_argument("--baseline-duration", type=float, default=3.0, help="seconds; 0 skips the baseline")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--header", type=_header, action="append", default=[], help="extra header 'Name: value'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/loadtest"), help="output directory")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.texts_per_request < 1 or args.max_connections < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --texts-per-request and --max-connections >= 1")
    if not 0.0 <= args.duplicate_ratio <= 1.0:
        parser.error("--duplicate-ratio must be within [0, 1]")
    return args


def config_from(args: argparse.Namespace) -> LoadTestConfig:
    return LoadTestConfig(
        url=args.url, data=args.data, mode=args.mode,
        levels=args.concurrency if args.mode == "closed" else args.rate,
        duration=args.duration, warmup=args.warmup, duplicate_ratio=args.duplicate_ratio,
        texts_per_request=args.texts_per_request, length_mix=args.length_mix, arrival=args.arrival,
        predict_path=args.predict_path, baseline_path=args.baseline_path, baseline_duration=args.baseline_duration,
        max_connections=args.max_connections, timeout=args.timeout, headers=dict(args.header), seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    from models.labels import LabelMismatch

    args = parse_args(argv)
    try:
        report = run_loadtest(config_from(args))
    except LabelMismatch as exc:  # the labeled file does not fit the served model: say so in one line
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    for path in write_loadtest(report, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
