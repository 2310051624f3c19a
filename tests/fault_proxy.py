"""A userspace fault proxy: TCP between a site and its coordinator, with the faults of a hospital's
network that this kernel cannot make (it has no ``netem`` qdisc).

One process serves several *links* (one per site). A link listens on its own address, forwards
every connection to the coordinator and applies, per direction, a one-way delay (half the round
trip), a bandwidth limit (serialisation at ``rate`` bytes per second, then the delay), and a
stall: while a link is stalled nothing is forwarded in either direction and no connection is
closed (a middlebox that black-holes a flow without a reset). Bytes are counted per link and
direction, at the TCP level (TLS and HTTP/2 framing included).

Settings change while connections run, through a control socket (a Unix socket, so the test
process reaches it from outside the proxy's network namespace), one JSON object per line:

    {"link": "site_a", "delay_ms": 25, "up_rate": 1250000}   -> {"ok": true}
    {"link": "site_a", "stalled": true}                        -> {"ok": true}
    {"stats": true}                                            -> {"site_a": {"up": ..., ...}}

A rate is the link's, shared by all of the site's connections. ``delay_ms`` is one way (each direction; a new connection's first bytes also wait one round trip,
the TCP handshake this proxy answers at once), ``up_rate`` / ``down_rate`` are bytes per second (0: no
limit); ``up`` is site to coordinator. Run:

    python tests/fault_proxy.py --control /tmp/p.sock \
        --link site_a=198.18.1.1:9092=198.18.0.1:9092 [--link ...]

It prints ``fault proxy ready`` once every link listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

CHUNK = 16384
QUEUE_CHUNKS = 16  # at most 256 kB in flight per direction: the sender then feels backpressure
NUMBERS = ("delay_ms", "up_rate", "down_rate")


@dataclass
class Link:
    name: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    delay_ms: float = 0.0
    up_rate: float = 0.0
    down_rate: float = 0.0
    stalled: bool = False
    bytes: dict = field(default_factory=lambda: {"up": 0, "down": 0})
    connections: int = 0
    open_connections: int = 0
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    free_at: dict = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    """When the link is next free to send, per direction: one link, shared by all of the
    site's connections (a rate limits the link, as a real upload does, not each connection)."""

    def __post_init__(self):
        self.resumed.set()

    def update(self, settings: dict) -> None:
        """Apply ``settings`` (all of them, or none: a bad one raises before anything changes)."""
        unknown = set(settings) - {"link", *NUMBERS, "stalled"}
        if unknown:
            raise KeyError(f"unknown setting(s) {sorted(unknown)}; known: "
                           f"{[*NUMBERS, 'stalled']}")
        numbers = {}
        for key in NUMBERS:
            if key in settings:
                value = settings[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or value != value:
                    raise TypeError(f"{key} must be a number, not {value!r}")
                numbers[key] = max(0.0, float(value))
        if "stalled" in settings and not isinstance(settings["stalled"], bool):
            raise TypeError(f"stalled must be true or false, not {settings['stalled']!r}")
        for key, value in numbers.items():
            setattr(self, key, value)
        if "stalled" in settings:
            self.stalled = settings["stalled"]
            (self.resumed.clear if self.stalled else self.resumed.set)()

    def stats(self) -> dict:
        return {"up": self.bytes["up"], "down": self.bytes["down"],
                "connections": self.connections, "open": self.open_connections,
                "delay_ms": self.delay_ms, "up_rate": self.up_rate,
                "down_rate": self.down_rate, "stalled": self.stalled}


async def _pump(link: Link, direction: str, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    """Read from one side, release each chunk at its departure + delay, write to the other."""
    queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
    rate_key = "up_rate" if direction == "up" else "down_rate"

    async def receive():
        try:
            while True:
                await link.resumed.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await link.resumed.wait()  # held while stalled: nothing is forwarded
                now = time.monotonic()
                rate = getattr(link, rate_key)
                depart = max(now, link.free_at[direction])
                link.free_at[direction] = depart + (len(data) / rate if rate else 0.0)
                await queue.put((link.free_at[direction] + link.delay_ms / 1000.0, data))
        except (ConnectionError, OSError):
            pass
        await queue.put(None)

    async def send():
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await link.resumed.wait()
                writer.write(data)
                link.bytes[direction] += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    await asyncio.gather(receive(), send())


async def _serve(link: Link, site_reader, site_writer) -> None:
    link.connections += 1
    link.open_connections += 1
    try:
        await link.resumed.wait()  # a stalled link answers nothing on a new connection either
        try:
            up_reader, up_writer = await asyncio.open_connection(*link.upstream)
        except OSError:
            return
        # a TCP handshake costs one round trip before the site may send; this proxy accepted
        # at once, so the first bytes wait that round trip here
        await asyncio.sleep(2 * link.delay_ms / 1000.0)
        try:
            await asyncio.gather(_pump(link, "up", site_reader, up_writer),
                                 _pump(link, "down", up_reader, site_writer))
        finally:
            up_writer.close()
    finally:
        link.open_connections -= 1
        site_writer.close()


async def _control(links: dict[str, Link], reader, writer) -> None:
    try:
        while line := await reader.readline():
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise TypeError(f"a message is a JSON object, not {type(msg).__name__}")
                if msg.get("stats"):
                    answer = {name: link.stats() for name, link in links.items()}
                elif "link" not in msg:
                    raise KeyError("no 'link' (or 'stats') in the message")
                elif msg["link"] not in links:
                    raise KeyError(f"no link {msg['link']!r}; links: {sorted(links)}")
                else:
                    links[msg["link"]].update(msg)
                    answer = {"ok": True}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
    finally:
        writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def parse_link(spec: str) -> Link:
    """``name=listen_host:port=upstream_host:port``"""
    try:
        name, listen, upstream = spec.split("=")
        return Link(name, _address(listen), _address(upstream))
    except ValueError:
        raise SystemExit(f"--link {spec!r}: expected name=listen_host:port=upstream_host:port")


async def main_async(control: str, specs: list[str]) -> None:
    links = {link.name: link for link in map(parse_link, specs)}
    servers = [await asyncio.start_server(lambda r, w, link=link: _serve(link, r, w),
                                          *link.listen) for link in links.values()]
    servers.append(await asyncio.start_unix_server(lambda r, w: _control(links, r, w), control))
    print("fault proxy ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", required=True, help="path of the control Unix socket")
    ap.add_argument("--link", action="append", required=True,
                    help="name=listen_host:port=upstream_host:port (repeatable)")
    args = ap.parse_args(argv)
    try:
        asyncio.run(main_async(args.control, args.link))
    except KeyboardInterrupt:
        pass


class ProxyControl:
    """The test's side of the control socket."""

    def __init__(self, path):
        self.path = str(path)

    def _ask(self, message: dict) -> dict:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall((json.dumps(message) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if answer.get("ok") is False:
            raise ValueError(answer["error"])
        return answer

    def set(self, link: str, **settings) -> None:
        self._ask({"link": link, **settings})

    def stats(self) -> dict:
        return self._ask({"stats": True})


if __name__ == "__main__":
    sys.exit(main())
