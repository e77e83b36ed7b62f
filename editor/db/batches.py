"""Batch job storage: a job, its records (one per input line), and each record's output line.

A record is `pending` until its result is stored (`done` or `failed`), in the same transaction
that updates the job's counters, so a job interrupted by a restart continues with exactly the
records that have no result yet. Methods are synchronous; the API calls them from threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from editor.db.engine import read_session, write_session
from editor.db.models import BatchJob, BatchRecord, utcnow
from editor.db.services import NotFound

ACTIVE = ("pending", "running")  # job states that the runner picks up (also after a restart)


@dataclass(frozen=True)
class NewRecord:
    """An input line: its id and record, or the error line it already is (bad JSON, ...)."""

    line: int
    custom_id: str
    input: dict[str, Any]
    error_line: dict[str, Any] | None = None  # the output line of a record that cannot run


@dataclass(frozen=True)
class RecordOutcome:
    record_id: int
    line: dict[str, Any]  # the output line: custom_id, output, spans, error
    seed: int | None = None

    @property
    def failed(self) -> bool:
        return self.line.get("error") is not None


class BatchStore:
    """Batch jobs and their records. Returned objects are detached and safe to read."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def create_job(
        self,
        *,
        template: str,
        options: dict[str, Any],
        instruction: str | None,
        model: str | None,
        input_name: str | None,
        records: Sequence[NewRecord],
    ) -> BatchJob:
        """Store a job with all its records in one transaction."""
        with write_session(self.sessions) as session:
            failed = sum(1 for r in records if r.error_line is not None)
            job = BatchJob(
                status="pending",
                template=template,
                options=options,
                instruction=instruction,
                model=model,
                input_name=input_name,
                total=len(records),
                completed=0,
                failed=failed,
            )
            session.add(job)
            session.flush()
            session.add_all(
                BatchRecord(
                    job_id=job.id,
                    line=r.line,
                    record_key=r.custom_id[:500],
                    input=r.input,
                    status="pending" if r.error_line is None else "failed",
                    output=r.error_line,
                    error=None if r.error_line is None else str(r.error_line["error"]["message"]),
                )
                for r in records
            )
            if failed == len(records):
                job.status, job.finished_at = "done", utcnow()
            session.flush()
            return job

    def get_job(self, job_id: int) -> BatchJob:
        with read_session(self.sessions) as session:
            return _job(session, job_id)

    def active_jobs(self) -> list[int]:
        """Ids of jobs still to run, oldest first (a restarted server continues them)."""
        with read_session(self.sessions) as session:
            return list(session.scalars(select(BatchJob.id).where(BatchJob.status.in_(ACTIVE)).order_by(BatchJob.id)))

    def claim(self, job_id: int, runner: str, lease_s: float, *, now: datetime | None = None) -> bool:
        """Take (or renew) the job for `runner` until `lease_s` from now, unless another runner's
        claim still holds or the job has ended. One UPDATE, so two processes cannot both win."""
        now = now or utcnow()
        with write_session(self.sessions) as session:
            result = session.execute(
                update(BatchJob)
                .where(
                    BatchJob.id == job_id,
                    BatchJob.status.in_(ACTIVE),
                    or_(BatchJob.runner.is_(None), BatchJob.runner == runner, BatchJob.lease_until < now),
                )
                .values(runner=runner, lease_until=now + timedelta(seconds=lease_s))
            )
            return bool(cast("CursorResult[Any]", result).rowcount)

    def release(self, runner: str) -> None:
        """Give up every claim of `runner` (a front shutting down), so another front continues at once."""
        with write_session(self.sessions) as session:
            session.execute(update(BatchJob).where(BatchJob.runner == runner).values(runner=None, lease_until=None))

    def pending_records(self, job_id: int, limit: int) -> list[BatchRecord]:
        with read_session(self.sessions) as session:
            return list(
                session.scalars(
                    select(BatchRecord)
                    .where(BatchRecord.job_id == job_id, BatchRecord.status == "pending")
                    .order_by(BatchRecord.line)
                    .limit(limit)
                )
            )

    def set_status(
        self, job_id: int, status: str, *, error: str | None = None, only_if_active: bool = True
    ) -> BatchJob:
        """Move a job to `status` (unless it has already ended, with `only_if_active`)."""
        with write_session(self.sessions) as session:
            job = _job(session, job_id)
            if only_if_active and job.status not in ACTIVE:
                return job
            job.status = status
            if error is not None:
                job.error = error
            if status not in ACTIVE:
                job.finished_at = utcnow()
            session.flush()
            return job

    def save_results(self, job_id: int, outcomes: Sequence[RecordOutcome]) -> BatchJob:
        """Store finished records and count them; the job is done when nothing is pending."""
        with write_session(self.sessions) as session:
            job = _job(session, job_id)
            for outcome in outcomes:
                result = session.execute(
                    update(BatchRecord)
                    .where(
                        BatchRecord.id == outcome.record_id,
                        BatchRecord.job_id == job_id,
                        BatchRecord.status == "pending",
                    )
                    .values(
                        status="failed" if outcome.failed else "done",
                        output=outcome.line,
                        error=None if not outcome.failed else str(outcome.line["error"]["message"]),
                        seed=outcome.seed,
                        updated_at=utcnow(),
                    )
                )
                if cast(
                    "CursorResult[Any]", result
                ).rowcount:  # a record is counted once, even if a result arrives twice
                    if outcome.failed:
                        job.failed += 1
                    else:
                        job.completed += 1
            pending = session.scalar(
                select(func.count()).where(BatchRecord.job_id == job_id, BatchRecord.status == "pending")
            )
            if not pending and job.status in ACTIVE:
                job.status, job.finished_at = "done", utcnow()
            session.flush()
            return job

    def result_lines(self, job_id: int, *, after_line: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """(line, output line) of finished records after `after_line`, in input order."""
        with read_session(self.sessions) as session:
            _job(session, job_id)
            rows = session.execute(
                select(BatchRecord.line, BatchRecord.output)
                .where(BatchRecord.job_id == job_id, BatchRecord.line > after_line, BatchRecord.status != "pending")
                .order_by(BatchRecord.line)
                .limit(limit)
            ).all()
            return [(line, output) for line, output in rows if output is not None]


def _job(session: Session, job_id: int) -> BatchJob:
    job = session.get(BatchJob, job_id)
    if job is None:
        raise NotFound(f"batch job {job_id}")
    return job


__all__ = ["ACTIVE", "BatchStore", "NewRecord", "RecordOutcome"]
