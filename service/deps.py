"""Dependencies injected into routes. Everything comes from `app.state.context`, built once by
`create_app`, so tests hand in their own settings, database and storage."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.dispatch import Dispatcher
from service.ratelimit import RequestLimiter
from service.storage import ObjectStore


@dataclass
class AppContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    dispatcher: Dispatcher
    limiter: RequestLimiter


def get_context(request: Request) -> AppContext:
    return request.app.state.context


def get_session(context: Annotated[AppContext, Depends(get_context)]) -> Iterator[Session]:
    with context.session_factory() as session:
        yield session


ContextDep = Annotated[AppContext, Depends(get_context)]
SessionDep = Annotated[Session, Depends(get_session)]
