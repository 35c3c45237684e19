"""The figures /metrics reads from the database, and the one the runner writes there (step durations).

Every read is one grouped query whose result is bounded (statuses x queues, at most
`metrics_max_series` error codes), so a scrape costs the same however many jobs there are rows of.
"""

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db import utcnow
from service.jobs.states import JobStatus
from service.jobs.tables import JobRow
from service.ops.tables import StepDurationRow

# Seconds: steps range from a second (dynamic int8 on a small CNN) to hours (distillation).
STEP_DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, math.inf)
LABEL_MAX_CHARS = 64


def bucket_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def _label(value, default: str) -> str:
    text = str(value) if value not in (None, "") else default
    return text[:LABEL_MAX_CHARS]


def record_step_durations(*, session: Session, tenant_id: str, spec_steps: list[dict], step_metrics: list[dict]) -> None:
    """Adds each step's seconds to its histogram bucket (a step resumed from a checkpoint counts with
    the seconds of the delivery that ran it: that one never finished the job). The caller commits,
    in the transaction that finishes the job."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    for spec, measured in zip(spec_steps, step_metrics):
        seconds = measured.get("seconds")
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            continue
        le = bucket_label(next(bound for bound in STEP_DURATION_BUCKETS if seconds <= bound))
        values = {"tenant_id": tenant_id, "step_type": _label(spec.get("type"), "unknown"),
                  "method": _label((spec.get("params") or {}).get("method"), "default"), "le": le,
                  "count": 1, "seconds_sum": float(seconds)}
        statement = insert(StepDurationRow).values(**values)
        # One statement: concurrent workers finishing jobs never lose each other's counts.
        session.execute(statement.on_conflict_do_update(
            index_elements=["tenant_id", "step_type", "method", "le"],
            set_={"count": StepDurationRow.count + 1, "seconds_sum": StepDurationRow.seconds_sum + float(seconds)}))


@dataclass
class StepHistogram:
    buckets: list[tuple[str, int]]  # cumulative, in bucket order, ending with +Inf
    count: int
    seconds_sum: float


def step_histograms(*, session: Session) -> dict[tuple[str, str], StepHistogram]:
    """(step type, method) -> cumulative histogram, summed over tenants."""
    rows = session.execute(
        select(StepDurationRow.step_type, StepDurationRow.method, StepDurationRow.le,
               func.sum(StepDurationRow.count), func.sum(StepDurationRow.seconds_sum))
        .group_by(StepDurationRow.step_type, StepDurationRow.method, StepDurationRow.le)).all()
    per_key: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
    for step_type, method, le, count, seconds in rows:
        per_key.setdefault((step_type, method), {})[le] = (int(count or 0), float(seconds or 0.0))
    histograms = {}
    for key, by_le in per_key.items():
        running, buckets, total_seconds = 0, [], 0.0
        for bound in STEP_DURATION_BUCKETS:
            count, seconds = by_le.get(bucket_label(bound), (0, 0.0))
            running += count
            total_seconds += seconds
            buckets.append((bucket_label(bound), running))
        histograms[key] = StepHistogram(buckets, running, total_seconds)
    return histograms


def jobs_by_status_and_queue(*, session: Session) -> dict[tuple[str, str], int]:
    rows = session.execute(select(JobRow.status, JobRow.queue, func.count()).group_by(JobRow.status, JobRow.queue)).all()
    return {(status, queue): int(count) for status, queue, count in rows}


def failures_by_code(*, session: Session, limit: int) -> dict[str, int]:
    """Failed jobs per error code, the most frequent `limit` codes (jobs are never deleted, so
    these only grow: a counter)."""
    count = func.count().label("n")
    rows = session.execute(
        select(JobRow.error_code, count).where(JobRow.status == JobStatus.FAILED.value)
        .group_by(JobRow.error_code).order_by(count.desc()).limit(limit)).all()
    return {_label(code, "unknown"): int(n) for code, n in rows}


def oldest_heartbeat_age_s(*, session: Session) -> dict[str, float]:
    """Per queue, the age of the stalest heartbeat among running jobs: the heartbeat threads of the
    workers write it every 10 s, so an age near MODELPRESS_STALE_JOB_AFTER_S means a worker is gone."""
    rows = session.execute(
        select(JobRow.queue, func.min(JobRow.heartbeat_at))
        .where(JobRow.status == JobStatus.RUNNING.value, JobRow.heartbeat_at.is_not(None))
        .group_by(JobRow.queue)).all()
    now = utcnow()
    return {queue: max(0.0, (now - _aware(oldest)).total_seconds()) for queue, oldest in rows if oldest is not None}


def _aware(moment) -> datetime:
    # Defensive: should a backend hand min() back as text or naive, it is UTC all the same.
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
