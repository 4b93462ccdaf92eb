"""What the `bench` commands share: the reference search they compare with, and the timers.

Timing uses the standard tools, never a hand-made loop: `triton.testing.do_bench` for single
operations on CUDA (CUDA events, warm-up, the L2 cache flushed before every run), and
`torch.utils.benchmark.Timer` elsewhere and for a fixed number of runs (it synchronises the
device around the runs). Timer runs on this process's torch thread count, not its default of one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.benchmark import Timer

# do_bench repeats for this long (its default is 100 ms): even the slowest reference search
# (about 0.1 s a call on one H100) then gets about ten samples for its median.
CUDA_REPEAT_MS = 1000
# Timer repeats for at least this long on the CPU, where bench figures are smoke tests of the code.
CPU_MIN_RUN_TIME_S = 0.1


def reference_search(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes the way the ReVQ paper's public code finds them: `torch.cdist` then `min` per
    group, under `torch.vmap` two groups at a time.

    x (G, M, d) and codebooks (G, K, d) -> indices (G, M) and L2 distances (G, M), not squared.
    """

    def one_group(queries: torch.Tensor, codes: torch.Tensor):
        return torch.cdist(queries, codes).min(dim=-1)

    distances, indices = torch.vmap(one_group, chunk_size=2)(x, codebooks)
    return indices, distances


def _timer(run: Callable[[], object]) -> Timer:
    return Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())


def seconds_per_call(run: Callable[[], object], device: torch.device, *, cuda_repeat_ms: int = CUDA_REPEAT_MS) -> float:
    """Median seconds of one call of `run` on `device`, after a warm-up call (compilation, autotuning);
    on CUDA do_bench repeats it for `cuda_repeat_ms`."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # a CUDA build without Triton: the Timer below serves
            pass
        else:
            with torch.cuda.device(device):  # its events time the current device
                return do_bench(run, rep=cuda_repeat_ms, return_mode="median") / 1e3
    run()
    return _timer(run).blocked_autorange(min_run_time=CPU_MIN_RUN_TIME_S).median


def mean_seconds(run: Callable[[], object], runs: int) -> float:
    """Mean seconds per call over `runs` back-to-back timed calls, for work whose count matters
    (training steps, batches). Timer first makes max(runs // 100, 2) untimed warm-up calls, which
    cover compilation and the allocator's first requests."""
    return _timer(run).timeit(runs).mean
