"""Long-form speech synthesis as persistent jobs (``/v1/audio/speech/jobs``).

A job splits its text into sentences and synthesizes them one at a time on the model's own
worker; each finished sentence is written durably under ``MODELHOST_HOME/speech/<id>/``
before its counter is committed, so a job interrupted by a crash resumes at the next
sentence, and its audio equals an uninterrupted run's (sentence ``i`` uses seed ``seed + i``).
"""

from modelhost.speechjobs.db import SpeechJobRepository
from modelhost.speechjobs.files import SentenceFiles
from modelhost.speechjobs.models import SpeechJob, SpeechJobState, SpeechParams
from modelhost.speechjobs.runner import SpeechJobRunner, Synthesize

__all__ = [
    "SentenceFiles",
    "SpeechJob",
    "SpeechJobRepository",
    "SpeechJobRunner",
    "SpeechJobState",
    "SpeechParams",
    "Synthesize",
]
