"""The operator's one door to the API server: get, list, server-side apply, status patches.

Everything else in the operator works on plain JSON dicts; this module turns
them into requests.  It wraps the synchronous ``kubernetes`` client in
threads (kopf's own loop must never block) and uses its dynamic client, so a
manifest's ``apiVersion``/``kind`` is all it needs to know where to go.
Writes are server-side apply under one field manager, forced: the operator
is the owner of the fields it renders, and a hand edit of one of them is put
back on the next reconcile, while fields it never sets stay the user's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, ResourceNotFoundError

from .naming import MANAGER

log = logging.getLogger(__name__)

Obj = dict[str, Any]
T = TypeVar("T")


class KubeError(Exception):
    """The API server refused a request; the message carries its reason."""


class KubeConflictError(KubeError):
    """A create found the object there, or a write's resourceVersion was stale: someone else was first."""


def load_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (``$KUBECONFIG`` or given)."""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    return k8s_client.ApiClient(configuration)


def _reason(exc: Exception) -> str:
    summary = getattr(exc, "summary", None)
    if callable(summary):
        return str(summary())
    return str(exc)


class Kube:
    """Typed-enough access to any resource by apiVersion and kind."""

    def __init__(self, api_client: k8s_client.ApiClient) -> None:
        self._api_client = api_client
        self._dynamic: DynamicClient | None = None
        self._lock = asyncio.Lock()

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(functools.partial(call, *args, **kwargs))

    async def _client(self) -> DynamicClient:
        async with self._lock:
            if self._dynamic is None:
                self._dynamic = await self._run(DynamicClient, self._api_client)
        return self._dynamic

    async def _resource(self, api_version: str, kind: str) -> Any:
        dynamic = await self._client()
        return await self._run(dynamic.resources.get, api_version=api_version, kind=kind)

    async def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves a kind (e.g. cert-manager's Certificate)."""
        try:
            await self._resource(api_version, kind)
        except ResourceNotFoundError:
            dynamic = await self._client()
            # Discovery is cached; a CRD installed after start needs a fresh look.
            await self._run(dynamic.resources.invalidate_cache)
            try:
                await self._resource(api_version, kind)
            except ResourceNotFoundError:
                return False
        return True

    async def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        resource = await self._resource(api_version, kind)
        dynamic = await self._client()
        try:
            found = await self._run(dynamic.get, resource, name=name, namespace=namespace)
        except NotFoundError:
            return None
        except Exception as exc:
            raise KubeError(f"get {kind} {namespace or ''}/{name}: {_reason(exc)}") from exc
        return dict(found.to_dict())

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> list[Obj]:
        resource = await self._resource(api_version, kind)
        dynamic = await self._client()
        try:
            found = await self._run(dynamic.get, resource, namespace=namespace, label_selector=label_selector)
        except Exception as exc:
            raise KubeError(f"list {kind} in {namespace or 'all namespaces'}: {_reason(exc)}") from exc
        return [dict(item) for item in found.to_dict().get("items") or []]

    async def create(self, manifest: Mapping[str, Any]) -> Obj:
        """Create, failing with :class:`KubeConflictError` if the object exists."""
        meta = manifest["metadata"]
        resource = await self._resource(manifest["apiVersion"], manifest["kind"])
        dynamic = await self._client()
        try:
            created = await self._run(
                dynamic.create, resource, body=dict(manifest), namespace=meta.get("namespace")
            )
        except ConflictError as exc:
            raise KubeConflictError(f"create {manifest['kind']} {meta['name']}: it exists") from exc
        except Exception as exc:
            raise KubeError(f"create {manifest['kind']} {meta['name']}: {_reason(exc)}") from exc
        return dict(created.to_dict())

    async def apply(self, manifest: Mapping[str, Any]) -> Obj:
        """Server-side apply, forced; an unchanged manifest writes nothing (no new resourceVersion).

        A ``metadata.resourceVersion`` in the manifest makes the write
        conditional: a stale one raises :class:`KubeConflictError`.
        """
        meta = manifest["metadata"]
        resource = await self._resource(manifest["apiVersion"], manifest["kind"])
        dynamic = await self._client()
        try:
            applied = await self._run(
                dynamic.server_side_apply,
                resource,
                body=dict(manifest),
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=MANAGER,
                force_conflicts=True,
            )
        except ConflictError as exc:
            raise KubeConflictError(f"apply {manifest['kind']} {meta['name']}: changed meanwhile") from exc
        except Exception as exc:
            raise KubeError(
                f"apply {manifest['kind']} {meta.get('namespace', '')}/{meta['name']}: {_reason(exc)}"
            ) from exc
        return dict(applied.to_dict())

    async def patch_status(self, api_version: str, kind: str, name: str, namespace: str, status: Obj) -> None:
        """Replace ``status`` through the status subresource (a merge patch of the whole status)."""
        resource = await self._resource(api_version, kind)
        dynamic = await self._client()
        try:
            await self._run(
                dynamic.patch,
                resource.status,
                body={"metadata": {"name": name, "namespace": namespace}, "status": status},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
            )
        except NotFoundError:
            log.debug("%s %s/%s is gone; its status is moot", kind, namespace, name)
        except Exception as exc:
            raise KubeError(f"patch status of {kind} {namespace}/{name}: {_reason(exc)}") from exc
