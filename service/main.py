"""The app factory: builds settings, database, storage and dispatcher once, and wires the routers."""

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import text

from service.api_docs import install_api_docs
from service import confine
from service.auth import authenticate
from service.config import Settings, get_settings
from service.confine import Confinement
from service.datasets.sandboxed import SandboxedDatasetReader
from service.datasets.views import router as datasets_router
from service.db import make_engine, make_session_factory
from service.deps import AppContext, ContextDep
from service.dispatch import DispatcherFactory, make_dispatcher
from service.errors import DomainError, install_error_handlers
from service.guards import RequestGuard
from service.idempotency.middleware import IdempotencyMiddleware
from service.job_events.views import router as job_events_router
from service.openapi import PROBLEM_RESPONSES
from service.ops.http import ObservedRequests
from service.ops.tracing import install_tracing
from service.ops.views import router as ops_router
from service.jobs.views import presets_router
from service.jobs.views import router as jobs_router
from service.models.sandboxed import SandboxedModelReader
from service.models.views import router as models_router
from service.ratelimit import RequestLimiter
from service.storage import open_store
from service.tenants.views import router as admin_router
from service.upload_sessions.views import router as uploads_router
from service.webhooks.views import router as webhooks_router

log = logging.getLogger("modelpress")


class NotReady(DomainError):
    status, code, title = 503, "not_ready", "Service unavailable"


def _ping_database(context: AppContext) -> None:
    with context.session_factory() as session:
        session.execute(text("SELECT 1"))


def _parse_confinement(settings: Settings) -> Confinement | None:
    """The namespaces upload parsers run in, when this kernel allows them (probed once, logged)."""
    if not settings.parse_namespaces:
        return None
    folders = [settings.data_dir]
    if "://" not in settings.effective_storage_url:
        folders.append(Path(settings.effective_storage_url))
    confinement = Confinement.of(*folders, inbox_root=settings.tmp_dir / "sandbox")
    if confine.available(confinement):
        log.info("upload parsers run without network and without sight of %d data folder(s)", len(confinement.hidden))
        return confinement
    log.warning("upload parsers run with rlimits only: this kernel refuses user namespaces")
    return None


def _shows_details(request: Request, context: AppContext) -> bool:
    """Readiness details (error classes, worker and auth modes) for an admin only: the local user
    of the embedded default, or a request with a valid admin key. Never an error: a probe without
    a key (or while the database is down) gets the plain answer."""
    if not context.settings.keys_required:
        return True
    if not request.headers.get("authorization"):
        return False
    try:
        with context.session_factory() as session:
            return "admin" in authenticate(request, context, session).scopes
    except Exception:  # an unknown key, a rate limit or a database away: no details, and no error
        return False


def _log_auth_mode(settings: Settings) -> None:
    if settings.auth_mode == "local_without_keys":
        log.info("no API keys required: the embedded default on %s (loopback only); every request acts as tenant %r",
                 settings.host, settings.default_tenant)
    elif settings.auth_mode == "off":
        log.warning("MODELPRESS_AUTH=off: no API keys required, anyone who reaches %s can read and delete every model",
                    settings.host)
    else:
        log.info("API keys required (Authorization: Bearer <key>); create the first with `python -m service.keys create`")


def create_app(settings: Settings | None = None, embedded_worker: DispatcherFactory | None = None) -> FastAPI:
    """`embedded_worker` builds the in-process dispatcher when no broker is configured; the
    composition root `worker.serve` passes it (the API never imports the worker)."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    settings.load_plugins()
    if settings.embedded_worker and settings.migrate_on_start:
        from service.migrate import upgrade

        upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow)
    session_factory = make_session_factory(engine)
    store = open_store(settings.effective_storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    dispatcher = make_dispatcher(settings, session_factory, store, embedded_worker)
    limiter = RequestLimiter(settings.effective_rate_limit_storage_url)
    confinement = _parse_confinement(settings)
    model_reader = SandboxedModelReader(limits=settings.model_parse_limits, spares=settings.parse_warm_children,
                                        confinement=confinement)
    dataset_reader = SandboxedDatasetReader(limits=settings.dataset_parse_limits, spares=settings.parse_warm_children,
                                            confinement=confinement)
    context = AppContext(settings=settings, session_factory=session_factory, store=store, dispatcher=dispatcher,
                         limiter=limiter, model_reader=model_reader, dataset_reader=dataset_reader)
    _log_auth_mode(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher.start()
        model_reader.start()
        dataset_reader.start()
        yield
        model_reader.close()
        dataset_reader.close()
        dispatcher.stop()
        engine.dispose()

    app = FastAPI(title="modelpress", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Compression as a service for computer-vision models. Errors are RFC 9457 problem+json with a stable `code`.")
    app.state.context = context
    install_error_handlers(app)
    # Innermost: it keeps the answers the routes give (CORS and nosniff are added on replays too).
    app.add_middleware(IdempotencyMiddleware)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"])

    @app.middleware("http")
    async def no_sniffing(request, call_next):
        response = await call_next(request)
        # A browser must take every answer as the type it is labelled with (no HTML guessed from an upload).
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    app.add_middleware(RequestGuard, max_json_body_bytes=settings.max_json_body_bytes,
                       body_idle_timeout_s=settings.body_idle_timeout_s, allowed_hosts=settings.allowed_host_names)
    # Outermost: a guard's refusal also gets a request id and is counted.
    app.add_middleware(ObservedRequests, request_id_max_chars=settings.request_id_max_chars)
    install_tracing(app, endpoint=settings.otel_endpoint)
    install_api_docs(app)
    app.include_router(admin_router, responses=PROBLEM_RESPONSES)
    app.include_router(models_router, responses=PROBLEM_RESPONSES)
    app.include_router(datasets_router, responses=PROBLEM_RESPONSES)
    app.include_router(jobs_router, responses=PROBLEM_RESPONSES)
    app.include_router(job_events_router, responses=PROBLEM_RESPONSES)
    app.include_router(presets_router, responses=PROBLEM_RESPONSES)
    app.include_router(uploads_router, responses=PROBLEM_RESPONSES)
    app.include_router(ops_router)
    app.include_router(webhooks_router, responses=PROBLEM_RESPONSES)

    @app.get("/healthz", tags=["health"])
    @app.head("/healthz", include_in_schema=False)
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request, context: ContextDep):
        """200 when database, storage and broker answer, else 503 `not_ready`. Anyone (a load
        balancer) sees which dependency is down; why, and how the service runs, only an admin."""
        checks, causes = {}, {}
        for name, probe in (
            ("database", lambda: _ping_database(context)),
            ("storage", context.store.ping),
            ("broker", context.dispatcher.ping),
        ):
            try:
                probe()
                checks[name] = "ok"
            except Exception as exc:  # readiness reports every failure instead of raising the first
                # The class only: a message can hold a path or a host; the log has the whole of it.
                log.warning("readiness: %s unreachable: %s", name, exc)
                checks[name], causes[name] = "error", exc.__class__.__name__
        details = _shows_details(request, context)
        if details:
            checks = {name: f"error: {causes[name]}" if name in causes else state for name, state in checks.items()}
        if causes:
            raise NotReady("a dependency is unreachable", checks=checks)
        body = {"status": "ready", "checks": checks}
        if details:
            body |= {"worker": "embedded" if settings.embedded_worker else "celery", "auth": settings.auth_mode,
                     "upload_parsers": "namespaces" if confinement else "rlimits only"}
        return body

    return app
