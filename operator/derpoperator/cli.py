"""``derpfleet``: the operator's command line.

``derpfleet operator`` runs the operator (in its pod, or against any
kubeconfig for development).  ``derpfleet render`` turns DerpRegion files into the manifests the operator
would apply (and, given node addresses, the DERP map it would publish),
without a cluster: for GitOps repositories, reviews, and trying a spec out.
It validates like the API server would and names every problem it finds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from derprelay.certs import CertError, CertMaterial, load_files
from derprelay.debug import DebugConfigError, parse_networks

from .conflicts import find_region_id_conflicts
from .credentials import CredentialError, certificate_pin, generate_mesh_key, generate_region_certificate
from .credentials import normalize_mesh_key as check_mesh_key
from .derp_map import build_derp_map
from .handlers import OperatorConfig
from .model import (
    API_GROUP,
    API_VERSION,
    KIND,
    DerpRegionSpec,
    InvalidSpecError,
    RegionRef,
    TlsMode,
    check_region_name,
    node_name,
    parse_region_spec,
)
from .naming import pod_name
from .observed import NodeAddress, ObservedNode, ObservedRegion
from .render import Manifest, render_derp_map_configmap, render_region
from .run import RunConfig, run

DEFAULT_DERP_MAP_NAME = "derp-map"
OFFLINE_CREATED = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
"""Offline regions have no creation time; conflicts then fall back to namespace/name order."""


class UsageError(Exception):
    """Bad input to the command line; the message names the file or flag."""


@dataclass(frozen=True, slots=True)
class LoadedRegion:
    ref: RegionRef
    spec: DerpRegionSpec
    source: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="derpfleet", description="Run a fleet of DERP relays on Kubernetes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser(
        "render",
        help="print the manifests (and DERP map) for DerpRegion files, offline",
        description="Render DerpRegion files into the manifests the operator applies, as YAML on stdout.",
    )
    render.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        type=Path,
        help="DerpRegion YAML (repeatable)",
    )
    render.add_argument(
        "-n", "--namespace", help="namespace of regions whose metadata names none (default: default)"
    )
    render.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    render.add_argument(
        "--relay-debug-allow",
        default="",
        metavar="CIDRS",
        help="CIDRs (commas) the relays also serve /debug/ and /metrics to, e.g. the pod network Prometheus scrapes from",
    )
    render.add_argument(
        "--mesh-key-file", type=Path, help="the region's mesh key (64 hex digits); default: a new one"
    )
    render.add_argument(
        "--tls-cert-file", type=Path, help="selfSigned mode: the region's certificate; default: new"
    )
    render.add_argument("--tls-key-file", type=Path, help="selfSigned mode: its private key")
    render.add_argument(
        "--node-address",
        action="append",
        default=[],
        metavar="NODE=IP",
        help="publish DERP node NODE (e.g. 900a) at IP in a DERP map ConfigMap (repeat for IPv4 and IPv6)",
    )
    render.add_argument(
        "--derp-map",
        action="store_true",
        help="also render the DERP map ConfigMap (implied by --node-address)",
    )
    render.add_argument(
        "--derp-map-name", default=DEFAULT_DERP_MAP_NAME, help="name of the DERP map ConfigMap"
    )
    _add_operator_command(commands)
    return parser


def _add_operator_command(commands: Any) -> None:
    run = commands.add_parser(
        "operator",
        help="run the operator: reconcile DerpRegions, probe relays, publish the DERP map",
        description="Reconcile DerpRegions into relays, probe them, and publish the fleet's DERP map.",
    )
    run.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        help="watch DerpRegions in this namespace only (repeatable; default: the whole cluster)",
    )
    here = os.environ.get("POD_NAMESPACE", "default")
    run.add_argument(
        "--map-namespace", default=here, help=f"namespace of the DERP map ConfigMap (default: {here})"
    )
    run.add_argument("--map-name", default=DEFAULT_DERP_MAP_NAME, help="name of the DERP map ConfigMap")
    run.add_argument(
        "--probe-interval",
        type=float,
        default=15.0,
        help="seconds between probes of each region (default: 15)",
    )
    run.add_argument(
        "--listen",
        default="0.0.0.0:8080",
        help="address of /derpmap.json, /healthz and /metrics (default: 0.0.0.0:8080)",
    )
    run.add_argument("--kubeconfig", help="kubeconfig to use outside a cluster (default: $KUBECONFIG)")
    run.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    run.add_argument(
        "--relay-debug-allow",
        default="",
        metavar="CIDRS",
        help="CIDRs (commas) the relays also serve /debug/ and /metrics to, e.g. the pod network Prometheus scrapes from",
    )
    run.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold a Lease so only one replica acts (default: on)",
    )
    run.add_argument("--lease-name", default="derpfleet-operator", help="the leader-election Lease's name")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: expected host:port, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The operator's settings from its flags; bad values raise :class:`UsageError`."""
    if args.probe_interval <= 0:
        raise UsageError(f"--probe-interval must be positive, not {args.probe_interval}")
    host, port = _listen_address(args.listen)
    return RunConfig(
        operator=OperatorConfig(
            namespaces=tuple(args.namespaces),
            map_namespace=args.map_namespace,
            map_name=args.map_name,
            probe_interval=args.probe_interval,
            cluster_domain=args.cluster_domain,
            relay_debug_allow=_relay_debug_allow(args.relay_debug_allow),
        ),
        listen_host=host,
        listen_port=port,
        kubeconfig=args.kubeconfig,
        leader_election=args.leader_elect,
        lease_namespace=args.map_namespace,
        lease_name=args.lease_name,
    )


