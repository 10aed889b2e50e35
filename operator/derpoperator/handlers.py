"""The kopf handlers: when to reconcile a DerpRegion, probe its relays, and publish the map.

What to do is decided by the pure modules (render, observed, status,
fleet); how to talk to the API server is :mod:`kubeapi`; this module wires
them to events.  One reconcile of a region:

1. read the DerpRegion and parse its spec (a bad spec → Degraded, nothing applied);
2. settle regionID conflicts across the fleet (the later claimant loses);
3. read or create its credentials: the mesh key and the self-signed
   certificate are generated once, when their Secret is missing, and then
   always read back, so they never rotate by accident;
4. observe its pods and their Kubernetes Nodes, render every manifest and
   server-side apply it (unchanged manifests write nothing);
5. compute the status from pods, probes and rollout and patch it if it changed;
6. publish the fleet's DERP map.

Reconciles run on create/update/resume, on every probe timer tick, and
shortly after any change to an object a region owns, so a hand edit is put
back and a dying relay leaves the map without waiting for the next tick.
One region's failure is logged, counted and reported in its own status; it
never stops the others.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from derprelay.certs import CertMaterial
from derprelay.keys import MeshKey

from . import credentials
from .conflicts import RegionKey, find_region_id_conflicts
from .fleet import (
    SOURCES_ANNOTATION,
    ListedRegion,
    Observation,
    assemble_map,
    listed_region,
    parse_time,
    published_sources,
    regions_to_look_up,
    sources_record,
)
from .kubeapi import Kube, KubeError, Obj
from .metrics import OperatorMetrics
from .model import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    DerpRegionSpec,
    InvalidSpecError,
    RegionRef,
    TlsMode,
    parse_region_spec,
)
from .naming import (
    MANAGER,
    REGION_LABEL,
    mesh_secret_name,
    pod_name,
    selector_labels,
    tls_secret_name,
)
from .observed import ObservedRegion, ProbeResult, observe_node, view_region
from .probe import ProbeTarget, probe_region
from .render import DERP_MAP_KEY, render_derp_map_configmap, render_region
from .status import (
    READY,
    Problem,
    compute_status,
    condition_events,
    condition_of,
    invalid_spec_status,
    rollout_from_statefulset,
)
from .web import Published

log = logging.getLogger(__name__)

REGION_API = f"{API_GROUP}/{API_VERSION}"
FINALIZER = "derpfleet.io/derp-map"
"""Held until a deleted region is out of the published DERP map."""
OWNED_CHANGE_DELAY = 1.0
"""Seconds to gather a burst of changes to owned objects into one reconcile."""
OWNED_KINDS = (
    ("", "v1", "pods"),
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
)
"""What a region owns (and the Pods it runs as), watched so a change is answered at once.

Secrets are not watched: that would need list/watch on every Secret in the
cluster; a hand-edited mesh-key Secret is put back on the next probe tick.
"""


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means the whole cluster."""
    map_namespace: str = "default"
    map_name: str = "derp-map"
    probe_interval: float = 15.0
    cluster_domain: str = "cluster.local"
    relay_debug_allow: str = ""
    """Passed to every relay as --debug-allow (see RegionRef.relay_debug_allow)."""


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(slots=True)
class _Credentials:
    mesh_key: str | None = None
    tls: CertMaterial | None = None
    """The certificate the relays serve, whatever its source."""
    pin: str = ""
    """Its pin: in the DERP map for selfSigned regions, and what the prober checks in every mode."""
    problems: list[Problem] = field(default_factory=list)


