"""Every failure the client raises is a ModelpressError carrying a stable `code` (the server's
problem code, or the failed job's error code), never a bare httpx error."""

from typing import Any


class ModelpressError(Exception):
    def __init__(self, code: str, message: str, *, status: int | None = None, problem: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.problem = problem or {}


class ServerUnreachable(ModelpressError):
    """The server could not be reached (after the bounded retries)."""


class WaitTimeout(ModelpressError):
    """`Job.wait(timeout=...)` ran out before the job finished."""


class JobFailed(ModelpressError):
    """The job ended `failed`; `code` is the job's error code and `job` the job as last seen."""

    def __init__(self, job, code: str, message: str):
        super().__init__(code, message)
        self.job = job


class GuardNotMet(JobFailed):
    """The job failed because its accuracy guard could not be met (`guard_not_met`); the best
    candidate is still downloadable from `job`."""


class FidelityFloorNotMet(JobFailed):
    """The job failed because the compressed model misses its task's safety floor
    (`fidelity_floor_not_met`); the model is still downloadable from `job`, and `shortfalls` lists
    each missed metric with its value and bound."""

    @property
    def shortfalls(self) -> list[dict]:
        return (self.job.metrics.get("floor") or {}).get("shortfalls") or []


# A failed job's error code -> the JobFailed subclass the client raises for it.
JOB_FAILURES: dict[str, type[JobFailed]] = {"guard_not_met": GuardNotMet, "fidelity_floor_not_met": FidelityFloorNotMet}


class JobCancelled(ModelpressError):
    def __init__(self, job):
        super().__init__("job_cancelled", f"job {job.id} was cancelled")
        self.job = job
