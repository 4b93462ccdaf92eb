"""Chunk-range tasks on a dask cluster: the protocol `encode --cluster` and `export-tokens --cluster`
share.

Work is cut into tasks over runs of whole chunks. A task writes only its own chunk objects and
records each chunk's completion right after writing it (the store's `ChunkMarks`, or a staged
piece's own record: pipeline/storage/staging.py), so
- dask runs a lost worker's task again elsewhere (and retries a task that raised), and the new
  attempt skips what the lost one finished;
- a killed job resumes: the same command plans tasks for the unfinished chunks only.
Only the driver writes a store's attrs. Workers report progress (images per block) as dask
events on the job's topic; the driver's progress bar adds them up across workers.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable, Sequence

TASKS_PER_WORKER = 4  # enough tasks to balance uneven workers; few enough that each amortises its start
TASK_RETRIES = 2  # for a task that raised (a lost worker's task is re-run by the scheduler regardless)


def new_job_id() -> str:
    """A fresh id for one run of a --cluster command: its task keys and progress topic carry it, and
    the store's progress record names it (tasks of one job write one store together)."""
    return uuid.uuid4().hex[:12]


def task_runs(items: Sequence[int], cluster_size: int) -> list[list[int]]:
    """Cut ascending chunk (or piece) numbers into tasks of consecutive ones, about
    TASKS_PER_WORKER tasks per dask worker."""
    if not items:
        return []
    size = max(1, math.ceil(len(items) / (max(1, cluster_size) * TASKS_PER_WORKER)))
    runs: list[list[int]] = []
    for item in items:
        if runs and item == runs[-1][-1] + 1 and len(runs[-1]) < size:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def run_tasks(client, function: Callable[[Any], None], tasks: Sequence[Any], *, name: str, job: str, bar) -> None:
    """Run `function(task)` for every task on the cluster (the tasks write their results themselves).

    `bar` (tqdm) advances by the images the workers report (`report_progress`) on the job's topic.
    The first task that still fails after TASK_RETRIES cancels the others and its error is raised.
    """
    from distributed import as_completed

    topic = progress_topic(job)
    client.subscribe_topic(topic, lambda event: bar.update(event[1]["images"]))
    futures = [client.submit(function, task, key=f"{name}-{i}-{job}", retries=TASK_RETRIES, pure=False)
               for i, task in enumerate(tasks)]
    try:
        for future in as_completed(futures):
            future.result()  # raises the task's error
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        client.unsubscribe_topic(topic)


def progress_topic(job: str) -> str:
    return f"revq-progress-{job}"


def report_progress(job: str, images: int) -> None:
    """Tell the driver of `job` that this task has done `images` more images (call on a worker)."""
    from distributed import get_worker

    get_worker().log_event(progress_topic(job), {"images": int(images)})


_WORKER_CACHE: dict[str, tuple[Any, Any]] = {}


def worker_cached(kind: str, key: Any, load: Callable[[], Any]) -> Any:
    """The worker process's one object of `kind` (a VAE, a fitted model), loaded by its first task
    and kept for the job's next tasks; a task of another `key` replaces it (bounding GPU memory)."""
    held = _WORKER_CACHE.get(kind)
    if held is None or held[0] != key:
        _WORKER_CACHE.pop(kind, None)
        _WORKER_CACHE[kind] = (key, load())
    return _WORKER_CACHE[kind][1]
