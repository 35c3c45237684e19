"""Job states as data: the one table of moves (service/jobs/states.py) is complete, `transition()`
makes exactly the moves it lists and refuses every other, and the database (SQLite and PostgreSQL,
migrated by Alembic) holds only known statuses; migration 0011 turns a requested cancel into
`cancelling` and back."""

import importlib.util
import itertools
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from service.db import make_engine, make_session_factory
from service.jobs.states import ACTIVE, FINISHED, HELD, TRANSITIONS, IllegalTransition, JobStatus, transition
from service.jobs.tables import JOB_STATUSES, JobRow
from service.migrate import downgrade, upgrade
from tests.conftest import PG_ADMIN_URL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A database of its own per test (migrations go up and down here), on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'states.db'}"
        return
    name = f"modelpress_states_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_job(session, status: str) -> str:
    job_id = f"job_{uuid.uuid4().hex[:12]}"
    session.add(JobRow(id=job_id, tenant_id="default", model_id="mdl_x", status=status, stage=status, progress=0.0,
                       spec={"steps": [], "data": {}}, metrics={}, attempts=0))
    session.commit()
    return job_id


def test_the_table_names_every_status_and_its_groups_agree():
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(TRANSITIONS[s] == frozenset() for s in FINISHED), "a finished job never moves"
    assert all(TRANSITIONS[s] for s in ACTIVE), "every active status has a way out"
    assert FINISHED | ACTIVE == set(JobStatus) and not FINISHED & ACTIVE
    assert HELD == {JobStatus.RUNNING, JobStatus.CANCELLING}
    # Every status can be reached from queued, and every active one can reach a finished one.
    reachable, frontier = {JobStatus.QUEUED}, [JobStatus.QUEUED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()] - reachable:
            reachable.add(nxt)
            frontier.append(nxt)
    assert reachable == set(JobStatus)
    # Cancelling is reached only from running; a queued job is cancelled directly.
    assert {s for s, moves in TRANSITIONS.items() if JobStatus.CANCELLING in moves} == {JobStatus.RUNNING}
    assert JobStatus.CANCELLED in TRANSITIONS[JobStatus.QUEUED]
    assert JobStatus.CANCELLED not in TRANSITIONS[JobStatus.RUNNING]


def test_the_tables_and_the_migration_spell_the_statuses_as_the_enum_does():
    assert JOB_STATUSES == tuple(JobStatus)
    spec = importlib.util.spec_from_file_location("m0004", ROOT / "migrations/versions/0011_cancelling.py")
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.STATUSES == tuple(JobStatus)


def test_transition_makes_every_listed_move_and_refuses_every_other(database_url):
    upgrade(database_url)
    sessions = make_session_factory(make_engine(database_url))
    moved, refused = 0, 0
    with sessions() as session:
        for source, target in itertools.product(JobStatus, JobStatus):
            job_id = add_job(session, source.value)
            if target in TRANSITIONS[source]:
                assert transition(session, job_id, source, target), (source, target)
                moved += 1
            else:
                with pytest.raises(IllegalTransition, match=f"{source} -> {target} is not an allowed transition"):
                    transition(session, job_id, source, target)
                refused += 1
            session.commit()
            expected = target if target in TRANSITIONS[source] else source
            assert session.scalar(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}) == expected.value
    assert (moved, refused) == (sum(map(len, TRANSITIONS.values())), len(JobStatus) ** 2 - moved)
    sessions.kw["bind"].dispose()


def test_a_move_from_a_status_the_job_has_left_does_nothing(database_url):
    """The loser of a race (the job moved since it was read) gets False, not an error, and the row
    is untouched; so is a move by a delivery that does not own the job."""
    upgrade(database_url)
    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        job_id = add_job(session, "running")
        session.execute(text("UPDATE jobs SET run_token = 'mine' WHERE id = :id"), {"id": job_id})
        assert not transition(session, job_id, JobStatus.QUEUED, JobStatus.CANCELLED)
        assert not transition(session, job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED, owner_token="theirs")
        assert transition(session, job_id, JobStatus.RUNNING, JobStatus.CANCELLING, owner_token="mine")
        session.commit()
        assert session.get(JobRow, job_id, populate_existing=True).status == "cancelling"
    sessions.kw["bind"].dispose()


def test_the_database_refuses_a_status_it_does_not_know(database_url):
    upgrade(database_url)
    sessions = make_session_factory(make_engine(database_url))
    with sessions() as session:
        job_id = add_job(session, "running")
        with pytest.raises(IntegrityError):
            session.execute(text("UPDATE jobs SET status = 'paused' WHERE id = :id"), {"id": job_id})
            session.commit()
    sessions.kw["bind"].dispose()


def test_migration_0011_turns_a_requested_cancel_into_cancelling_and_back(database_url):
    upgrade(database_url, "0010_webhooks")
    engine = create_engine(database_url)
    insert = text("INSERT INTO jobs (id, tenant_id, model_id, status, stage, progress, spec, queue, metrics, cancel_requested, "
                  "attempts, created_at) VALUES (:id, 'default', 'mdl_x', :status, 'x', 0, '{}', 'cpu', '{}', :asked, 0, "
                  "CURRENT_TIMESTAMP)")
    rows = {"job_asked": ("running", True), "job_running": ("running", False), "job_queued": ("queued", False)}
    with engine.begin() as connection:
        for job_id, (status, asked) in rows.items():
            connection.execute(insert, {"id": job_id, "status": status, "asked": asked})
    upgrade(database_url, "0011_cancelling")
    with engine.connect() as connection:
        statuses = dict(connection.execute(text("SELECT id, status FROM jobs")).all())
    assert statuses == {"job_asked": "cancelling", "job_running": "running", "job_queued": "queued"}
    downgrade(database_url, "0010_webhooks")
    with engine.connect() as connection:
        back = {job_id: (status, bool(asked)) for job_id, status, asked in
                connection.execute(text("SELECT id, status, cancel_requested FROM jobs")).all()}
    assert back == rows
    engine.dispose()
