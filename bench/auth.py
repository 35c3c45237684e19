"""What keys and the rate limiter cost per request: `GET /v1/models` (an empty list) through the
app in-process, without a key (the embedded default), with a key (memory limiter) and with a key
and the Redis limiter, on SQLite. Prints a table.

    python -m bench.auth [--requests 300] [--redis redis://127.0.0.1:6379/12]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.unit_of_work import transaction
from worker.serve import create_app
from service.migrate import upgrade
from service.tenants import service as tenants


def _key(settings: Settings) -> str:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    with transaction(make_session_factory(engine)) as session:
        tenants.create_tenant(session=session, tenant_id="bench", quotas={"max_requests_per_minute": 10**9})
        secret = tenants.create_key(session=session, tenant_id="bench", scopes="read").secret
    engine.dispose()
    return secret


def measure(settings: Settings, headers: dict, requests: int) -> list[float]:
    with TestClient(create_app(settings)) as client:
        for _ in range(20):
            client.get("/v1/models", headers=headers)
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            assert client.get("/v1/models", headers=headers).status_code == 200
            times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plain = Settings(data_dir=base / "plain")
        keyed = Settings(data_dir=base / "keyed", auth="on")
        key = {"Authorization": f"Bearer {_key(keyed)}"}
        redis = Settings(data_dir=base / "keyed", auth="on", rate_limit_storage_url=args.redis)
        for name, settings, headers in (("no key (embedded default)", plain, {}), ("key, memory limiter", keyed, key),
                                        ("key, Redis limiter", redis, key)):
            times = sorted(measure(settings, headers, args.requests))
            rows.append((name, statistics.median(times), times[int(0.95 * len(times)) - 1]))
    print(f"| mode | requests | p50 ms | p95 ms |\n|---|---|---|---|")
    for name, p50, p95 in rows:
        print(f"| {name} | {args.requests} | {p50:.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
