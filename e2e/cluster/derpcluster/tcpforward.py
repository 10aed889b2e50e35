"""``python -m derpcluster.tcpforward LISTEN TARGET [--cluster DIR]``: carry TCP connections to another address.

The real node lives in a network namespace of its own and cannot reach the
API server on the host's 127.0.0.1; this forwarder listens on the host end
of the node's link and passes every connection through unchanged (TLS goes
end to end, the kubelet checks the API server's certificate by name).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

CHUNK = 64 * 1024


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        for writer in (client_writer, upstream_writer):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(forward, *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="derpcluster.tcpforward")
    parser.add_argument("listen", help="IP:PORT")
    parser.add_argument("target", help="IP:PORT")
    parser.add_argument(
        "--cluster", help="the state directory this serves: on the command line, cluster-down recognizes it"
    )
    args = parser.parse_args()
    asyncio.run(serve(split_address(args.listen), split_address(args.target)))


if __name__ == "__main__":
    main()
