"""The operator process: its HTTP endpoint, leader election, and kopf running the handlers.

Kopf's own peering is switched off (``standalone``): it pauses only for a
peer of *higher* priority, so two equal replicas would both act.  A Lease
decides instead, as for Kubernetes' own controllers; the standby serves
``/healthz`` while it waits, and the map endpoint once it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import kopf
from kopf._core.engines.peering import Identity  # the type of kopf.operator(identity=), not re-exported

from .handlers import FINALIZER, Operator, OperatorConfig, register
from .kubeapi import Kube, load_api_client
from .leader import LeaderElection, LeaseConfig
from .metrics import OperatorMetrics
from .web import Published, build_app, start_server

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "derpfleet.io"


@dataclass(frozen=True, slots=True)
class RunConfig:
    operator: OperatorConfig
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    kubeconfig: str | None = None
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "derpfleet-operator"
    identity: str = ""


def default_identity() -> str:
    """Pod name in a cluster (HOSTNAME), else host and PID: unique per replica."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Kubernetes Events are for what a user acts on; kopf's per-handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # A deleted region waits for its probe timer to stop before its finalizer goes;
    # kopf looks every 60 s by default, which would hold every deletion for a minute.
    settings.background.cancellation_polling = 1.0
    settings.networking.request_timeout = 30


async def run(config: RunConfig, stop: asyncio.Event | None = None) -> None:
    """Serve, wait to lead, then reconcile until stopped; a lost lease means standing by again."""
    stop = stop or asyncio.Event()
    kube = Kube(load_api_client(config.kubeconfig))
    metrics = OperatorMetrics()
    published = Published()
    operator = Operator(kube, config.operator, metrics, published)
    registry = kopf.OperatorRegistry()
    register(registry, operator)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        _configure_kopf(settings)

    # A registry of our own has none of kopf's default login handlers; this one reads the
    # in-cluster service account or $KUBECONFIG, as the kubernetes client does.
    kopf.on.login(registry=registry)(kopf.login_via_client)

    runner = await start_server(
        build_app(published, metrics.registry), config.listen_host, config.listen_port
    )
    # Named here, not by kopf: kopf's own guess asks the password database for the user,
    # which has no entry for the image's uid 65532 (KeyError at start on a real node).
    identity = config.identity or default_identity()
    election = None
    if config.leader_election:
        lease = LeaseConfig(config.lease_namespace, config.lease_name, identity)
        election = LeaderElection(kube, lease)
    try:
        while not stop.is_set():
            if election is not None:
                published.role = "standby"
                if not await _until_stopped(election.acquire(), stop):
                    return
            published.role = "leading"
            if not await _lead(registry, config.operator.namespaces, identity, election, stop):
                return
            # The lease could not be renewed in time (an API server down for longer than the lease):
            # stop acting, as leader election demands, then stand by to lead again once it is back.
            # The last published map is still served meanwhile.
            log.warning("standing by to take the lease again")
    finally:
        if election is not None:
            await election.release()
        await runner.cleanup()


async def _lead(
    registry: kopf.OperatorRegistry,
    namespaces: tuple[str, ...],
    identity: str,
    election: LeaderElection | None,
    stop: asyncio.Event,
) -> bool:
    """Reconcile until stopped (False) or the lease is lost (True)."""
    kopf_stop = asyncio.Event()
    reconciling = asyncio.create_task(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            identity=Identity(identity),
            stop_flag=kopf_stop,
        )
    )
    stopped = asyncio.create_task(stop.wait())
    enders: list[asyncio.Task[Any]] = [stopped]
    if election is not None:
        enders.append(asyncio.create_task(election.hold()))
    await asyncio.wait([reconciling, *enders], return_when=asyncio.FIRST_COMPLETED)
    kopf_stop.set()
    lost = not stopped.done() and not reconciling.done()
    for task in enders:
        task.cancel()
    await reconciling
    return lost


async def _until_stopped(work: Any, stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` comes first; True when the work finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True
