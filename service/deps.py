"""Dependencies injected into routes. Everything comes from `app.state.context`, built once by
`create_app`, so tests hand in their own settings, database and storage."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.dispatch import Dispatcher
from service.datasets.sandboxed import SandboxedDatasetReader
from service.models.sandboxed import SandboxedModelReader
from service.ratelimit import RequestLimiter
from service.storage import ObjectStore


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
    # async on purpose: a sync generator's teardown waits for a thread-pool thread, and under load
    # every thread can be a sync route waiting for a pooled connection that only such a teardown
    # would give back: a deadlock. Closing here, on the event loop, returns the connection at once
    # (a rollback, sub-millisecond); the session is still used by one thread at a time.
    session = context.session_factory()
    try:
        yield session
    finally:
        session.close()


ContextDep = Annotated[AppContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
