"""The job core: one background job per request (`job.Job`), run by this process's `manager.JobManager`.

- `job`: a request's life: its files created, the upstream call run, the one ending.
- `reading`: the upstream read loop (events parsed, checked, logged, assembled).
- `ending`: the ending's files (`.raw`, terminal status, ledger line, marker), retried on a full disk.
- `closing`: the closing events of the log, in the relay's format or a face's (`LogFormat`).
- `view`: what those pieces see of a job and of its manager (protocols, no code).
- `manager`: slots, fair shares per key, the thread pools for file work, the idle watch, shutdown.

The core imports nothing from the faces or the operator view: a face hands its log format to the jobs it
creates, and the operator view listens to the ledger lines written (`JobManager.on_counted`).
"""

from .job import Job
from .manager import JobManager
from .view import Events, Listener, LogFormat

__all__ = ["Events", "Job", "JobManager", "Listener", "LogFormat"]
