from alembic import context
from sqlalchemy import engine_from_config, pool

import service.datasets.tables  # noqa: F401  (register tables on Base.metadata)
import service.jobs.tables  # noqa: F401
import service.models.tables  # noqa: F401
import service.tenants.tables  # noqa: F401
import service.audit.tables  # noqa: F401
import service.upload_sessions.tables  # noqa: F401
import service.ops.tables  # noqa: F401
import service.job_events.tables  # noqa: F401
import service.idempotency.tables  # noqa: F401
import service.webhooks.tables  # noqa: F401
from service.db import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
