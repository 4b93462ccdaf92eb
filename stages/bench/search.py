"""`revq-pipe bench search`: the nearest-code search beside the reference way, on the same inputs.

One process, one set of random standardised inputs (like preprocessed latents and codes), these
measurements:
- this project's `nearest_code` (on CUDA the Triton exact kernel on every pair, checking the inputs
  for NaN/inf as it reads them; on CPU the bounded torch path), and on CUDA also the same kernel
  without the check and the Triton screen method with it (screen + exact re-run): what
  `nearest_code` would take with either method as its default;
- the paper's public code's way: ``torch.vmap(cdist + min, chunk_size=2)`` over groups;
- ``baddbmm`` (|c|^2 - 2 x.c) + ``argmin``, in chunks of groups so the distance block fits;
- an fp32 SGEMM, to measure the device's FP32 FMA rate.

Speeds are Gpairs/s with pairs = G*M*K. The FMA bound is SGEMM FLOP/s over 2(d+2) FLOP per pair
(d multiply-adds, the code norm and the comparison): about 2,500 Gpairs/s at d=8 on one H100,
whose fp32 SGEMM this project measured at 51.6 TFLOP/s (51.6e12 / 20, on 2026-11-22). Times are
medians from `triton.testing.do_bench` on CUDA and `torch.utils.benchmark.Timer` on the CPU
(`pipeline.reporting.benchmarking`). In their sm_90 builds the screen costs about d+5.5 and the exact kernel about 2d+3.5
FP32-pipe instructions per pair; at one instruction per FMA slot those are their own ceilings,
printed too.

`candidates` (CUDA; under Triton's interpreter on the CPU, a dry run) adds a sweep of both
methods' launch configurations: every candidate tile (`triton_search.candidate_configs`: rows per
thread around the most that fit the registers, 4 or 8 warps, 1 or 3 pipelining stages), then the
fastest with fewer or more programs per multiprocessor (K split into fewer or more ranges), each
checked against the answer above: what autotuning should choose from, in one run.

Agreement: on up to EXACT_CHECK_GROUPS groups, the answer is compared with the exact torch path
(identical indices, distances within 1e-5). The two baselines use the expanded formula and may
pick a different code where two codes' distances differ by less than its rounding: every such
query is re-scored with the exact direct fp32 distance, and the kernel's code must be at least as
close as the baseline's.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import torch

from revq_pipe.kernels import nearest_code
from revq_pipe.kernels.nearest_code import implementation_for, nearest_code_torch
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError
from revq_pipe.pipeline.reporting.bench_options import SearchShape, parse_shape
from revq_pipe.pipeline.reporting.benchmarking import (baddbmm_search, compare_with_baseline, device_description,
                                                       exact_sq_dists, reference_search, seconds_per_call,
                                                       sgemm_flops)
from revq_pipe.pipeline.reporting.search_sweep import SWEEP_REPEAT_MS, CandidateTiming, sweep_candidates

log = logging.getLogger(__name__)

# On the CPU a shape past this many pairs would take minutes per method.
CPU_MAX_PAIRS = 1 << 28
EXACT_CHECK_GROUPS = 4


@dataclass
class Timing:
    name: str
    seconds: float


@dataclass
class BenchSearchResult:
    """Timings of the four methods on one shape and device, and whether they agree."""

    shape: SearchShape
    device: str
    implementation: str
    timings: list[Timing]
    sgemm_flops: float
    exact_check: str
    agreement: list[str] = field(default_factory=list)
    all_agree: bool = True
    date: str = ""
    candidates: list[CandidateTiming] = field(default_factory=list)

    def gpairs(self, name: str) -> float:
        seconds = next(t.seconds for t in self.timings if t.name == name)
        return self.shape.pairs / seconds / 1e9

    def report(self) -> str:
        """A table of Gpairs/s with the speed-up over the reference way and the FMA-bound fraction."""
        d = self.shape.dim
        fma_bound = self.sgemm_flops / (2 * (d + 2)) / 1e9
        screen_bound = self.sgemm_flops / 2 / (d + 5.5) / 1e9
        exact_bound = self.sgemm_flops / 2 / (2 * d + 3.5) / 1e9
        reference = self.gpairs(REFERENCE)
        lines = [
            f"bench search: {self.shape.label} (G={self.shape.groups}, M={self.shape.queries}, "
            f"K={self.shape.codes}, d={d}; {self.shape.pairs / 1e9:.3g} Gpairs) on {self.device}, {self.date}",
            f"  {'method':<34} {'ms':>10} {'Gpairs/s':>10} {'vs ref':>8} {'of FMA bound':>13}",
        ]
        for timing in self.timings:
            rate = self.gpairs(timing.name)
            lines.append(
                f"  {timing.name:<34} {timing.seconds * 1e3:>10.4g} {rate:>10.4g} {rate / reference:>7.3g}x "
                f"{rate / fma_bound:>12.1%}"
            )
        sgemm_line = (
            f"  fp32 SGEMM: {self.sgemm_flops / 1e12:.3g} TFLOP/s -> FMA bound {fma_bound:.4g} Gpairs/s (2(d+2) FLOP/pair)"
        )
        if self.implementation.startswith("Triton"):
            sgemm_line += f"; Triton kernels' instruction bounds: screen {screen_bound:.4g}, exact {exact_bound:.4g} Gpairs/s"
        lines += [
            sgemm_line,
            f"  nearest_code ran: {self.implementation}",
            f"  exact check: {self.exact_check}",
            *[f"  {line}" for line in self.agreement],
            "  all agree: " + ("yes" if self.all_agree else "NO"),
        ]
        if self.candidates:
            lines += self._candidate_lines(fma_bound)
        return "\n".join(lines)

    def _candidate_lines(self, fma_bound: float) -> list[str]:
        lines = [f"  candidate launches (no NaN/inf check; {SWEEP_REPEAT_MS} ms of repetitions each), fastest first:",
                 f"    {'method':<6} {'BLOCK_M':>7} {'BLOCK_K':>7} {'warps':>5} {'stages':>6} {'progs/SM':>8} {'ms':>9} "
                 f"{'Gpairs/s':>9} {'of FMA bound':>12}  indices"]
        for c in sorted(self.candidates, key=lambda c: (c.seconds != c.seconds, c.seconds)):
            if c.error:
                lines.append(f"    {c.describe()} failed: {c.error}")
                continue
            rate = self.shape.pairs / c.seconds / 1e9
            lines.append(f"    {c.describe()} {c.seconds * 1e3:>9.4g} {rate:>9.4g} {rate / fma_bound:>11.1%}  "
                         + ("equal" if c.equal else "DIFFERENT"))
        return lines


OURS = "nearest_code (this project)"
OURS_UNCHECKED = "exact kernel, no NaN/inf check"
OURS_SCREEN = "Triton screen method, NaN/inf checked"
REFERENCE = "reference: vmap(cdist+min, chunk=2)"
BADDBMM = "baddbmm + argmin"


def check_answers(x: torch.Tensor, codebooks: torch.Tensor, outputs: dict[str, torch.Tensor]) -> tuple[str, list[str], bool]:
    """The exact check of the project's answers (identical to the exact torch path on up to
    EXACT_CHECK_GROUPS groups), each other answer against nearest_code's, and whether all hold."""
    checked = min(x.shape[0], EXACT_CHECK_GROUPS)
    exact_indices, exact_dists = nearest_code_torch(x[:checked], codebooks[:checked])
    exact_ok = True
    for name in (OURS, OURS_UNCHECKED, OURS_SCREEN):
        if name in outputs:
            dists = exact_sq_dists(x[:checked], codebooks[:checked], outputs[name][:checked])
            exact_ok &= torch.equal(outputs[name][:checked], exact_indices)
            exact_ok &= torch.allclose(dists, exact_dists, rtol=1e-5, atol=0.0)
    exact_check = (f"{'identical' if exact_ok else 'DIFFERENT'} indices to the exact torch path on {checked} groups "
                   f"({checked * x.shape[1]} queries)")
    agreement, all_agree = [], exact_ok
    for name in (OURS_UNCHECKED, OURS_SCREEN, REFERENCE, BADDBMM):
        if name in outputs:
            line, ok = compare_with_baseline(name, x, codebooks, outputs[OURS], outputs[name])
            agreement.append(line)
            all_agree = all_agree and ok
    return exact_check, agreement, all_agree


