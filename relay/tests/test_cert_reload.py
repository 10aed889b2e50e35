"""``--certmode manual`` certificates rotated on disk as the kubelet does, while clients stay connected.

A test CA issues every certificate.  The files are updated the way the
kubelet updates a Secret volume: the new pair goes into a fresh timestamped
directory, a ``..data`` symlink is renamed over the old one, and ``tls.crt``
and ``tls.key`` are symlinks through ``..data`` that never change themselves.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from derpcluster.pki import CertificateAuthority, IssuedKey
from derprelay import certs, cli
from derprelay.client import DerpClient, Endpoint, connect
from derprelay.keys import NodePrivateKey
from relayharness import (
    RECV_TIMEOUT,
    RelayProcess,
    deliver,
    exchange_every_size,
    fetch,
    free_port,
    metric,
    wait_for,
)

HOSTNAME = "127.0.0.1"
"""The harness's --hostname: the certificates name it as an IP address."""
POLL = "0.2"
"""--cert-reload-interval for these tests: short, so a rotation shows within a second."""
ROTATION_TIMEOUT = 15.0
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class CertAuthority:
    """The test's CA (the local cluster's kind); clients trust it and verify the relay's name."""

    def __init__(self, directory: Path) -> None:
        self.authority = CertificateAuthority(f"derp-relay test CA {os.urandom(4).hex()}")
        self.cert = x509.load_pem_x509_certificate(self.authority.cert_pem)
        self.bundle = directory / "ca.pem"
        self.bundle.write_bytes(self.authority.cert_pem)

    def issue(
        self,
        *,
        ips: tuple[str, ...] = (HOSTNAME,),
        dns_names: tuple[str, ...] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key: IssuedKey | None = None,
    ) -> certs.CertMaterial:
        """A leaf for these names followed by the CA certificate, as cert-manager writes tls.crt."""
        issued = self.authority.issue(
            (*dns_names, *ips)[0],
            dns_names=dns_names,
            ips=ips,
            server=True,
            key=key,
            not_before=not_before,
            not_after=not_after,
        )
        return certs.CertMaterial(issued.cert_pem + self.authority.cert_pem, issued.key_pem)

    def endpoint(self, relay: RelayProcess) -> Endpoint:
        """How a client that trusts this CA reaches the relay: the name checked, no pin."""
        return Endpoint(relay.url, ssl_context=ssl.create_default_context(cafile=str(self.bundle)))


def serial(material: certs.CertMaterial) -> int:
    return material.leaf.serial_number


class SecretVolume:
    """A directory laid out and updated as the kubelet's atomic writer does a Secret volume."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self._updates = 0

    @property
    def cert_path(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "tls.key"

    def write(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._updates += 1
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y_%m_%d_%H_%M_%S")
        fresh = self.directory / f"..{stamp}.{self._updates}"
        fresh.mkdir()
        (fresh / "tls.crt").write_bytes(cert_pem)
        (fresh / "tls.key").write_bytes(key_pem)
        data = self.directory / "..data"
        old = data.resolve() if data.is_symlink() else None
        staged = self.directory / "..data_tmp"
        staged.symlink_to(fresh.name)
        staged.rename(data)  # the one atomic step: both files change together
        for name in ("tls.crt", "tls.key"):
            if not (self.directory / name).is_symlink():
                (self.directory / name).symlink_to(f"..data/{name}")
        if old is not None:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()

    def put(self, material: certs.CertMaterial) -> None:
        self.write(material.cert_pem, material.key_pem)

    def flags(self, workers: int = 1) -> tuple[str, ...]:
        return (
            "--workers",
            str(workers),
            "--certmode",
            "manual",
            "--tls-cert-file",
            str(self.cert_path),
            "--tls-key-file",
            str(self.key_path),
            "--cert-reload-interval",
            POLL,
        )


async def served_chain(relay: RelayProcess) -> list[x509.Certificate]:
    """The chain a new TLS connection gets, leaf first (nothing verified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", relay.status["derpPort"], ssl=context), RECV_TIMEOUT
    )
    ssl_object = writer.get_extra_info("ssl_object")
    chain = getattr(ssl_object, "get_unverified_chain", None) or ssl_object._sslobj.get_unverified_chain
    ders = [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain()]  # type: ignore[attr-defined]
    writer.close()
    return [x509.load_der_x509_certificate(der) for der in ders]


