"""/metrics in the Prometheus text format.

Two sources. HTTP counts and latency are recorded in each API process by `ops.http` (with several
API processes, in prometheus_client's multiprocess files, summed at scrape). Everything about jobs
is read from the database at scrape time: jobs by status and queue, queue depth, failures by error
code, step durations (written by the worker that finished the job), heartbeat ages. So the
workers' figures reach the API's /metrics whatever host they run on, and no API process disagrees
with another.
"""

import logging

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from service.jobs.states import JobStatus
from service.ops import service as ops

log = logging.getLogger(__name__)


class JobsCollector:
    """Reads the job figures from the database on every scrape (a handful of grouped queries)."""

    def __init__(self, session_factory, *, max_series: int):
        self.session_factory, self.max_series = session_factory, max_series

    def collect(self):
        up = GaugeMetricFamily("modelpress_metrics_database_up", "1 when the job figures below could be read")
        try:
            with self.session_factory() as session:
                by_status = ops.jobs_by_status_and_queue(session=session)
                failures = ops.failures_by_code(session=session, limit=self.max_series)
                histograms = ops.step_histograms(session=session)
                heartbeats = ops.oldest_heartbeat_age_s(session=session)
        except Exception as exc:  # a scrape while the database is away still answers, and says so
            log.warning("metrics: job figures unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs by status and queue", labels=["status", "queue"])
        queues = sorted({queue for _, queue in by_status} | {"cpu"})
        for status in JobStatus:
            for queue in queues:
                jobs.add_metric([status.value, queue], by_status.get((status.value, queue), 0))
        yield jobs

        depth = GaugeMetricFamily("modelpress_queue_depth", "Jobs waiting for a worker", labels=["queue"])
        for queue in queues:
            depth.add_metric([queue], by_status.get((JobStatus.QUEUED.value, queue), 0))
        yield depth

        failed = CounterMetricFamily("modelpress_job_failures", "Failed jobs by error code", labels=["code"])
        for code, count in sorted(failures.items()):
            failed.add_metric([code], count)
        yield failed

        durations = HistogramMetricFamily("modelpress_step_duration_seconds",
                                          "Wall time of each finished step, by step type and method",
                                          labels=["step_type", "method"])
        for (step_type, method), histogram in sorted(histograms.items())[: self.max_series]:
            durations.add_metric([step_type, method], histogram.buckets, histogram.seconds_sum)
        yield durations

        age = GaugeMetricFamily("modelpress_job_heartbeat_age_seconds",
                                "Age of the stalest heartbeat among running jobs (their workers write one every 10 s)",
                                labels=["queue"])
        for queue, seconds in sorted(heartbeats.items()):
            age.add_metric([queue], seconds)
        yield age


def scrape(*, session_factory, max_series: int, multiprocess_dir: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir:
        MultiProcessCollector(registry, path=multiprocess_dir)
    else:
        registry.register(_ProcessMetrics())
    registry.register(JobsCollector(session_factory, max_series=max_series))
    return generate_latest(registry)


class _ProcessMetrics:
    """This process's own registry (HTTP metrics, process and Python figures), passed through."""

    def collect(self):
        yield from REGISTRY.collect()
