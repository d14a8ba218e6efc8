"""Redis key names, built in one place (as rq's job.py does): a job's hash and tables, the job index, the
one-active-job lock of a scope, and a scope's task claims and fencing tokens."""
from __future__ import annotations

INDEX = "sam3:jobs"  # sorted set: job ids by creation time
JOB_PREFIX = "sam3:job:"


def job(job_id: str) -> str:
    """Hash: the job's stored fields (JSON values) and counters (integers)."""
    return JOB_PREFIX + job_id


def done(job_id: str) -> str:
    """Set: tasks the job has finished (predicted, skipped or failed)."""
    return job(job_id) + ":done"


def workers(job_id: str) -> str:
    """Hash: tasks finished per worker."""
    return job(job_id) + ":workers"


def errors(job_id: str) -> str:
    """List: the latest errors, newest first."""
    return job(job_id) + ":errors"


def chunks(job_id: str) -> str:
    """String: the plan (chunks of task ids, JSON); its presence marks the plan complete."""
    return job(job_id) + ":chunks"


def chunks_done(job_id: str) -> str:
    """Set: chunk indexes finished."""
    return job(job_id) + ":chunks_done"


def results(job_id: str) -> str:
    """Hash: an evaluation's result per task (JSON)."""
    return job(job_id) + ":results"


def report(job_id: str) -> str:
    """Hash: an evaluation's report ("json") and page ("html")."""
    return job(job_id) + ":report"


def of_job(job_id: str) -> tuple[str, ...]:
    """Every key of a job (to expire them together)."""
    return (job(job_id), done(job_id), workers(job_id), errors(job_id), chunks(job_id), chunks_done(job_id),
            results(job_id), report(job_id))


def lock(scope: str) -> str:
    """String: the id of the job that holds the scope ("<project>:<model_version>")."""
    return f"sam3:lock:{scope}"


def claim_prefix(scope: str) -> str:
    """"<prefix><task>" holds "<owner>|<token>" while a runner's lease on the task lasts."""
    return f"sam3:claim:{scope}:"


def fence(scope: str) -> str:
    """Hash: per task, the last fencing token given out."""
    return f"sam3:fence:{scope}"