async def wait_served(relay: RelayProcess, serial: int, timeout: float = ROTATION_TIMEOUT) -> None:
    """Poll new connections (bounded) until they get the certificate with ``serial``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := (await served_chain(relay))[0].serial_number) != serial:
        if loop.time() > deadline:
            raise AssertionError(f"after {timeout}s new connections still get serial {got:x}, not {serial:x}")
        await asyncio.sleep(0.05)


def reloads(relay: RelayProcess, result: str) -> float:
    return metric(relay, "derp_tls_cert_reloads_total", f'result="{result}"')


async def wait_counted(relay: RelayProcess, result: str, count: int) -> None:
    await wait_for(lambda: reloads(relay, result) >= count, f"{result} counted {count}", ROTATION_TIMEOUT)
    assert reloads(relay, result) == count


class Chatter:
    """A client pair exchanging packets both ways without pause, until stopped: proof it stayed up."""

    def __init__(self, a: DerpClient, key_a: bytes, b: DerpClient, key_b: bytes) -> None:
        self.rounds = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(a, key_a, b, key_b))

    async def _run(self, a: DerpClient, key_a: bytes, b: DerpClient, key_b: bytes) -> None:
        while not self._stop.is_set():
            await exchange_every_size(a, key_a, b, key_b)
            self.rounds += 1

    async def rounds_after(self, more: int) -> None:
        """Wait for ``more`` rounds beyond now (the task's failure surfaces here)."""
        target = self.rounds + more
        await wait_for(lambda: self.rounds >= target or self._task.done(), "more exchanges")
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, RECV_TIMEOUT)


async def connected_pair(ca: CertAuthority, relay: RelayProcess) -> tuple[Chatter, list[DerpClient]]:
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    a = await connect(ca.endpoint(relay), key_a)
    b = await connect(ca.endpoint(relay), key_b)
    return Chatter(a, key_a.public, b, key_b.public), [a, b]


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return CertAuthority(tmp_path)


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    return SecretVolume(tmp_path / "secret-volume")


async def test_rotation_reaches_new_connections_while_a_connected_pair_keeps_relaying(
    relay_factory: Callable[..., RelayProcess], ca: CertAuthority, volume: SecretVolume
) -> None:
    first, second = ca.issue(), ca.issue()
    volume.put(first)
    relay = relay_factory(*volume.flags())
    assert (await served_chain(relay))[0].serial_number == serial(first)
    chatter, clients = await connected_pair(ca, relay)
    await chatter.rounds_after(1)
    accepts_before = metric(relay, "derp_accepts_total")

    volume.put(second)
    await wait_served(relay, serial(second))
    await chatter.rounds_after(3)  # the same two connections, relaying on after the reload
    await chatter.stop()

    chain = await served_chain(relay)
    assert chain[1] == ca.cert  # the chain as the files give it
    with warnings.catch_warnings():  # the meta cert's CN is longer than X.520 allows, as derper's is
        warnings.simplefilter("ignore", UserWarning)
        meta_cn = chain[2].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert meta_cn == "derpkey" + relay.public_key.hex()  # derper's meta cert, still after the chain
    fresh = await connect(ca.endpoint(relay), NodePrivateKey.generate())  # verifies the new one by name
    await fresh.close()
    assert metric(relay, "derp_accepts_total") == accepts_before + 1  # nobody reconnected
    assert metric(relay, "derp_current_connections") == 2
    assert reloads(relay, "reloaded") == 1
    assert metric(relay, "derp_tls_cert_not_after_unix_time") == int(
        second.leaf.not_valid_after_utc.timestamp()
    )
    assert metric(relay, "derp_tls_cert_info", f'serial="{serial(second):x}"') == 1
    assert metric(relay, "derp_tls_cert_reloads", 'result="reloaded"', path="/debug/varz") == 1
    old, new = certs.describe(first.leaf), certs.describe(second.leaf)
    assert f"TLS certificate reloaded from {volume.cert_path}: {old} -> {new}" in relay.log()
    for client in clients:
        await client.close()


