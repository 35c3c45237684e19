import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.auth import Forbidden, authenticate
from service.deps import ContextDep, SessionDep
from service.ops.metrics import scrape

router = APIRouter(tags=["operations"])


def _check_access(request: Request, context: ContextDep, session: SessionDep) -> None:
    """Where keys are required: the scraper's MODELPRESS_METRICS_TOKEN, or an operator tenant's
    admin key (the figures span every tenant). Without keys (the embedded default on loopback) anyone local."""
    settings = context.settings
    if not settings.keys_required:
        return
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if settings.metrics_token and scheme.lower() == "bearer" and hmac.compare_digest(
            secret.strip().encode(), settings.metrics_token.encode()):
        return
    caller = authenticate(request, context, session)
    if not caller.operator:
        raise Forbidden("/metrics needs an operator's admin key or the metrics token", required_scope="admin")


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, context: ContextDep, session: SessionDep):
    """Prometheus text format: HTTP requests by route template and status, jobs by status and queue,
    queue depth, failures by code, step durations, heartbeat ages (docs/ARCHITECTURE.md, Operations)."""
    _check_access(request, context, session)
    session.close()  # the scrape opens its own sessions; this one's connection goes back now
    body = scrape(session_factory=context.session_factory, max_series=context.settings.metrics_max_series,
                  multiprocess_dir=context.settings.prometheus_multiproc_dir)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
