"""A TCP relay that delays every chunk by a fixed one-way time and counts the bytes.

The kernel here has no netem, so the WAN test (tests/wan_lab.py) adds propagation delay in
user space: this relay reads each direction continuously, stamps every chunk with the time
it was read, and writes it on only when that time plus `--delay-ms` has come. Reading never
waits for writing, so a chunk is delayed, never serialized a second time: the rate limit
stays the one `tc tbf` sets on the link. With `--delay-ms 0` it is a tap that only counts
and time-stamps (used in front of the server).

Every read is logged as `[t, dir, bytes]` (`t` from time.monotonic(), the same clock in
every network namespace of a host; `dir` "up" = from the accepting side to `--connect`,
"down" = back). On SIGTERM or SIGINT the relay writes `--stats` (JSON: totals and the
log) and exits 0. Standard library only: it starts in a few tens of milliseconds.

    python wan_relay.py --listen 127.0.0.1:7000 --connect 10.77.1.1:7000 --delay-ms 40 --stats s.json --ready r
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

READ = 1 << 18


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Relay:
    def __init__(self, connect: tuple[str, int], delay_s: float, bind: str | None):
        self.connect, self.delay_s, self.bind = connect, delay_s, bind
        self.bytes = {"up": 0, "down": 0}
        self.events: list[tuple[float, str, int]] = []
        self.connections = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Copy reader to writer, each chunk held until its read time + delay (a delay line)."""
        line: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                item = await line.get()
                if item is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(READ):
                now = time.monotonic()
                self.bytes[direction] += len(data)
                self.events.append((now, direction, len(data)))
                line.put_nowait((now + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        line.put_nowait(None)
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    async def handle(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        local = (self.bind, 0) if self.bind else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.connect, local_addr=local)
        except OSError:
            down_writer.close()
            return
        for w in (down_writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pipe(down_reader, up_writer, "up"), self._pipe(up_reader, down_writer, "down"))
        finally:
            for w in (down_writer, up_writer):
                w.close()

    def stats(self) -> dict:
        return {"connect": list(self.connect), "delay_s": self.delay_s, "bytes": self.bytes,
                "connections": self.connections, "events": self.events}


async def main(args: argparse.Namespace) -> None:
    relay = Relay(_addr(args.connect), args.delay_ms / 1000.0, args.bind)
    host, port = _addr(args.listen)
    server = await asyncio.start_server(relay.handle, host, port, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready:
        Path(args.ready).write_text(str(os.getpid()))
    await stop.wait()
    server.close()
    tmp = Path(args.stats + ".tmp")
    tmp.write_text(json.dumps(relay.stats()))
    tmp.replace(args.stats)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--connect", required=True, help="HOST:PORT to forward to")
    p.add_argument("--bind", help="source address of the forwarded connection")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every chunk, both directions")
    p.add_argument("--stats", required=True, help="JSON written at SIGTERM")
    p.add_argument("--ready", help="file written once listening")
    asyncio.run(main(p.parse_args()))
