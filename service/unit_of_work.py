"""Where a transaction ends: at the boundary, never inside a service function.

The boundaries are the request (`service.deps.get_session`: commit when the route succeeded, roll
back when it raised), scripts and tests (`transaction()`), and the worker's door to job state
(`service.jobs.runner_api`, one transaction per call). Services add, change and flush; they never
commit. What must wait for the commit (send a job to the broker, delete a removed model's objects)
they register with `after_commit`; what undoes an outside effect when the transaction rolls back
(an uploaded object whose row was never stored) with `on_rollback`. The boundary runs both once the
session is closed, so no connection is held while they run.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

Action = Callable[[], None]
_AFTER_COMMIT, _ON_ROLLBACK = "modelpress.after_commit", "modelpress.on_rollback"


def after_commit(session: Session, action: Action) -> None:
    """Run `action` once this session's work is committed; never if it rolls back."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def on_rollback(session: Session, action: Action) -> None:
    """Run `action` if this session's work is rolled back (it undoes something outside the database)."""
    session.info.setdefault(_ON_ROLLBACK, []).append(action)


def commit(session: Session) -> list[Action]:
    """Commit; returns the after-commit actions, for the caller to run once the session is closed."""
    session.commit()
    session.info.pop(_ON_ROLLBACK, None)
    return session.info.pop(_AFTER_COMMIT, [])


def rollback(session: Session) -> list[Action]:
    """Roll back; returns the undo actions, for the caller to run with `run_undo`."""
    session.rollback()
    session.info.pop(_AFTER_COMMIT, None)
    return session.info.pop(_ON_ROLLBACK, [])


def run_undo(actions: list[Action]) -> None:
    # An undo that fails must not hide the error that caused the rollback.
    for action in actions:
        try:
            action()
        except Exception:
            log.warning("an undo after a rollback failed", exc_info=True)


@contextmanager
def transaction(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work outside a request (scripts, tests): commit on success, roll back on error."""
    session = session_factory()
    try:
        yield session
        done = commit(session)
    except BaseException:
        undo = rollback(session)
        session.close()
        run_undo(undo)
        raise
    session.close()
    for action in done:
        action()
