"""A harness that runs ``derp-relay`` as a real process on loopback, and its fixtures.

Every relay gets its own temporary key file, certificate directory and
ephemeral ports; the status file it writes tells the test where it listens.
Relays are stopped with SIGTERM (the graceful path) and killed if they linger.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from derprelay import certs
from derprelay import frames as f
from derprelay.client import DerpClient, Endpoint, connect
from derprelay.keys import MeshKey, NodePrivateKey

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass
class RelayProcess:
    """A running relay: its command line, process, status file's content and log."""

    args: list[str]
    workdir: Path
    process: subprocess.Popen[bytes] = field(init=False)
    status: dict[str, Any] = field(init=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "relay.log"

    def launch(self) -> None:
        """Start the command line and wait for its status file."""
        status_path = self.workdir / "status.json"
        status_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not status_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"relay did not start (exit {self.process.poll()}):\n{self.log()}")
            time.sleep(0.05)
        self.status = json.loads(status_path.read_text())

    def restart(self) -> None:
        """Stop gracefully and start again with the same key, certificate and ports."""
        self.stop()
        self.launch()

    @property
    def url(self) -> str:
        return str(self.status["url"])

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, cert_name=str(self.status["certName"]))

    @property
    def public_key(self) -> bytes:
        return bytes.fromhex(str(self.status["publicKey"]).removeprefix("nodekey:"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait for a graceful exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


def relay_command(workdir: Path, *extra: str) -> list[str]:
    """The relay's command line: loopback, ephemeral ports, files in ``workdir``; ``extra`` wins."""
    return [
        sys.executable,
        "-m",
        "derprelay.cli",
        "-a",
        "127.0.0.1:0",
        "--stun-port",
        "0",
        "--hostname",
        "127.0.0.1",
        "--certdir",
        str(workdir / "certs"),
        "-c",
        str(workdir / "derper.key"),
        "--status-file",
        str(workdir / "status.json"),
        "--log-level",
        "debug",
        *extra,
    ]


def start_relay(workdir: Path, *extra: str, wrapper: tuple[str, ...] = ()) -> RelayProcess:
    """Start a relay; ``wrapper`` is a command that runs it (e.g. in a network namespace)."""
    workdir.mkdir(parents=True, exist_ok=True)
    relay = RelayProcess([*wrapper, *relay_command(workdir, *extra)], workdir)
    relay.launch()
    return relay


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays with extra flags; all are stopped after the test."""
    started: list[RelayProcess] = []

    def factory(*extra: str, name: str = "relay") -> RelayProcess:
        relay = start_relay(tmp_path / name, *extra)
        started.append(relay)
        return relay

    yield factory
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    return relay_factory()


@pytest.fixture
def mesh_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.key"
    path.write_text(MeshKey.generate().text + "\n")
    return path


async def new_client(relay: RelayProcess, **kwargs: Any) -> tuple[DerpClient, NodePrivateKey]:
    key = NodePrivateKey.generate()
    return await connect(relay.endpoint, key, **kwargs), key


RECV_TIMEOUT = 10.0


async def exchange_every_size(a: DerpClient, key_a: bytes, b: DerpClient, key_b: bytes) -> None:
    """A packet of each size from a to b and back (reversed), each checked on arrival."""
    for size in (1, 1200, f.MAX_PACKET_SIZE):
        payload = bytes([size % 251]) * size
        await a.send(key_b, payload)
        got = await asyncio.wait_for(b.recv_packet(), RECV_TIMEOUT)
        assert (got.source, got.packet) == (key_a, payload)
        await b.send(key_a, payload[::-1])
        back = await asyncio.wait_for(a.recv_packet(), RECV_TIMEOUT)
        assert (back.source, back.packet) == (key_b, payload[::-1])


DELIVERY_TIMEOUT = 20.0


async def deliver(sender: DerpClient, receiver: DerpClient, dest: bytes, payload: bytes) -> None:
    """Send until it arrives: mesh membership is learned asynchronously."""

    async def attempt() -> None:
        while True:
            await sender.send(dest, payload)
            try:
                got = await asyncio.wait_for(receiver.recv_packet(), 0.5)
            except TimeoutError:
                continue
            if got.packet == payload:
                return

    await asyncio.wait_for(attempt(), DELIVERY_TIMEOUT)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The relay's own answer is what a test checks; a redirect is never followed off the machine."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch(
    relay: RelayProcess, path: str, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the relay (over TLS, certificate unchecked): status, headers, body."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirects())
    request = urllib.request.Request(relay.url.removesuffix("/derp") + path, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(relay: RelayProcess, name: str, labels: str = "", path: str = "/metrics") -> float:
    """Read one value from the relay's /metrics or /debug/varz (loopback, so allowed)."""
    status, _, body = fetch(relay, path)
    assert status == 200, f"{path}: {status}"
    text = body.decode()
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def recv_matching(client: DerpClient, kind: type[f.Frame]) -> f.Frame:
    async def loop() -> f.Frame:
        while True:
            frame = await client.recv()
            if isinstance(frame, kind):
                return frame

    return await asyncio.wait_for(loop(), RECV_TIMEOUT)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = RECV_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_ca_bundle(tmp_path: Path) -> Path:
    """Make relays a and b's certificates up front, so each can verify the other through one bundle."""
    bundle = tmp_path / "mesh-ca.pem"
    pems = [
        certs.load_or_create_self_signed(tmp_path / name / "certs", "127.0.0.1").cert_pem
        for name in ("a", "b")
    ]
    bundle.write_bytes(b"".join(pems))
    return bundle


def start_pair(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path, ports: tuple[int, int]
) -> tuple[RelayProcess, RelayProcess]:
    first, second = start_mesh(relay_factory, tmp_path, mesh_key_file, ports)
    return first, second


def start_mesh(
    relay_factory: Callable[..., RelayProcess],
    tmp_path: Path,
    mesh_key_file: Path,
    ports: Sequence[int],
    *extra: str,
) -> list[RelayProcess]:
    """Relays named a, b, c… on ``ports``, each meshed with all the others."""
    bundle = write_ca_bundle(tmp_path)
    mesh_with = ",".join(f"127.0.0.1:{port}" for port in ports)
    return [
        relay_factory(
            "-a",
            f"127.0.0.1:{port}",
            "--mesh-psk-file",
            str(mesh_key_file),
            "--mesh-with",
            mesh_with,
            "--mesh-ca-file",
            str(bundle),
            *extra,
            name=name,
        )
        for name, port in zip("abcdefgh", ports, strict=False)
    ]
