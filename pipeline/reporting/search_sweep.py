"""`bench search --candidates`: every candidate launch configuration of the search kernels timed
and checked in one run, what autotuning should choose from (stages/bench/search.py reports it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from revq_pipe.pipeline.reporting.benchmarking import seconds_per_call

log = logging.getLogger(__name__)

# Repetitions per candidate launch of the sweep: 20 to 40 candidates per shape.
SWEEP_REPEAT_MS = 200


@dataclass
class CandidateTiming:
    """One launch configuration of a method's kernels and its median time (NaN and `error` if it
    failed)."""

    method: str
    config: Any  # a triton.Config
    programs_per_sm: int
    seconds: float = float("nan")
    equal: bool = False
    error: str = ""

    def describe(self) -> str:
        c = self.config
        return (f"{self.method:<6} {c.kwargs['BLOCK_M']:>7} {c.kwargs['BLOCK_K']:>7} {c.num_warps:>5} {c.num_stages:>6} "
                f"{self.programs_per_sm:>8}")


# The kernel each method's candidate tiles are sized for.
SWEPT_KERNELS = {"exact": "exact_search_kernel", "screen": "screen_kernel"}


def sweep_candidates(x: torch.Tensor, codebooks: torch.Tensor, expected: torch.Tensor) -> list[CandidateTiming]:
    """Time every candidate tile of each method's kernel (triton_search.candidate_configs), then the
    fastest with each candidate number of programs per multiprocessor (the K split), and check each
    one's indices against `expected`. A launch that fails (too many registers, say) is reported."""
    from revq_pipe.kernels.triton_search import (CANDIDATE_PROGRAMS_PER_SM, PROGRAMS_PER_SM, candidate_configs,
                                                 nearest_code_triton)

    cuda = x.device.type == "cuda"  # else Triton's interpreter: a dry run of the sweep
    multiprocessors = torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else 1

    def measure(method: str, config, programs_per_sm: int) -> CandidateTiming:
        timing = CandidateTiming(method, config, programs_per_sm)

        def run() -> torch.Tensor:
            return nearest_code_triton(x, codebooks, method=method, config=config,
                                       target_programs=programs_per_sm * multiprocessors)[0]

        try:
            timing.equal = torch.equal(run(), expected)
            timing.seconds = seconds_per_call(run, x.device, cuda_repeat_ms=SWEEP_REPEAT_MS)
        except Exception as err:  # a sweep reports a launch that cannot run and goes on with the others
            timing.error = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
        log.info(f"candidate {timing.describe()}: {timing.error or f'{timing.seconds * 1e3:.4g} ms'}")
        return timing

    timings = [measure(method, config, PROGRAMS_PER_SM) for method, kernel in SWEPT_KERNELS.items()
               for config in candidate_configs(x.shape[2], kernel)]
    fastest = min((t for t in timings if not t.error), key=lambda t: t.seconds, default=None)
    if fastest is not None:
        timings += [measure(fastest.method, fastest.config, n) for n in CANDIDATE_PROGRAMS_PER_SM if n != PROGRAMS_PER_SM]
    return timings
