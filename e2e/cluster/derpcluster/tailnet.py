"""A real tailnet on loopback: Headscale as the coordination server, tailscaled nodes as its clients.

The tailnet test points both at the DERP map the operator published and
checks that real Tailscale traffic crosses our relays.  Everything here
listens on 127.0.0.1 only and keeps to its own directory: Headscale's
SQLite database, noise key and CLI socket; each tailscaled's state, socket
and logs.  Every process leads its own process group, so :meth:`stop`
ends exactly what was started, children included.

Nothing may reach past loopback.  The binaries leave out the features that
would on their own (see :data:`tailnet_binaries.OFFLINE_TAGS`), the
environment turns off log uploads and port mapping, Headscale's DNS pushes
no resolvers and its update check is off, and :class:`LoopbackWatch` lets
a test check what the processes actually connected to.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
WATCH_INTERVAL = 0.5
IPV4_PREFIX = "100.64.0.0/10"
IPV6_PREFIX = "fd7a:115c:a1e0::/48"
OFFLINE_ENV = {
    "TS_NO_LOGS_NO_SUPPORT": "true",
    "TS_DISABLE_PORTMAPPER": "true",
    "TS_DISABLE_UPNP": "true",
}
"""For tailscaled and the tailscale CLI alike: no log uploads, no gateway probing."""
ALWAYS_DERP_ENV = {"TS_DEBUG_ALWAYS_USE_DERP": "1"}
"""tailscaled sends nothing over UDP, so DERP is the only path between nodes."""


class TailnetError(RuntimeError):
    """A tailnet process failed to start or a CLI call failed; the message carries its output or log."""


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class LoggedProcess:
    """A started program, its log file, and how to end it and its children."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL if it lingers; a no-op once stopped."""
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)


def launch(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> LoggedProcess:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return LoggedProcess(name, log_path, process)


def run_cli(argv: Sequence[str], env: dict[str, str], timeout: float = CLI_TIMEOUT) -> str:
    """Run a CLI call to completion; its stdout, or :class:`TailnetError` with everything it said."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise TailnetError(f"{' '.join(argv)}: no answer within {timeout:.0f}s") from None
    if result.returncode != 0:
        raise TailnetError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}".rstrip()
        )
    return result.stdout


@dataclass
class Headscale:
    """One Headscale server on 127.0.0.1: SQLite, its own noise key, embedded DERP off."""

    binary: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    process: LoggedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def verify_url(self) -> str:
        """Where relays ask whether a client key belongs to this tailnet (``--verify-client-url``)."""
        return f"{self.url}/verify"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    def write_config(self, derp_urls: Sequence[str] = (), derp_paths: Sequence[Path] = ()) -> None:
        """The configuration for the next start; the DERP map comes only from ``derp_urls``/``derp_paths``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "server_url": self.url,
            "listen_addr": f"{HOST}:{self.port}",
            "metrics_listen_addr": f"{HOST}:{free_port()}",
            "grpc_listen_addr": f"{HOST}:{free_port()}",
            "grpc_allow_insecure": False,
            "noise": {"private_key_path": str(self.workdir / "noise_private.key")},
            "prefixes": {"v4": IPV4_PREFIX, "v6": IPV6_PREFIX, "allocation": "sequential"},
            "derp": {
                "server": {"enabled": False},
                "urls": list(derp_urls),
                "paths": [str(p) for p in derp_paths],
                "auto_update_enabled": False,
            },
            "disable_check_updates": True,
            "database": {"type": "sqlite", "sqlite": {"path": str(self.workdir / "db.sqlite")}},
            "log": {"level": "info", "format": "text"},
            "policy": {"mode": "file", "path": ""},
            "dns": {"magic_dns": False, "override_local_dns": False, "nameservers": {"global": []}},
            "unix_socket": str(self.workdir / "headscale.sock"),
            "unix_socket_permission": "0770",
            "logtail": {"enabled": False},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def launch(self) -> LoggedProcess:
        """Start ``headscale serve`` with the written configuration, without waiting for it."""
        self.process = launch(
            "headscale",
            [str(self.binary), "serve", "--config", str(self.config_path)],
            self.workdir / "headscale.log",
            dict(os.environ),
        )
        return self.process

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until ``/health`` answers; :class:`TailnetError` with the log if it exits first."""
        process = self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.running():
                raise TailnetError(f"headscale exited {process.process.returncode}:\n{process.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.2)
        raise TailnetError(f"headscale not healthy after {timeout:.0f}s:\n{process.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def cli(self, *args: str) -> Any:
        """A ``headscale`` CLI call through the server's socket, its JSON output parsed."""
        out = run_cli(
            [str(self.binary), "--config", str(self.config_path), *args, "--output", "json"], dict(os.environ)
        )
        return json.loads(out) if out.strip() else None

    def create_user(self, name: str) -> int:
        return int(self.cli("users", "create", name)["id"])

    def preauth_key(self, user_id: int) -> str:
        """A reusable key that joins nodes as ``user_id`` without a login step."""
        return str(
            self.cli("preauthkeys", "create", "--user", str(user_id), "--reusable", "--expiration", "1h")[
                "key"
            ]
        )

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.cli("nodes", "list") or [])

    def delete_node(self, node_id: int) -> None:
        self.cli("nodes", "delete", "--identifier", str(node_id), "--force")


