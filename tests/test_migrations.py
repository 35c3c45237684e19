from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import service.datasets.tables  # noqa: F401
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
from service.migrate import downgrade, upgrade


def test_migrations_match_the_tables_and_roundtrip_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    downgrade(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_every_table_has_an_owner():
    for table in Base.metadata.tables.values():
        # A tenant's own row is owned by its id.
        assert "tenant_id" in table.columns or table.name == "tenants", table.name
