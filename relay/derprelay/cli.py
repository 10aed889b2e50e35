"""``derp-relay``: flags, key and certificate plumbing, start-up and graceful shutdown.

Flags are named like Tailscale's ``derper`` where the feature is the same, so
a derper command line mostly carries over.  ``--dev`` runs a complete relay on
loopback with a self-signed certificate and prints the DERP map to use it.
``--workers N`` runs the relay as N processes (``derprelay.supervisor``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import SPEEDUPS, certreload, certs, frames, metrics, supervisor
from .admission import url_admission
from .debug import DebugAccess, DebugConfigError, DebugSite
from .derpmap import DerpMap, DerpNode, DerpRegion
from .http import HomePage, HttpSite, start_listener
from .keys import KeyFormatError, MeshKey, NodePrivateKey, public_key_text
from .listener import (
    HANDSHAKES_PER_TURN,
    MAX_PENDING_HANDSHAKES,
    PENDING_WAIT_MAX,
    HandshakeLimits,
    RelayListener,
)
from .mesh import Mesh, MeshConfigError, parse_mesh_with
from .ratelimit import TokenBucket
from .server import HANDSHAKE_TIMEOUT, SEND_QUEUE_DEPTH, WRITE_TIMEOUT, RateLimit, RelayServer
from .stunserver import start_stun_server
from .supervisor import WorkerSetup
from .tasks import cancel_and_wait
from .workerlinks import WorkerHub, worker_family

log = logging.getLogger("derprelay")

VERSION = "0.1.0"
DEV_ADDR = "127.0.0.1:3340"
DEV_STUN_PORT = 3478
DEV_REGION_ID = 900
SHUTDOWN_GRACE = 1.0
"""Seconds between the Restarting frame and closing every connection."""


DEBUG_ENV_NAMES = "TS_ALLOW_DEBUG_IP, TS_DEBUG_TRUSTED_CIDRS"


class ConfigError(Exception):
    """The command line or a file it names is unusable; the message says which and why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="derp-relay",
        description="A DERP relay for Tailscale and Headscale clients (derper-compatible).",
    )
    p.add_argument(
        "--dev", action="store_true", help=f"run on loopback ({DEV_ADDR}), self-signed TLS, print a DERP map"
    )
    p.add_argument(
        "-a", "--addr", default=":443", help="listen address :port, ip:port or [ipv6]:port (port 0: any)"
    )
    p.add_argument("--stun-port", type=int, default=3478, help="UDP port for STUN (0: any free port)")
    p.add_argument("--stun", action=argparse.BooleanOptionalAction, default=True, help="serve STUN")
    p.add_argument("--hostname", default="", help="TLS host name (default: the listen IP, else localhost)")
    p.add_argument(
        "--certmode",
        choices=("selfsigned", "manual", "none"),
        default="selfsigned",
        help="selfsigned: generate (kept in --certdir if given) and pin, never reloaded; manual: "
        "<certdir>/<hostname>.crt/.key, reloaded when they change; none: plain HTTP",
    )
    p.add_argument(
        "--certdir", type=Path, help="directory of certificates (manual) or where to keep the self-signed one"
    )
    p.add_argument(
        "--tls-cert-file", type=Path, help="--certmode manual: certificate (chain) PEM, instead of --certdir"
    )
    p.add_argument(
        "--tls-key-file", type=Path, help="--certmode manual: private key PEM, instead of --certdir"
    )
    p.add_argument(
        "--cert-reload-interval",
        type=float,
        default=certreload.RELOAD_INTERVAL,
        metavar="SECONDS",
        help="--certmode manual: look at the certificate and key files this often and serve a new valid "
        "pair to new connections, keeping established ones (0: never); a bad pair is refused and logged",
    )
    p.add_argument(
        "-c", "--config", type=Path, help="file keeping the relay's private key (created if missing)"
    )
    p.add_argument("--mesh-psk-file", type=Path, help="file holding the region's mesh key (64 hex digits)")
    p.add_argument(
        "--mesh-with", default="", help="comma-separated host[:port][/dialhost] of the other region members"
    )
    p.add_argument(
        "--mesh-with-file",
        type=Path,
        help="file listing mesh peers like --mesh-with (commas or lines), re-read when it changes",
    )
    p.add_argument("--mesh-ca-file", type=Path, help="CA bundle that verifies mesh peers' certificates")
    p.add_argument(
        "--mesh-tls-insecure", action="store_true", help="do not verify mesh peers' certificates (tests)"
    )
    p.add_argument("--verify-client-url", default="", help="admission endpoint to POST each client's key to")
    p.add_argument(
        "--verify-client-url-fail-open",
        type=_parse_bool,
        default=False,
        metavar="BOOL",
        help="admit clients when the admission endpoint is unreachable (default false: unlike derper, "
        "an outage of the endpoint does not open the relay to everyone)",
    )
    p.add_argument(
        "--home",
        default="",
        metavar="blank|URL",
        help="what / serves: empty for the default page, 'blank' for an empty one (scanners find open "
        "relays by their home page), or a URL to redirect to",
    )
    p.add_argument(
        "--accept-connection-limit", type=float, default=math.inf, help="new connections per second"
    )
    p.add_argument(
        "--accept-connection-burst", type=int, default=sys.maxsize, help="burst of new connections"
    )
    p.add_argument(
        "--handshakes-per-turn",
        type=int,
        default=HANDSHAKES_PER_TURN,
        help="TLS handshakes a worker starts per event-loop turn; established clients are served between "
        "batches, so an accept storm cannot stall them",
    )
    p.add_argument(
        "--max-pending-handshakes",
        type=int,
        default=MAX_PENDING_HANDSHAKES,
        help="accepted connections that may wait for their TLS handshake, per worker; more are refused "
        f"(closed at once), as are those that waited over {PENDING_WAIT_MAX:g}s",
    )
    p.add_argument(
        "--per-client-rate-limit", type=int, default=0, help="bytes/s each client may send (0: no limit)"
    )
    p.add_argument(
        "--per-client-rate-burst", type=int, default=0, help="burst bytes (default: 2 x the limit)"
    )
    p.add_argument(
        "--tcp-write-timeout", type=float, default=WRITE_TIMEOUT, help="seconds a client may stop reading"
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT,
        help="seconds to finish the HTTP and DERP handshakes",
    )
    p.add_argument(
        "--send-queue-depth", type=int, default=SEND_QUEUE_DEPTH, help="packets queued per slow client"
    )
    p.add_argument(
        "--bootstrap-dns-names", default="", help="comma-separated names answered at /bootstrap-dns"
    )
    p.add_argument(
        "--status-file", type=Path, help="write the relay's URL, ports, key and pin here once listening"
    )
    p.add_argument(
        "--debug-allow",
        default="",
        metavar="CIDRS",
        help="also serve /debug/ and /metrics to these IPs/CIDRs (commas), e.g. the pod network "
        "for Prometheus; loopback and Tailscale addresses always may (derper's TS_ALLOW_DEBUG_IP too)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes sharing the ports, one relay (default: the CPUs this process may use, "
        "after its cgroup CPU quota; 1: a single process)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one JSON object per line (time, level, logger, message), for log pipelines",
    )
    p.add_argument("--version", action="version", version=f"derp-relay {VERSION}")
    return p


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``:443``, ``1.2.3.4:443`` or ``[::1]:443`` into host and port."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"-a {addr!r}: expected :port, ip:port or [ipv6]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def load_or_create_private_key(path: Path) -> NodePrivateKey:
    """Read derper's JSON config (``{"PrivateKey": "privkey:…"}``), creating it if absent."""
    try:
        doc = json.loads(path.read_text())
        return NodePrivateKey.from_text(str(doc["PrivateKey"]))
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, KeyFormatError) as exc:
        raise ConfigError(
            f"-c {path}: not a relay key file ({exc}); move it away to generate a new key"
        ) from None
    key = NodePrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps({"PrivateKey": key.text}, indent="\t").encode(), mode=0o600)
    log.info("generated a new relay key in %s", path)
    return key


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_mesh_key(path: Path) -> MeshKey:
    try:
        return MeshKey.from_text(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--mesh-psk-file {path}: {exc.strerror}") from None
    except KeyFormatError as exc:
        raise ConfigError(f"--mesh-psk-file {path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """The command line, checked and resolved into what the relay runs with."""

    host: str
    port: int
    hostname: str
    stun_port: int | None
    tls: certs.CertMaterial | None
    cert_files: tuple[Path, Path] | None
    """--certmode manual: the certificate and key files, watched for a new pair."""
    private_key: NodePrivateKey
    home: HomePage
    args: argparse.Namespace


def resolve(args: argparse.Namespace) -> Settings:
    """Check the flags together; raise :class:`ConfigError` naming the bad one."""
    if args.dev:
        args.addr = DEV_ADDR if args.addr == ":443" else args.addr
        args.stun_port = DEV_STUN_PORT if args.stun_port == 3478 else args.stun_port
    host, port = parse_addr(args.addr)
    hostname = args.hostname or (host if _is_ip(host) else "localhost")
    if args.config is not None:
        private_key = load_or_create_private_key(args.config)
    elif args.dev:
        private_key = NodePrivateKey.generate()
    else:
        raise ConfigError(
            "-c <key file> is required (the relay's identity must survive restarts); or use --dev"
        )
    tls: certs.CertMaterial | None = None
    cert_files: tuple[Path, Path] | None = None
    try:
        if args.certmode == "manual":
            if args.tls_cert_file and args.tls_key_file:
                cert_files = args.tls_cert_file, args.tls_key_file
            elif args.certdir is not None:
                cert_files = certs.manual_paths(args.certdir, hostname)
            else:
                raise ConfigError("--certmode manual needs --certdir, or --tls-cert-file and --tls-key-file")
            tls = certs.load_files(*cert_files)
        elif args.certmode == "selfsigned":
            tls = certs.load_or_create_self_signed(args.certdir, hostname)
    except certs.CertError as exc:
        raise ConfigError(str(exc)) from None
    if (args.mesh_with or args.mesh_with_file) and args.mesh_psk_file is None:
        raise ConfigError("--mesh-with and --mesh-with-file need --mesh-psk-file")
    if args.per_client_rate_limit < 0 or args.send_queue_depth < 1:
        raise ConfigError("--per-client-rate-limit must be >= 0 and --send-queue-depth >= 1")
    if args.handshakes_per_turn < 1 or args.max_pending_handshakes < 0:
        raise ConfigError("--handshakes-per-turn must be at least 1 and --max-pending-handshakes at least 0")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.cert_reload_interval < 0:
        raise ConfigError("--cert-reload-interval must be >= 0 (0: never)")
    try:
        home = HomePage.from_flag(args.home)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(
        host=host,
        port=port,
        hostname=hostname,
        stun_port=args.stun_port if args.stun else None,
        tls=tls,
        cert_files=cert_files,
        private_key=private_key,
        home=home,
        args=args,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _bootstrap_dns(names: list[str]) -> bytes:
    """Resolve the configured names now: clients use these when their DNS is broken."""
    answer: dict[str, list[str]] = {}
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        answer[name] = sorted({str(info[4][0]) for info in infos})
    return json.dumps(answer).encode()


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a started relay serves: what its status file and the dev DERP map say."""

    settings: Settings
    derp_port: int
    stun_port: int

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        host = self.settings.host or self.settings.hostname
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.derp_port}/derp"

    def status(self, public_key: str, worker_pids: list[int]) -> dict[str, Any]:
        """What tests, the demo and operators need to reach this relay."""
        s = self.settings
        return {
            "url": self.url,
            "host": s.host or s.hostname,
            "hostname": s.hostname,
            "derpPort": self.derp_port,
            "stunPort": self.stun_port,
            "publicKey": public_key,
            "certName": s.tls.cert_name if s.tls else "",
            "tls": s.tls is not None,
            "pid": os.getpid(),
            "workers": worker_pids,
        }

    def derp_map(self) -> DerpMap:
        s = self.settings
        host = s.host or "127.0.0.1"
        node = DerpNode(
            name=f"{DEV_REGION_ID}a",
            region_id=DEV_REGION_ID,
            host_name=s.hostname,
            ipv4=host if _is_ip(host) and ":" not in host else "",
            ipv6=host if ":" in host else "",
            derp_port=self.derp_port,
            stun_port=self.stun_port if self.stun_port else -1,
            cert_name=s.tls.cert_name if s.tls else "",
        )
        return DerpMap((DerpRegion(DEV_REGION_ID, "dev", "derp-relay dev", (node,)),))


class Relay:
    """A running relay (or one worker of it): listener, STUN, mesh links; started and stopped as a unit."""

    def __init__(self, settings: Settings, worker: WorkerSetup | None = None) -> None:
        self.settings = settings
        self.worker = worker
        args = settings.args
        self.stats = metrics.RelayStats()
        mesh_key = _read_mesh_key(args.mesh_psk_file) if args.mesh_psk_file else None
        admission = (
            url_admission(args.verify_client_url, fail_open=args.verify_client_url_fail_open)
            if args.verify_client_url
            else None
        )
        rate_limit = None
        if args.per_client_rate_limit:
            rate_limit = RateLimit(
                args.per_client_rate_limit, args.per_client_rate_burst or 2 * args.per_client_rate_limit
            )
        self.server = RelayServer(
            settings.private_key,
            mesh_key=mesh_key,
            admission=admission,
            rate_limit=rate_limit,
            send_queue_depth=args.send_queue_depth,
            write_timeout=args.tcp_write_timeout,
            handshake_timeout=args.handshake_timeout,
            stats=self.stats,
        )
        self.identity = metrics.Identity(VERSION)
        self.served_cert: certreload.ServedCertificate | None = None
        if settings.tls is not None:
            meta = certs.meta_cert_pem(self.server.public_key, frames.PROTOCOL_VERSION)
            self.served_cert = certreload.ServedCertificate(settings.tls, meta)
        self.metrics = metrics.RelayMetrics(
            lambda: [
                *metrics.relay_families(
                    self.stats,
                    self.server.gauges(),
                    self._mesh.states() if self._mesh else [],
                    self.identity,
                ),
                *([worker_family(worker.index, self.server)] if worker else []),
                *(certreload.cert_families(self.served_cert) if self.served_cert else []),
            ]
        )
        self.hub: WorkerHub | None = None
        if worker is not None:
            self.hub = WorkerHub(worker.index, self.server, self.metrics.exposition)
        try:
            access = DebugAccess.from_settings(args.debug_allow, os.environ)
        except DebugConfigError as exc:
            raise ConfigError(f"--debug-allow (or {DEBUG_ENV_NAMES}): {exc}") from None
        self.debug = DebugSite(
            self.server,
            self.metrics,
            self.identity,
            settings.hostname,
            access,
            mesh=lambda: self._mesh,
            workers=self.hub,
        )
        try:
            self.mesh_peers = parse_mesh_with(args.mesh_with)
        except MeshConfigError as exc:
            raise ConfigError(f"--mesh-with: {exc}") from None
        self._listener: RelayListener | None = None
        self._stun: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._mesh: Mesh | None = None
        self.derp_port = 0
        self.stun_port = 0

    def _mesh_tls(self) -> ssl.SSLContext | None:
        ca_file = self.settings.args.mesh_ca_file
        if ca_file is None:
            return None
        try:
            return ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--mesh-ca-file {ca_file}: {exc}") from None

    async def start(self) -> None:
        s = self.settings
        args = s.args
        accept_limit = None
        if math.isfinite(args.accept_connection_limit):
            # Each worker takes its share: the kernel spreads connections evenly over them.
            workers = self.worker.count if self.worker else 1
            accept_limit = TokenBucket(
                args.accept_connection_limit / workers,
                max(1, math.ceil(args.accept_connection_burst / workers)),
                asyncio.get_running_loop().time(),
            )
        names = [n.strip() for n in args.bootstrap_dns_names.split(",") if n.strip()]
        site = HttpSite(
            self.server,
            debug=self.debug,
            bootstrap_dns=lambda: _bootstrap_dns(names),
            home=s.home,
        )
        worker = self.worker
        if self.hub is not None and worker is not None:
            # Before the listener: a client must not register where the news cannot go yet.
            await self.hub.connect(worker.links)
        try:
            self._listener = start_listener(
                site,
                s.host,
                s.port,
                self.served_cert.listener_context if self.served_cert else None,
                sock=worker.derp_socket if worker else None,
                limits=HandshakeLimits(args.handshakes_per_turn, args.max_pending_handshakes),
                accept_limit=accept_limit,
            )
        except OSError as exc:
            raise ConfigError(f"-a {args.addr}: cannot listen: {exc.strerror}") from None
        self.derp_port = self._listener.sockets[0].getsockname()[1]
        if s.stun_port is not None:
            try:
                self._stun = await start_stun_server(
                    s.host, s.stun_port, self.stats, sock=worker.stun_socket if worker else None
                )
            except OSError as exc:
                raise ConfigError(f"--stun-port {s.stun_port}: cannot listen: {exc.strerror}") from None
            self.stun_port = self._stun.get_extra_info("sockname")[1]
        self._mesh = Mesh(
            self.server,
            self._mesh_tls(),
            insecure=args.mesh_tls_insecure,
            own_hosts=frozenset((s.hostname, f"{s.hostname}:{self.derp_port}")),
        )
        if self.served_cert is not None and s.cert_files is not None and args.cert_reload_interval > 0:
            watch = certreload.CertFileWatch(self.served_cert, *s.cert_files, s.hostname)
            self._tasks.append(
                asyncio.create_task(watch.follow(args.cert_reload_interval), name="certificate files")
            )
        if args.mesh_with_file is not None:
            follow = self._mesh.follow_file(args.mesh_with_file, self.mesh_peers)
            self._tasks.append(asyncio.create_task(follow, name="mesh peers file"))
        else:
            self._mesh.set_peers(self.mesh_peers)

    @property
    def listening(self) -> Listening:
        return Listening(self.settings, self.derp_port, self.stun_port)

    async def stop(self) -> None:
        """Stop accepting, tell clients we are restarting, then close everything."""
        self.server.closing = True  # the other workers are stopping too: their links will close
        if self._listener is not None:
            self._listener.close()
        if self._stun is not None:
            self._stun.close()
        await cancel_and_wait(self._tasks)
        if self._mesh is not None:
            await self._mesh.close()
        await self.server.shutdown(SHUTDOWN_GRACE)
        if self.hub is not None:
            self.hub.close()
        if self._listener is not None:
            await self._listener.wait_closed()


def _announce(listening: Listening, status: dict[str, Any], dev: bool) -> None:
    workers = len(status["workers"])
    log.info(
        "DERP on %s, server key %s%s",
        status["url"],
        status["publicKey"],
        f", {workers} worker processes" if workers > 1 else "",
    )
    if listening.stun_port:
        log.info("STUN on udp port %d", listening.stun_port)
    log.info("per-packet path: %s", SPEEDUPS.describe())
    settings = listening.settings
    if settings.tls is not None and settings.cert_files is not None:
        interval = settings.args.cert_reload_interval
        log.info(
            "TLS: certificate %s from %s, %s",
            certs.describe(settings.tls.leaf),
            settings.cert_files[0],
            f"looked at every {interval:g}s for a new pair" if interval else "not reloaded",
        )
    elif status["certName"]:
        log.info("TLS: self-signed/pinned certificate %s (never reloaded)", status["certName"])
    if dev:
        print(
            f"derp-relay (dev) is running.\n"
            f"  DERP: {status['url']}\n"
            f"  STUN: {listening.settings.host}:{listening.stun_port}/udp\n"
            f"  key:  {status['publicKey']}\n"
            f"  pin:  {status['certName'] or '(plain HTTP)'}\n"
            f"DERP map for this relay (Headscale derp.paths, or a Tailscale policy's derpMap):\n"
            f"{listening.derp_map().dumps()}"
            f"Press Ctrl-C to stop.",
            flush=True,
        )


def _ready(listening: Listening, worker_pids: list[int]) -> None:
    """The relay serves: write the status file, say where."""
    settings = listening.settings
    status = listening.status(public_key_text(settings.private_key.public), worker_pids)
    if settings.args.status_file is not None:
        _write_atomically(settings.args.status_file, json.dumps(status, indent=2).encode())
    _announce(listening, status, settings.args.dev)


def _parent_gone(loop: asyncio.AbstractEventLoop, lifeline: int, stop: asyncio.Event) -> None:
    """The lifeline pipe is readable only at end of file: the supervisor is gone, so this worker goes too.

    The reader is removed at once (a pipe at end of file stays readable, and
    would be called back on every turn of the loop), and should the graceful
    stop hang, the worker exits anyway rather than outlive its relay.
    """
    loop.remove_reader(lifeline)
    log.warning("the supervisor is gone; stopping this worker")
    stop.set()
    loop.call_later(supervisor.WORKER_STOP_TIMEOUT, os._exit, 1)


async def serve(settings: Settings, worker: WorkerSetup | None = None) -> None:
    """Run the relay, or one worker of it, until SIGTERM/SIGINT (or, for a worker, its parent is gone)."""
    relay = Relay(settings, worker)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        _ready(relay.listening, [os.getpid()])
    else:
        loop.add_reader(worker.lifeline, _parent_gone, loop, worker.lifeline, stop)
        os.write(worker.ready, b"+")
    await stop.wait()
    log.info("shutting down: telling %d clients to reconnect", relay.server.gauges().current_connections)
    await relay.stop()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, for log pipelines (Loki, Elasticsearch, Cloud Logging)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str, worker: int | None = None) -> None:
    """Log to stderr as text or JSON; a worker process's lines say which worker wrote them."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(worker))
    else:
        which = "" if worker is None else f"worker {worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s {which}%(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _event_loop_runner() -> Any:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return asyncio.run
    return uvloop.run


def _run_worker(settings: Settings, worker: WorkerSetup) -> int:
    """The body of one worker process: its log lines say which worker it is."""
    configure_logging(settings.args.log_level, settings.args.log_format, worker.index)
    try:
        _event_loop_runner()(serve(settings, worker))
    except ConfigError as exc:
        print(f"derp-relay: worker {worker.index}: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_workers(settings: Settings, count: int) -> int:
    try:
        shared = supervisor.bind_shared(settings.host, settings.port, settings.stun_port, count)
    except OSError as exc:
        raise ConfigError(f"-a {settings.args.addr} / --stun-port: cannot listen: {exc.strerror}") from None
    listening = Listening(settings, shared.derp_port, shared.stun_port)
    return supervisor.run_workers(
        count,
        shared,
        lambda worker: _run_worker(settings, worker),
        lambda pids: _ready(listening, pids),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        settings = resolve(args)
        workers = args.workers or supervisor.default_workers()
        if workers > 1:
            return _run_workers(settings, workers)
        _event_loop_runner()(serve(settings))
    except ConfigError as exc:
        print(f"derp-relay: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
