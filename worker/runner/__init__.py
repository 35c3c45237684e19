"""The job runner: one function every technique plugs into. Read in this order:

lifecycle.py  claim -> run -> final status; progress, heartbeat, cancel, deadline; the `Outcome`.
inputs.py     the job's model and datasets, loaded and given their roles; the preflight read of its graph.
steps.py      each step in turn, each feeding the next; step checkpoints and named outputs.
evaluation.py the final model against the original (plus the last step's own measurements).
artifacts.py  metrics.json, report.html, recipe.json and the uploads.

It reaches job state only through service.jobs.runner_api (plain data), and techniques only through the step
registry: it imports no technique.
"""

from worker.runner.lifecycle import Outcome, RunnerDeps, WorkerStopping, run_job

__all__ = ["Outcome", "RunnerDeps", "WorkerStopping", "run_job"]