def bench_search(shape: str, device: str = "auto", candidates: bool = False) -> BenchSearchResult:
    """Time the kernel, the reference way, baddbmm+argmin and an SGEMM on one random input set; on
    CUDA also the exact kernel without its NaN/inf check and, with `candidates`, the candidate
    launch configurations of the exact kernel (`sweep_candidates`)."""
    spec = parse_shape(shape)
    dev = resolve_device(device)
    if dev.type == "cpu" and spec.pairs > CPU_MAX_PAIRS:
        raise UserError(
            f"{spec.label} is {spec.pairs:.3g} pairs: minutes per method on the CPU; "
            "pass a small `shape` G,M,K,d (e.g. 8,64,4096,8) or run on CUDA"
        )
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(spec.groups, spec.queries, spec.dim, generator=gen, device=dev)
    codebooks = torch.randn(spec.groups, spec.codes, spec.dim, generator=gen, device=dev)
    code_sqnorms = codebooks.square().sum(-1)

    outputs: dict[str, torch.Tensor] = {}

    def ours() -> None:
        outputs[OURS] = nearest_code(x, codebooks)[0]

    def ours_screen() -> None:
        from revq_pipe.kernels.triton_search import nearest_code_triton

        outputs[OURS_SCREEN] = nearest_code_triton(x, codebooks, method="screen", check_finite=True)[0]

    def reference() -> None:
        outputs[REFERENCE] = reference_search(x, codebooks)[0]

    def baddbmm() -> None:
        outputs[BADDBMM] = baddbmm_search(x, codebooks, code_sqnorms)

    def ours_unchecked() -> None:
        outputs[OURS_UNCHECKED] = nearest_code(x, codebooks, check_finite=False)[0]

    methods = [(OURS, ours), (REFERENCE, reference), (BADDBMM, baddbmm)]
    if implementation_for(x) == "triton":
        methods[1:1] = [(OURS_UNCHECKED, ours_unchecked), (OURS_SCREEN, ours_screen)]
    timings = []
    for name, run in methods:
        timings.append(Timing(name, seconds_per_call(run, dev)))
        log.info(f"bench search {spec.label}, {name}: {timings[-1].seconds * 1e3:.4g} ms")  # a cut-short run keeps it
    sgemm = sgemm_flops(dev)

    exact_check, agreement, all_agree = check_answers(x, codebooks, outputs)

    device_name = device_description(dev)
    on_triton = implementation_for(x) == "triton"
    if on_triton:
        from revq_pipe.kernels.triton_search import autotuned_config

        implementation = f"Triton kernels ({autotuned_config() or 'interpreted'})"
    else:
        implementation = "matmul-screened exact torch path (CPU)"
    return BenchSearchResult(
        shape=spec,
        device=device_name,
        implementation=implementation,
        timings=timings,
        sgemm_flops=sgemm,
        exact_check=exact_check,
        agreement=agreement,
        all_agree=all_agree,
        date=datetime.date.today().isoformat(),
        candidates=sweep_candidates(x, codebooks, outputs[OURS]) if candidates and on_triton else [],
    )
