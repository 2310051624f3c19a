"""The fault proxy (`tests/fault_proxy.py`) on its own, without namespaces: the proxy runs as a
subprocess on 127.0.0.1 with an echo server thread as its upstream. Every wait is for an event (the
ready line, a byte count, a control answer); timeouts are only failure bounds, and durations are
only bounded from below (the machine may be loaded)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fault_proxy import ProxyControl

PROXY = Path(__file__).resolve().parent / "fault_proxy.py"
BOUND = 20  # seconds: a failure bound on events that must happen, never a delay
QUIET = 0.3  # seconds: how long a negative check listens for bytes that must not come


class Upstream:
    """An echo server thread that also keeps every byte it received per connection and lets the
    test push bytes from the upstream side."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.cond = threading.Condition()
        self.conns: list[socket.socket] = []
        self.received: list[bytearray] = []
        self.last_byte_at: list[float] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.conns.append(conn)
                self.received.append(bytearray())
                self.last_byte_at.append(0.0)
                index = len(self.conns) - 1
                self.cond.notify_all()
            threading.Thread(target=self._echo, args=(conn, index), daemon=True).start()

    def _echo(self, conn, index):
        try:
            while data := conn.recv(65536):
                with self.cond:
                    self.received[index] += data
                    self.last_byte_at[index] = time.monotonic()
                    self.cond.notify_all()
                conn.sendall(data)
        except OSError:
            pass

    def wait_for(self, predicate, timeout=BOUND):
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "upstream: the awaited event never came"

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proxy:
    def __init__(self, tmp_path: Path, upstream_port: int, links=("a",)):
        self.control_path = tmp_path / "proxy.sock"
        self.ports = {name: _free_port() for name in links}
        specs = [f"--link={name}=127.0.0.1:{port}=127.0.0.1:{upstream_port}"
                 for name, port in self.ports.items()]
        self.proc = subprocess.Popen([sys.executable, str(PROXY), "--control",
                                      str(self.control_path), *specs],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        if "fault proxy ready" not in line:
            self.proc.kill()
            raise AssertionError(f"proxy did not start: {line!r} "
                                 f"{self.proc.stderr.read().decode()}")
        self.control = ProxyControl(self.control_path)

    def connect(self, link="a") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports[link]), timeout=BOUND)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def raw(self, lines: list[bytes]) -> list[dict]:
        """Send raw lines on one control connection; one parsed answer per line."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(BOUND)
            sock.connect(str(self.control_path))
            answers = []
            buffer = b""
            for line in lines:
                sock.sendall(line + b"\n")
                while b"\n" not in buffer:
                    chunk = sock.recv(65536)
                    assert chunk, f"the control socket closed after {line!r}"
                    buffer += chunk
                answer, buffer = buffer.split(b"\n", 1)
                answers.append(json.loads(answer))
            return answers

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def proxy(tmp_path, upstream):
    running = Proxy(tmp_path, upstream.port)
    yield running
    running.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def assert_silent(sock: socket.socket) -> None:
    """Nothing arrives (and the connection is not closed) while we listen for QUIET seconds."""
    sock.settimeout(QUIET)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return
    finally:
        sock.settimeout(BOUND)
    raise AssertionError(f"expected nothing, got {data!r}" if data else "the connection closed")


def echo_round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - start


def test_echo_is_unchanged_and_counted_per_direction(proxy, upstream):
    payload = bytes(range(256)) * 1000 + b"tail"  # 256 004 bytes, more than the in-flight queue
    with proxy.connect() as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        upstream.wait_for(lambda: len(upstream.received) == 1
                          and len(upstream.received[0]) == len(payload))
        assert bytes(upstream.received[0]) == payload
        # bytes pushed by the upstream alone count as "down" only
        upstream.conns[0].sendall(b"x" * 1000)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        stats = proxy.control.stats()["a"]
    assert stats["up"] == len(payload)
    assert stats["down"] == len(payload) + 1000
    assert stats["connections"] == 1


def test_delay_adds_two_delays_per_round_trip_and_applies_to_a_running_connection(proxy):
    with proxy.connect() as sock:
        echo_round_trip(sock)  # the connection is up (and counted) before the change
        proxy.control.set("a", delay_ms=150)
        assert proxy.control.stats()["a"]["delay_ms"] == 150
        assert echo_round_trip(sock) >= 0.300
        proxy.control.set("a", delay_ms=300)
        assert echo_round_trip(sock) >= 0.600
        assert proxy.control.stats()["a"]["connections"] == 1  # the same connection throughout


def test_up_rate_limits_the_upload(proxy, upstream):
    rate, n = 400_000, 400_000  # n / rate = 1 s
    proxy.control.set("a", up_rate=rate)
    with proxy.connect() as sock:
        start = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(b"u" * n,))
        sender.start()
        # measured where the upload ends: at the upstream, when it has the last byte
        upstream.wait_for(lambda: upstream.received and len(upstream.received[0]) == n)
        assert upstream.last_byte_at[0] - start >= n / rate
        assert recv_exactly(sock, n) == b"u" * n
        sender.join(BOUND)
    assert proxy.control.stats()["a"]["up"] == n


def test_a_rate_limits_the_link_not_each_connection(proxy, upstream):
    """Two connections uploading at once share the link's rate, as on a real upload: 2 x n
    bytes at ``rate`` take 2 n / rate, not n / rate."""
    rate, n = 400_000, 200_000  # 2 n / rate = 1 s
    proxy.control.set("a", up_rate=rate)
    with proxy.connect() as one, proxy.connect() as two:
        start = time.monotonic()
        senders = [threading.Thread(target=s.sendall, args=(b"u" * n,)) for s in (one, two)]
        for sender in senders:
            sender.start()
        upstream.wait_for(lambda: len(upstream.received) == 2
                          and all(len(r) == n for r in upstream.received))
        assert max(upstream.last_byte_at) - start >= 2 * n / rate
        assert recv_exactly(one, n) == recv_exactly(two, n) == b"u" * n
        for sender in senders:
            sender.join(BOUND)


def test_down_rate_limits_the_download(proxy, upstream):
    rate, n = 400_000, 400_000
    proxy.control.set("a", down_rate=rate)
    with proxy.connect() as sock:
        echo_round_trip(sock)  # the upstream side of the connection exists
        upstream.wait_for(lambda: len(upstream.conns) == 1)
        start = time.monotonic()
        sender = threading.Thread(target=upstream.conns[0].sendall, args=(b"d" * n,))
        sender.start()
        assert recv_exactly(sock, n) == b"d" * n
        assert time.monotonic() - start >= n / rate
        sender.join(BOUND)
    stats = proxy.control.stats()["a"]
    assert (stats["up"], stats["down"]) == (4, 4 + n)


def test_a_stall_holds_both_directions_then_releases_in_order(proxy, upstream):
    with proxy.connect() as sock:
        echo_round_trip(sock, b"before")
        upstream.wait_for(lambda: len(upstream.received) == 1)
        proxy.control.set("a", stalled=True)
        sock.sendall(b"one,")
        sock.sendall(b"two,")
        upstream.conns[0].sendall(b"pushed,")  # the upstream's direction too
        assert_silent(sock)
        assert bytes(upstream.received[0]) == b"before"  # nothing went up either
        stats = proxy.control.stats()["a"]
        assert stats["stalled"] is True and stats["open"] == 1
        sock.sendall(b"three")
        proxy.control.set("a", stalled=False)
        upstream.wait_for(lambda: bytes(upstream.received[0]) == b"beforeone,two,three")
        # pushed first (it was held in the proxy), then the echo of the held upload
        got = recv_exactly(sock, len(b"pushed,one,two,three"))
    assert got == b"pushed,one,two,three"
    assert proxy.control.stats()["a"]["connections"] == 1


def test_a_connection_opened_during_a_stall_gets_nothing_until_it_ends(proxy, upstream):
    proxy.control.set("a", stalled=True)
    with proxy.connect() as sock:
        sock.sendall(b"hello")
        assert_silent(sock)
        assert upstream.conns == []  # not even forwarded to the upstream
        proxy.control.set("a", stalled=False)
        assert recv_exactly(sock, 5) == b"hello"
    assert len(upstream.conns) == 1


def test_bad_control_messages_are_answered_with_an_error_and_the_proxy_keeps_serving(proxy):
    answers = proxy.raw([
        b"this is not json",
        b'{"link": "nowhere", "delay_ms": 5}',
        b'{"delay_ms": 5}',
        b'{"link": "a", "delay_ms": "slow"}',
        b'{"link": "a", "delay": 5}',
        b'["a", 5]',
        b'{"link": "a", "delay_ms": 7}',
    ])
    for answer in answers[:-1]:
        assert answer["ok"] is False and answer["error"]
    assert "JSON" in answers[0]["error"] or "Expecting" in answers[0]["error"]
    assert "nowhere" in answers[1]["error"]
    assert "link" in answers[2]["error"]
    assert "delay_ms" in answers[3]["error"] and "slow" in answers[3]["error"]
    assert "delay" in answers[4]["error"]
    assert "object" in answers[5]["error"]
    assert answers[-1] == {"ok": True}
    stats = proxy.control.stats()["a"]
    assert stats["delay_ms"] == 7  # the bad messages changed nothing, the good one applied
    assert stats["up_rate"] == 0 and stats["down_rate"] == 0 and stats["stalled"] is False
    with pytest.raises(ValueError, match="nowhere"):
        proxy.control.set("nowhere", delay_ms=1)
    proxy.control.set("a", delay_ms=0)
    with proxy.connect() as sock:
        echo_round_trip(sock, b"still serving")


@pytest.mark.parametrize("spec", ["site_a", "site_a=127.0.0.1:9092",
                                  "site_a=127.0.0.1:x=127.0.0.1:9092",
                                  "site_a=127.0.0.1:9092=127.0.0.1:70000"])
def test_a_malformed_link_exits_non_zero_naming_it(tmp_path, spec):
    done = subprocess.run([sys.executable, str(PROXY), "--control", str(tmp_path / "c.sock"),
                           "--link", spec], capture_output=True, text=True, timeout=BOUND)
    assert done.returncode != 0
    assert spec in done.stderr
    assert "fault proxy ready" not in done.stdout
