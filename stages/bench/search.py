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
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from revq_pipe.kernels import nearest_code
from revq_pipe.kernels.nearest_code import implementation_for, nearest_code_torch
from revq_pipe.pipeline.reporting.benchmarking import reference_search, seconds_per_call
from revq_pipe.pipeline.model.config import PRESETS
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.errors import UserError

log = logging.getLogger(__name__)

# The paper's VAE (DC-AE f32c32 at 256 px) gives 32*8*8 numbers per image: T = that / d groups.
LATENT_NUMBERS = 32 * 8 * 8
BENCH_PRESETS = ("512T_NC=16384", "256T_NC=65536", "256T_NC=262144")
# On the CPU a shape past this many pairs would take minutes per method.
CPU_MAX_PAIRS = 1 << 28
# baddbmm's distance block per chunk of groups, in elements (4 GiB of fp32).
BADDBMM_BLOCK = 1 << 30
EXACT_CHECK_GROUPS = 4
# Repetitions per candidate launch of the sweep: 20 to 40 candidates per shape.
SWEEP_REPEAT_MS = 200


@dataclass(frozen=True)
class SearchShape:
    """G groups of M queries, each group searching its own K codes of dimension d."""

    groups: int
    queries: int
    codes: int
    dim: int
    label: str

    @property
    def pairs(self) -> int:
        return self.groups * self.queries * self.codes


def parse_shape(shape: str) -> SearchShape:
    """A paper preset name (at its training batch size) or an explicit ``G,M,K,d``."""
    if shape in BENCH_PRESETS:
        preset = PRESETS[shape]
        dim = preset["dim"]
        return SearchShape(LATENT_NUMBERS // dim, preset["batch_size"], preset["codes"], dim, shape)
    parts = shape.split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise UserError(f"`shape` must be one of {', '.join(BENCH_PRESETS)} or G,M,K,d with positive integers, got {shape!r}")
    groups, queries, codes, dim = values
    if dim > 64:
        raise UserError(f"`shape` d must be at most 64, got {dim}")
    return SearchShape(groups, queries, codes, dim, f"G={groups},M={queries},K={codes},d={dim}")


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
    candidates: list["CandidateTiming"] = field(default_factory=list)

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


OURS = "nearest_code (this project)"
OURS_UNCHECKED = "exact kernel, no NaN/inf check"
OURS_SCREEN = "Triton screen method, NaN/inf checked"
REFERENCE = "reference: vmap(cdist+min, chunk=2)"
BADDBMM = "baddbmm + argmin"


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


def _sgemm_flops(device: torch.device) -> float:
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


def _exact_sq_dists(x: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
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
    ours_dist = _exact_sq_dists(x, codebooks, ours)[differ]
    their_dist = _exact_sq_dists(x, codebooks, theirs)[differ]
    farther = int((ours_dist > their_dist).sum())
    if farther:
        return f"{name}: {count} indices differ and at {farther} the kernel's code is FARTHER in exact fp32", False
    return (
        f"{name}: {count} of {ours.numel()} indices differ; at each the kernel's code is at least as "
        "close in exact fp32 (the baseline's expanded formula rounds)",
        True,
    )


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


def check_answers(x: torch.Tensor, codebooks: torch.Tensor, outputs: dict[str, torch.Tensor]) -> tuple[str, list[str], bool]:
    """The exact check of the project's answers (identical to the exact torch path on up to
    EXACT_CHECK_GROUPS groups), each other answer against nearest_code's, and whether all hold."""
    checked = min(x.shape[0], EXACT_CHECK_GROUPS)
    exact_indices, exact_dists = nearest_code_torch(x[:checked], codebooks[:checked])
    exact_ok = True
    for name in (OURS, OURS_UNCHECKED, OURS_SCREEN):
        if name in outputs:
            dists = _exact_sq_dists(x[:checked], codebooks[:checked], outputs[name][:checked])
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
    sgemm = _sgemm_flops(dev)

    exact_check, agreement, all_agree = check_answers(x, codebooks, outputs)

    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
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
