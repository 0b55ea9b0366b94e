"""Long analyses (occlusion) run one at a time on a worker thread; clients poll their progress."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException

from ..errors import DeconvnetError
from .schemas import JobInfo


@dataclass
class Job:
    id: str
    kind: str
    image_id: str
    status: str = "queued"
    progress: float = 0.0
    message: str = ""
    error: str | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)

    def info(self) -> JobInfo:
        return JobInfo(
            id=self.id,
            kind=self.kind,
            image_id=self.image_id,
            status=self.status,
            progress=self.progress,
            message=self.message,
            error=self.error,
            result=self.result,
        )


class Jobs:
    """Long analyses run one at a time on a worker thread; clients poll their progress."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()

    def submit(
        self,
        kind: str,
        image_id: str,
        work: Callable[[Callable[[float, str], None]], dict[str, Any]],
        max_pending: int = 4,
    ) -> Job:
        """Queue ``work``; the same analysis of the same image already queued or running is returned
        instead of a new job, and at most ``max_pending`` jobs wait or run at once (else 429)."""
        with self._lock:
            pending = [j for j in self._jobs.values() if j.status in ("queued", "running")]
            for j in pending:
                if j.kind == kind and j.image_id == image_id:
                    return j
            if len(pending) >= max_pending:
                raise HTTPException(
                    429, f"{len(pending)} analyses are already queued or running; try again when one is done"
                )
            job = Job(uuid.uuid4().hex[:16], kind, image_id)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)

        def progress(fraction: float, message: str = "") -> None:
            job.progress = float(min(1.0, max(0.0, fraction)))
            if message:
                job.message = message

        def run() -> None:
            with self._run_lock:
                job.status = "running"
                try:
                    job.result = work(progress)
                    job.progress = 1.0
                    job.status = "done"
                except DeconvnetError as e:
                    job.error, job.status = str(e), "error"
                except Exception as e:  # a bug: report it to the client, keep serving
                    job.error, job.status = f"{type(e).__name__}: {e}", "error"

        threading.Thread(target=run, name=f"job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job
