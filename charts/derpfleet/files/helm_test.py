"""``helm test``: every operator replica answers /healthz, one of them leads, and it serves the map it published.

Runs in a pod of the operator's own image (``templates/tests/``), as the
operator's ServiceAccount, and reads the release's pods and the map's
ConfigMap in the release namespace.  Each replica is asked at its pod
IP rather than through the Service, so every one of them is checked (and no
cluster DNS is needed).  The leader's ``/derpmap.json`` must be the map in
the ConfigMap (503 while nothing is published yet) and hold every region of
``tests.expectRegions``.  A replica that has just taken over may need a few
seconds, so the checks are tried again for a while before failing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

NAMESPACE = os.environ["RELEASE_NAMESPACE"]
SELECTOR = os.environ["OPERATOR_SELECTOR"]
MAP_NAME = os.environ["DERP_MAP_NAME"]
MAP_KEY = "derpmap.json"
PORT = int(os.environ["OPERATOR_PORT"])
EXPECTED_REGIONS = sorted(json.loads(os.environ.get("EXPECT_REGIONS") or "[]"))
ATTEMPTS = 20
PAUSE = 3.0
HTTP_TIMEOUT = 5.0


def ask(ip: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{ip}:{PORT}{path}", timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def published_map(core: client.CoreV1Api) -> Any:
    """The map in the ConfigMap, or None when the operator has published none yet."""
    try:
        configmap = core.read_namespaced_config_map(MAP_NAME, NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads((configmap.data or {})[MAP_KEY])


def check(core: client.CoreV1Api) -> list[str]:
    """What is wrong right now; nothing when the release passes."""
    listed = core.list_namespaced_pod(NAMESPACE, label_selector=SELECTOR)
    pods: list[dict[str, Any]] = core.api_client.sanitize_for_serialization(listed)["items"]
    ready = {
        pod["metadata"]["name"]: pod["status"]["podIP"]
        for pod in pods
        if pod["status"].get("podIP")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])
    }
    if not ready:
        return [f"no operator pod ({SELECTOR}) is Ready in {NAMESPACE}"]
    problems, leaders = [], []
    for name, ip in sorted(ready.items()):
        status, body = ask(ip, "/healthz")
        print(f"{name} ({ip}) /healthz: {status} {body.strip()}")
        if status != 200 or not body.startswith("ok"):
            problems.append(f"{name}: /healthz answered {status} {body.strip()!r}")
        elif body.strip() == "ok: leading":
            leaders.append(name)
    if len(leaders) != 1:
        return [*problems, f"expected one leading replica, found {leaders or 'none'}"]
    (leader,) = leaders
    status, body = ask(ready[leader], "/derpmap.json")
    published = published_map(core)
    if published is None:
        print(f"ConfigMap {MAP_NAME}: no map published yet; {leader} /derpmap.json: {status}")
        if status != 503:
            problems.append(f"{leader}: /derpmap.json answered {status} with no map published")
        if EXPECTED_REGIONS:
            problems.append(f"no map published yet; expected regions {EXPECTED_REGIONS}")
        return problems
    if status != 200:
        return [*problems, f"{leader}: /derpmap.json answered {status} {body.strip()!r}"]
    served = json.loads(body)
    regions = sorted(int(region_id) for region_id in served.get("Regions") or {})
    print(f"{leader} /derpmap.json: regions {regions}")
    if served != published:
        problems.append(f"{leader} serves a map other than ConfigMap {MAP_NAME}'s")
    if missing := sorted(set(EXPECTED_REGIONS) - set(regions)):
        problems.append(f"regions {missing} are not in the served map")
    return problems


def main() -> int:
    config.load_incluster_config()  # type: ignore[no-untyped-call]
    core = client.CoreV1Api()
    for attempt in range(1, ATTEMPTS + 1):
        problems = check(core)
        if not problems:
            print("ok")
            return 0
        print(f"attempt {attempt}/{ATTEMPTS}: {'; '.join(problems)}", flush=True)
        time.sleep(PAUSE)
    return 1


if __name__ == "__main__":
    sys.exit(main())
