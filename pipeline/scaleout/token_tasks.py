"""`export-tokens --cluster`: tasks on a dask cluster tokenize runs of whole chunks into one token store.

A token store has one row per latent, so every chunk's place is known up front: each task reads
its latent chunks, tokenizes them exactly as a single-process export does (chunk by chunk, in
batches from each chunk's start) and writes its own token chunks, marking each one written in
`chunks_done` (the store's chunk marks; the protocol is pipeline/scaleout/chunk_tasks.py's). A lost worker's task runs again and skips the marked
chunks; a killed export resumes from them, and also from the rows an export without --cluster
committed. At the end the driver commits every row, removes the marks and finishes the store, which
then equals a single-process export's array for array. While it runs, the store's progress record
names the job whose tasks write it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from revq_pipe.pipeline.scaleout.chunk_tasks import report_progress, run_tasks, task_runs, worker_cached
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.storage.store import LatentStore
from revq_pipe.pipeline.storage.token_store import TokenStore

CHUNKS_DONE = "chunks_done"


def written_on_cluster(tokens: TokenStore) -> bool:
    """Whether an unfinished token store is being written by `export-tokens --cluster`."""
    return tokens.chunk_marks(CHUNKS_DONE) is not None


@dataclass
class TokenizeTask:
    run: str  # the run directory's absolute path, or a hub id: what each worker loads
    run_sha256: str  # the weights every worker must have
    store: str  # the latent store's URL
    tokens: str  # the token store's URL
    device: str  # --device as given: each worker resolves it
    batch_size: int
    job: str
    chunks: list[int] | None = None


def fill_on_cluster(client, tokens: TokenStore, task: TokenizeTask, cluster_size: int,
                    bar_from: Callable[[int], Any]) -> None:
    """Tokenize every chunk of `tokens` not written yet, on `cluster_size` dask workers, then finish
    the store; `bar_from(rows already written)` makes the progress bar."""
    marks = tokens.chunk_marks(CHUNKS_DONE, create=True)
    tokens.commit(tokens.rows_done, {"job": task.job})
    # Chunks below rows_done were committed by an export without --cluster.
    todo = [chunk for chunk in marks.undone()
            if min((chunk + 1) * tokens.chunk_size, len(tokens)) > tokens.rows_done]
    with bar_from(len(tokens) - sum(_rows(tokens, chunk) for chunk in todo)) as bar:
        run_tasks(client, tokenize_task, [replace(task, chunks=run) for run in task_runs(todo, cluster_size)],
                  name="tokenize", job=task.job, bar=bar)
    tokens.commit(len(tokens))
    tokens.remove_chunk_marks(CHUNKS_DONE)
    tokens.finish()


def tokenize_task(task: TokenizeTask) -> None:
    """Tokenize and write the task's chunks, marking each when written. Runs on a worker."""
    from revq_pipe.pipeline.device import resolve_device
    from revq_pipe.pipeline.storage.run_dir import Run

    device = resolve_device(task.device)

    def load() -> Run:
        run = Run.load(task.run, device)
        if run.sha256 != task.run_sha256:
            raise UserError(f"the run {task.run} on this worker holds other weights than the driver's")
        return run

    model = worker_cached("run", (task.run, task.run_sha256, str(device)), load).model
    latents = LatentStore.open(task.store)
    tokens = TokenStore.open(task.tokens, mode="r+")
    marks = tokens.chunk_marks(CHUNKS_DONE)
    for chunk in task.chunks:
        start = chunk * tokens.chunk_size
        stop = start + _rows(tokens, chunk)
        ids = model.tokenize_batched(latents.checked_rows(start, stop), task.batch_size)
        tokens.write(start, ids, latents.labels[start:stop], latents.keys[start:stop])
        marks.mark(chunk)
        report_progress(task.job, stop - start)


def _rows(tokens: TokenStore, chunk: int) -> int:
    return min(tokens.chunk_size, len(tokens) - chunk * tokens.chunk_size)
