"""Transactions end at the boundary: the request (service.deps.get_session) commits when the route
returned and rolls back when it raised, before the response is sent; after-commit actions run only
after a commit, undo actions only after a rollback. Real app, real SQLite; the routes below are
test-only and use the app's own session dependency."""

import uuid

from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.audit.tables import AuditEventRow
from service.db import make_engine, make_session_factory
from service.deps import SessionDep
from service.errors import Conflict
from service.jobs.tables import JobRow
from service.unit_of_work import after_commit, on_rollback, transaction
from tests.test_models_api import assert_problem

events: list[str] = []
router = APIRouter(prefix="/test-uow")


def _audit_row(session, resource_id: str) -> None:
    session.add(AuditEventRow(tenant_id="default", key_prefix="", action="test.uow", resource_id=resource_id))
    after_commit(session, lambda: events.append(f"committed {resource_id}"))
    on_rollback(session, lambda: events.append(f"undone {resource_id}"))


@router.post("/ok/{resource_id}")
def writes_and_returns(resource_id: str, session: SessionDep):
    _audit_row(session, resource_id)
    return {"ok": True}


@router.post("/raises/{resource_id}")
def writes_then_raises(resource_id: str, session: SessionDep):
    _audit_row(session, resource_id)
    session.flush()  # written to the database, not yet committed
    raise Conflict("refused after writing", code="job_finished")


@router.post("/commit-fails/{resource_id}")
def commit_refused(resource_id: str, session: SessionDep):
    _audit_row(session, resource_id)
    # Flushed only at the commit, where the database refuses it (ck_jobs_status).
    session.add(JobRow(id=f"job_{resource_id}", tenant_id="default", model_id="mdl_x", status="bogus", stage="x",
                       progress=0.0, spec={}, metrics={}))
    return {"ok": True}


def stored(settings, resource_id: str) -> bool:
    engine = make_engine(settings.effective_database_url)
    try:
        with make_session_factory(engine)() as session:
            return session.scalar(select(AuditEventRow.id).where(AuditEventRow.resource_id == resource_id)) is not None
    finally:
        engine.dispose()


def test_the_request_commits_on_success_and_rolls_back_on_error(settings):
    from worker.serve import create_app

    app = create_app(settings)
    app.include_router(router)
    events.clear()
    ok, raised, refused = (uuid.uuid4().hex[:8] for _ in range(3))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(f"/test-uow/ok/{ok}").status_code == 200
        assert stored(settings, ok) and events == [f"committed {ok}"]

        events.clear()
        assert_problem(client.post(f"/test-uow/raises/{raised}"), 409, "job_finished")
        assert not stored(settings, raised) and events == [f"undone {raised}"]

        # The commit runs before the response is sent: a commit the database refuses is the
        # response (not a 200 for work that was never stored).
        events.clear()
        response = client.post(f"/test-uow/commit-fails/{refused}")
        assert response.status_code == 500 and response.json()["code"] == "internal_error"
        assert not stored(settings, refused) and events == [f"undone {refused}"]


def test_transaction_commits_or_rolls_back_and_runs_the_right_actions(settings):
    from service.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    events.clear()
    with transaction(sessions) as session:
        _audit_row(session, "kept")
        assert events == []  # nothing runs before the commit
    assert events == ["committed kept"] and stored(settings, "kept")
    events.clear()
    try:
        with transaction(sessions) as session:
            _audit_row(session, "dropped")
            session.flush()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert events == ["undone dropped"] and not stored(settings, "dropped")
    engine.dispose()
