"""The worker's own cost for one job beyond the engine, in-process: resizer.services.job_run on a staged
256 KB photo (fit 256x256, JPEG q85), staging and the usage spool under /dev/shm, no shipper.

    .venv/bin/python bench/bench_job_run.py [--jobs 300] [--root <a worktree of another commit>]

Prints job_run's thread CPU per job, the engine's share (the job's own cpu_seconds) and the rest (job
documents, input and result files, the usage record's fsync, the notice). Compare commits by running it
on a worktree of each (`--root`), alternately: run-to-run noise is about ±10%.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

PARAMS = {"width": 256, "height": 256, "fit": "inside", "format": "jpeg", "quality": 85, "gravity": "center",
          "background": None, "enlarge": False}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    scratch = Path(tempfile.mkdtemp(prefix="job-run-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    os.environ.update({"STAGING_URL": f"file://{scratch / 'staging'}", "METERING_SPOOL_DIR": str(scratch / "spool"),
                       "METERING_SHIPPER": "false", "DJANGO_SETTINGS_MODULE": "controlplane.settings"})
    import django

    django.setup()
    from controlplane.celery import app
    from resizer.jobs import job_create
    from resizer.services import job_run
    from resizer.staging import staging_store

    data = (Path(args.root).parent / "shared" / "corpus" / "photo-256k-1.jpg").read_bytes()
    facts = {"format": "jpeg", "width": 1280, "height": 960, "bytes": len(data), "frames": 1}

    def one(producer: object) -> tuple[float, float]:
        job, _ = job_create(staging_store(), customer_id=str(uuid.uuid4()), key_id="k", request_id="r",
                            params=PARAMS, input_facts=facts, data=data)
        started = time.thread_time()
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
        return time.thread_time() - started, done.cpu_seconds or 0.0

    try:
        with app.producer_or_acquire() as producer:
            for _ in range(20):  # warm-up
                one(producer)
            runs = [one(producer) for _ in range(args.jobs)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    total, engine = (sum(r[i] for r in runs) / len(runs) * 1000 for i in (0, 1))
    print(f"job_run {total:.2f} ms, engine {engine:.2f} ms, beyond the engine {total - engine:.2f} ms "
          f"({args.jobs} jobs)")


if __name__ == "__main__":
    main()
