"""Where a step's time goes: `torch.profiler` over a number of calls, summarised per call.

`profile_calls(run, calls, device)` profiles `calls` back-to-back calls of `run` (already warmed up)
and returns a `CallProfile`: on CUDA the kernels by device time, the kernel launches and host
synchronisations per call and the peak memory; on the CPU the operators by their own CPU time (a
dry run of the same report). `report()` is the text bench fit writes; the raw trace can be saved
for chrome://tracing or Perfetto.

Counting, from the profiler's events:
- kernels: events the profiler puts on the device (kernels, memcpy and memset), each one execution;
  a CUDA graph's replay shows its kernels too, behind one `cudaGraphLaunch`;
- launches: the host's launch calls (`cudaLaunchKernel*`, `cuLaunchKernel*` for Triton,
  `cudaGraphLaunch`);
- host syncs: the runtime calls that wait for the device (`cudaStreamSynchronize`,
  `cudaDeviceSynchronize`, `cudaEventSynchronize`, blocking `cudaMemcpy`), and separately the
  operators that read a device value back (`aten::_local_scalar_dense`: `.item()`, `bool()`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
READ_BACK_OP = "aten::_local_scalar_dense"
TOP = 25


@dataclass
class CallProfile:
    """Per-call figures of a profiled run of `calls` calls."""

    calls: int
    device: str
    top: list[tuple[str, int, float]]  # (name, executions, microseconds), summed over the calls
    busy_us: float  # device (CUDA) or self CPU time of everything counted in `top`'s universe
    launches: int = 0
    syncs: int = 0
    read_backs: int = 0
    peak_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    def report(self, title: str) -> str:
        per = self.calls
        what = "kernels by device time" if self.device == "cuda" else "operators by self CPU time"
        lines = [f"profile: {title}, {per} calls on {self.device}",
                 f"  per call: {self.busy_us / per / 1000:.3f} ms {'of kernels' if self.device == 'cuda' else 'of CPU time'}, "
                 f"{self.launches / per:.1f} launches, {self.syncs / per:.2f} host syncs, "
                 f"{self.read_backs / per:.2f} read-backs (.item()/bool())"
                 + (f"; peak memory {self.peak_gib:.2f} GiB" if self.peak_gib is not None else ""),
                 f"  top {len(self.top)} {what} (per call: count, ms, share):"]
        for name, count, micros in self.top:
            share = micros / self.busy_us if self.busy_us else 0.0
            lines.append(f"    {count / per:>7.1f} {micros / per / 1000:>9.4f} {share:>6.1%}  {name[:110]}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def profile_calls(run: Callable[[], object], calls: int, device: torch.device, *,
                  trace: Path | None = None) -> CallProfile:
    """Profile `calls` calls of `run` (warm it up first); save the chrome trace to `trace` when given
    (a `.json.gz` name is compressed)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return _summary(prof.events(), calls, device)


def _summary(events, calls: int, device: torch.device) -> CallProfile:
    cuda = device.type == "cuda"
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    counts = collections.Counter()
    for event in events:
        counts[event.name] += 1
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device == cuda:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time_total if on_device else event.self_cpu_time_total
    top = sorted(((name, count, micros) for name, (count, micros) in totals.items()), key=lambda t: -t[2])
    result = CallProfile(calls=calls, device=device.type, top=top[:TOP], busy_us=sum(t[2] for t in top),
                         launches=sum(counts[name] for name in LAUNCH_CALLS),
                         syncs=sum(counts[name] for name in SYNC_CALLS), read_backs=counts[READ_BACK_OP])
    if cuda:
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        result.notes.append("on the CPU there are no kernels, launches or device syncs: this is the report's dry run")
    return result
