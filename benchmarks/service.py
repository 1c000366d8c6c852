"""The service behind the tunnel: for each line ``N\\n`` it sends N pattern bytes.

Every connection's byte stream is PATTERN repeated from offset 0 (see
``common.py``), across requests, so the client verifies all it receives.
Run as ``python -m benchmarks.service``; prints ``listening PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from benchmarks.common import PATTERN, PATTERN_SIZE

_DOUBLE = memoryview(PATTERN + PATTERN)
SLICE = 256 * 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    offset = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            remaining = int(line)
            while remaining:
                start = offset % PATTERN_SIZE
                take = min(remaining, SLICE)
                writer.write(_DOUBLE[start : start + take])
                offset += take
                remaining -= take
                await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096, limit=1 << 16)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
