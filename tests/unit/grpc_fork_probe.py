"""Run as a script: children forked (uvloop's subprocesses, as the tiers start theirs) while
gRPC streams run in this process; prints how many of them did not exit cleanly."""

from __future__ import annotations

import asyncio
import shutil
import sys

import grpc
import uvloop
from grpc import aio


async def _stream(request: bytes, _context: object):
    for _ in range(200):
        yield request
        await asyncio.sleep(0)


async def _failed_children(n: int) -> int:
    server = aio.server()
    method = grpc.unary_stream_rpc_method_handler(
        _stream, request_deserializer=bytes, response_serializer=bytes
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("p.P", {"S": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_stream("/p.P/S", request_serializer=bytes, response_deserializer=bytes)

    async def client() -> None:
        while True:
            async for _ in call(b"x" * 100):
                pass

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await asyncio.sleep(0.2)
    failed = 0
    true = shutil.which("true") or "/bin/true"
    for _ in range(n):
        proc = await asyncio.create_subprocess_exec(true)
        failed += await proc.wait() != 0
    for task in clients:
        task.cancel()
    await channel.close()
    await server.stop(None)
    return failed


if __name__ == "__main__":
    print(uvloop.run(_failed_children(int(sys.argv[1]))))
