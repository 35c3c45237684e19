from modelpress.spec.errors import EngineError  # noqa: F401  (the engine's failures share the domain hierarchy)


class GuardNotMet(EngineError):
    """A step's accuracy guard could not be met. `result` is the best candidate it found: the
    runner still evaluates and stores it, then fails the job with this code."""

    def __init__(self, message: str, result):
        super().__init__("guard_not_met", message)
        self.result = result


class FidelityFloorNotMet(EngineError):
    """The final model misses its task's safety floor (worker/engine/tasks/floor.py); like a guard
    not met, the model and its metrics are stored before the job fails with this code."""

    def __init__(self, message: str):
        super().__init__("fidelity_floor_not_met", message)


class TaskDoesNotFitModel(EngineError):
    """The job's given task cannot read the model's outputs (shapes known only when it ran)."""

    def __init__(self, message: str):
        super().__init__("task_does_not_fit_model", message)


class TimeLimitExceeded(EngineError):
    """The job ran past its time limit (settings.job_time_limit_s): raised at a progress check, or by
    a run the heartbeat stopped. An EngineError (the job fails with this code); a step that records
    its candidates' errors and goes on (the guard) lets this one through."""

    def __init__(self, limit_s: float):
        super().__init__("time_limit_exceeded", f"the job ran past its limit of {limit_s:g} s")


class JobCancelled(Exception):
    """Raised at a progress check once a cancel was requested."""


class JobSuperseded(Exception):
    """Raised at a progress check when another delivery of the same job has taken it over."""