@dataclass
class Tailscaled:
    """One tailscaled in userspace networking with its own state, socket and port, and its CLI."""

    tailscaled_binary: Path
    tailscale_binary: Path
    workdir: Path
    name: str
    process: LoggedProcess | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "tailscaled.sock"

    @property
    def state_path(self) -> Path:
        return self.workdir / "tailscaled.state"

    def _env(self) -> dict[str, str]:
        return {**os.environ, **OFFLINE_ENV, **ALWAYS_DERP_ENV, "TS_LOGS_DIR": str(self.workdir)}

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait until its CLI socket answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = launch(
            f"tailscaled {self.name}",
            [
                str(self.tailscaled_binary),
                "--tun=userspace-networking",
                f"--statedir={self.workdir}",
                f"--state={self.state_path}",
                f"--socket={self.socket_path}",
                f"--port={free_port(socket.SOCK_DGRAM)}",
                "--no-logs-no-support",
                # A plain file, so a test can read the node key the way tailscaled keeps it.
                "--encrypt-state=false",
            ],
            self.workdir / "tailscaled.log",
            self._env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running():
                raise TailnetError(f"{self.process.name} exited:\n{self.process.log_tail()}")
            with contextlib.suppress(TailnetError):
                self.cli("status", "--json", timeout=5)
                return
            time.sleep(0.2)
        raise TailnetError(
            f"{self.process.name}: no CLI answer after {timeout:.0f}s:\n{self.process.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        return run_cli(
            [str(self.tailscale_binary), f"--socket={self.socket_path}", *args], self._env(), timeout
        )

    def cli_process(self, *args: str) -> subprocess.Popen[bytes]:
        """A CLI call left running with its stdin, stdout and stderr piped (``tailscale nc``)."""
        return subprocess.Popen(
            [str(self.tailscale_binary), f"--socket={self.socket_path}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
        )

    def up(self, login_server: str, auth_key: str) -> None:
        self.cli(
            "up",
            f"--login-server={login_server}",
            f"--authkey={auth_key}",
            f"--hostname={self.name}",
            "--accept-dns=false",
            "--timeout=60s",
        )

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json")))

    def node_private_key(self) -> str:
        """The node key (``privkey:…``) tailscaled registered with, from its unencrypted state file.

        The state is a JSON object of base64 blobs; the current profile's
        prefs hold the key under ``Config.PrivateNodeKey``.
        """
        state = json.loads(self.state_path.read_text())
        profile_key = base64.b64decode(state["_current-profile"]).decode()
        prefs = json.loads(base64.b64decode(state[profile_key]))
        return str(prefs["Config"]["PrivateNodeKey"])


def non_loopback_peers(pid: int) -> set[str]:
    """Remote addresses of ``pid``'s connected TCP and UDP sockets that are not loopback.

    Read from /proc: the socket inodes the process holds, matched against the
    kernel's socket tables.  Unconnected sockets (remote address zero) count
    as nothing, so this sees connections, not every datagram sent.
    """
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    peers = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] not in inodes:
                    continue
                address = _proc_net_address(fields[2])
                if (
                    not address.is_unspecified
                    and not address.is_loopback
                    and not _is_mapped_loopback(address)
                ):
                    peers.add(str(address))
    return peers


class LoopbackWatch:
    """Samples the connections of some processes in the background and keeps every non-loopback peer seen.

    Checking once at the end would miss a connection that came and went;
    sampling every :data:`WATCH_INTERVAL` catches any that lasts longer.
    """

    def __init__(self) -> None:
        self.watched: dict[int, LoggedProcess] = {}
        self.seen: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-watch", daemon=True)
        self._thread.start()

    def watch(self, process: LoggedProcess) -> None:
        self.watched[process.process.pid] = process

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            for pid, process in list(self.watched.items()):
                if process.running() and (peers := non_loopback_peers(pid)):
                    self.seen.setdefault(f"{process.name} (pid {pid})", set()).update(peers)

    def stop(self) -> dict[str, set[str]]:
        """Stop sampling; what was seen, by process name."""
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)
        return self.seen


def _proc_net_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address of a ``/proc/net`` ``HEX:PORT`` field: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text.split(":", maxsplit=1)[0])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _is_mapped_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped is not None and mapped.is_loopback
