"""Jobs: queue, states, persistence, de-duplication, restart recovery."""

from modelhost.jobs.db import JobRepository
from modelhost.jobs.manager import JobManager, JobView, SubmitResult, load_refusal
from modelhost.jobs.models import Job, JobState

__all__ = [
    "Job",
    "JobManager",
    "JobRepository",
    "JobState",
    "JobView",
    "SubmitResult",
    "load_refusal",
]
