"""`manage.py dead_letters [list | requeue JOB... | requeue --all | drop JOB... | drop --finished]`: what
waits in the dead-letter queue (`<RESIZE_QUEUE>.dead`, ADR 0001), and putting it right.

- `list` (the default): one JSON line per dead letter: its job, the job document's status and attempts,
  why and when the broker dead-lettered it. It takes nothing away: the messages are read on one channel
  and go back to the queue when it closes.
- `requeue`: each named (or, with `--all`, every) unfinished job is published again to the resize
  queue, as the API publishes a job, and its dead letters are removed once the broker confirmed the new
  message. The job then runs and is recorded once (its usage record's id is the job's). A finished job
  (`succeeded` / `failed`) or one whose document is gone (swept) is not requeued: drop it.
- `drop`: removes the named dead letters, or with `--finished` those whose job is finished or gone.

The management UI's "get messages" with "requeue = false" deletes a dead letter (the dead-letter queue
has no dead-letter queue of its own), and a message copied there loses Celery's headers: use this."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from resizer.jobs import is_job_id

LIMIT = 10_000  # dead letters read at once (each held unacked on the channel until it closes)


def _job_id(message: Any) -> str | None:
    """The job a dead letter is for: Celery's `id` header, or the task's argument in the body (a message
    copied by hand may have lost its headers); None when neither says (such a letter is only listed)."""
    found = (message.headers or {}).get("id") or message.properties.get("correlation_id")
    if not found:
        try:
            found = json.loads(message.body)[0][0]
        except (ValueError, TypeError, IndexError, KeyError):
            return None
    return found if is_job_id(found) else None


def _death(message: Any) -> dict[str, Any]:
    """Why and when the broker dead-lettered it (its x-death header), as far as it says."""
    headers = message.headers or {}
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths else {}
    when = first.get("time")
    if isinstance(when, datetime):
        when = when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return {"reason": first.get("reason") or headers.get("x-first-death-reason"), "queue": first.get("queue"),
            "count": first.get("count"), "dead_lettered_at": when}


class Command(BaseCommand):
    help = "List the dead-lettered resize jobs, publish them to the resize queue again, or drop them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", nargs="?", choices=["list", "requeue", "drop"], default="list")
        parser.add_argument("jobs", nargs="*", help="job ids (requeue, drop)")
        parser.add_argument("--all", action="store_true", help="requeue: every unfinished job")
        parser.add_argument("--finished", action="store_true", help="drop: every finished (or swept) job")

    def handle(self, *args: object, action: str, jobs: list[str], all: bool, finished: bool,  # noqa: A002
               **options: object) -> None:
        if action == "list" and (jobs or all or finished):
            raise CommandError("list takes no job ids and no --all or --finished")
        if action == "requeue" and (bool(jobs) == all or finished):
            raise CommandError("requeue takes job ids or --all (one of the two)")
        if action == "drop" and (bool(jobs) == finished or all):
            raise CommandError("drop takes job ids or --finished (one of the two)")
        import celeryconfig
        from controlplane.celery import app
        from resizer.jobs import job_load
        from resizer.services import job_requeue
        from resizer.staging import staging_store

        store = staging_store()
        done: dict[str, int] = {"requeued": 0, "dropped": 0, "kept": 0}
        with app.connection_for_write() as connection:
            channel = connection.channel()
            queue = celeryconfig.dead_letter_queue(channel)
            messages = []
            try:
                queue.queue_declare(passive=True)
            except connection.channel_errors:
                pass  # no such queue (nothing was ever dead-lettered on this RESIZE_QUEUE): no dead letters
            else:
                while len(messages) < LIMIT and (message := queue.get(no_ack=False)) is not None:
                    messages.append(message)
            by_job: dict[str | None, list[Any]] = {}
            for message in messages:
                by_job.setdefault(_job_id(message), []).append(message)
            unknown = set(jobs) - set(by_job)
            if unknown:
                raise CommandError(f"no dead letter for job(s) {', '.join(sorted(unknown))}; nothing was changed")
            documents = {job_id: job_load(store, job_id) if job_id else None for job_id in by_job}
            status = {job_id: job.status if job is not None else "gone" for job_id, job in documents.items()}
            if action == "list":
                for job_id, held in by_job.items():
                    job = documents[job_id]
                    for message in held:
                        self.stdout.write(json.dumps({
                            "job": job_id, "status": status[job_id], "attempts": job.attempts if job else None,
                            "customer": job.customer_id if job else None,
                            "created_at": job.created_at if job else None, **_death(message)}))
                return
            unfinished = {job_id for job_id, job in documents.items() if job is not None and not job.finished}
            if action == "requeue":
                refused = sorted(j for j in jobs if j not in unfinished)
                if refused:
                    raise CommandError(f"not requeued: job(s) {', '.join(f'{j} ({status[j]})' for j in refused)} "
                                       "finished or swept: drop their dead letters instead; nothing was changed")
                chosen = set(jobs) if jobs else unfinished
            else:
                chosen = set(jobs) if jobs else set(by_job) - unfinished - {None}  # an unknown job is kept
            for job_id, held in by_job.items():
                if job_id not in chosen:
                    done["kept"] += len(held)
                    continue
                if action == "requeue":
                    try:
                        job_requeue(job_id)  # confirmed by the broker, or it raises (its dead letters then stay)
                    except Exception as e:
                        self.stdout.write(json.dumps(done))
                        raise CommandError(f"job {job_id} could not be published ({type(e).__name__}: {e}); the "
                                           f"{done['requeued']} job(s) before it were requeued (above), it and "
                                           "the rest stay dead-lettered: run it again") from e
                    done["requeued"] += 1
                else:
                    done["dropped"] += len(held)
                for message in held:
                    message.ack()
            # What was not acked goes back to the queue as the channel closes.
        self.stdout.write(json.dumps(done))
