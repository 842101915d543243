"""Multi-process runs under `torchrun`: the job protocol between rank 0 and the other ranks.

    torchrun --nproc_per_node=2 -m totobench run --model toto-tiny --tasks imagenet ...

The process group itself is `totobench.parallel`'s. Rank 0 runs the tasks exactly as one process
would; each time it needs features it sends an extraction job (the dataset and settings, pickled)
with `send_job`, every rank extracts its share of the batches into checked cache entries and
reports back (`send_report` / `collect_reports`), and rank 0 assembles the features by dataset
index - so the order of samples, and therefore every number, is the single-process run's. The
other ranks wait in `receive_job` (see `totobench.features.extract.serve_extraction`) until rank 0
sends STOP, then exit 0. Only rank 0 writes result files. The feature cache folder must be
shared by all ranks (the same machine, or a shared file system).

Two job kinds: "extract" (features.extract.run_extraction_job) and "run": `job["fn"](backbone,
device, **job["kwargs"])` on every rank (`run_job`), in step with rank 0 which calls the same
function itself. A streamed probe trains so (tasks/streaming.py), data-parallel: every rank reads
and forwards only its share of each batch and keeps it, and the probe all-reduces gradients,
statistics and counts through the process group (probes/linear.py, probes/attentive.py), so the
ranks stay in step inside the job; only their reports come back here. `fn` must be a module-level
function (it is pickled by name).
"""

from __future__ import annotations

import pickle
from typing import Any

from totobench.errors import TotobenchError
from totobench.parallel import broadcast_object, gather_objects, info

STOP = {"op": "stop"}


def picklable(obj: Any) -> bool:
    """Whether a dataset can be shipped to the other ranks."""
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means: extract on rank 0 alone
        return False
    return True


def send_job(job: dict) -> None:
    """Rank 0: hand an extraction job (or STOP) to every other rank."""
    broadcast_object(job)


def receive_job() -> dict | None:
    """Ranks > 0: wait for rank 0's next job; None when it sends STOP."""
    job = broadcast_object(None)
    return None if job is None or job.get("op") == "stop" else job


def failure_report(err: Exception) -> dict:
    """The report of a rank whose share of a job raised `err` (rank 0 raises it as one line)."""
    return {"error": f"rank {info().rank}: {err}", "user_error": isinstance(err, TotobenchError)}


def send_report(report: dict) -> None:
    """Hand this rank's job report (or its `failure_report`) to rank 0 and ignore the others':
    what ranks > 0 do, and rank 0 when its own share failed (it raises that error itself)."""
    gather_objects(report)


def collect_reports(report: dict) -> list[dict]:
    """Rank 0: every rank's job report, rank 0's (`report`) first. Raises the first failure a
    rank reported: TotobenchError when it was a user error, else RuntimeError."""
    reports = gather_objects(report)
    for r in reports:
        if "error" in r:
            raise (TotobenchError if r.get("user_error") else RuntimeError)(r["error"])
    return reports


def run_job(job: dict, backbone, device) -> dict:
    """Ranks > 0: run a "run" job (its function, on this rank's backbone and device); the report
    rank 0 gathers once every rank is done (with the function's own, when it returns a dict)."""
    report = job["fn"](backbone, device, **job["kwargs"])
    return {"computed": 0, "reused": 0, **(report if isinstance(report, dict) else {})}