def run_operator(args: argparse.Namespace) -> int:
    config = run_config(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # kopf's login reads it from there

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run(config, stop)

    asyncio.run(main())
    return 0


def _documents(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not YAML: {exc}") from None
    found = []
    for number, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{path} (document {number})" if len(docs) > 1 else str(path)
        if not isinstance(doc, dict):
            raise UsageError(f"{where}: expected a {KIND} object")
        if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}" or doc.get("kind") != KIND:
            raise UsageError(
                f"{where}: apiVersion {doc.get('apiVersion')!r}, kind {doc.get('kind')!r}: "
                f"expected {API_GROUP}/{API_VERSION} {KIND}"
            )
        found.append((where, doc))
    return found


def _relay_debug_allow(text: str) -> str:
    """Check ``--relay-debug-allow`` as the relay will, so a typo fails here and not in every pod."""
    try:
        parse_networks(text)
    except DebugConfigError as exc:
        raise UsageError(f"--relay-debug-allow: {exc}") from None
    return ",".join(text.replace(",", " ").split())


def load_regions(
    paths: Sequence[Path], namespace: str | None, cluster_domain: str, relay_debug_allow: str = ""
) -> list[LoadedRegion]:
    """Parse every DerpRegion in the files, collecting all problems before giving up."""
    regions: list[LoadedRegion] = []
    problems: list[str] = []
    for path in paths:
        for where, doc in _documents(path):
            meta = doc.get("metadata") or {}
            own_namespace = meta.get("namespace")
            if namespace and own_namespace and own_namespace != namespace:
                problems.append(
                    f"{where}: metadata.namespace {own_namespace!r} differs from --namespace {namespace!r}"
                )
                continue
            ref = RegionRef(
                name=str(meta.get("name", "")),
                namespace=str(own_namespace or namespace or "default"),
                uid="",
                cluster_domain=cluster_domain,
                relay_debug_allow=relay_debug_allow,
            )
            try:
                check_region_name(ref.name)
                regions.append(LoadedRegion(ref, parse_region_spec(doc.get("spec")), where))
            except InvalidSpecError as exc:
                problems += [f"{where}: {p}" for p in exc.problems]
    if not regions and not problems:
        problems.append(f"no {KIND} in {', '.join(map(str, paths))}")
    if problems:
        raise UsageError("\n".join(problems))
    return regions


def _observed(
    region: LoadedRegion, cert_pin: str = "", nodes: tuple[ObservedNode, ...] = ()
) -> ObservedRegion:
    return ObservedRegion(
        name=region.ref.name,
        namespace=region.ref.namespace,
        created=OFFLINE_CREATED,
        spec=region.spec,
        cert_pin=cert_pin,
        nodes=nodes,
    )


def _check_conflicts(regions: Sequence[LoadedRegion]) -> None:
    losers = find_region_id_conflicts(_observed(r) for r in regions)
    if losers:
        raise UsageError(
            "\n".join(f"{ns}/{name}: {message}" for (ns, name), message in sorted(losers.items()))
        )


def parse_node_addresses(values: Sequence[str]) -> dict[str, list[NodeAddress]]:
    """``900a=203.0.113.7`` flags -> node name -> addresses (published as ExternalIPs)."""
    addresses: dict[str, list[NodeAddress]] = {}
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or not name or not address:
            raise UsageError(f"--node-address {value!r}: expected NODE=IP, e.g. 900a=203.0.113.7")
        addresses.setdefault(name, []).append(NodeAddress("ExternalIP", address))
    return addresses


def _offline_nodes(
    spec: DerpRegionSpec, ref: RegionRef, addresses: dict[str, list[NodeAddress]]
) -> tuple[ObservedNode, ...]:
    """Offline every desired relay counts as running; only those with a hostname or address get published."""
    return tuple(
        ObservedNode(
            ordinal,
            pod_name=pod_name(ref, ordinal),
            pod_ready=True,
            addresses=tuple(addresses.get(node_name(spec.region_id, ordinal), ())),
        )
        for ordinal in range(spec.replicas)
    )


def _read_mesh_key(path: Path | None, region: LoadedRegion) -> str:
    if path is None:
        print(
            f"derpfleet: {region.ref.name}: generated a new mesh key; keep it with --mesh-key-file",
            file=sys.stderr,
        )
        return generate_mesh_key()
    try:
        return check_mesh_key(path.read_text())
    except OSError as exc:
        raise UsageError(f"--mesh-key-file {path}: {exc.strerror}") from None
    except CredentialError as exc:
        raise UsageError(f"--mesh-key-file {path}: {exc}") from None


def _read_certificate(args: argparse.Namespace, region: LoadedRegion) -> CertMaterial:
    if args.tls_cert_file is None and args.tls_key_file is None:
        print(
            f"derpfleet: {region.ref.name}: generated a new self-signed certificate (new pin); "
            "keep it with --tls-cert-file/--tls-key-file",
            file=sys.stderr,
        )
        return generate_region_certificate(region.ref, region.spec)
    if args.tls_cert_file is None or args.tls_key_file is None:
        raise UsageError("--tls-cert-file and --tls-key-file go together")
    try:
        return load_files(args.tls_cert_file, args.tls_key_file)
    except CertError as exc:
        raise UsageError(str(exc)) from None


def render_files(args: argparse.Namespace) -> list[Manifest]:
    """Everything ``derpfleet render`` prints, in apply order, the DERP map last."""
    regions = load_regions(
        args.files, args.namespace, args.cluster_domain, _relay_debug_allow(args.relay_debug_allow)
    )
    _check_conflicts(regions)
    secrets_given = args.mesh_key_file or args.tls_cert_file or args.tls_key_file
    if secrets_given and len(regions) > 1:
        raise UsageError("--mesh-key-file and --tls-*-file belong to one region: render one region at a time")
    addresses = parse_node_addresses(args.node_address)
    known = {node_name(r.spec.region_id, i) for r in regions for i in range(r.spec.replicas)}
    if unknown := sorted(set(addresses) - known):
        raise UsageError(
            f"--node-address names unknown nodes {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    manifests: list[Manifest] = []
    observed: list[ObservedRegion] = []
    for region in regions:
        spec = region.spec
        mesh_key = _read_mesh_key(args.mesh_key_file, region) if spec.mesh_enabled else None
        tls = _read_certificate(args, region) if spec.tls.mode is TlsMode.SELF_SIGNED else None
        manifests += render_region(region.ref, spec, mesh_key, tls)
        pin = certificate_pin(tls) if tls is not None else ""
        observed.append(_observed(region, pin, _offline_nodes(spec, region.ref, addresses)))
    if args.derp_map or addresses:
        namespace = args.namespace or regions[0].ref.namespace
        manifests.append(
            render_derp_map_configmap(namespace, args.derp_map_name, build_derp_map(observed).dumps())
        )
    return manifests


class _BlockStyleDumper(yaml.SafeDumper):
    """Multi-line strings (the DERP map JSON) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: Sequence[Manifest]) -> str:
    return yaml.dump_all(manifests, Dumper=_BlockStyleDumper, sort_keys=False, explicit_start=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "operator":
            return run_operator(args)
        manifests = render_files(args)
    except UsageError as exc:
        print(f"derpfleet: {exc}".replace("\n", "\nderpfleet: "), file=sys.stderr)
        return 2
    sys.stdout.write(dump_manifests(manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
