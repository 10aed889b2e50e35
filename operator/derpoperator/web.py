"""The operator's HTTP endpoint: the DERP map for Headscale's ``derp.urls``, health, metrics.

Headscale fetches ``derp.urls`` (JSON only) at start and on its update
interval, so the map is served from memory exactly as last published to the
ConfigMap.  ``/derpmap.yaml`` serves the ConfigMap's other form, the file
Headscale's ``derp.paths`` reads, for setups that fetch it into a file.
Until the first map is published both answer 503, never an empty map: an
empty map would tell Headscale there are no relays at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .derp_map_yaml import headscale_yaml

log = logging.getLogger(__name__)

DERP_MAP_PATH = "/derpmap.json"
DERP_MAP_YAML_PATH = "/derpmap.yaml"
NOT_PUBLISHED = "no DERP map published yet; the operator is starting\n"


@dataclass
class Published:
    """What the endpoint serves; the handlers update it after every publish."""

    derp_map_json: str = ""
    role: str = "starting"
    """starting, standby (another replica leads) or leading."""


def build_app(published: Published, registry: CollectorRegistry) -> web.Application:
    async def derp_map(_: web.Request) -> web.Response:
        if not published.derp_map_json:
            return web.Response(status=503, text=NOT_PUBLISHED)
        return web.Response(text=published.derp_map_json, content_type="application/json")

    async def derp_map_yaml(_: web.Request) -> web.Response:
        if not published.derp_map_json:
            return web.Response(status=503, text=NOT_PUBLISHED)
        return web.Response(text=headscale_yaml(published.derp_map_json), content_type="application/yaml")

    async def healthz(_: web.Request) -> web.Response:
        # Served by the operator's own event loop: a wedged loop fails this probe, which is the point.
        return web.Response(text=f"ok: {published.role}\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(DERP_MAP_PATH, derp_map)
    app.router.add_get(DERP_MAP_YAML_PATH, derp_map_yaml)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen and return the runner (``await runner.cleanup()`` stops it)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("serving %s, %s, /healthz and /metrics on %s:%d", DERP_MAP_PATH, DERP_MAP_YAML_PATH, host, port)
    return runner
