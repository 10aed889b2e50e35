"""Leader election on a coordination.k8s.io Lease, so two operator replicas never both act.

The same protocol as Kubernetes' own controllers: the leader renews the
Lease every few seconds; a standby takes it over once it has seen no renewal
for a whole lease duration, measured on its own clock (never by comparing
the leader's timestamps with ours, so clock skew cannot split the brain).
Every write is conditional on the resourceVersion read, so of two
candidates only one can win.  A leader that fails to renew in time stops
leading; one that stops gracefully releases the Lease for a fast handover.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass

from .kubeapi import Kube, KubeConflictError, KubeError, Obj

log = logging.getLogger(__name__)

LEASE_SECONDS = 15
RENEW_INTERVAL = 5.0
RETRY_INTERVAL = 2.0


def _micro_time(moment: datetime.datetime) -> str:
    """``metav1.MicroTime`` as the API server wants it (UTC, microseconds, Z)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    lease_seconds: int = LEASE_SECONDS
    renew_interval: float = RENEW_INTERVAL
    retry_interval: float = RETRY_INTERVAL


class LeaderElection:
    def __init__(self, kube: Kube, config: LeaseConfig) -> None:
        self.kube = kube
        self.config = config
        self._seen_record: tuple[object, object] | None = None
        self._seen_at = 0.0

    def _lease(self, acquire_time: str, transitions: int, resource_version: str = "") -> Obj:
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        meta: Obj = {"name": self.config.name, "namespace": self.config.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.config.identity,
                "leaseDurationSeconds": self.config.lease_seconds,
                "acquireTime": acquire_time or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards."""
        config = self.config
        lease = await self.kube.get("coordination.k8s.io/v1", "Lease", config.name, config.namespace)
        try:
            if lease is None:
                await self.kube.create(self._lease("", 0))
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"))
            if record != self._seen_record:
                self._seen_record, self._seen_at = record, time.monotonic()
            duration = int(spec.get("leaseDurationSeconds") or config.lease_seconds)
            expired = time.monotonic() - self._seen_at > duration
            if holder and holder != config.identity and not expired:
                return False
            ours = holder == config.identity
            transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
            acquired = str(spec.get("acquireTime") or "") if ours else ""
            version = str(lease["metadata"]["resourceVersion"])
            await self.kube.apply(self._lease(acquired, transitions, version))
        except KubeConflictError:
            return False
        if not ours:
            log.info("took over the lease %s/%s from %r", config.namespace, config.name, holder or "nobody")
        return True

    async def acquire(self) -> None:
        """Wait until we lead."""
        announced = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info(
                        "leading as %s (lease %s/%s)",
                        self.config.identity,
                        self.config.namespace,
                        self.config.name,
                    )
                    return
            except KubeError as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("another replica leads; standing by")
                announced = True
            await asyncio.sleep(self.config.retry_interval)

    async def hold(self) -> None:
        """Renew until renewal fails for a whole lease duration; then return: we lead no more."""
        last_renewed = time.monotonic()
        while time.monotonic() - last_renewed < self.config.lease_seconds:
            await asyncio.sleep(self.config.renew_interval)
            try:
                if await self.try_acquire_or_renew():
                    last_renewed = time.monotonic()
                else:
                    break
            except KubeError as exc:
                log.warning("renewing the lease: %s", exc)
        log.error("lost the lease %s/%s; stopping to reconcile", self.config.namespace, self.config.name)

    async def release(self) -> None:
        """Give the Lease up so a standby need not wait for it to expire."""
        config = self.config
        try:
            lease = await self.kube.get("coordination.k8s.io/v1", "Lease", config.name, config.namespace)
        except KubeError as exc:
            log.warning("releasing the lease: %s", exc)
            return
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != config.identity:
            return
        released = self._lease("", int((lease.get("spec") or {}).get("leaseTransitions") or 0))
        released["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        released["spec"]["holderIdentity"] = ""
        try:
            await self.kube.apply(released)
        except KubeError as exc:
            log.warning("releasing the lease: %s", exc)
