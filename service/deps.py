"""Dependencies injected into routes. Everything comes from `app.state.context`, built once by
`create_app`, so tests hand in their own settings, database and storage."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.dispatch import Dispatcher
from service.datasets.sandboxed import SandboxedDatasetReader
from service.models.sandboxed import SandboxedModelReader
from service.ratelimit import RequestLimiter
from service.storage import ObjectStore
from service.unit_of_work import commit, rollback, run_undo


@dataclass
class AppContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    dispatcher: Dispatcher
    limiter: RequestLimiter
    model_reader: SandboxedModelReader
    dataset_reader: SandboxedDatasetReader


async def get_context(request: Request) -> AppContext:
    # async: a sync dependency costs a hop to the thread pool on every request, for nothing here.
    return request.app.state.context


async def get_session(context: Annotated[AppContext, Depends(get_context)]) -> AsyncIterator[Session]:
    """The request's transaction boundary: commit when the route returned, roll back when it raised
    (the services never commit; service/unit_of_work.py). Function-scoped (`SessionDep`), so this
    runs before the response is sent: a client never sees a success that was not committed, and a
    failed commit is its error response."""
    # async on purpose: a sync generator's teardown waits for a thread-pool thread, and under load
    # every thread can be a sync route waiting for a pooled connection that only such a teardown
    # would give back: a deadlock. Committing and closing here, on the event loop, returns the
    # connection at once (a commit or rollback, about a millisecond); the session is still used by
    # one thread at a time. Only then do the after-commit actions (a broker send, object deletes)
    # wait for a thread: they hold no connection.
    session = context.session_factory()
    try:
        yield session
        done = commit(session)
    except BaseException:
        undo = rollback(session)
        session.close()
        if undo:
            await run_in_threadpool(run_undo, undo)
        raise
    session.close()
    for action in done:
        await run_in_threadpool(action)


ContextDep = Annotated[AppContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
