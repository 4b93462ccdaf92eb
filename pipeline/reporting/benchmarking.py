"""What the `bench` commands share: the baseline searches they compare with (the reference's
vmap(cdist), baddbmm + argmin), the check of an answer against them, an SGEMM rate, and the timers.

Timing uses the standard tools, never a hand-made loop: `triton.testing.do_bench` for single
operations on CUDA (CUDA events, warm-up, the L2 cache flushed before every run), and
`torch.utils.benchmark.Timer` elsewhere and for a fixed number of runs (it synchronises the
device around the runs). Timer runs on this process's torch thread count, not its default of one.
"""

from __future__ import annotations

import platform
from typing import Callable

import torch
from torch.utils.benchmark import Timer

# do_bench repeats for this long (its default is 100 ms): even the slowest reference search
# (about 0.1 s a call on one H100) then gets about ten samples for its median.
CUDA_REPEAT_MS = 1000
# Timer repeats for at least this long on the CPU, where bench figures are smoke tests of the code.
CPU_MIN_RUN_TIME_S = 0.1
# baddbmm's distance block per chunk of groups, in elements (4 GiB of fp32).
BADDBMM_BLOCK = 1 << 30


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


def baddbmm_search(x: torch.Tensor, codebooks: torch.Tensor, code_sqnorms: torch.Tensor) -> torch.Tensor:
    """|c|^2 - 2 x.c with one baddbmm per chunk of groups, then argmin (|x|^2 does not change it)."""
    groups, queries, _ = x.shape
    codes = codebooks.shape[1]
    chunk = max(1, BADDBMM_BLOCK // (queries * codes))
    parts = []
    for g0 in range(0, groups, chunk):
        g1 = min(g0 + chunk, groups)
        scores = torch.baddbmm(code_sqnorms[g0:g1, None, :], x[g0:g1], codebooks[g0:g1].transpose(1, 2), alpha=-2.0)
        parts.append(scores.argmin(dim=-1))
    return torch.cat(parts)


def sgemm_flops(device: torch.device) -> float:
    """Measured fp32 matrix-product FLOP/s, TF32 off (the FP32 FMA rate)."""
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seconds = seconds_per_call(lambda: torch.mm(a, b), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return 2 * size**3 / seconds


def exact_sq_dists(x: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Direct fp32 squared distance of every query to the code it was given, summed over d in order."""
    chosen = torch.gather(codebooks, 1, indices[..., None].expand(-1, -1, codebooks.shape[2]))
    diff = x - chosen
    total = diff[..., 0] * diff[..., 0]
    for j in range(1, x.shape[2]):
        total = total + diff[..., j] * diff[..., j]
    return total


def compare_with_baseline(
    name: str, x: torch.Tensor, codebooks: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor
) -> tuple[str, bool]:
    """How many queries a baseline answered differently, and whether ours is never the farther."""
    differ = ours != theirs
    count = int(differ.sum())
    if count == 0:
        return f"{name}: all {ours.numel()} indices equal", True
    ours_dist = exact_sq_dists(x, codebooks, ours)[differ]
    their_dist = exact_sq_dists(x, codebooks, theirs)[differ]
    farther = int((ours_dist > their_dist).sum())
    if farther:
        return f"{name}: {count} indices differ and at {farther} the kernel's code is FARTHER in exact fp32", False
    return (
        f"{name}: {count} of {ours.numel()} indices differ; at each the kernel's code is at least as "
        "close in exact fp32 (the baseline's expanded formula rounds)",
        True,
    )


def device_description(device: torch.device) -> str:
    """The device a bench ran on, in words: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()} x{threads} threads (torch {torch.__version__})"