class Operator:
    """The operator's state between events: observations, probe results, the published map."""

    def __init__(self, kube: Kube, config: OperatorConfig, metrics: OperatorMetrics, published: Published):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.published = published
        self._observations: dict[RegionKey, Observation] = {}
        self._probes: dict[RegionKey, dict[int, ProbeResult]] = {}
        self._pins: dict[RegionKey, credentials.PinHistory] = {}
        """Each region's certificate pin and the one before: relays take a new certificate a while later."""
        self._locks: dict[RegionKey, asyncio.Lock] = {}
        self._publish_lock = asyncio.Lock()
        self._pending: dict[RegionKey, asyncio.Task[None]] = {}

    # --- the fleet ----------------------------------------------------------------

    async def _list_regions(self) -> list[Obj]:
        if not self.config.namespaces:
            return await self.kube.list(REGION_API, KIND)
        regions: list[Obj] = []
        for namespace in self.config.namespaces:
            regions += await self.kube.list(REGION_API, KIND, namespace)
        return regions

    async def _listed(self) -> list[ListedRegion]:
        """Live regions with a usable regionID (the CRD's schema makes that nearly all)."""
        return [found for body in await self._list_regions() if (found := listed_region(body))]

    async def publish(self) -> None:
        """Write the fleet map to its ConfigMap (if it changed) and to the HTTP endpoint.

        A published region the listing lacks is looked up by name first: only
        its absence drops it (the last good map stays, see :mod:`fleet`).
        """
        async with self._publish_lock:
            current = await self.kube.get("v1", "ConfigMap", self.config.map_name, self.config.map_namespace)
            current_data = (current or {}).get("data") or {}
            previous = current_data.get(DERP_MAP_KEY)
            annotations = ((current or {}).get("metadata") or {}).get("annotations") or {}
            claims = await self._listed()
            sources = published_sources(annotations)
            watched = self.config.namespaces
            for namespace, name in regions_to_look_up(claims, previous, sources, watched):
                body = await self.kube.get(REGION_API, KIND, name, namespace)
                found = listed_region(body) if body is not None else None
                if found is not None:
                    log.warning(
                        "the list of DerpRegions lacked %s/%s, which exists: its map entry stays",
                        namespace,
                        name,
                    )
                    claims.append(found)
            derp_map_json = assemble_map(claims, self._observations, previous)
            record = sources_record(claims, derp_map_json)
            configmap = render_derp_map_configmap(
                self.config.map_namespace, self.config.map_name, derp_map_json, {SOURCES_ANNOTATION: record}
            )
            # Every key of ours is compared, so a map published before derpmap.yaml existed gains it too.
            stale = any(current_data.get(key) != value for key, value in configmap["data"].items())
            if stale or annotations.get(SOURCES_ANNOTATION) != record:
                await self.kube.apply(configmap)
                log.info("published the DERP map %s/%s", self.config.map_namespace, self.config.map_name)
            self.published.derp_map_json = derp_map_json
            self.metrics.published_regions.set(len(json.loads(derp_map_json)["Regions"]))

    # --- one region -------------------------------------------------------------------

    def _lock(self, key: RegionKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one region in shape and publish; errors are the caller's (kopf retries them)."""
        key = (namespace, name)
        async with self._lock(key):
            body = await self.kube.get(REGION_API, KIND, name, namespace)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return
            try:
                self._observations[key] = await self._reconcile(body)
            except Exception:
                self.metrics.reconciles.labels("error").inc()
                raise
        await self.publish()

    def reconcile_soon(self, namespace: str, name: str) -> None:
        """Reconcile after a short pause, once for a burst of changes to the region's objects."""
        key = (namespace, name)
        if key in self._pending:
            return

        async def later() -> None:
            await asyncio.sleep(OWNED_CHANGE_DELAY)
            del self._pending[key]
            try:
                await self.reconcile(namespace, name)
            except (KubeError, kopf.TemporaryError) as exc:
                log.warning(
                    "reconcile of %s/%s after a change to its objects failed: %s", namespace, name, exc
                )

        self._pending[key] = asyncio.create_task(later())

    async def forget(self, namespace: str, name: str) -> None:
        """A deleted region: out of the map now; its objects go with it by ownerReference."""
        key = (namespace, name)
        async with self._lock(key):
            self._observations.pop(key, None)
            self._probes.pop(key, None)
            self._pins.pop(key, None)
        self.metrics.forget(key)
        await self.publish()

    async def _credentials(self, ref: RegionRef, spec: DerpRegionSpec) -> _Credentials:
        found = _Credentials()
        if spec.mesh_enabled:
            secret = await self.kube.get("v1", "Secret", mesh_secret_name(ref), ref.namespace)
            if secret is None:
                found.mesh_key = credentials.generate_mesh_key()
                log.info("%s/%s: generated a new mesh key", ref.namespace, ref.name)
            else:
                try:
                    found.mesh_key = credentials.mesh_key_from_secret(secret)
                except credentials.CredentialError as exc:
                    found.problems.append(
                        Problem(
                            "MeshSecretInvalid",
                            f"Secret {mesh_secret_name(ref)}: {exc}; fix it or delete it to have a new mesh key made",
                        )
                    )
        tls_name = tls_secret_name(ref, spec)
        secret = await self.kube.get("v1", "Secret", tls_name, ref.namespace)
        if spec.tls.mode is TlsMode.SELF_SIGNED and secret is None:
            found.tls = credentials.generate_region_certificate(ref, spec)
            log.info("%s/%s: generated the region's self-signed certificate", ref.namespace, ref.name)
        elif secret is None:
            if spec.tls.mode is TlsMode.SECRET:
                found.problems.append(
                    Problem(
                        "TLSSecretMissing",
                        f"Secret {ref.namespace}/{tls_name} (tls.secretName) does not exist; create a "
                        "kubernetes.io/tls Secret with tls.crt and tls.key",
                    )
                )
        else:
            try:
                material = credentials.tls_material_from_secret(secret)
            except credentials.CredentialError as exc:
                found.problems.append(
                    Problem("TLSSecretInvalid", f"Secret {ref.namespace}/{tls_name}: {exc}")
                )
            else:
                found.tls = material
        if found.tls is not None:
            found.pin = credentials.certificate_pin(found.tls)
        if spec.tls.mode is TlsMode.CERT_MANAGER and not await self.kube.has_kind(
            "cert-manager.io/v1", "Certificate"
        ):
            found.problems.append(
                Problem(
                    "CertManagerMissing",
                    "tls.mode is certManager but the cluster has no cert-manager Certificate kind; "
                    "install cert-manager or choose selfSigned or secret",
                )
            )
        return found

    async def _observe_pods(self, ref: RegionRef, replicas: int) -> tuple[dict[int, Obj], dict[str, Obj]]:
        selector = ",".join(f"{k}={v}" for k, v in selector_labels(ref).items())
        pods = {}
        for pod in await self.kube.list("v1", "Pod", ref.namespace, selector):
            name = pod["metadata"]["name"]
            for ordinal in range(replicas):
                if name == pod_name(ref, ordinal):
                    pods[ordinal] = pod
        nodes = {}
        for pod in pods.values():
            node = _node_of(pod)
            if node and node not in nodes:
                found = await self.kube.get("v1", "Node", node)
                if found is not None:
                    nodes[node] = found
        return pods, nodes

    async def _reconcile(self, body: Obj) -> Observation:
        meta = body["metadata"]
        ref = RegionRef(
            meta["name"],
            meta["namespace"],
            meta["uid"],
            self.config.cluster_domain,
            self.config.relay_debug_allow,
        )
        key = (ref.namespace, ref.name)
        generation = int(meta.get("generation", 0))
        previous_status = body.get("status") or {}
        try:
            spec = parse_region_spec(body.get("spec"))
        except InvalidSpecError as exc:
            await self._write_status(
                body,
                invalid_spec_status(previous_status, str(exc), generation, _utc_now()),
            )
            self.metrics.reconciles.labels("problem").inc()
            return None

        problems: list[Problem] = []
        losers = find_region_id_conflicts(await self._listed())
        if key in losers:
            problems.append(Problem("RegionIDConflict", losers[key]))
        creds = await self._credentials(ref, spec)
        problems += creds.problems
        if creds.pin:
            history = self._pins.get(key)
            self._pins[key] = (
                history.observe(creds.pin, _utc_now()) if history else credentials.PinHistory(creds.pin)
            )

        pods, nodes = await self._observe_pods(ref, spec.replicas)
        sts: Obj | None = None
        if not creds.problems:
            pod_ips = {i: str((p.get("status") or {}).get("podIP") or "") for i, p in pods.items()}
            generated_tls = creds.tls if spec.tls.mode is TlsMode.SELF_SIGNED else None
            for manifest in render_region(ref, spec, creds.mesh_key, generated_tls, pod_ips=pod_ips):
                applied = await self.kube.apply(manifest)
                if manifest["kind"] == "StatefulSet":
                    sts = applied
        else:
            sts = await self.kube.get("apps/v1", "StatefulSet", f"derp-{ref.name}", ref.namespace)

        probes = self._probes.get(key, {})
        observed = ObservedRegion(
            name=ref.name,
            namespace=ref.namespace,
            created=parse_time(meta.get("creationTimestamp")),
            spec=spec,
            cert_pin=creds.pin,
            nodes=tuple(
                observe_node(i, pods.get(i), nodes.get(_node_of(pods.get(i))), probes.get(i))
                for i in range(spec.replicas)
            ),
        )
        status = compute_status(
            observed,
            generation=generation,
            rollout=rollout_from_statefulset(sts, spec.replicas),
            problems=problems,
            previous_status=previous_status,
            now=_utc_now(),
        )
        await self._write_status(body, status)
        ready = (condition_of(status, READY) or {}).get("status") == "True"
        self.metrics.record_views(key, view_region(observed), ready)
        self.metrics.reconciles.labels("problem" if problems else "ok").inc()
        return None if problems else observed

    async def _write_status(self, body: Obj, status: Obj) -> None:
        """Patch the status when it changed, and tell the user about Ready flips as Events."""
        previous = body.get("status") or {}
        if previous == status:
            return
        meta = body["metadata"]
        await self.kube.patch_status(REGION_API, KIND, meta["name"], meta["namespace"], status)
        for condition, event_type in condition_events(previous, status):
            # kopf.event, not kopf.info: the latter obeys the posting level, kept at WARNING
            # so kopf's own per-handler messages don't become Events.
            kopf.event(
                kopf.Body(cast(kopf.RawBody, body)),
                type=event_type,
                reason=condition["reason"],
                message=condition["message"],
            )

    # --- probing ----------------------------------------------------------------------

    async def probe(self, namespace: str, name: str) -> None:
        """Probe the region's ready relays, then reconcile so status and map follow the verdicts."""
        key = (namespace, name)
        observed = self._observations.get(key)
        if observed is not None:
            history = self._pins.get(key)
            targets = _probe_targets(observed, history.rotating_out(_utc_now()) if history else ())
            mesh_key = await self._mesh_key(observed)
            results = await probe_region(targets, mesh_key, mesh=observed.spec.mesh_enabled)
            for target in targets:
                result = results[target.ordinal]
                self.metrics.record_probe(key, target.name, result.ok)
                if not result.ok:
                    log.warning(
                        "%s/%s: relay %s failed its probe: %s", namespace, name, target.name, result.message
                    )
            self._probes[key] = results
        await self.reconcile(namespace, name)

    async def _mesh_key(self, observed: ObservedRegion) -> MeshKey | None:
        if not observed.spec.mesh_enabled:
            return None
        ref = RegionRef(observed.name, observed.namespace, "")
        secret = await self.kube.get("v1", "Secret", mesh_secret_name(ref), observed.namespace)
        return MeshKey.from_text(credentials.mesh_key_from_secret(secret)) if secret else None


def _node_of(pod: Mapping[str, Any] | None) -> str:
    return str(((pod or {}).get("spec") or {}).get("nodeName") or "")


def _probe_targets(observed: ObservedRegion, rotating_out: tuple[str, ...]) -> list[ProbeTarget]:
    """Relays with an address and a ready pod, or one only probes can judge: those clients could be sent to."""
    spec = observed.spec
    targets = []
    for view in view_region(observed):
        address = view.ipv4 or view.ipv6
        if not (view.observed.probe_wanted and address):
            continue
        # The operator knows the exact certificate the relays serve, so it pins it in every mode;
        # for a while after it changed, the one before too: the relays take it when the kubelet
        # has updated their volume.
        cert_name = observed.cert_pin or view.host_name
        targets.append(
            ProbeTarget(
                ordinal=view.observed.ordinal,
                name=view.name,
                address=address,
                derp_port=spec.derp_port,
                stun_port=spec.stun_port if spec.stun_enabled else None,
                cert_name=cert_name,
                other_pins=rotating_out if observed.cert_pin else (),
            )
        )
    return targets


API_RETRY_DELAY = 5.0


async def _retry_on_api_errors(
    action: Callable[[str, str], Awaitable[None]], namespace: str | None, name: str
) -> None:
    """Run a region handler; an API error makes kopf retry it shortly instead of giving up."""
    if namespace is None:
        raise kopf.PermanentError("a DerpRegion without a namespace: the CRD is namespaced")
    try:
        await action(namespace, name)
    except KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=API_RETRY_DELAY) from exc


