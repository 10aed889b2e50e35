"""The relay's per-packet Python path alone: SendPacket bytes in, RecvPacket bytes out.

``make bench`` measures whole relays over TLS, where encryption and system
calls hide what our own code costs.  This drives one
:class:`derprelay.server.RelayServer` in process, with no socket and no TLS: a
sender connection is fed stream chunks of SendPacket frames, as a transport
would deliver them, and a receiver connection's sink collects the RecvPacket
frames each event-loop turn flushes.  What it reports, microseconds per
relayed packet, is the part of a relay's CPU time that this repository's code
decides, so a change to the hot path can be judged before and after in
seconds.  Run: ``python bench/hotpath.py [--packets N] [--sizes 64,1200,16384]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from derprelay import frames as f
from derprelay.keys import KEY_LEN, NodePrivateKey
from derprelay.server import ClientConnection, RelayServer

CHUNK = 64 * 1024
"""Bytes per data_received call: what one TLS read of a busy sender gives."""


class CollectingSink:
    """A FrameSink that takes each batch as a transport would: joined into one write."""

    def __init__(self) -> None:
        self.bytes = 0

    def write_frames(self, data: list[bytes]) -> None:
        self.bytes += len(b"".join(data))

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connect(server: RelayServer, key: NodePrivateKey, port: int) -> tuple[ClientConnection, CollectingSink]:
    sink = CollectingSink()
    conn = ClientConnection(server, sink, ("127.0.0.1", port))
    info = f.ClientInfoMessage(can_ack_pings=True).to_json()
    conn.receive_data(f.ClientInfo(key.public, key.seal_to(server.public_key, info)).encode())
    return conn, sink


async def relay_packets(size: int, packets: int) -> float:
    """Seconds the relay's own code spends relaying ``packets`` packets of ``size`` bytes."""
    server = RelayServer(NodePrivateKey.generate())
    receiver_key = NodePrivateKey.generate()
    sender, _ = _connect(server, NodePrivateKey.generate(), 1)
    _, receiver_sink = _connect(server, receiver_key, 2)
    await asyncio.sleep(0)  # flush the handshakes
    frame_len = f.FRAME_HEADER_LEN + KEY_LEN + size  # SendPacket in, RecvPacket out: same length
    per_stream = max(1, CHUNK // frame_len)
    stream = f.SendPacket(receiver_key.public, bytes(size)).encode() * per_stream
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    before = receiver_sink.bytes
    rounds = max(1, packets // per_stream)
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            sender.receive_data(chunk)
        await asyncio.sleep(0)  # one event-loop turn: the receiver's flush
    elapsed = time.perf_counter() - start
    relayed, rest = divmod(receiver_sink.bytes - before, frame_len)
    if rest or relayed != rounds * per_stream:
        raise SystemExit(f"relayed {relayed} of {rounds * per_stream} packets")
    return elapsed / relayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000, help="packets per size and repeat")
    parser.add_argument("--sizes", default="64,1200,16384", help="packet sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="runs per size; the median is shown")
    args = parser.parse_args()
    print("size      µs/packet (median)   min      max")
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [asyncio.run(relay_packets(size, args.packets)) * 1e6 for _ in range(args.repeats)]
        print(f"{size:>6} B  {statistics.median(runs):8.3f}           {min(runs):6.3f}   {max(runs):6.3f}")


if __name__ == "__main__":
    main()