async def test_bad_rotations_keep_the_served_certificate_are_counted_once_and_a_good_one_is_taken(
    relay_factory: Callable[..., RelayProcess], ca: CertAuthority, volume: SecretVolume
) -> None:
    good = ca.issue()
    volume.put(good)
    relay = relay_factory(*volume.flags())
    chatter, clients = await connected_pair(ca, relay)
    other, expired = ca.issue(), ca.issue(not_before=NOW - DAY, not_after=NOW - datetime.timedelta(hours=1))
    half = ca.issue()
    bad: list[tuple[str, bytes, bytes]] = [
        ("key_mismatch", ca.issue().cert_pem, other.key_pem),
        ("not_pem", half.cert_pem[: len(half.cert_pem) // 3], half.key_pem),
        ("expired", expired.cert_pem, expired.key_pem),
        ("wrong_name", *_pair(ca.issue(ips=(), dns_names=("derp.other.example",)))),
    ]
    for result, cert_pem, key_pem in bad:
        volume.write(cert_pem, key_pem)
        await wait_counted(relay, result, 1)
        assert (await served_chain(relay))[0].serial_number == serial(good)

    # Valid in three seconds: refused at first, looked at again every poll, taken in its time;
    # and an RSA key after ECDSA ones, which must replace what is served, not sit beside it.
    rsa_key = rsa.generate_private_key(65537, 2048)
    soon = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=3)
    later = ca.issue(not_before=soon, key=rsa_key)
    volume.put(later)
    await wait_counted(relay, "not_yet_valid", 1)
    await wait_served(relay, serial(later))
    await chatter.rounds_after(2)
    await chatter.stop()

    assert reloads(relay, "reloaded") == 1
    for result, *_ in [*bad, ("not_yet_valid",)]:
        assert reloads(relay, result) == 1, result  # once per bad state, not once per poll
        assert len(re.findall(rf"TLS certificate not reloaded \({result}\)", relay.log())) == 1, result
    assert f"still serving {certs.describe(good.leaf)}" in relay.log()
    assert metric(relay, "derp_current_connections") == 2
    for client in clients:
        await client.close()


def _pair(material: certs.CertMaterial) -> tuple[bytes, bytes]:
    return material.cert_pem, material.key_pem


WORKERS = 2
CONNECTIONS = 24
"""New connections after the rotation: all on one of two workers is a 1 in 2**23 chance."""


async def test_every_worker_serves_the_rotated_certificate(
    relay_factory: Callable[..., RelayProcess], ca: CertAuthority, volume: SecretVolume, mesh_key_file: Path
) -> None:
    first, second = ca.issue(), ca.issue()
    volume.put(first)
    relay = relay_factory(*volume.flags(WORKERS), "--mesh-psk-file", str(mesh_key_file))
    chatter, clients = await connected_pair(ca, relay)

    volume.put(second)
    log_lines = re.compile(
        rf"worker (\d) derprelay.certs INFO TLS certificate reloaded .* -> serial {serial(second):x}"
    )
    await wait_for(
        lambda: len(set(log_lines.findall(relay.log()))) == WORKERS, "every worker's reload", ROTATION_TIMEOUT
    )
    served = [(await served_chain(relay))[0].serial_number for _ in range(CONNECTIONS)]
    assert served == [serial(second)] * CONNECTIONS
    await chatter.rounds_after(2)
    await chatter.stop()

    # Each worker's exposition is in the combined one: the old serial is nowhere, one rotation is one reload.
    assert metric(relay, "derp_tls_cert_info", f'serial="{serial(second):x}"') == 1
    assert f'serial="{serial(first):x}"' not in fetch(relay, "/metrics")[2].decode()
    assert reloads(relay, "reloaded") == 1
    for client in clients:
        await client.close()


def test_a_negative_interval_is_refused_with_the_flag_named() -> None:
    args = cli.build_parser().parse_args(["--dev", "--cert-reload-interval", "-1"])
    with pytest.raises(cli.ConfigError, match="--cert-reload-interval must be >= 0"):
        cli.resolve(args)


@pytest.mark.parametrize(
    ("name", "hostname", "covered"),
    [
        ("derp.example.com", "DERP.example.com.", True),
        ("*.example.com", "derp.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.derp.example.com", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("derp.example.com", "127.0.0.1", False),
        ("127.0.0.1", "127.0.0.2", False),
    ],
)
def test_which_names_a_certificate_covers(name: str, hostname: str, covered: bool) -> None:
    assert certs.names_host(certs.generate_self_signed(name).leaf, hostname) is covered


async def test_mesh_links_stay_up_across_a_rotation(
    relay_factory: Callable[..., RelayProcess], ca: CertAuthority, tmp_path: Path, mesh_key_file: Path
) -> None:
    """Mesh peers verify the members through the CA; a renewed member keeps its links and makes new ones."""
    ports = (free_port(), free_port())
    volumes = [SecretVolume(tmp_path / f"volume-{name}") for name in "ab"]
    relays = []
    for name, port, volume in zip("ab", ports, volumes, strict=True):
        volume.put(ca.issue())
        mesh = ("--mesh-psk-file", str(mesh_key_file), "--mesh-ca-file", str(ca.bundle))
        peers = ",".join(f"127.0.0.1:{p}" for p in ports)
        relays.append(
            relay_factory(*volume.flags(), "-a", f"127.0.0.1:{port}", *mesh, "--mesh-with", peers, name=name)
        )
    key_a, key_b = NodePrivateKey.generate(), NodePrivateKey.generate()
    on_a, on_b = await connect(ca.endpoint(relays[0]), key_a), await connect(ca.endpoint(relays[1]), key_b)
    await deliver(on_b, on_a, key_a.public, b"before")
    await deliver(on_a, on_b, key_b.public, b"before, back")  # both mesh links are up
    accepts = [metric(relay, "derp_accepts_total") for relay in relays]  # a client and a mesh link each
    assert accepts == [2, 2]

    renewed = ca.issue()
    volumes[0].put(renewed)
    await wait_served(relays[0], serial(renewed))
    await deliver(on_b, on_a, key_a.public, b"after")
    await deliver(on_a, on_b, key_b.public, b"and back")
    assert [metric(relay, "derp_accepts_total") for relay in relays] == accepts  # nothing reconnected
    assert [metric(relay, "derp_mesh_peers_connected") for relay in relays] == [1, 1]
    # A new mesh link to the renewed member (its peer restarted) verifies the new certificate.
    relays[1].restart()
    await wait_for(lambda: metric(relays[1], "derp_mesh_peers_connected") == 1, "b's new mesh link to a")
    await on_a.close()
    await on_b.close()