def register(registry: kopf.OperatorRegistry, operator: Operator) -> None:
    """Attach the handlers to a kopf registry (not the global one: the CLI and tests make their own)."""
    config = operator.config

    @kopf.on.resume(API_GROUP, API_VERSION, PLURAL, registry=registry)
    @kopf.on.create(API_GROUP, API_VERSION, PLURAL, registry=registry)
    @kopf.on.update(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def region_changed(namespace: str | None, name: str, **_: Any) -> None:
        await _retry_on_api_errors(operator.reconcile, namespace, name)

    @kopf.on.delete(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def region_deleted(namespace: str | None, name: str, **_: Any) -> None:
        await _retry_on_api_errors(operator.forget, namespace, name)

    @kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=config.probe_interval, registry=registry)
    async def probe_tick(namespace: str | None, name: str, **_: Any) -> None:
        assert namespace is not None, "DerpRegion is namespaced"
        try:
            await operator.probe(namespace, name)
        except KubeError as exc:
            log.warning("probe round of %s/%s: %s", namespace, name, exc)

    async def owned_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        region = labels.get(REGION_LABEL)
        if namespace and region:
            operator.reconcile_soon(namespace, region)

    for group, version, plural in OWNED_KINDS:
        kopf.on.event(
            group=group,
            version=version,
            plural=plural,
            labels={"app.kubernetes.io/managed-by": MANAGER},
            registry=registry,
        )(owned_changed)
