"""The modelpress Python client: `from modelpress import Client`."""

from modelpress.client import Client, Dataset, Job, Model
from modelpress.errors import FidelityFloorNotMet, GuardNotMet, JobCancelled, JobFailed, ModelpressError, ServerUnreachable, WaitTimeout

__all__ = [
    "Client", "Dataset", "Job", "Model",
    "ModelpressError", "JobFailed", "GuardNotMet", "FidelityFloorNotMet", "JobCancelled", "ServerUnreachable", "WaitTimeout",
]
