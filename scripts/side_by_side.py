"""Side by side (issue 6): the same model served by this project and by peer servers, the same load test on all.

    python scripts/side_by_side.py --checkpoint build/ft_quick/best --artifact build/ft_quick_artifact \
        --data ../shared/data/sst2/dev.tsv --peers ours,triton,infinity,torchserve,ray \
        --concurrency 16,64,256 --duration 10 --out bench_results/side_by_side
    python scripts/side_by_side.py --smoke        # tiny model, 2 s per level: checks that everything works

``--artifact`` must be built from ``--checkpoint`` (``models.build``; its manifest says from what), so
that ours serves the weights the peers serve; the script refuses a pair that does not match.
Each peer is installed into its own venv outside the project (``--peers-root``, default /work/peers/<name>;
torch pinned to the local CPU wheel), started, warmed up, measured and stopped; the load levels run
round-robin across the servers, each measured with the others stopped (SIGSTOP; ``--keep-others-running`` to
leave them be). A server that fails to start is tried again with fresh ports
(``--start-attempts``, 3), each failed attempt's log kept. Prints one line per phase and the three targets
(issue 17), each met / not met / not judged:
  ours >= 1.5x the best peer at every concurrency level swept (the ratio at equal concurrency),
  our saturation throughput >= 2x the best peer's (best of sweep for both), and
  our p99 at half our saturation rate <= the best peer's p50 at that rate;
then Triton's own load tool, perf_analyzer, on the servers that speak Open Inference Protocol v2 (ours and
Triton) over HTTP and gRPC at the same concurrency levels (``--perf-analyzer``; installed into
<peers-root>/perf_analyzer, see ``scripts/benchlib/peers/perf_analyzer.py``);
writes side_by_side.{json,md,png} into --out. The logic lives in ``scripts/benchlib/peers``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchlib.argtypes import names, positive_floats, positive_ints  # noqa: E402
from scripts.benchlib.peers.perf_analyzer import PROTOCOLS  # noqa: E402
from scripts.benchlib.peers.run import RunConfig, artifact_mismatch, run_side_by_side  # noqa: E402
from scripts.benchlib.peers.servers import SERVERS, START_ATTEMPTS  # noqa: E402

DEFAULT_PEERS = "ours,triton,infinity,torchserve,ray"


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def perf_analyzer_protocols(text: str) -> list[str]:
    """``http,grpc`` -> ["http", "grpc"]; ``none`` -> []."""
    chosen = [] if text.strip().lower() == "none" else names(text)
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {', '.join(unknown)}: use http, grpc or none")
    return chosen


def parse_override(text: str) -> tuple[str, str, object]:
    """``server.key=value`` (e.g. ``ray.replicas=2``) -> (server, key, typed value)."""
    target, sep, value = text.partition("=")
    server, dot, key = target.partition(".")
    if not sep or not dot or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not server.key=value")
    if server not in SERVERS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown server {server!r} (one of {', '.join(SERVERS)})")
    if key not in SERVERS[server].settings:
        raise argparse.ArgumentTypeError(f"{text!r}: {server} has no setting {key!r} "
                                         f"(it has {', '.join(SERVERS[server].settings)})")
    return server, key, _value(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("build/finetune/best"),
                        help="HF DistilBertForSequenceClassification checkpoint directory (the peers serve it)")
    parser.add_argument("--artifact", type=Path, default=Path("models/default"),
                        help="our ONNX artifact built from that checkpoint (models.build)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2/dev.tsv"), help="labeled TSV/CSV")
    parser.add_argument("--peers", type=names, default=names(DEFAULT_PEERS),
                        help=f"servers, comma-separated, from {', '.join(SERVERS)} (ours included)")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 4, 16, 64], help="closed loop levels")
    parser.add_argument("--open-fractions", type=positive_floats, default=[0.5],
                        help="open loop rates as fractions of our saturation throughput (0.5 is always run)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--server-warmup", type=float, default=5.0, help="seconds of load on each server after start")
    parser.add_argument("--out", type=Path, default=Path("bench_results/side_by_side"))
    parser.add_argument("--peers-root", type=Path, default=Path("/work/peers"), help="where each peer's venv lives")
    parser.add_argument("--python", help="base interpreter for the peers' venvs (default: this one's base)")
    parser.add_argument("--reinstall", action="store_true", help="pip install into the peers' venvs again")
    parser.add_argument("--no-install", dest="install", action="store_false", help="use the venvs as they are")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                        metavar="SERVER.KEY=VALUE", help="override a server setting, e.g. torchserve.workers=2")
    parser.add_argument("--max-length", type=int, help="truncation length (default: the artifact's)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--perf-analyzer", type=perf_analyzer_protocols, default=list(PROTOCOLS),
                        help="protocols perf_analyzer measures the OIP v2 servers over: http,grpc (default), one of "
                        "them, or none")
    parser.add_argument("--start-attempts", type=int, default=START_ATTEMPTS,
                        help="tries to start each server, each with fresh ports (failed attempts' logs are kept)")
    parser.add_argument("--keep-others-running", dest="pause_others", action="store_false",
                        help="leave the servers not being measured running (by default they are stopped meanwhile: "
                        "their idle CPU, Ray's daemons above all, was taken from the one measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random model built here, concurrency 1,8, 2 s per phase: does everything work?")
    args = parser.parse_args(argv)
    unknown = [p for p in args.peers if p not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if args.duration <= 0 or args.warmup < 0 or args.server_warmup < 0:
        parser.error("--duration must be > 0, --warmup and --server-warmup >= 0")
    if args.start_attempts < 1:
        parser.error("--start-attempts must be >= 1")
    if args.smoke:
        args.concurrency, args.duration, args.warmup, args.server_warmup = [1, 8], 2.0, 0.5, 1.0
        if args.out == parser.get_default("out"):
            args.out = Path("bench_results/side_by_side_smoke")
    return args


def smoke_model(out: Path) -> tuple[Path, Path]:
    """A tiny random DistilBERT checkpoint and the artifact built from it (fp32 + int8), under ``out``."""
    from models.build import build
    from tests.model_fixtures import TINY_MAX_LENGTH, save_tiny_checkpoint

    checkpoint, artifact = out / "checkpoint", out / "artifact"
    if not (checkpoint / "config.json").exists():
        checkpoint.mkdir(parents=True, exist_ok=True)
        save_tiny_checkpoint(checkpoint)
    if not (artifact / "manifest.json").exists():
        build(checkpoint, artifact, ("fp32", "int8"), max_length=TINY_MAX_LENGTH, name="tiny-smoke")
    return checkpoint, artifact


def config_from(args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, dict] = {}
    for server, key, value in args.overrides:
        overrides.setdefault(server, {})[key] = value
    return RunConfig(
        checkpoint=args.checkpoint, artifact=args.artifact, data=args.data, out=args.out, servers=args.peers,
        concurrency=args.concurrency, duration=args.duration, warmup=args.warmup, server_warmup=args.server_warmup,
        open_fractions=args.open_fractions, peers_root=args.peers_root, python=args.python, reinstall=args.reinstall,
        install=args.install, overrides=overrides, max_length=args.max_length, timeout=args.timeout, seed=args.seed,
        perf_analyzer=args.perf_analyzer, start_attempts=args.start_attempts, pause_others=args.pause_others,
    )


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the run's finally: every started server is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.checkpoint, args.artifact = smoke_model(args.out / "smoke-model")
    for path, what in ((args.checkpoint, "--checkpoint"), (args.artifact, "--artifact"), (args.data, "--data")):
        if not path.exists():
            print(f"{what} {path} does not exist", file=sys.stderr)
            return 2
    mismatch = artifact_mismatch(args.artifact, args.checkpoint)
    if mismatch:
        print(mismatch, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    report = run_side_by_side(config_from(args))
    return 0 if any(s.get("status") == "measured" for s in report["servers"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
