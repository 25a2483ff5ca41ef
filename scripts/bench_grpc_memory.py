"""What a flood of large gRPC calls costs the server in memory: its peak resident memory above idle, and the answers.

Starts the server (its defaults, GRPC_PORT on a free port) and sends ``--calls`` ModelInfer calls at once over one
channel, each ``--texts`` texts of ``--chars`` characters (about a MAX_REQUEST_BYTES message by default), then
prints the server's peak resident memory (``VmHWM``, reset once the server is ready) above what it held then,
and how the calls were answered. A flood like this is what a hostile or badly written client sends; every byte
of it the server reads before it can refuse a call is memory outside its plan.

    python scripts/bench_grpc_memory.py --calls 1000 --texts 64 --chars 15000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from scripts.benchlib.chaos.harness import memory_bytes  # noqa: E402
from scripts.benchlib.serverproc import free_port, start_server, stop_server  # noqa: E402
from server.memory_model import RESET_PEAK  # noqa: E402
from server.protocols.oip_proto import grpc_service_pb2 as pb  # noqa: E402
from server.protocols.oip_proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub  # noqa: E402

WORD = "splendid "
MIB = 1 << 20


def infer_request(texts: int, chars: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="sentiment")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[texts])
    tensor.contents.bytes_contents.extend([(WORD * (chars // len(WORD))).encode()] * texts)
    return request


async def flood(address: str, request: pb.ModelInferRequest, calls: int) -> collections.Counter:
    async with aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = GRPCInferenceServiceStub(channel)

        async def one() -> str:
            try:
                await stub.ModelInfer(request, timeout=300)
                return "OK"
            except grpc.RpcError as error:
                return f"{error.code().name}: {(error.details() or '')[:60]}"

        return collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls sent at once")
    parser.add_argument("--texts", type=int, default=64, help="texts per call")
    parser.add_argument("--chars", type=int, default=15000, help="characters per text")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    args = parser.parse_args(argv)
    port = free_port()
    env = {"GRPC_PORT": str(port), **dict(item.split("=", 1) for item in args.env)}
    server = start_server(env, Path(tempfile.mkdtemp(prefix="grpc-memory-")))
    try:
        pid = server.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text(RESET_PEAK)  # VmHWM from here on
        idle = memory_bytes(pid, "VmRSS") // MIB
        request = infer_request(args.texts, args.chars)
        started = time.perf_counter()
        answers = asyncio.run(flood(f"127.0.0.1:{port}", request, args.calls))
        elapsed = time.perf_counter() - started
        peak = memory_bytes(pid, "VmHWM") // MIB
        print(f"{args.calls} calls of {request.ByteSize():,} bytes in {elapsed:.1f} s: "
              + ", ".join(f"{count} {answer}" for answer, count in answers.most_common()))
        print(f"server resident memory: {idle} MiB idle, peak {peak} MiB: +{peak - idle} MiB")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
