from sqlalchemy import BigInteger, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base


class StepDurationRow(Base):
    """One bucket of the step-duration histogram: how many finished steps of this type and method
    took at most `le` seconds but more than the bucket below, and their summed seconds.

    Written by `jobs.service.finish` in the transaction that finishes the job (so a job is counted
    once, by whichever worker finished it); read by every API process at scrape time, so the
    workers' figures reach /metrics on any host and survive restarts."""

    __tablename__ = "step_durations"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The bucket's upper bound as Prometheus writes it ("0.5", "+Inf").
    le: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds_sum: Mapped[float] = mapped_column(Float, default=0.0)
