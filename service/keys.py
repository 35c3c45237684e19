"""Server-side key management, for the first key (no key exists yet to call /v1/admin with):

    python -m service.keys create --tenant acme --scopes read,write [--name ci] [--expires-days 90]
    python -m service.keys create --tenant ops --scopes admin --operator
    python -m service.keys list --tenant acme
    python -m service.keys revoke --tenant acme KEY_ID

It talks to the database in the settings (DATABASE_URL, or the embedded default's SQLite) and
creates the tenant when it does not exist yet. The key is printed once, on stdout alone, so
`KEY=$(python -m service.keys create ...)` captures it.
"""

import argparse
import sys
from datetime import timedelta

from service.config import get_settings
from service.db import make_engine, make_session_factory, utcnow
from service.unit_of_work import transaction
from service.errors import DomainError
from service.tenants import service as tenants


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.keys", description="Create, list and revoke API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key (and its tenant if new); prints the key once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", required=True, help="comma-separated: read, write, admin")
    create.add_argument("--name", default="")
    create.add_argument("--expires-days", type=int, default=None)
    create.add_argument("--operator", action="store_true", help="a new tenant whose admin keys manage other tenants")
    listing = commands.add_parser("list", help="a tenant's keys (prefixes only)")
    listing.add_argument("--tenant", required=True)
    revoke = commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("key_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    if settings.embedded_worker and settings.migrate_on_start:
        from service.migrate import upgrade

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            if args.command == "create":
                if session.get(tenants.TenantRow, args.tenant) is None:
                    tenants.create_tenant(session=session, tenant_id=args.tenant, operator=args.operator)
                expires_at = utcnow() + timedelta(days=args.expires_days) if args.expires_days else None
                issued = tenants.create_key(session=session, tenant_id=args.tenant, scopes=args.scopes, name=args.name,
                                            expires_at=expires_at)
                print(f"created key {issued.row.id} (prefix {issued.row.prefix}) for tenant {args.tenant}; "
                      "it is shown only now", file=sys.stderr)
                print(issued.secret)
            elif args.command == "list":
                for key in tenants.list_keys(session=session, tenant_id=args.tenant):
                    state = "revoked" if key.revoked_at else "active"
                    print(f"{key.id}\t{key.prefix}\t{','.join(key.scopes)}\t{state}\t{key.name}")
            else:
                tenants.revoke_key(session=session, tenant_id=args.tenant, key_id=args.key_id)
                print(f"revoked {args.key_id}", file=sys.stderr)
    except DomainError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
