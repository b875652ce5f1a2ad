"""``GET /metrics``: this API process's series plus the cluster state (``core.metrics``).

Unauthenticated, as Prometheus scrapes it; it shows counts and stream names, no user
data. Put it behind the network boundary (or a proxy rule) where that matters.
"""

from __future__ import annotations

from aiohttp import web

from core import metrics
from core.api.http import runtime_key
from core.api.openapi import Body, doc

routes = web.RouteTableDef()

cluster_collector_key = web.AppKey("cluster_collector", metrics.ClusterCollector)


def setup_metrics(app: web.Application) -> None:
    app[cluster_collector_key] = metrics.ClusterCollector()
    app.add_routes(routes)


@routes.get("/metrics")
@doc(
    "Prometheus metrics",
    responses={
        200: Body(
            ["text/plain", "application/openmetrics-text"],
            {"type": "string"},
            "Prometheus text exposition (OpenMetrics when the Accept header asks for it).",
        )
    },
    tags=["operations"],
    auth=False,
)
async def metrics_endpoint(request: web.Request) -> web.Response:
    families = await request.app[cluster_collector_key].families(request.app[runtime_key])
    return metrics.metrics_response(request, families)
