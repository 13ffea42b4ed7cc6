"""Names of the sealed streams. Both sides derive them from the task and session, so
the server can refuse any stream that is not the one a task allows, and a stream
from another round, task or session cannot be passed off as this one."""


def download_stream_id(job_id: str, round_no: int, task_id: str, session_id: str) -> str:
    return f"{job_id}/{round_no}/{task_id}/down/{session_id}"


def upload_stream_id(job_id: str, round_no: int, task_id: str, session_id: str) -> str:
    return f"{job_id}/{round_no}/{task_id}/up/{session_id}"
